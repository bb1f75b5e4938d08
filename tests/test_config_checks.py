"""Config and stage checks that must fail before any model is loaded or compiled."""

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
    with pytest.raises(ConfigError, match="task.prompt_template applies to"):
        load_config("configs/grpo.toml", ["task.prompt_template='chat'"])


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
