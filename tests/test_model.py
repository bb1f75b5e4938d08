"""The decoder, its checkpoint I/O and the sampler against HF transformers (torch, float32).

Three tiny random checkpoints are written by `save_pretrained` once per module:

- `qwen_tied`: Qwen2, GQA ratio 1, tied head, `rope_theta` 100, vocabulary 16 (also used for the
  statistical sampling tests).
- `qwen_gqa2`: Qwen2, GQA ratio 2, untied head.
- `llama_gqa3`: Llama, GQA ratio 3, untied head, no attention bias, explicit `head_dim` 16 (hidden /
  heads is 8) and llama3 RoPE scaling with `original_max_position_embeddings` 16.

Weights use `initializer_range` 0.3 and random norms/biases so logits are far from uniform and
every tensor matters. Few distinct shapes are used to keep the number of compilations small.
"""

import dataclasses
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from hf_parity import (
    NEW_TOKENS,
    PROMPT_LENGTHS,
    Checkpoint,
    assert_logits_close,
    check_completion_structure,
    check_greedy_matches_hf,
    check_logits_match_hf,
    check_save_hf_round_trip,
    completion_logits,
    completion_logprobs,
    gf_logits,
    hf_logits,
    left_padded_prompts,
    log_softmax,
    write_checkpoint,
)
from safetensors.numpy import load_file, save_file

from gradflow.models import CheckpointError, ModelConfig, load_hf, save_hf
from gradflow.rollout import filter_logits, generate


def hf_config(name: str) -> transformers.PretrainedConfig:
    common = dict(
        num_hidden_layers=2,
        initializer_range=0.3,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    if name == "qwen_tied":
        return transformers.Qwen2Config(
            vocab_size=16,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100.0},
            **common,
        )
    if name == "qwen_gqa2":
        return transformers.Qwen2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            **common,
        )
    assert name == "llama_gqa3"
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=96,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        attention_bias=False,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        **common,
    )


NAMES = ("qwen_tied", "qwen_gqa2", "llama_gqa3")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Checkpoint]:
    out = {}
    for seed, name in enumerate(NAMES):
        config = hf_config(name)
        model_class = (
            transformers.LlamaForCausalLM
            if config.model_type == "llama"
            else transformers.Qwen2ForCausalLM
        )
        out[name] = write_checkpoint(model_class, config, tmp_path_factory.mktemp(name), seed)
    return out


@pytest.fixture(scope="module")
def prompts() -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids (over a 16-token vocabulary, valid for every model) and mask."""
    return left_padded_prompts()


# ---------------------------------------------------------------------------------------------
# Forward pass and checkpoint I/O.


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf(checkpoints, prompts, name):
    check_logits_match_hf(checkpoints[name], *prompts)


def test_unrolled_layers_match_hf_and_the_scanned_gradient(checkpoints, prompts):
    """`scan_layers = False` (the layers of the full forward pass unrolled) gives HF's logits
    and the gradient of the scanned layers."""
    ckpt = checkpoints[NAMES[0]]
    unrolled = dataclasses.replace(ckpt.model, scan_layers=False)
    check_logits_match_hf(dataclasses.replace(ckpt, model=unrolled), *prompts)
    ids, mask = (jnp.asarray(x) for x in prompts)

    # Unrolled means no loop over the layers is left in the program (the scanned one has one).
    def loops(model):
        return (
            eqx.filter_jit(type(model).hidden_states)
            .lower(model, ids, mask)
            .as_text()
            .count("while")
        )

    assert loops(ckpt.model) > 0 and loops(unrolled) == 0

    def loss(model):
        return jnp.sum(jnp.where(mask == 1, jax.nn.log_softmax(model(ids, mask))[..., 3], 0.0))

    scanned_grad = jax.grad(loss)(ckpt.model)
    unrolled_grad = jax.grad(loss)(unrolled)
    for a, b in zip(jax.tree.leaves(scanned_grad), jax.tree.leaves(unrolled_grad), strict=True):
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_save_hf_round_trip(checkpoints, prompts, tmp_path, name):
    check_save_hf_round_trip(checkpoints[name], *prompts, tmp_path)


def test_sharded_save_loads_in_hf_and_gradflow(checkpoints, prompts, tmp_path):
    ckpt = checkpoints["llama_gqa3"]
    ids, mask = prompts
    save_hf(ckpt.model, tmp_path, max_shard_bytes=32_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert {tmp_path / f for f in index["weight_map"].values()} == set(shards)
    assert not (tmp_path / "model.safetensors").exists()
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    real = mask == 1
    np.testing.assert_allclose(
        hf_logits(reloaded_hf, ids, mask)[real], hf_logits(ckpt.hf, ids, mask)[real], atol=1e-6
    )
    np.testing.assert_array_equal(
        gf_logits(load_hf(tmp_path), ids, mask), gf_logits(ckpt.model, ids, mask)
    )


def test_bfloat16_load_is_close_to_float32(checkpoints, prompts):
    ckpt = checkpoints["llama_gqa3"]
    ids, mask = prompts
    model = load_hf(ckpt.path, dtype=jnp.bfloat16)
    assert model.embed.dtype == jnp.bfloat16
    assert model.layers.q_proj.dtype == jnp.bfloat16
    ours = gf_logits(model, ids, mask)
    assert ours.dtype == np.float32
    assert np.isfinite(ours).all()
    real = mask == 1
    assert_logits_close(ours[real], gf_logits(ckpt.model, ids, mask)[real], rtol=0.1)


def test_bfloat16_decode_attention_implementations_agree(checkpoints, prompts):
    """In bfloat16 the Pallas decode-attention kernel (interpreted here) keeps the cache's dtype
    and gives the XLA path's greedy completions."""
    ids, mask = prompts
    model = load_hf(checkpoints["llama_gqa3"].path, dtype=jnp.bfloat16)
    runs = {
        attention: generate(
            model,
            jnp.asarray(ids),
            jnp.asarray(mask),
            key=jax.random.key(0),
            max_new_tokens=4,
            temperature=0.0,
            decode_attention=attention,
        )
        for attention in ("xla", "pallas")
    }
    np.testing.assert_array_equal(
        np.asarray(runs["pallas"].tokens[:, :2]), np.asarray(runs["xla"].tokens[:, :2])
    )
    np.testing.assert_allclose(
        np.asarray(runs["pallas"].logprobs[:, :2]),
        np.asarray(runs["xla"].logprobs[:, :2]),
        atol=0.05,
    )


# ---------------------------------------------------------------------------------------------
# Checkpoint errors.


def test_load_without_config_names_the_file(checkpoints, tmp_path):
    weights = load_file(checkpoints["qwen_gqa2"].path / "model.safetensors")
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)


def test_load_unsupported_model_type_names_the_file(checkpoints, tmp_path):
    source = checkpoints["qwen_gqa2"].path
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(load_file(source / "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"config\.json.*gpt2"):
        load_hf(tmp_path)


def _copy_with_weights(source: Path, target: Path, weights: dict[str, np.ndarray]):
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})


def test_load_missing_tensor_names_it(checkpoints, tmp_path):
    source = checkpoints["qwen_gqa2"].path
    weights = load_file(source / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.bias"]
    _copy_with_weights(source, tmp_path, weights)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_hf(tmp_path)


def test_load_misshaped_tensor_names_it_and_the_file(checkpoints, tmp_path):
    source = checkpoints["qwen_gqa2"].path
    weights = load_file(source / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][1:]
    _copy_with_weights(source, tmp_path, weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*mlp\.up_proj\.weight") as info:
        load_hf(tmp_path)
    assert "(63, 32)" in str(info.value) and "(64, 32)" in str(info.value)


def test_load_unused_tensor_names_it(checkpoints, tmp_path):
    """A tensor the model would not read (here an o_proj bias) is an error, not silently
    dropped."""
    source = checkpoints["qwen_gqa2"].path
    weights = load_file(source / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.bias"] = np.ones(32, np.float32)
    _copy_with_weights(source, tmp_path, weights)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.bias"):
        load_hf(tmp_path)


def test_llama_attention_bias_is_refused(checkpoints, tmp_path):
    """HF's Llama with `attention_bias` has an o_proj bias gradflow does not model."""
    source = checkpoints["llama_gqa3"].path
    config = json.loads((source / "config.json").read_text())
    config["attention_bias"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*attention_bias"):
        load_hf(tmp_path)


def test_save_over_a_sharded_save_replaces_it(checkpoints, prompts, tmp_path):
    """Saving a single-file checkpoint into a directory holding a sharded one leaves no stale
    index or shards behind: gradflow and HF both load the new weights."""
    ids, mask = prompts
    old, new = checkpoints["llama_gqa3"].model, load_hf(checkpoints["llama_gqa3"].path)
    new = eqx.tree_at(lambda m: m.embed, new, new.embed * 2.0)
    save_hf(old, tmp_path, max_shard_bytes=32_000)
    save_hf(new, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    np.testing.assert_array_equal(
        gf_logits(load_hf(tmp_path), ids, mask), gf_logits(new, ids, mask)
    )


def test_config_reads_rope_as_transformers_does(checkpoints):
    """`rope_scaling`'s own `rope_theta` wins over the top-level one; llama3's
    `original_max_position_embeddings` defaults to `max_position_embeddings`; integer rope
    fields stay integers when written back; `partial_rotary_factor` other than 1 is refused."""
    base = json.loads((checkpoints["llama_gqa3"].path / "config.json").read_text())
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    hf = {**base, "rope_theta": 10000.0, "rope_scaling": rope}
    hf.pop("rope_parameters", None)
    config = ModelConfig.from_hf(hf)
    reference = transformers.LlamaConfig(**hf)
    assert config.rope_theta == reference.rope_parameters["rope_theta"] == 500000.0
    scaling = dict(config.rope_scaling)
    assert scaling["original_max_position_embeddings"] == base["max_position_embeddings"]
    written = config.to_hf()["rope_parameters"]["original_max_position_embeddings"]
    assert isinstance(written, int)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        ModelConfig.from_hf({**hf, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="linear RoPE needs factor"):
        ModelConfig.from_hf({**hf, "rope_scaling": {"rope_type": "linear"}})


# ---------------------------------------------------------------------------------------------
# Sampler.


@pytest.mark.parametrize(
    ("name", "attention"),
    [(name, "xla") for name in NAMES] + [("qwen_gqa2", "pallas"), ("llama_gqa3", "pallas")],
)
def test_greedy_matches_hf_generate(checkpoints, prompts, name, attention):
    """Greedy completions equal HF's token for token, up to and including EOS; logprobs too.
    Also with the Pallas decode-attention kernel (interpreted off the GPU)."""
    check_greedy_matches_hf(checkpoints[name], *prompts, attention)


@pytest.mark.parametrize("name", ["qwen_gqa2", "llama_gqa3"])
def test_sampled_logprobs_are_those_of_the_unmodified_policy(checkpoints, prompts, name):
    """At temperature 0.7 with top-k the logprobs are still the temperature-1 full-vocab ones;
    the sampling log-probs are those of the tempered top-k distribution the tokens came from."""
    ckpt = checkpoints[name]
    ids, mask = prompts
    completions = generate(
        ckpt.model,
        jnp.asarray(ids),
        jnp.asarray(mask),
        key=jax.random.key(1),
        max_new_tokens=NEW_TOKENS,
        temperature=0.7,
        top_k=5,
        eos_token_ids=(3,),
        pad_token_id=0,
    )
    check_completion_structure(completions, 3, 0, NEW_TOKENS)
    tokens = np.asarray(completions.tokens)
    real = np.asarray(completions.mask)
    expected = completion_logprobs(ckpt.hf, ids, mask, tokens, real)
    np.testing.assert_allclose(
        np.asarray(completions.logprobs)[real], expected[real], atol=1e-4, rtol=0
    )
    tempered = completion_logits(ckpt.hf, ids, mask, tokens).astype(np.float64) / 0.7
    kth = np.sort(tempered, axis=-1)[..., -5:-4]
    truncated = log_softmax(np.where(tempered >= kth, tempered, -np.inf))
    expected = np.take_along_axis(truncated, tokens[..., None], axis=-1)[..., 0]
    sampling = np.asarray(completions.sampling_logprobs)
    np.testing.assert_allclose(sampling[real], expected[real], atol=1e-4, rtol=0)
    assert np.abs(sampling - np.asarray(completions.logprobs))[real].mean() > 1e-2
    assert (sampling[~real] == 0).all()


GROUP = 3


def _group_and_repeated(model, ids, mask, **kwargs):
    """`generate(group_size=GROUP)` on the distinct prompts, and `generate` on each prompt
    repeated `GROUP` times (today's layout), with the same key and settings."""
    common = dict(key=jax.random.key(5), max_new_tokens=NEW_TOKENS, pad_token_id=0, **kwargs)
    grouped = generate(model, jnp.asarray(ids), jnp.asarray(mask), group_size=GROUP, **common)
    repeated = generate(
        model,
        jnp.asarray(np.repeat(ids, GROUP, axis=0)),
        jnp.asarray(np.repeat(mask, GROUP, axis=0)),
        **common,
    )
    return grouped, repeated


def test_group_greedy_completions_are_those_of_repeated_prompts(checkpoints, prompts):
    """One prefill per prompt gives each of its `G` consecutive rows the greedy completion of the
    prompt repeated `G` times, row for row (prompts of different lengths: a wrong row order or a
    row given another prompt's cache shows)."""
    ids, mask = prompts
    grouped, repeated = _group_and_repeated(
        checkpoints["qwen_gqa2"].model, ids, mask, temperature=0.0, eos_token_ids=(3,)
    )
    assert grouped.tokens.shape == (len(PROMPT_LENGTHS) * GROUP, NEW_TOKENS)
    for field in ("tokens", "mask", "lengths", "finished"):
        np.testing.assert_array_equal(
            np.asarray(getattr(grouped, field)), np.asarray(getattr(repeated, field)), field
        )
    distinct = np.asarray(grouped.tokens)[::GROUP]
    assert len({row.tobytes() for row in distinct}) == len(PROMPT_LENGTHS)
    # One prefill per prompt against one per row: other programs, the same values summed in
    # other orders (a few float32 ulps of log-probs of magnitude up to ~5).
    np.testing.assert_allclose(
        np.asarray(grouped.logprobs), np.asarray(repeated.logprobs), rtol=1e-4, atol=1e-6
    )


def test_group_sampled_logprobs_are_those_of_a_full_forward_pass(checkpoints, prompts):
    """Sampled (temperature 0.7, top-k) with `group_size`: the draws of the repeated prompts
    with the same key, the rows of a group differ, and every token's log-prob is HF's full
    forward pass over prompt + completion."""
    ckpt = checkpoints["llama_gqa3"]
    ids, mask = prompts
    grouped, repeated = _group_and_repeated(
        ckpt.model, ids, mask, temperature=0.7, top_k=5, eos_token_ids=(3,)
    )
    check_completion_structure(grouped, 3, 0, NEW_TOKENS)
    tokens = np.asarray(grouped.tokens)
    np.testing.assert_array_equal(tokens, np.asarray(repeated.tokens))
    assert any(len({r.tobytes() for r in g}) > 1 for g in tokens.reshape(-1, GROUP, NEW_TOKENS))
    real = np.asarray(grouped.mask)
    expected = completion_logprobs(
        ckpt.hf, np.repeat(ids, GROUP, axis=0), np.repeat(mask, GROUP, axis=0), tokens, real
    )
    np.testing.assert_allclose(np.asarray(grouped.logprobs)[real], expected[real], atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocked_prefill_attention_masks_as_attend(dtype):
    """`attend_blocked` (query/key blocks, online softmax) against `attend` (all scores at once):
    left padding, GQA, sliding windows from 1 slot to wider than the prompt, blocks that split
    the prompt unevenly, one block, and a block per token."""
    from gradflow.models.attention import attend_blocked
    from gradflow.models.layers import attend

    rng = np.random.default_rng(0)
    batch, time, heads, kv_heads, dim = 3, 7, 6, 2, 8

    def draw(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    q, k, v = (
        draw(batch, time, heads, dim),
        draw(batch, time, kv_heads, dim),
        draw(batch, time, kv_heads, dim),
    )
    valid = np.ones((batch, time), bool)
    valid[0, :3] = False
    valid[1, :6] = False
    valid = jnp.asarray(valid)
    index = jnp.broadcast_to(jnp.arange(time), (batch, time))
    tolerance = 1e-6 if dtype == "float32" else 2e-2
    for window in (None, 1, 3, 9):
        window = None if window is None else jnp.asarray(window, jnp.int32)
        expected = np.asarray(attend(q, k, v, index, valid, window, 0.4), np.float32)
        for block in (1, 3, 64):
            out = attend_blocked(q, k, v, valid, window, 0.4, block)
            assert out.dtype == q.dtype
            np.testing.assert_allclose(
                np.asarray(out, np.float32), expected, atol=tolerance, err_msg=f"{window} {block}"
            )


SAMPLES = 4000


def test_first_token_frequencies_follow_the_softmax(checkpoints, prompts):
    """Chi-square test of 4000 first tokens at temperature 1 against HF's next-token softmax."""
    ckpt = checkpoints["qwen_tied"]
    ids, mask = prompts
    prompt = ids[:1, -PROMPT_LENGTHS[0] :]
    with torch.no_grad():
        logits = ckpt.hf(torch.as_tensor(prompt, dtype=torch.long)).logits[0, -1].double()
    probs = torch.softmax(logits, -1).numpy()
    completions = generate(
        ckpt.model,
        jnp.asarray(np.repeat(prompt, SAMPLES, axis=0)),
        jnp.ones((SAMPLES, prompt.shape[1]), jnp.int32),
        key=jax.random.key(2),
        max_new_tokens=1,
        temperature=1.0,
    )
    counts = np.bincount(np.asarray(completions.tokens)[:, 0], minlength=probs.size)
    expected = SAMPLES * probs
    # Pool the rare tokens so every bin expects at least 5 draws.
    rare = expected < 5
    observed = np.append(counts[~rare], counts[rare].sum())
    expected = np.append(expected[~rare], expected[rare].sum())
    if expected[-1] == 0.0:
        observed, expected = observed[:-1], expected[:-1]
    assert (~rare).sum() >= 5  # the test has power: several likely tokens
    result = scipy.stats.chisquare(observed, expected * observed.sum() / expected.sum())
    assert result.pvalue > 1e-3, (counts, SAMPLES * probs)


FILTER_BATCH = 512
FILTER_STEPS = 4


def filtered_samples(ckpt, prompts, **filtering):
    ids, mask = prompts
    reps = FILTER_BATCH // ids.shape[0]
    ids, mask = np.repeat(ids, reps, axis=0), np.repeat(mask, reps, axis=0)
    completions = generate(
        ckpt.model,
        jnp.asarray(ids),
        jnp.asarray(mask),
        key=jax.random.key(3),
        max_new_tokens=FILTER_STEPS,
        **filtering,
    )
    tokens = np.asarray(completions.tokens)
    check_completion_structure(completions, None, 0, FILTER_STEPS)
    return tokens, completion_logits(ckpt.hf, ids, mask, tokens)


def test_top_k_only_emits_the_k_most_likely(checkpoints, prompts):
    k = 3
    tokens, logits = filtered_samples(checkpoints["qwen_tied"], prompts, temperature=1.0, top_k=k)
    kth = np.sort(logits, axis=-1)[..., -k]
    chosen = np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    assert (chosen >= kth - 1e-4).all()
    # All k candidates are actually used somewhere.
    ranks = (logits > chosen[..., None]).sum(-1)
    assert set(ranks.ravel().tolist()) == set(range(k))


def nucleus(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean mask of the smallest most-likely set whose probability reaches `top_p` (numpy)."""
    probs = np.exp(log_softmax(logits))
    allowed = np.zeros(logits.shape, bool)
    for index in np.ndindex(logits.shape[:-1]):
        order = np.argsort(-probs[index])
        total = 0.0
        for token in order:
            allowed[index + (token,)] = True
            total += probs[index + (token,)]
            if total >= top_p + 1e-6:  # lenient at the edge: HF and gradflow differ by ~1e-6
                break
    return allowed


def test_top_p_only_emits_from_the_nucleus(checkpoints, prompts):
    top_p = 0.6
    tokens, logits = filtered_samples(
        checkpoints["qwen_tied"], prompts, temperature=1.0, top_p=top_p
    )
    allowed = nucleus(logits, top_p)
    assert np.take_along_axis(allowed, tokens[..., None], axis=-1).all()
    assert (allowed.sum(-1) < logits.shape[-1]).all()  # the filter removes something everywhere
    assert (allowed.sum(-1) > 1).any()
    # Where the nucleus has several tokens, more than one of them is drawn at the first step.
    first = tokens[:, 0].reshape(len(PROMPT_LENGTHS), -1)
    wide = allowed[:: FILTER_BATCH // len(PROMPT_LENGTHS), 0].sum(-1) > 1
    assert all(len(set(first[g].tolist())) > 1 for g in np.flatnonzero(wide))


def test_eos_ends_a_row(checkpoints, prompts):
    """Rows stop at EOS independently: mask 1 through EOS, then pads; lengths/finished agree."""
    ckpt = checkpoints["qwen_tied"]
    ids, mask = prompts
    reps = 16
    ids, mask = np.repeat(ids, reps, axis=0), np.repeat(mask, reps, axis=0)
    # EOS: the most likely first token of the longest prompt, so that many rows stop early.
    eos = int(hf_logits(ckpt.hf, ids[:1], mask[:1])[0, -1].argmax())
    pad = 15 if eos != 15 else 14
    completions = generate(
        ckpt.model,
        jnp.asarray(ids),
        jnp.asarray(mask),
        key=jax.random.key(4),
        max_new_tokens=NEW_TOKENS,
        temperature=1.0,
        eos_token_ids=(eos,),
        pad_token_id=pad,
    )
    check_completion_structure(completions, eos, pad, NEW_TOKENS)
    finished = np.asarray(completions.finished)
    lengths = np.asarray(completions.lengths)
    assert finished.any() and not finished.all()
    assert (lengths[finished] < NEW_TOKENS).any()
    real = np.asarray(completions.mask)
    expected = completion_logprobs(ckpt.hf, ids, mask, np.asarray(completions.tokens), real)
    np.testing.assert_allclose(
        np.asarray(completions.logprobs)[real], expected[real], atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_cache_attention_matches_numpy(implementation):
    """One query per row over cache slots `start[b] … end-1` (rows starting at different slots,
    `end` inside a block), against a float64 numpy softmax attention."""
    from gradflow.models.layers import attend_cache

    rng = np.random.default_rng(0)
    batch, heads, kv_heads, slots, dim, end = 3, 6, 2, 128, 16, 77
    q = rng.standard_normal((batch, heads, dim)).astype(np.float32)
    keys = rng.standard_normal((batch, kv_heads, slots, dim)).astype(np.float32)
    values = rng.standard_normal((batch, kv_heads, slots, dim)).astype(np.float32)
    start = np.array([0, 5, 70], np.int32)
    out = attend_cache(
        jnp.asarray(q),
        jnp.asarray(keys),
        jnp.asarray(values),
        jnp.asarray(start),
        jnp.asarray(end, jnp.int32),
        implementation,
        dim**-0.5,
    )
    expected = np.zeros((batch, heads, dim))
    for b in range(batch):
        for h in range(heads):
            k = keys[b, h // (heads // kv_heads), start[b] : end].astype(np.float64)
            v = values[b, h // (heads // kv_heads), start[b] : end].astype(np.float64)
            scores = k @ q[b, h] / np.sqrt(dim)
            weights = np.exp(scores - scores.max())
            expected[b, h] = weights @ v / weights.sum()
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)


def test_top_k_larger_than_the_vocabulary_keeps_everything():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5)), jnp.float32)
    kept = filter_logits(logits, temperature=1.0, top_k=10, top_p=1.0)
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(logits))


def test_two_level_sampler_follows_the_distribution():
    """Several blocks, zero-probability entries, unnormalised rows: a chi-square test; and the
    returned log-normaliser."""
    from gradflow.rollout import inverse_cdf_sample

    rng = np.random.RandomState(0)
    p = rng.dirichlet(np.full(300, 0.5)).astype(np.float32)
    p[10:40] = 0.0  # never drawn
    rows = 20000
    with np.errstate(divide="ignore"):
        logits = jnp.asarray(np.tile(np.log(p * 3.0), (rows, 1)))
    draws, normalizer = inverse_cdf_sample(
        logits, jax.random.uniform(jax.random.key(0), (rows,)), block=64
    )
    np.testing.assert_allclose(np.asarray(normalizer), np.log(3.0 * p.sum()), rtol=1e-5)
    draws = np.asarray(draws)
    counts = np.bincount(draws, minlength=300)
    assert counts[10:40].sum() == 0
    frequent = p > 5.0 / rows * 10
    observed = np.append(counts[frequent], counts[~frequent].sum()).astype(np.float64)
    weights = np.append(p[frequent], p[~frequent].sum()).astype(np.float64)
    expected = weights / weights.sum() * rows
    expected *= observed.sum() / expected.sum()
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3
