"""Rollout correction against hand computations: each factor of a token's weight appears once.

A token's policy loss is weighed by `w = K · f(ρ)`:

- `ρ_t = π_old(y_t) / π_sampler(y_t)`: the sampler–trainer mismatch (both unfiltered, at the
  sampling temperature);
- `K`: the mass `Z = π_sampler(y) / μ(y)` that the top-k/top-p filter kept, where `μ` is the
  filtered distribution the token was drawn from (1 without a filter). The sampler gives `Z`
  exactly at temperature 1; at another temperature it keeps no unfiltered tempered log-prob, so
  `K = min(π_old / μ, 1) = min(ρ·Z, 1)` is all there is, and a correction of `ρ` is an error;
- `f`: the `rollout_correction` of `ρ`: `none` 1, `token_tis` `min(ρ_t, C)`, `token_mask`
  `ρ_t` inside `[lower, C]` and 0 outside, `sequence_mask` the same on the sequence's `Π_t ρ_t`.
  Rejected tokens keep their place in the aggregation denominators (TRL's convention).

Every combination of correction × filtered or not × temperature 1 or not is checked against numpy
written from these formulas and the PPO-clip loss of `docs/algorithms.md`: the loss value, the
per-token weight (the gradient at ratio 1), the metrics; then the sampler's log-probs these rest on,
and a whole compiled step for each sampling setting.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow.algorithms import Algorithm
from gradflow.batch import Prompts
from gradflow.config import build_config
from gradflow.logprobs import completion_logprobs
from gradflow.models import ModelConfig, init_from_config
from gradflow.optim import Optimizer
from gradflow.rollout import Completions, sample_token
from gradflow.stages import (
    AbstractAdvantage,
    AbstractReward,
    AbstractRollout,
    Max,
    Mean,
    PolicyLoss,
    RewardOutput,
    UpdateBatch,
)
from gradflow.state import init_state
from gradflow.step import step

MODES = ("none", "token_tis", "token_mask", "sequence_mask")
# (filtered by top-k/top-p, temperature)
SAMPLINGS = ((False, 1.0), (False, 0.7), (True, 1.0), (True, 0.7))
C = 2.0  # rollout_correction_threshold
B, T = 12, 5


def _data(seed=0):
    """Per-token log-probs of the sampler (unfiltered), kept masses, mismatch ratios, policy
    shifts and advantages; one row without valid tokens."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, T + 1, B)
    lengths[3] = 0
    mask = np.arange(T)[None, :] < lengths[:, None]
    sampler = rng.uniform(-3.0, -0.1, (B, T))  # log π_sampler(y_t)
    z = rng.uniform(0.3, 1.0, (B, T))  # kept mass Z
    log_rho = rng.normal(0.0, 0.5, (B, T))  # log ρ_t
    shift = rng.normal(0.0, 0.25, (B, T))  # log π_θ − log π_old: some ratios clipped
    advantages = rng.normal(size=(B, T))
    return mask, sampler, z, log_rho, shift, advantages


MASK, SAMPLER, Z, LOG_RHO, SHIFT, ADVANTAGES = _data()
RHO = np.exp(LOG_RHO)
SEQ_RHO = np.exp((LOG_RHO * MASK).sum(1))


def test_data_covers_every_case():
    """Tokens and sequences on each side of both thresholds, kept-mass products above 1, PPO
    ratios clipped on both sides, advantages of both signs, a row without tokens."""
    rho, seq = RHO[MASK], SEQ_RHO[MASK.any(1)]
    for values in (rho, seq):
        assert (values > C).any() and (values < 0.5).any()
        assert ((values > 0.5) & (values < C)).any()
        assert np.abs(values - C).min() > 1e-3 and np.abs(values - 0.5).min() > 1e-3
    assert (RHO * Z)[MASK].max() > 1.0
    ratio = np.exp(SHIFT)[MASK]
    assert (ratio > 1.2).any() and (ratio < 0.8).any()
    assert (ADVANTAGES[MASK] > 0).any() and (ADVANTAGES[MASK] < 0).any()
    assert not MASK[3].any()


# ---------------------------------------------------------------------------------------------
# Hand computations (numpy, float64).


def kept_mass_ref(filtered, temperature):
    """`K`: 1 unfiltered; `Z` at temperature 1; `min(ρZ, 1)` at another temperature."""
    if not filtered:
        return np.ones((B, T))
    if temperature == 1.0:
        return np.minimum(Z, 1.0)
    return np.minimum(RHO * Z, 1.0)


def correction_ref(mode, lower):
    """`f(ρ)` of each rollout correction."""
    if mode == "none":
        return np.ones((B, T))
    if mode == "token_tis":
        return np.minimum(RHO, C)
    ratio = RHO if mode == "token_mask" else np.broadcast_to(SEQ_RHO[:, None], (B, T))
    return np.where((ratio >= lower) & (ratio <= C), ratio, 0.0)


def ppo_loss_ref(shift, advantages, eps=0.2, dual_clip=3.0):
    ratio = np.exp(np.clip(shift, -20, 20))
    l1 = -advantages * ratio
    l2 = -advantages * np.clip(ratio, 1 - eps, 1 + eps)
    c = np.maximum(l1, l2)
    return np.where(advantages < 0, np.minimum(-advantages * dual_clip, c), c)


def aggregate_ref(values, agg):
    m = MASK.astype(np.float64)
    if agg == "token-mean":
        return (values * m).sum() / m.sum()
    rows = m.any(1)
    per_row = (values * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return per_row[rows].sum() / rows.sum()


def token_share_ref(agg):
    """d loss / d (w_t · L_t): each token's share of the aggregate."""
    m = MASK.astype(np.float64)
    if agg == "token-mean":
        return m / m.sum()
    return m / np.maximum(m.sum(1, keepdims=True), 1.0) / m.any(1).sum()


# ---------------------------------------------------------------------------------------------
# The loss stage.


def _batch(filtered, temperature):
    """The fields the step gives the loss stage for a sampling setting (`UpdateBatch`): the
    sampler's unfiltered log-probs at the training temperature unless the filter ran at another
    temperature; the filtered `log μ = log π_sampler − log Z` when filtered."""
    old = SAMPLER + LOG_RHO
    sampling = SAMPLER - np.log(Z) if filtered else None
    sampler = None if filtered and temperature != 1.0 else SAMPLER

    def f32(x):
        return None if x is None else jnp.asarray(x, jnp.float32)

    return UpdateBatch(
        ids=jnp.zeros((B, T + 1), jnp.int32),
        full_mask=jnp.ones((B, T + 1), bool),
        mask=jnp.asarray(MASK),
        trained=jnp.ones(B, bool),
        advantages=f32(ADVANTAGES * MASK),
        old_logp=f32(old),
        sampling_logp=f32(sampling),
        sampler_logp=f32(sampler),
        ref_logp=None,
        old_values=None,
        returns=None,
    )


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("lower", [0.0, 0.5])
@pytest.mark.parametrize(("filtered", "temperature"), SAMPLINGS)
@pytest.mark.parametrize("mode", MODES)
def test_each_factor_appears_once(mode, filtered, temperature, lower, agg):
    """The loss value (PPO ratios away from 1), each token's weight `K·f(ρ)` (the gradient at
    ratio 1 is `−A_t · w_t · share_t`) and the metrics, against the hand computation."""
    loss = PolicyLoss(
        rollout_correction=mode,
        rollout_correction_threshold=C,
        rollout_correction_threshold_lower=lower,
        agg=agg,
    )
    batch = _batch(filtered, temperature)
    denominator = loss.denominator(batch)
    old = np.asarray(batch.old_logp, np.float64)

    def objective(logp):
        return loss(logp, jnp.zeros((B, T)), None, batch, denominator)

    if filtered and temperature != 1.0 and mode != "none":
        with pytest.raises(ValueError, match="top-k/top-p sampling at a temperature other"):
            objective(batch.old_logp)
        return
    weights = kept_mass_ref(filtered, temperature) * correction_ref(mode, lower)

    value, metrics = objective(jnp.asarray(old + SHIFT, jnp.float32))
    expected = aggregate_ref(weights * ppo_loss_ref(SHIFT, ADVANTAGES), agg)
    np.testing.assert_allclose(float(value), expected, rtol=2e-5, atol=1e-7)

    grad = jax.grad(lambda logp: objective(logp)[0])(batch.old_logp)
    expected_grad = -ADVANTAGES * weights * token_share_ref(agg)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=2e-5, atol=1e-8)

    reduced = {k: float(v.reduce()) for k, v in metrics.items() if isinstance(v, Mean | Max)}
    if filtered:
        kept = kept_mass_ref(filtered, temperature)[MASK].mean()
        np.testing.assert_allclose(reduced["loss/kept_mass"], kept, rtol=1e-5)
    else:
        assert "loss/kept_mass" not in reduced
    if filtered and temperature != 1.0:
        assert not any(k.startswith("rollout/") for k in reduced)
        return
    np.testing.assert_allclose(reduced["rollout/is_mean"], RHO[MASK].mean(), rtol=1e-5)
    np.testing.assert_allclose(reduced["rollout/is_max"], RHO[MASK].max(), rtol=1e-5)
    if mode == "token_tis":
        np.testing.assert_allclose(reduced["rollout/is_truncated"], (RHO > C)[MASK].mean())
    elif mode != "none":
        rejected = (correction_ref(mode, lower) == 0)[MASK].mean()
        np.testing.assert_allclose(reduced["rollout/is_masked"], rejected, rtol=1e-6)


def test_issue_numbers():
    """Issue 23's example: top-p at temperature 1 keeps `Z = 0.9`, the trainer's probability is
    `ρ = 1.05` times the sampler's: `token_tis` weighs the token by `ρZ = 0.945` (not `ρ²Z`),
    `none` by `Z` alone."""
    s = jnp.full((1, 4), -1.0)
    batch = UpdateBatch(
        ids=jnp.zeros((1, 5), jnp.int32),
        full_mask=jnp.ones((1, 5), bool),
        mask=jnp.ones((1, 4), bool),
        trained=jnp.ones(1, bool),
        advantages=jnp.ones((1, 4)),
        old_logp=s + np.log(1.05),
        sampling_logp=s - np.log(0.9),
        sampler_logp=s,
        ref_logp=None,
        old_values=None,
        returns=None,
    )
    for mode, weight in [("none", 0.9), ("token_tis", 0.945), ("token_mask", 0.945)]:
        loss = PolicyLoss(rollout_correction=mode, dual_clip=None)
        value, _ = loss(batch.old_logp, jnp.zeros((1, 4)), None, batch, jnp.asarray(4.0))
        np.testing.assert_allclose(-float(value), weight, rtol=1e-6)


def test_lower_threshold_key():
    """`rollout_correction_threshold_lower` is an `[algorithm]` key landing in the loss stage;
    outside `[0, 1)` it is refused with a message naming it."""
    raw = {
        "model": {"init": "random", "config": "x.json"},
        "algorithm": {"name": "grpo", "rollout_correction_threshold_lower": 0.5},
    }
    config = build_config(raw)
    assert config.hyperparameters == {"rollout_correction_threshold_lower": 0.5}
    assert PolicyLoss(rollout_correction_threshold_lower=0.5).rollout_correction_threshold_lower
    for bad in (-0.1, 1.0, 2.5):
        with pytest.raises(ValueError, match=r"rollout_correction_threshold_lower must be in"):
            PolicyLoss(rollout_correction="token_mask", rollout_correction_threshold_lower=bad)


# ---------------------------------------------------------------------------------------------
# The sampler's log-probs the weights rest on.


def _filtered_probs_ref(logits, temperature, top_k, top_p):
    """Tempered probabilities with top-k then top-p applied, renormalised (numpy)."""
    x = logits / temperature
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    keep = np.ones_like(p, bool)
    order = np.argsort(-x, axis=-1)
    for b in range(x.shape[0]):
        if top_k:
            keep[b, order[b, top_k:]] = False
        q = np.where(keep[b], p[b], 0.0)
        q /= q.sum()
        before = np.cumsum(q[order[b]]) - q[order[b]]
        keep[b, order[b][before >= top_p]] = False
    kept = np.where(keep, p, 0.0)
    return kept / kept.sum(-1, keepdims=True), p


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.7), (3, 1.0), (4, 0.8)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_log_probs(temperature, top_k, top_p):
    """`logprobs` is the temperature-1 unfiltered log-prob and `sampling_logprobs` the one of the
    filtered tempered distribution: at temperature 1, `exp(logprobs − sampling_logprobs)` is the
    kept mass `Z`; at another temperature it is not (hence no sampler log-prob for ρ there)."""
    rng = np.random.RandomState(1)
    logits = rng.normal(0.0, 2.0, (64, 8)).astype(np.float32)
    tokens, logprobs, sampling = sample_token(
        jnp.asarray(logits),
        jnp.asarray(rng.uniform(size=64), jnp.float32),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    tokens = np.asarray(tokens)
    rows = np.arange(64)
    mu, tempered = _filtered_probs_ref(logits.astype(np.float64), temperature, top_k, top_p)
    plain = np.exp(logits - logits.max(-1, keepdims=True))
    plain /= plain.sum(-1, keepdims=True)
    assert (mu[rows, tokens] > 0).all()
    np.testing.assert_allclose(np.asarray(sampling), np.log(mu[rows, tokens]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(logprobs), np.log(plain[rows, tokens]), atol=2e-5)
    z = np.where(mu > 0, tempered, 0.0).sum(-1)  # the kept mass of the tempered distribution
    ratio = np.exp(np.asarray(logprobs - sampling))
    if temperature == 1.0:
        np.testing.assert_allclose(ratio, z, rtol=2e-5)
    else:
        assert np.abs(ratio / z - 1.0).max() > 0.05


# ---------------------------------------------------------------------------------------------
# A whole step for each sampling setting: the step gives the loss stage the right log-probs.

CONFIG = ModelConfig(
    model_type="qwen2",
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=1e4,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_bias=True,
    max_position_embeddings=64,
)
MODEL = init_from_config(CONFIG, key=jax.random.key(0))
PROMPT_LEN, GROUP = 3, 4
PROMPTS = Prompts(
    ids=jnp.asarray(np.random.RandomState(2).randint(2, 32, (B // GROUP, PROMPT_LEN)), jnp.int32),
    mask=jnp.ones((B // GROUP, PROMPT_LEN), bool),
    index=jnp.arange(B // GROUP),
)
TOKENS = np.where(MASK, np.random.RandomState(3).randint(2, 32, (B, T)), 0).astype(np.int32)
IDS = jnp.concatenate([jnp.repeat(PROMPTS.ids, GROUP, 0), jnp.asarray(TOKENS)], 1)
FULL_MASK = jnp.concatenate([jnp.repeat(PROMPTS.mask, GROUP, 0), jnp.asarray(MASK)], 1)


class FixedRollout(AbstractRollout):
    """Returns fixed completions, as drawn at `temperature`, with top-k/top-p if `filtered`."""

    completions: Completions
    temperature: float
    filtered: bool
    group_size: int = GROUP
    max_new_tokens: int = T

    def prompts_to_sample(self, prompts_per_step):
        return prompts_per_step

    def __call__(self, policy, prompts, key):
        return self.completions

    def select(self, rewards, prompts_per_step):
        rows = rewards.total.shape[0]
        return jnp.arange(rows), jnp.ones(rows, bool), {}


class NoReward(AbstractReward):
    def __call__(self, prompts, completions):
        return RewardOutput(total=jnp.zeros(completions.tokens.shape[0]), parts={})


class FixedAdvantage(AbstractAdvantage):
    advantages: jax.Array

    def __call__(self, token_rewards, mask, values, group_size):
        return jnp.where(mask, self.advantages, 0.0), None


@pytest.mark.parametrize(
    ("filtered", "temperature", "mode"),
    [
        (False, 1.0, "token_tis"),
        (False, 0.7, "token_tis"),
        (True, 1.0, "token_tis"),
        (True, 1.0, "none"),
        (True, 0.7, "none"),
    ],
)
def test_step(filtered, temperature, mode):
    """One update at ratio 1: `loss/policy = Σ −A·K·f(ρ) / Σm`, with the sampler's log-probs as
    the sampler gives them (`sample_token`) and the trainer's recomputed ones."""
    old = np.asarray(
        completion_logprobs(MODEL, IDS, FULL_MASK, PROMPT_LEN, temperature=temperature)[0],
        np.float64,
    )
    sampler = old - LOG_RHO  # the sampler's unfiltered log-probs at the temperature
    sampling = sampler - np.log(Z) if filtered else sampler
    completions = Completions(
        tokens=jnp.asarray(TOKENS),
        mask=jnp.asarray(MASK),
        # at another temperature `logprobs` are the temperature-1 ones, which nothing may use
        logprobs=jnp.asarray(sampler if temperature == 1.0 else sampler + 0.3, jnp.float32),
        sampling_logprobs=jnp.asarray(sampling, jnp.float32),
        lengths=jnp.asarray(MASK.sum(1), jnp.int32),
        finished=jnp.asarray(MASK.sum(1) < T),
    )
    algorithm = Algorithm(
        FixedRollout(completions, temperature, filtered),
        NoReward(),
        FixedAdvantage(jnp.asarray(ADVANTAGES, jnp.float32)),
        PolicyLoss(rollout_correction=mode, rollout_correction_threshold=C),
        Optimizer(),
    )
    state = init_state(algorithm, jax.tree.map(jnp.copy, MODEL), key=jax.random.key(4))
    _, metrics = step(algorithm, state, PROMPTS, jax.random.key(5))
    weights = kept_mass_ref(filtered, temperature) * correction_ref(mode, 0.0)
    expected = aggregate_ref(-ADVANTAGES * weights, "token-mean")
    np.testing.assert_allclose(float(metrics["loss/policy"]), expected, rtol=1e-4, atol=1e-6)
    if filtered:
        kept = kept_mass_ref(filtered, temperature)[MASK].mean()
        np.testing.assert_allclose(float(metrics["loss/kept_mass"]), kept, rtol=1e-4)
    if not (filtered and temperature != 1.0):
        np.testing.assert_allclose(float(metrics["rollout/is_mean"]), RHO[MASK].mean(), rtol=1e-4)
        np.testing.assert_allclose(float(metrics["rollout/is_max"]), RHO[MASK].max(), rtol=1e-4)


def test_step_refuses_a_correction_it_cannot_compute():
    """Top-p at temperature 0.7 keeps no unfiltered tempered sampler log-prob: `token_tis` is an
    error, not a silent weight."""
    completions = Completions(
        tokens=jnp.asarray(TOKENS),
        mask=jnp.asarray(MASK),
        logprobs=jnp.zeros((B, T)),
        sampling_logprobs=jnp.zeros((B, T)),
        lengths=jnp.asarray(MASK.sum(1), jnp.int32),
        finished=jnp.asarray(MASK.sum(1) < T),
    )
    algorithm = Algorithm(
        FixedRollout(completions, 0.7, True),
        NoReward(),
        FixedAdvantage(jnp.asarray(ADVANTAGES, jnp.float32)),
        PolicyLoss(rollout_correction="token_tis"),
        Optimizer(),
    )
    state = init_state(algorithm, jax.tree.map(jnp.copy, MODEL), key=jax.random.key(4))
    with pytest.raises(ValueError, match="top-k/top-p sampling at a temperature other than 1"):
        step(algorithm, state, PROMPTS, jax.random.key(5))
