"""Config and stage checks that must fail before any model is loaded or compiled."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow.config import ConfigError, load_config
from gradflow.logprobs import completion_logprobs
from gradflow.models import ModelConfig, init_from_config
from gradflow.stages import PolicyLoss, Sampling


def test_dual_clip_of_the_wrong_type_is_a_config_error():
    with pytest.raises(ConfigError, match="algorithm.dual_clip"):
        load_config("configs/grpo.toml", ["algorithm.dual_clip='off'"])


def test_dual_clip_at_most_one_is_rejected():
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        PolicyLoss(dual_clip=1.0)


@pytest.mark.parametrize(
    "bad", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}]
)
def test_sampling_settings_are_validated(bad):
    with pytest.raises(ValueError, match="sampling needs"):
        Sampling(**bad)


def test_gsm8k_only_task_keys_are_rejected_for_arithmetic():
    with pytest.raises(ConfigError, match="task.source applies to task.name = 'gsm8k'"):
        load_config("configs/grpo.toml", ["task.source='hub'"])
    with pytest.raises(ConfigError, match="task.max_value applies to task.name = 'arithmetic'"):
        load_config("configs/gsm8k/qwen25_0p5b_grpo.toml", ["task.max_value=9"])


def test_update_batch_must_divide_into_minibatches_before_loading(tmp_path):
    from gradflow.train import Trainer

    config = load_config(
        "configs/ppo.toml",
        [
            "train.prompts_per_step=4",
            "algorithm.minibatches=3",
            "algorithm.group_size=2",
            "logging.wandb='disabled'",
            f"run.output_dir='{tmp_path}'",
            "task.train_size=64",
            "task.test_size=8",
        ],
    )
    with pytest.raises(ConfigError, match="minibatches × algorithm.micro_batches"):
        Trainer(config, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_training_logprobs_follow_the_sampling_temperature():
    """Log-probs at temperature T are those of softmax(logits / T) (verl's and TRL's convention)."""
    config = ModelConfig(
        model_type="qwen2", vocab_size=17, hidden_size=16, intermediate_size=32, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=8, rope_theta=1e4, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32,
    )  # fmt: skip
    model = init_from_config(config, key=jax.random.key(0))
    model = jax.tree.map(lambda x: x * 20.0, model)  # sharper logits: temperature matters
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 17, (2, 9)), jnp.int32)
    mask = jnp.ones((2, 9), jnp.int32)
    prompt_len, temperature = 4, 0.7
    logp, _ = completion_logprobs(model, ids, mask, prompt_len, temperature=temperature)
    logits = np.asarray(model(ids, mask), np.float64)[:, prompt_len - 1 : -1] / temperature
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    targets = np.asarray(ids)[:, prompt_len:]
    expected = np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logp), expected, atol=1e-4)
    untempered, _ = completion_logprobs(model, ids, mask, prompt_len)
    assert np.abs(np.asarray(untempered) - expected).max() > 1e-2


def test_model_scan_layers_reaches_the_policy():
    from gradflow.train import load_policy

    assert load_policy(load_config("configs/grpo.toml")).scan_layers is False
    assert load_policy(load_config("configs/grpo.toml", ["model.scan_layers=true"])).scan_layers


RANDOM_TOY = ["model.init='random'"]  # the toy model's config.json, random weights


def _overridden(overrides: str, config: str = "configs/grpo.toml"):
    from gradflow.train import load_policy

    return load_policy(load_config(config, [*RANDOM_TOY, f"model.overrides={overrides}"])).config


def test_model_overrides_take_the_keys_of_config_json():
    """The keys a user copies from config.json set the same fields as gradflow's own names."""
    hf = _overridden("{num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1}")
    own = _overridden("{num_layers = 2, num_heads = 2, num_kv_heads = 1}")
    assert (hf.num_layers, hf.num_heads, hf.num_kv_heads) == (2, 2, 1)
    assert hf == own
    # Read as transformers reads them: rope_scaling is config.json's dictionary.
    scaled = _overridden('{rope_scaling = {rope_type = "linear", factor = 2.0}}')
    assert (scaled.rope_type, scaled.rope_scaling) == ("linear", (("factor", 2.0),))


def test_model_overrides_derive_what_transformers_derives(tmp_path):
    """Fewer Gemma 3 layers through either name: the layer types follow sliding_window_pattern,
    as transformers' Gemma3TextConfig builds them."""
    from transformers import Gemma3TextConfig

    from gradflow.train import load_policy

    shape = {
        "model_type": "gemma3_text", "vocab_size": 48, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 12, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 8, "sliding_window": 4,
        "sliding_window_pattern": 6, "max_position_embeddings": 64,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(shape))
    expected = tuple(Gemma3TextConfig(**{**shape, "num_hidden_layers": 2}).layer_types)
    for overrides in ("{num_hidden_layers = 2}", "{num_layers = 2}"):
        raw = [*RANDOM_TOY, f"model.path='{tmp_path}'", f"model.overrides={overrides}"]
        config = load_policy(load_config("configs/grpo.toml", raw)).config
        assert config.num_layers == 2 and config.layer_types == expected, overrides


def test_a_model_override_that_is_neither_name_lists_both():
    with pytest.raises(ConfigError) as info:
        _overridden("{num_hiden_layers = 2}")
    message = str(info.value)
    assert "model.overrides: 'num_hiden_layers'" in message
    assert "(did you mean 'num_hidden_layers'?)" in message
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size"):
        assert key in message
    assert "num_layers (num_hidden_layers)" in message  # gradflow's names, with config.json's
    with pytest.raises(ConfigError, match="num_layers and num_hidden_layers set the same field"):
        _overridden("{num_layers = 2, num_hidden_layers = 3}")
    # The toy model's config.json holds the RoPE base in rope_parameters, which transformers
    # reads before rope_theta: an override of rope_theta alone would change nothing.
    with pytest.raises(ConfigError, match="rope_theta = 1000000.0 does not take"):
        _overridden("{rope_theta = 1000000.0}")


def test_gradflow_names_stand_for_the_keys_config_json_writes():
    from gradflow.models import ModelConfig
    from gradflow.models.config import CONFIG_JSON_KEYS

    gemma = ModelConfig.load(
        {
            "model_type": "gemma3_text", "vocab_size": 48, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "rope_local_base_freq": 5000.0,
        }
    )  # fmt: skip
    hf = gemma.to_hf()
    assert {name: hf[key] for name, key in CONFIG_JSON_KEYS.items()} == {
        name: getattr(gemma, name) for name in CONFIG_JSON_KEYS
    }


def test_max_new_tokens_with_an_environment_says_what_to_write():
    """A single-turn config given an [environment]: the refusal says which keys replace
    algorithm.max_new_tokens, with the value to carry over."""
    with pytest.raises(ConfigError) as info:
        load_config("configs/grpo.toml", ["environment.class='examples/envs/retry.py:Retry'"])
    message = str(info.value)
    assert "remove algorithm.max_new_tokens (32)" in message
    assert "environment.max_turn_tokens = 32" in message
    assert "environment.max_turns × (environment.max_turn_tokens + " in message
