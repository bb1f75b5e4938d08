"""Losses and aggregation against numpy references written from `docs/algorithms.md`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow.losses import (
    AGG_MODES,
    aggregate,
    aggregation_denominator,
    aggregation_numerator,
    entropy,
    kl,
    policy_loss,
    value_loss,
)

BATCH, TIME = 8, 6

# ---------------------------------------------------------------------------------------------
# Independent numpy references (float64, plain loops).


def ref_masked_mean(x, m):
    total = sum(float(x[i]) for i in np.ndindex(*m.shape) if m[i])
    return total / (float(np.sum(m)) + 1e-8)


def ref_aggregate(values, m, mode):
    """Each mode written from its definition (no numerator/denominator split)."""
    rows = [[float(values[b, t]) for t in range(m.shape[1]) if m[b, t]] for b in range(m.shape[0])]
    valid_rows = [row for row in rows if row]
    if mode == "token-mean":
        return sum(sum(row) for row in rows) / sum(len(row) for row in rows)
    if mode == "seq-mean-token-mean":
        return sum(sum(row) / len(row) for row in valid_rows) / len(valid_rows)
    if mode == "seq-mean-token-sum":
        return sum(sum(row) for row in valid_rows) / len(valid_rows)
    if mode == "seq-mean-token-sum-norm":
        return sum(sum(row) for row in rows) / (m.shape[0] * m.shape[1])
    raise AssertionError(mode)


def ref_kl(logp, ref_logp, estimator):
    out = np.zeros(logp.shape)
    for i in np.ndindex(*logp.shape):
        d = float(logp[i]) - float(ref_logp[i])
        if estimator == "k1":
            out[i] = d
        elif estimator == "abs":
            out[i] = abs(d)
        elif estimator == "k2":
            out[i] = 0.5 * d * d
        else:
            d = min(max(d, -20.0), 20.0)
            out[i] = min(max(math.exp(-d) - 1.0 + d, -10.0), 10.0)
    return out


def ref_policy_loss(
    logp, old, adv, m, clip_low, clip_high, dual_clip, agg, ratio_level, weights=None
):
    batch, time = m.shape
    log_ratio = np.zeros((batch, time))
    for b in range(batch):
        diffs = [float(logp[b, t]) - float(old[b, t]) for t in range(time) if m[b, t]]
        for t in range(time):
            if ratio_level == "sequence":
                log_ratio[b, t] = sum(diffs) / len(diffs) if diffs else 0.0
            elif m[b, t]:
                log_ratio[b, t] = float(logp[b, t]) - float(old[b, t])
    loss = np.zeros((batch, time))
    clipped = np.zeros((batch, time), bool)
    high = np.zeros((batch, time), bool)
    lower = np.zeros((batch, time), bool)
    for b, t in np.ndindex(batch, time):
        lr = min(max(log_ratio[b, t], -20.0), 20.0)
        log_ratio[b, t] = lr
        a = float(adv[b, t])
        ratio = math.exp(lr)
        l1 = -a * ratio
        l2 = -a * min(max(ratio, 1.0 - clip_low), 1.0 + clip_high)
        c = max(l1, l2)
        clipped[b, t] = l2 > l1
        high[b, t] = a > 0 and ratio > 1.0 + clip_high
        if dual_clip is not None and a < 0:
            lower[b, t] = c > -a * dual_clip
            c = min(-a * dual_clip, c)
        loss[b, t] = c if weights is None else float(weights[b, t]) * c
    metrics = {
        "approx_kl": ref_masked_mean(-log_ratio, m),
        "clipfrac": ref_masked_mean(clipped, m),
        "clipfrac_high": ref_masked_mean(high, m),
        "clipfrac_lower": ref_masked_mean(lower, m),
    }
    return ref_aggregate(loss, m, agg), metrics


def ref_value_loss(v, old, ret, m, clip, agg):
    per_token = np.zeros(m.shape)
    clipped = np.zeros(m.shape, bool)
    for i in np.ndindex(*m.shape):
        v_clip = float(old[i]) + min(max(float(v[i]) - float(old[i]), -clip), clip)
        unclipped_loss = (float(v[i]) - float(ret[i])) ** 2
        clipped_loss = (v_clip - float(ret[i])) ** 2
        per_token[i] = max(unclipped_loss, clipped_loss)
        clipped[i] = clipped_loss > unclipped_loss
    return 0.5 * ref_aggregate(per_token, m, agg), {"vf_clipfrac": ref_masked_mean(clipped, m)}


def ref_entropy(logits):
    out = np.zeros(logits.shape[:-1])
    for i in np.ndindex(*logits.shape[:-1]):
        z = logits[i].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        out[i] = -sum(pv * math.log(pv) for pv in p if pv > 0)
    return out


# ---------------------------------------------------------------------------------------------
# Inputs: ragged masks, a fully masked row, garbage on padding.


def make_mask(rng, batch=BATCH, time=TIME):
    lengths = rng.integers(1, time + 1, size=batch)
    lengths[0] = time
    lengths[3] = 0  # fully masked row
    return np.arange(time)[None, :] < lengths[:, None]


def make_policy_inputs(seed=0):
    """Log ratios wide enough that both clips and the dual clip act, for tokens and sequences."""
    rng = np.random.default_rng(seed)
    mask = make_mask(rng)
    old = rng.normal(-2.0, 0.5, size=(BATCH, TIME)).astype(np.float32)
    row_shift = np.array([0.0, 1.5, -0.6, 0.0, 1.3, 0.1, -1.5, 0.25])[:, None]
    diff = rng.normal(0.0, 0.4, size=(BATCH, TIME)) + row_shift
    diff[0, 1] = 25.0  # beyond the +-20 log-ratio clip
    logp = (old + diff).astype(np.float32)
    # One advantage per sequence, both signs, as after `broadcast_to_tokens`.
    seq_adv = np.array([-1.0, -0.7, 1.2, 0.4, -0.3, 0.8, 1.1, -1.4])
    adv = np.broadcast_to(seq_adv[:, None], (BATCH, TIME)).copy()
    adv[2, 0] = -0.5  # token-level variation too
    adv = np.where(mask, adv, 0.0).astype(np.float32)
    return logp, old, adv, mask


def as_mask(mask, kind):
    return jnp.asarray(mask) if kind == "bool" else jnp.asarray(mask, jnp.float32)


def close(actual, expected, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Aggregation.


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_aggregate(mode, kind):
    rng = np.random.default_rng(1)
    mask = make_mask(rng)
    values = rng.normal(size=(BATCH, TIME)).astype(np.float32)
    m = as_mask(mask, kind)
    out = aggregate(jnp.asarray(values), m, mode)
    assert out.shape == () and out.dtype == jnp.float32
    close(out, ref_aggregate(values, mask, mode))
    lengths = mask.sum(axis=1)
    expected_den = {
        "token-mean": lengths.sum(),
        "seq-mean-token-mean": np.count_nonzero(lengths),
        "seq-mean-token-sum": np.count_nonzero(lengths),
        "seq-mean-token-sum-norm": BATCH * TIME,
    }[mode]
    den = aggregation_denominator(m, mode)
    assert den.dtype == jnp.float32 and float(den) == expected_den
    num = aggregation_numerator(jnp.asarray(values), m, mode)
    close(num / den, ref_aggregate(values, mask, mode))


def test_aggregate_empty_mask_is_zero():
    values = jnp.ones((2, 3))
    for mode in AGG_MODES:
        assert float(aggregate(values, jnp.zeros((2, 3), bool), mode)) == 0.0


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        aggregate(jnp.ones((2, 3)), jnp.ones((2, 3)), "sum")
    with pytest.raises(ValueError, match="token-mean"):
        aggregation_denominator(jnp.ones((2, 3)), "mean")
    with pytest.raises(ValueError, match="token-mean"):
        policy_loss(*[jnp.zeros((2, 3))] * 4, agg="seq-sum")


# ---------------------------------------------------------------------------------------------
# KL.


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_kl(estimator):
    rng = np.random.default_rng(2)
    logp = rng.normal(-2.0, 1.0, size=(4, 5)).astype(np.float32)
    ref = (logp + rng.normal(0.0, 1.0, size=(4, 5))).astype(np.float32)
    ref[0, :4] = logp[0, :4] + np.array([30.0, 15.0, -15.0, -30.0], np.float32)  # k3 clamps
    out = kl(jnp.asarray(logp), jnp.asarray(ref), estimator)
    assert out.dtype == jnp.float32
    close(out, ref_kl(logp, ref, estimator), atol=1e-4, rtol=1e-5)


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k1, abs, k2, k3"):
        kl(jnp.zeros((1, 2)), jnp.zeros((1, 2)), "k4")


# ---------------------------------------------------------------------------------------------
# Policy loss.

CLIPS = [
    pytest.param(0.2, 0.2, 3.0, id="symmetric-dual"),
    pytest.param(0.2, 0.28, 3.0, id="clip_higher-dual"),
    pytest.param(0.2, 0.28, None, id="clip_higher-no_dual"),
    pytest.param(3e-4, 4e-4, None, id="gspo_clips"),
]


@pytest.mark.parametrize(("clip_low", "clip_high", "dual_clip"), CLIPS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss(clip_low, clip_high, dual_clip, ratio_level, agg):
    logp, old, adv, mask = make_policy_inputs()
    loss, metrics = policy_loss(
        jnp.asarray(logp),
        jnp.asarray(old),
        jnp.asarray(adv),
        jnp.asarray(mask),
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        agg=agg,
        ratio_level=ratio_level,
    )
    ref_loss, ref_metrics = ref_policy_loss(
        logp, old, adv, mask, clip_low, clip_high, dual_clip, agg, ratio_level
    )
    assert loss.shape == () and loss.dtype == jnp.float32
    close(loss, ref_loss, rtol=1e-5)
    assert set(metrics) == {"approx_kl", "clipfrac", "clipfrac_high", "clipfrac_lower"}
    for name, value in ref_metrics.items():
        close(metrics[name], value, atol=1e-6)
    # The inputs make every metric act (so the comparisons above are not vacuous).
    assert ref_metrics["clipfrac"] > 0 and ref_metrics["clipfrac"] >= ref_metrics["clipfrac_high"]
    assert (ref_metrics["clipfrac_lower"] > 0) == (dual_clip is not None)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_importance_weights(agg):
    """Per-token weights (π_old/μ of top-k/top-p samples) scale each token's clipped loss and
    are constants for the gradient; the metrics do not change."""
    logp, old, adv, mask = make_policy_inputs()
    weights = np.random.default_rng(5).uniform(0.2, 1.0, mask.shape)

    def loss_of(lp, w):
        return policy_loss(
            lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), agg=agg, weights=w
        )

    loss, metrics = loss_of(jnp.asarray(logp), jnp.asarray(weights))
    ref_loss, ref_metrics = ref_policy_loss(
        logp, old, adv, mask, 0.2, 0.2, 3.0, agg, "token", weights=weights
    )
    close(loss, ref_loss, rtol=1e-5)
    for name, value in ref_metrics.items():
        close(metrics[name], value, atol=1e-6)
    assert (
        abs(ref_loss - ref_policy_loss(logp, old, adv, mask, 0.2, 0.2, 3.0, agg, "token")[0]) > 1e-3
    )
    # d loss / d weights is zero: the weights are not trained through.
    grad_w = jax.grad(lambda w: loss_of(jnp.asarray(logp), w)[0])(jnp.asarray(weights))
    assert not np.any(np.asarray(grad_w))


def test_policy_loss_clip_higher_is_asymmetric():
    """With A > 0 the ratio is capped at 1 + clip_high; with A < 0 floored at 1 - clip_low."""
    mask = jnp.ones((2, 1), bool)
    old = jnp.zeros((2, 1))
    logp = jnp.log(jnp.array([[1.5], [0.5]]))
    adv = jnp.array([[1.0], [-1.0]])
    loss, metrics = policy_loss(
        logp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="seq-mean-token-sum"
    )
    close(loss, (-1.28 + 0.8) / 2, atol=1e-6)
    # both tokens are clipped, one of them at the upper bound
    close(metrics["clipfrac"], 1.0, atol=1e-6)
    close(metrics["clipfrac_high"], 0.5, atol=1e-6)


def test_policy_loss_on_policy_is_reinforce():
    """With old_logp = stop_gradient(logp) the ratio is 1: the gradient is -A / N per token."""
    logp, _, adv, mask = make_policy_inputs(1)

    def loss_fn(lp):
        return policy_loss(lp, jax.lax.stop_gradient(lp), jnp.asarray(adv), jnp.asarray(mask))

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(logp))
    close(grad, np.where(mask, -adv / mask.sum(), 0.0), atol=1e-7)
    assert float(metrics["clipfrac"]) == 0.0 and float(metrics["approx_kl"]) == 0.0


def test_policy_loss_ignores_padding_garbage():
    logp, old, adv, mask = make_policy_inputs(2)
    dirty = np.where(mask, logp, -np.inf).astype(np.float32)
    for level in ["token", "sequence"]:

        def loss_fn(lp, level=level):
            out = policy_loss(
                lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), ratio_level=level
            )
            return out[0]

        clean_loss, clean_grad = jax.value_and_grad(loss_fn)(jnp.asarray(logp))
        dirty_loss, dirty_grad = jax.value_and_grad(loss_fn)(jnp.asarray(dirty))
        assert float(clean_loss) == float(dirty_loss)
        np.testing.assert_array_equal(np.asarray(clean_grad), np.asarray(dirty_grad))


def test_policy_loss_argument_errors():
    args = [jnp.zeros((2, 3))] * 4
    with pytest.raises(ValueError, match="token, sequence"):
        policy_loss(*args, ratio_level="seq")
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(*args, dual_clip=0.5)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("micro_batches", [2, 4])
def test_gradient_accumulation_is_exact(agg, ratio_level, micro_batches):
    logp, old, adv, mask = make_policy_inputs(3)
    logp, old, adv, mask = map(jnp.asarray, (logp, old, adv, mask))

    def loss_fn(lp, old, adv, mask, denominator=None):
        return policy_loss(
            lp,
            old,
            adv,
            mask,
            clip_high=0.28,
            agg=agg,
            ratio_level=ratio_level,
            denominator=denominator,
        )[0]

    full_loss, full_grad = jax.value_and_grad(loss_fn)(logp, old, adv, mask)
    denominator = aggregation_denominator(mask, agg)
    size = BATCH // micro_batches
    losses, grads = [], []
    for k in range(micro_batches):
        rows = slice(k * size, (k + 1) * size)
        loss, grad = jax.value_and_grad(loss_fn)(
            logp[rows], old[rows], adv[rows], mask[rows], denominator
        )
        losses.append(float(loss))
        grads.append(np.asarray(grad))
    close(sum(losses), float(full_loss), atol=1e-6)
    close(np.concatenate(grads), np.asarray(full_grad), atol=1e-7)
    assert np.abs(np.asarray(full_grad)).max() > 0


def test_policy_loss_jit():
    logp, old, adv, mask = map(jnp.asarray, make_policy_inputs(4))
    fn = jax.jit(lambda *a: policy_loss(*a, agg="seq-mean-token-mean", ratio_level="sequence"))
    eager = policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean", ratio_level="sequence")
    jitted = fn(logp, old, adv, mask)
    close(jitted[0], float(eager[0]), atol=1e-6)
    for name in eager[1]:
        close(jitted[1][name], float(eager[1][name]), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Value loss and entropy.


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("clip", [0.5, 0.1])
def test_value_loss(agg, clip):
    rng = np.random.default_rng(5)
    mask = make_mask(rng)
    old = rng.normal(size=(BATCH, TIME)).astype(np.float32)
    values = (old + rng.normal(0.0, 0.6, size=(BATCH, TIME))).astype(np.float32)
    returns = (old + rng.normal(0.0, 1.0, size=(BATCH, TIME))).astype(np.float32)
    loss, metrics = value_loss(
        jnp.asarray(values),
        jnp.asarray(old),
        jnp.asarray(returns),
        jnp.asarray(mask),
        clip=clip,
        agg=agg,
    )
    ref_loss, ref_metrics = ref_value_loss(values, old, returns, mask, clip, agg)
    close(loss, ref_loss)
    close(metrics["vf_clipfrac"], ref_metrics["vf_clipfrac"], atol=1e-6)
    assert 0 < ref_metrics["vf_clipfrac"] < 1


def test_entropy():
    rng = np.random.default_rng(6)
    logits = rng.normal(0.0, 3.0, size=(2, 3, 11)).astype(np.float32)
    logits[0, 0] *= 1e4  # large logits: numerically stable
    logits[1, 1, :5] = -np.inf  # masked vocabulary entries
    out = entropy(jnp.asarray(logits))
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    close(out, ref_entropy(logits), atol=1e-5)
    grad = jax.grad(lambda z: entropy(z).sum())(jnp.asarray(logits))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_entropy_bfloat16_input_is_float32():
    logits = jnp.zeros((1, 2, 8), jnp.bfloat16)
    out = entropy(logits)
    assert out.dtype == jnp.float32
    close(out, np.full((1, 2), math.log(8)), atol=1e-6)
