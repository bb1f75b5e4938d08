"""`gradflow.xla_cpu`: importing gradflow keeps XLA:CPU's reductions out of YNNPACK fusions (the
LM head's entropy over the vocabulary is several times faster), and leaves a user's own choice."""

import os
import subprocess
import sys

ENTROPY_HLO = """
import gradflow
import jax, jax.numpy as jnp
from gradflow.logprobs import head_logprobs
from gradflow.models import init_from_config
config = dict(
    model_type="qwen2", vocab_size=1024, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
)
model = init_from_config(config, key=jax.random.key(0))
hidden = jnp.ones((8, 32, 16))
targets = jnp.zeros((8, 32), jnp.int32)
entropy = lambda h: head_logprobs(model, h, targets, chunk=32)[1]
text = jax.jit(entropy).lower(hidden).compile().as_text()
# The computations that hold a reduce, and the YNNPACK fusions that call one of them.
reducing, name = set(), None
for line in text.splitlines():
    if line.startswith("%"):
        name = line.split()[0]
    elif " reduce(" in line and name:
        reducing.add(name)
calls = [line.split("calls=")[1].split(",")[0] for line in text.splitlines() if "__ynn_fusion" in line]
print(sum(call in reducing for call in calls))
"""


def _reduce_fusions(xla_flags: str) -> int:
    env = dict(os.environ, XLA_FLAGS=xla_flags)
    out = subprocess.run(
        [sys.executable, "-c", ENTROPY_HLO], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def test_importing_gradflow_keeps_reductions_out_of_ynnpack_unless_the_user_chose():
    assert _reduce_fusions("") == 0
    # The user's own setting wins (here: YNNPACK's default list plus reductions), which is also
    # what shows the check above can fail.
    assert _reduce_fusions("--xla_cpu_experimental_ynn_fusion_type=+reduce") > 0
