"""LoRA (`[model.lora]`) against PEFT, and in training.

- Adapters compute what PEFT computes: gradflow's adapter export loaded by
  `peft.PeftModel.from_pretrained` and the merged `save_hf` export give gradflow's logits
  (Qwen2 with q/k/v biases and an untied head, Qwen3 with q/k norms and a tied head); an adapter
  written by `peft` itself loads with PEFT's logits; the sampler decodes with them as the forward
  pass computes them (factored), and as the merged model does.
- Dropout acts on the adapters' inputs of the training objective only.
- A step trains the adapters only: the base stays bit-identical, the optimizer holds adapter
  moments only, the reference is the base (no copy) — for every algorithm, on a mesh too.
- A run exports `adapter/` and `hf/`, checkpoints adapters without the base, resumes
  bit-identically and refuses another base; `model.init = "random"` trains too.
- Bad input: rank ≤ 0, a target matching no module, an adapter of another shape, an adapter on
  random weights, a dropout outside [0, 1).
"""

import json
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from hf_parity import (
    QWEN3_TIED,
    TINY,
    assert_logits_close,
    gf_logits,
    hf_logits,
    left_padded_prompts,
    write_checkpoint,
)
from safetensors.numpy import load_file, save_file

from gradflow import algorithms
from gradflow.batch import Prompts
from gradflow.checkpoint import STATE_FILE, list_checkpoints
from gradflow.config import ConfigError, MeshConfig, load_config
from gradflow.models import (
    CheckpointError,
    LoraAdapters,
    init_from_config,
    load_hf,
    lora_policy,
    save_hf,
    save_peft,
)
from gradflow.rollout import generate
from gradflow.sharding import make_mesh, shard_prompts, shard_state
from gradflow.state import init_state
from gradflow.step import step
from gradflow.train import load_policy, train

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "src" / "gradflow" / "assets" / "toy-arith"
MODELS = {
    "qwen2": (
        transformers.Qwen2ForCausalLM,
        transformers.Qwen2Config(
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            **TINY,
        ),
    ),
    "qwen3": QWEN3_TIED,
}
TINY_RUN = (
    "train.steps=2",
    "train.prompts_per_step=4",
    "algorithm.group_size=2",
    "algorithm.max_new_tokens=16",
    "eval.size=8",
    "eval.every=0",
    "task.train_size=64",
    "task.test_size=8",
    "logging.progress=false",
    "logging.wandb=disabled",
    "logging.samples_every=0",
    "checkpoint.every=1",
    "checkpoint.keep=5",
)


def _randomised(model, key, scale=0.3):
    """`model` with every adapter matrix drawn at random (a fresh `B = 0` would make any
    comparison trivial)."""
    lora = model.lora
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(key, len(leaves))
    drawn = [
        scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    return model.replace_adapters(jax.tree.unflatten(treedef, drawn))


@pytest.fixture(scope="module", params=sorted(MODELS))
def base(request, tmp_path_factory):
    model_class, config = MODELS[request.param]
    return write_checkpoint(model_class, config, tmp_path_factory.mktemp(request.param), seed=0)


def _peft_model(path: Path, adapter: Path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    return peft.PeftModel.from_pretrained(hf, adapter).eval()


def test_exported_adapter_and_merged_model_give_gradflows_logits(base, tmp_path):
    ids, mask = left_padded_prompts()
    targets = ["q_proj", "v_proj", "o_proj", "down_proj", "gate_proj"]
    policy = _randomised(
        lora_policy(base.model, rank=4, alpha=8.0, targets=targets, key=jax.random.key(0)),
        jax.random.key(1),
    )
    ours = gf_logits(policy, ids, mask)
    real = mask == 1
    # The adapters change the logits (else the comparisons below prove nothing).
    assert np.abs(ours - gf_logits(policy.adapters_off(), ids, mask))[real].max() > 0.1
    save_peft(policy, tmp_path / "adapter", base_model=str(base.path))
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["r"] == 4 and sorted(settings["target_modules"]) == sorted(targets)
    assert_logits_close(
        ours[real], hf_logits(_peft_model(base.path, tmp_path / "adapter"), ids, mask)[real]
    )
    save_hf(policy, tmp_path / "hf")
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    assert_logits_close(ours[real], hf_logits(merged, ids, mask)[real])


def test_adapter_written_by_peft_loads_with_peft_logits(base, tmp_path):
    ids, mask = left_padded_prompts()
    hf = transformers.AutoModelForCausalLM.from_pretrained(base.path, attn_implementation="eager")
    torch.manual_seed(0)
    settings = peft.LoraConfig(
        r=4, lora_alpha=12, target_modules="all-linear", init_lora_weights=False
    )
    peft_model = peft.get_peft_model(hf, settings).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    expected = hf_logits(peft_model, ids, mask)
    policy = lora_policy(
        base.model,
        rank=4,
        alpha=12,
        targets="all-linear",
        adapter=tmp_path / "peft",
        key=jax.random.key(0),
    )
    real = mask == 1
    assert_logits_close(gf_logits(policy, ids, mask)[real], expected[real])
    assert np.abs(expected - hf_logits(base.hf, ids, mask))[real].max() > 0.1  # not the base


def test_sampler_decodes_with_the_adapters():
    model = load_hf(TOY)
    policy = _randomised(model.with_lora(4, 8, key=jax.random.key(0)), jax.random.key(1), 0.5)
    ids = jnp.asarray([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]], jnp.int32)
    mask = ids > 0
    out = generate(policy, ids, mask, key=jax.random.key(2), max_new_tokens=8, temperature=0.0)
    merged = generate(
        policy.merge_adapters(), ids, mask, key=jax.random.key(2), max_new_tokens=8, temperature=0.0
    )
    base = generate(model, ids, mask, key=jax.random.key(2), max_new_tokens=8, temperature=0.0)
    np.testing.assert_array_equal(out.tokens, merged.tokens)
    # The merged weights round W + s·BA to float32 once; the factored sampler adds s·(xAᵀ)Bᵀ to
    # xWᵀ: the same values summed in another order, a few float32 ulps apart per projection, and
    # ~50 ulps on log-probs near 2 after 4 layers (1.2e-5 on an AVX2 CPU): 1e-4 relative.
    np.testing.assert_allclose(out.logprobs, merged.logprobs, rtol=1e-4, atol=1e-6)
    assert (np.asarray(out.tokens) != np.asarray(base.tokens)).any()
    # The sampler's log-probs are those of the factored forward pass.
    full = jnp.concatenate([ids, out.tokens], axis=1)
    logits = policy(full, jnp.concatenate([mask, out.mask], axis=1))[:, 4:-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, out.tokens[:, :, None], axis=-1)[:, :, 0]
    np.testing.assert_allclose(np.where(out.mask, picked, 0.0), out.logprobs, atol=1e-4)


def test_dropout_drops_adapter_inputs_in_the_objective_only(tmp_path):
    model = load_hf(TOY)
    ids = jnp.asarray([[3, 4, 5, 6, 7]], jnp.int32)
    mask = jnp.ones_like(ids, bool)
    fresh = model.with_lora(4, 8, dropout=0.5, key=jax.random.key(0))
    # B = 0: the adapters add nothing, dropped or not.
    np.testing.assert_array_equal(
        fresh.with_dropout(jax.random.key(1))(ids, mask), model(ids, mask)
    )
    policy = _randomised(fresh, jax.random.key(1))
    plain = np.asarray(policy(ids, mask))
    first = np.asarray(policy.with_dropout(jax.random.key(2))(ids, mask))
    np.testing.assert_array_equal(first, policy.with_dropout(jax.random.key(2))(ids, mask))
    assert np.abs(first - plain).max() > 1e-3
    assert (
        np.abs(first - np.asarray(policy.with_dropout(jax.random.key(3))(ids, mask))).max() > 1e-3
    )
    # Without a key (log-probs before the update, the reference, the sampler) nothing is dropped;
    # nor with a rate of 0.
    no_dropout = _randomised(model.with_lora(4, 8, key=jax.random.key(0)), jax.random.key(1))
    np.testing.assert_array_equal(no_dropout.with_dropout(jax.random.key(2))(ids, mask), plain)
    save_peft(policy, tmp_path / "adapter")
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["lora_dropout"] == 0.5
    # A step trains with it: the same step without dropout updates the adapters differently.
    algorithm = _algorithm("grpo")
    trained = []
    for rate in (0.3, 0.0):
        policy = init_from_config(SHAPE, key=jax.random.key(0))
        policy = _randomised(
            policy.with_lora(4, 8, dropout=rate, key=jax.random.key(3)), jax.random.key(4)
        )
        state, metrics = step(
            algorithm,
            init_state(algorithm, policy, key=jax.random.key(1)),
            _prompts(),
            jax.random.key(0),
        )
        assert float(metrics["update/skipped"]) == 0.0
        trained.append(np.asarray(state.policy.lora.q_proj.a))
    assert np.abs(trained[0] - trained[1]).max() > 1e-6


# ---------------------------------------------------------------------------------------------
# Training.

SHAPE = load_hf(TOY).config


def _reward():
    from gradflow.stages import HostReward

    def thirds(tokens, mask, index):
        return np.stack([((tokens % 3 == 0) & mask).mean(axis=1)]).astype(np.float32)

    return HostReward(scorer=thirds, parts=("correct",), weights=(1.0,))


def _algorithm(name: str, **overrides):
    """A preset on `_reward`, with 2 completions of up to 6 tokens per prompt."""
    return algorithms.make(
        name,
        reward=_reward(),
        group_size=2,
        max_new_tokens=6,
        learning_rate=1e-2,
        eos_token_ids=(1,),
        **overrides,
    )


def _prompts():
    rng = np.random.default_rng(0)
    return Prompts(
        ids=jnp.asarray(rng.integers(2, 40, (4, 5)), jnp.int32),
        mask=jnp.ones((4, 5), bool),
        index=jnp.arange(4, dtype=jnp.int32),
    )


def _policy():
    return init_from_config(SHAPE, key=jax.random.key(0)).with_lora(4, 8, key=jax.random.key(3))


@pytest.mark.parametrize("name", algorithms.NAMES)
def test_a_step_trains_only_the_adapters(name):
    kl = {"kl_coef": 0.1} if "kl_coef" in algorithms.hyperparameters(name) else {}
    algorithm = _algorithm(name, **kl)
    base = jax.tree.map(np.asarray, eqx.filter(_policy().adapters_off(), eqx.is_array))
    state = init_state(algorithm, _policy(), key=jax.random.key(1))
    # Only the adapters have optimizer state; the reference is the base itself.
    moments = [x for x in jax.tree.leaves(state.policy_opt) if x.ndim > 0]
    assert moments and all(x.shape[-1] == 4 or x.shape[-2] == 4 for x in moments)
    if algorithm.loss.needs_reference:
        assert state.reference is None and state.reference_is_base
    a_before = np.asarray(state.policy.lora.q_proj.a)
    for i in range(2):
        state, metrics = step(algorithm, state, _prompts(), jax.random.key(7 + i))
    assert float(metrics["update/skipped"]) == 0.0
    after = jax.tree.map(np.asarray, eqx.filter(state.policy.adapters_off(), eqx.is_array))
    jax.tree.map(np.testing.assert_array_equal, after, base)  # frozen, bit for bit
    assert np.abs(np.asarray(state.policy.lora.q_proj.a) - a_before).max() > 1e-4
    assert np.abs(np.asarray(state.policy.lora.down_proj.b)).max() > 1e-4
    if algorithm.loss.needs_reference:
        assert float(metrics["loss/kl_ref"]) > 0.0  # the reference differs from the policy now


def test_lora_step_on_a_mesh_matches_one_device():
    algorithm = _algorithm("grpo", kl_coef=0.1, minibatches=2)
    results = []
    for sizes in ((1, 1, 1), (2, 2, 2)):
        mesh = make_mesh(MeshConfig(*sizes), jax.devices()[: int(np.prod(sizes))])
        state = shard_state(init_state(algorithm, _policy(), key=jax.random.key(1)), mesh)
        state, metrics = step(
            algorithm, state, shard_prompts(_prompts(), mesh), jax.random.key(7), mesh=mesh
        )
        results.append((state, metrics))
    (single, m1), (sharded, m8) = results
    assert sharded.policy.layers.q_proj.sharding.spec == jax.sharding.PartitionSpec(
        None, "tensor", "fsdp"
    )
    np.testing.assert_allclose(m8["loss/kl_ref"], m1["loss/kl_ref"], rtol=1e-4, atol=1e-9)
    for a, b in zip(
        jax.tree.leaves(single.policy.lora), jax.tree.leaves(sharded.policy.lora), strict=True
    ):
        # Adam's first steps are ±learning rate (1e-2); a gradient near Adam's eps moves by
        # ~1e-5 when the mesh packs and sums in another order.
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)


def _run_config(tmp_path, *extra):
    return load_config(
        ROOT / "configs" / "examples" / "lora.toml",
        [*TINY_RUN, f"run.output_dir={json.dumps(str(tmp_path))}", *extra],
    )


def test_run_exports_peft_adapter_and_merged_model_and_resumes_bit_identically(tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(TOY, base_dir)
    model = f"model.path={json.dumps(str(base_dir))}"
    whole, _ = train(_run_config(tmp_path / "whole", model, "checkpoint.every=0"))
    # The checkpoint holds the adapters, their optimizer state, the step and the key, no base.
    run_dir, _ = train(_run_config(tmp_path / "split", model, "train.steps=1"))
    names = load_file(str(list_checkpoints(run_dir / "checkpoints")[-1] / STATE_FILE))
    assert any(".lora." in n for n in names)
    assert not any(n.endswith((".q_proj", ".embed", ".down_proj")) for n in names), names
    train(_run_config(tmp_path / "split", model, "run.resume=true"))
    for file in ("adapter/adapter_model.safetensors", "hf/model.safetensors"):
        a, b = load_file(str(whole / file)), load_file(str(run_dir / file))
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # PEFT on the base, the merged export and gradflow's LoRA policy agree.
    ids, mask = left_padded_prompts(vocab=40)
    real = mask == 1
    config = _run_config(
        tmp_path / "load", model, f"model.lora.adapter={json.dumps(str(whole / 'adapter'))}"
    )
    ours = gf_logits(load_policy(config), ids, mask)
    assert np.abs(ours - gf_logits(load_hf(base_dir), ids, mask))[real].max() > 1e-4  # trained
    assert_logits_close(
        ours[real], hf_logits(_peft_model(base_dir, whole / "adapter"), ids, mask)[real]
    )
    merged = transformers.AutoModelForCausalLM.from_pretrained(whole / "hf").eval()
    assert_logits_close(ours[real], hf_logits(merged, ids, mask)[real])
    # Resuming on other base weights (same path) is refused.
    tensors = load_file(str(base_dir / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name] + np.float32(1e-3)
    save_file(tensors, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="fingerprint"):
        train(_run_config(tmp_path / "split", model, "run.resume=true", "train.steps=3"))


def test_lora_on_random_weights_trains():
    config = load_config(
        ROOT / "configs" / "examples" / "lora.toml",
        [
            'model.path=""',
            'model.init="random"',
            f"model.config={json.dumps(str(TOY / 'config.json'))}",
        ],
    )
    policy = load_policy(config)
    assert isinstance(policy.lora, LoraAdapters) and policy.lora.rank == config.model.lora.rank
    algorithm = _algorithm("grpo")
    state, _ = step(
        algorithm,
        init_state(algorithm, policy, key=jax.random.key(1)),
        _prompts(),
        jax.random.key(0),
    )
    assert np.abs(np.asarray(state.policy.lora.q_proj.b)).max() > 0


# ---------------------------------------------------------------------------------------------
# Bad input: one line each.


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.lora.rank=0"], r"model.lora.rank: must be >= 1, got 0"),
        (["model.lora.rank=-2"], r"model.lora.rank: must be >= 1, got -2"),
        (
            ['model.lora.targets=["q_proj", "qkv"]'],
            r"'qkv' matches no module; modules: q_proj, k_proj, v_proj, o_proj, gate_proj, "
            r"up_proj, down_proj",
        ),
        (['model.lora.targets="everything"'], r"neither \"all-linear\" nor a list"),
        (["model.lora.dropout=1.0"], r"model.lora.dropout: must be in \[0, 1\), got 1.0"),
        (["model.lora.ranks=8"], r"unknown key model.lora.ranks \(did you mean 'rank'\?\)"),
        (
            [
                'model.path=""',
                'model.init="random"',
                'model.config="gradflow:toy-arith"',
                'model.lora.adapter="somewhere"',
            ],
            r'model.lora.adapter was trained on a pretrained base, not on model.init = "random"',
        ),
    ],
)
def test_bad_lora_settings_are_one_line_errors(overrides, message, tmp_path):
    with pytest.raises((ConfigError, ValueError), match=message) as error:
        load_policy(_run_config(tmp_path, *overrides))
    assert "\n" not in str(error.value)


def test_adapter_of_another_base_shape_names_the_tensor(tmp_path):
    other = init_from_config(SHAPE.replace(intermediate_size=128), key=jax.random.key(0)).with_lora(
        32, 64, key=jax.random.key(1)
    )
    save_peft(other, tmp_path / "other")
    config = _run_config(
        tmp_path / "run", f"model.lora.adapter={json.dumps(str(tmp_path / 'other'))}"
    )
    with pytest.raises(
        CheckpointError,
        match=(
            r"tensor 'base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight' has shape "
            r"\(128, 32\), expected \(256, 32\)"
        ),
    ) as error:
        load_policy(config)
    assert "\n" not in str(error.value)
