"""Memory of training: full fine-tuning against LoRA, computed on the CPU without weights.

For each model shape the train state is built shape-only (`eqx.filter_eval_shape` of
`init_state`) and its bytes are counted by part: the parameters (with LoRA: the frozen base plus
the adapters), the optimizer state and the frozen reference (GRPO with `kl_coef > 0`; with LoRA
it is the base itself, so it costs nothing). Then one whole RL step (rollout + reward + update,
the state donated) is compiled for the CPU from abstract inputs and XLA's memory analysis gives
its peak: arguments + outputs − aliased (donated) buffers + temporaries. The CPU's buffer
assignment is not a GPU's, so the peak is an estimate; the state bytes are exact.

    python benchmarks/memory.py
    python benchmarks/memory.py --prompts 8 --group 8 --prompt-len 256 --new-tokens 512
"""

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gradflow.algorithms import make  # noqa: E402
from gradflow.batch import Prompts  # noqa: E402
from gradflow.models import Decoder, ModelConfig  # noqa: E402
from gradflow.stages import HostReward  # noqa: E402
from gradflow.state import init_state  # noqa: E402
from gradflow.step import _compiled_step  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "src" / "gradflow" / "assets"
QWEN3_4B = {  # Qwen/Qwen3-4B config.json (the fields that set shapes)
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
}
SHAPES = {
    "Qwen2.5-1.5B": ASSETS / "qwen2" / "qwen2-1.5b-instruct.config.json",
    "Qwen3-4B": QWEN3_4B,
}
GIB = 1024**3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", help="parameter and compute dtype")
    parser.add_argument("--remat", default="full")
    parser.add_argument("--kl-coef", type=float, default=0.04, help="> 0 keeps a reference")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser.parse_args(argv)


def _bytes(tree) -> int:
    leaves = [
        x for x in jax.tree.leaves(tree) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    ]
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)


def _policy(config: ModelConfig, args, lora: bool) -> Decoder:
    def build():
        model = Decoder.init(config, key=jax.random.key(0), dtype=jnp.dtype(args.dtype))
        model = dataclasses.replace(model, remat=args.remat)
        if lora:
            model = model.with_lora(args.rank, 2 * args.rank, key=jax.random.key(1))
        return model

    return eqx.filter_eval_shape(build)


def measure(name: str, config: ModelConfig, args, lora: bool) -> dict:
    """The state's bytes by part and the compiled step's peak for one shape and mode."""
    reward = HostReward(
        scorer=lambda tokens, mask, index: np.zeros((1, tokens.shape[0]), np.float32),
        parts=("correct",),
        weights=(1.0,),
    )
    algorithm = make(
        "grpo",
        reward=reward,
        group_size=args.group,
        max_new_tokens=args.new_tokens,
        kl_coef=args.kl_coef,
        micro_batches=args.micro_batches,
        eos_token_ids=(config.eos_token_id or 0,),
    )
    policy = _policy(config, args, lora)
    state = eqx.filter_eval_shape(init_state, algorithm, policy, key=jax.random.key(0))
    params = _bytes(state.policy)
    adapters = _bytes(state.policy.lora) if lora else 0
    optimizer = _bytes(state.policy_opt)
    reference = _bytes(state.reference) if state.reference is not None else 0
    prompts = Prompts(
        ids=jax.ShapeDtypeStruct((args.prompts, args.prompt_len), jnp.int32),
        mask=jax.ShapeDtypeStruct((args.prompts, args.prompt_len), jnp.bool_),
        index=jax.ShapeDtypeStruct((args.prompts,), jnp.int32),
    )
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

    def is_shape(x):
        return isinstance(x, jax.ShapeDtypeStruct)

    dynamic, static = eqx.partition(state, is_shape, is_leaf=is_shape)
    inputs_dynamic, inputs_static = eqx.partition((prompts, key), is_shape, is_leaf=is_shape)

    def run(dynamic, inputs_dynamic):
        prompts, key = eqx.combine(inputs_dynamic, inputs_static, is_leaf=is_shape)
        whole = eqx.combine(dynamic, static, is_leaf=is_shape)
        new_state, metrics = _compiled_step((algorithm, prompts, key, None), whole)
        return eqx.filter(new_state, eqx.is_array), metrics

    start = time.perf_counter()
    compiled = jax.jit(run, donate_argnums=0).lower(dynamic, inputs_dynamic).compile()
    stats = compiled.memory_analysis()
    peak = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )
    return {
        "model": name,
        "mode": f"LoRA r={args.rank}" if lora else "full FT",
        "params": params,
        "adapters": adapters,
        "optimizer": optimizer,
        "reference": reference,
        "state": _bytes(dynamic),
        "step_temp": stats.temp_size_in_bytes,
        "step_peak": peak,
        "compile_s": time.perf_counter() - start,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    print(
        f"GRPO step: {args.prompts} prompts x {args.group} samples, prompt {args.prompt_len} + "
        f"{args.new_tokens} new tokens, {args.micro_batches} micro-batches, {args.dtype} "
        f"params and compute, remat {args.remat}, kl_coef {args.kl_coef}, AdamW"
    )
    rows = []
    for name, source in SHAPES.items():
        config = ModelConfig.load(source)
        for lora in (False, True):
            rows.append(measure(name, config, args, lora))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        "| model | mode | params (GiB) | of which adapters (MiB) | optimizer (GiB) | "
        "reference (GiB) | train state (GiB) | step peak (GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['mode']} | {r['params'] / GIB:.2f} | "
            f"{r['adapters'] / 1024**2:.1f} | {r['optimizer'] / GIB:.3f} | "
            f"{r['reference'] / GIB:.2f} | {r['state'] / GIB:.2f} | {r['step_peak'] / GIB:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
