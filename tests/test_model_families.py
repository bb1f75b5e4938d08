"""Qwen3, Mistral and Gemma 3 against HF transformers (torch, float32), with `hf_parity`'s checks.

Five tiny random checkpoints are written by `save_pretrained` once per module, two layers each:

- `qwen3_tied`: Qwen3, GQA ratio 2, tied head, explicit `head_dim` 16 (hidden / heads is 8).
- `qwen3_sliding`: Qwen3, GQA ratio 3, untied, `use_sliding_window` with `max_window_layers` 1
  (layer 0 full, layer 1 a 4-slot window).
- `mistral`: Mistral, GQA ratio 4, untied, `sliding_window` 4 on every layer.
- `gemma3_capped`: Gemma 3 text, GQA ratio 2, tied, a sliding layer (window 4, RoPE base 10000)
  then a global one (base 100), `query_pre_attn_scalar` 24, final logit soft-capping.
- `gemma3_untied`: Gemma 3 text, GQA ratio 4, untied, window 3, `head_dim` 8 with the default
  `query_pre_attn_scalar` (256), linear RoPE scaling on the global layer, no soft-capping.

The prompts are up to 7 tokens and 8 more are generated: every windowed row outgrows its window,
in the forward pass and in the KV-cache sampler.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
import transformers
from hf_parity import (
    PROMPT_LENGTHS,
    QWEN3_TIED,
    TINY,
    Checkpoint,
    check_greedy_matches_hf,
    check_logits_match_hf,
    check_save_hf_round_trip,
    gf_logits,
    left_padded_prompts,
    write_checkpoint,
)

from gradflow.models import Decoder, ModelConfig

CHECKPOINTS = {
    "qwen3_tied": QWEN3_TIED,
    "qwen3_sliding": (
        transformers.Qwen3ForCausalLM,
        transformers.Qwen3Config(
            hidden_size=48,
            intermediate_size=96,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
            **TINY,
        ),
    ),
    "mistral": (
        transformers.MistralForCausalLM,
        transformers.MistralConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=1,
            sliding_window=4,
            tie_word_embeddings=False,
            **TINY,
        ),
    ),
    "gemma3_capped": (
        transformers.Gemma3ForCausalLM,
        transformers.Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 100.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            final_logit_softcapping=8.0,
            tie_word_embeddings=True,
            **TINY,
        ),
    ),
    "gemma3_untied": (
        transformers.Gemma3ForCausalLM,
        transformers.Gemma3TextConfig(
            hidden_size=48,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            sliding_window=3,
            sliding_window_pattern=2,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            },
            tie_word_embeddings=False,
            **TINY,
        ),
    ),
}
NAMES = tuple(CHECKPOINTS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Checkpoint]:
    return {
        name: write_checkpoint(model_class, config, tmp_path_factory.mktemp(name), seed)
        for seed, (name, (model_class, config)) in enumerate(CHECKPOINTS.items())
    }


@pytest.fixture(scope="module")
def prompts() -> tuple[np.ndarray, np.ndarray]:
    return left_padded_prompts()


def test_the_families_are_read_with_their_options(checkpoints):
    """Each checkpoint's config arrives with the options that make it its family."""
    configs = {name: ckpt.model.config for name, ckpt in checkpoints.items()}
    assert configs["qwen3_tied"].family.qk_norm and configs["qwen3_tied"].head_dim == 16
    assert configs["qwen3_sliding"].layer_windows == (None, 4)
    assert configs["mistral"].layer_windows == (4, 4)
    gemma = configs["gemma3_capped"]
    assert gemma.family.gemma and gemma.hidden_act == "gelu_pytorch_tanh"
    assert gemma.layer_windows == (4, None)
    assert (gemma.rope_theta, gemma.rope_local_theta) == (100.0, 10000.0)
    assert gemma.attention_scale == 24**-0.5
    assert gemma.final_logit_softcapping == 8.0
    untied = configs["gemma3_untied"]
    assert untied.layer_windows == (3, None) and untied.attention_scale == 256**-0.5
    assert (untied.rope_type, untied.rope_scaling) == ("linear", (("factor", 2.0),))
    assert checkpoints["gemma3_capped"].model.lm_head is None
    assert checkpoints["gemma3_untied"].model.lm_head is not None


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf(checkpoints, prompts, name):
    check_logits_match_hf(checkpoints[name], *prompts)


@pytest.mark.parametrize("name", NAMES)
def test_save_hf_round_trip(checkpoints, prompts, tmp_path, name):
    check_save_hf_round_trip(checkpoints[name], *prompts, tmp_path)


@pytest.mark.parametrize(
    ("name", "attention"), [(name, "xla") for name in NAMES] + [("gemma3_untied", "pallas")]
)
def test_greedy_matches_hf_generate(checkpoints, prompts, name, attention):
    """Also with the Pallas decode-attention kernel (interpreted off the GPU), whose window is
    its rows' first slot."""
    check_greedy_matches_hf(checkpoints[name], *prompts, attention)


def test_sliding_window_hides_only_what_lies_outside_it(checkpoints, prompts):
    """Against the same weights with a window wider than the batch: the first `window` tokens of
    each row get the same logits, later ones different ones."""
    model = checkpoints["gemma3_capped"].model
    ids, mask = prompts
    wide = dataclasses.replace(model, config=model.config.replace(sliding_window=ids.shape[1]))
    narrow, full = gf_logits(model, ids, mask), gf_logits(wide, ids, mask)
    window = model.config.sliding_window
    for row, length in enumerate(PROMPT_LENGTHS):
        start = ids.shape[1] - length
        inside = slice(start, start + min(window, length))
        # Other masks, the same attention weights: float32 rounding relative to the logits.
        np.testing.assert_allclose(narrow[row, inside], full[row, inside], rtol=1e-4, atol=1e-5)
        if length > window:
            outside = np.abs(narrow[row, start + window :] - full[row, start + window :])
            assert outside.max(axis=-1).min() > 1e-2


# ---------------------------------------------------------------------------------------------
# Reading config.json as transformers does.


def test_configs_leaving_fields_out_read_as_transformers_does():
    """The Hub's older Gemma 3 format (top-level `rope_theta`, `rope_local_base_freq`,
    `rope_scaling`, `sliding_window_pattern`, no `layer_types`), with fields left to the
    class defaults (`head_dim`, `query_pre_attn_scalar`, the tied head); Mistral's default
    window and Qwen3's default `head_dim`."""
    hf = {
        "model_type": "gemma3_text",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window": 512,
        "sliding_window_pattern": 3,
    }
    config = ModelConfig.from_hf(hf)
    reference = transformers.Gemma3TextConfig(**hf)
    assert list(config.layer_types) == reference.layer_types
    assert config.layer_windows == (512, 512, None, 512, 512, None)
    assert config.rope_theta == reference.rope_parameters["full_attention"]["rope_theta"]
    assert config.rope_local_theta == reference.rope_parameters["sliding_attention"]["rope_theta"]
    assert dict(config.rope_scaling)["factor"] == 8.0 and config.rope_type == "linear"
    assert config.head_dim == reference.head_dim == 256
    assert config.query_pre_attn_scalar == reference.query_pre_attn_scalar
    assert config.tie_word_embeddings == reference.tie_word_embeddings is True
    mistral = {k: v for k, v in hf.items() if "rope" not in k and "sliding" not in k}
    mistral["model_type"] = "mistral"
    assert (
        ModelConfig.from_hf(mistral).sliding_window == transformers.MistralConfig().sliding_window
    )
    qwen3 = {**mistral, "model_type": "qwen3"}
    assert ModelConfig.from_hf(qwen3).head_dim == transformers.Qwen3Config(**qwen3).head_dim == 128


def _config(checkpoints, name: str) -> dict:
    return json.loads((checkpoints[name].path / "config.json").read_text())


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("gemma3_capped", {"model_type": "gemma3"}, "gemma3_text"),
        ("gemma3_capped", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        # Gemma 2's attention soft-capping, which transformers' Gemma 3 does not apply.
        ("gemma3_capped", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
        ("gemma3_capped", {"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
        (
            "gemma3_capped",
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 100.0},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0},
                }
            },
            "sliding_attention of type 'linear'",
        ),
        ("qwen3_tied", {"attention_bias": True}, "attention_bias"),
        (
            "qwen3_sliding",
            {"use_sliding_window": False},
            "layer_types has sliding_attention layers but sliding_window",
        ),
        ("mistral", {"layer_types": ["full_attention"] * 2}, "layer_types"),
    ],
)
def test_what_gradflow_cannot_compute_is_refused_by_name(checkpoints, name, changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**_config(checkpoints, name), **changes}, source="config.json")


def test_random_init_of_a_family_has_its_shapes(prompts):
    """`Decoder.init` of a Gemma 3 shape: identity norms (zeros, as `1 + weight`), q/k norms and
    the norms after attention and MLP; its forward is finite."""
    config = ModelConfig.from_hf(CHECKPOINTS["gemma3_capped"][1].to_dict())
    model = Decoder.init(config, key=jax.random.key(0))
    assert model.layers.q_norm.shape == (2, 16) and model.layers.mlp_out_norm.shape == (2, 32)
    assert not np.asarray(model.layers.attention_out_norm).any()
    expected = config.num_parameters
    assert sum(x.size for x in jax.tree.leaves(model)) == expected
    assert np.isfinite(gf_logits(model, *prompts)).all()
