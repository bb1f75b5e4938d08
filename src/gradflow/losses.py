"""Policy, value and KL losses and their aggregation (see `docs/algorithms.md`).

Loss aggregation (`agg`), with `L` the per-token loss and `m` the completion mask:

- `"token-mean"`: `sum(L*m) / sum(m)` (DAPO's token-level loss).
- `"seq-mean-token-mean"`: mean over sequences of each sequence's token mean (GRPO paper).
- `"seq-mean-token-sum"`: mean over sequences of each sequence's token sum.
- `"seq-mean-token-sum-norm"`: `sum(L*m) / (batch * time)` (Dr.GRPO and TRL's `dr_grpo`: a
  constant normaliser, `time` the completion cap); verl divides by `time` alone (its
  `loss_mask.shape[-1]`): `aggregation_denominator(..., rows=1)`.

`policy_loss` also takes per-token weights (`gradflow.stages.PolicyLoss`: the mass a top-k/top-p
filter kept times the rollout correction), which multiply each token's loss before aggregation.

Each mode is `aggregation_numerator / aggregation_denominator`; sequence means count only
sequences with at least one valid token. Passing the whole minibatch's denominator to
`aggregate` while feeding one micro-batch's values makes the sum over micro-batches equal the
full-batch loss exactly (gradient accumulation).

KL estimators (`kl`, `d = logp - ref_logp`): `"k1"`: `d`; `"abs"`: `|d|`; `"k2"`: `d^2 / 2`;
`"k3"`: `exp(-d) - 1 + d` with `d` clamped to `[-20, 20]` and the result to `[-10, 10]` (verl).

Policy loss (PPO-clip, `policy_loss`): `log_ratio = clip(logp - old_logp, -20, 20)`,
`ratio = exp(log_ratio)`, `l1 = -A*ratio`, `l2 = -A*clip(ratio, 1 - clip_low, 1 + clip_high)`,
`c = max(l1, l2)`, `L = where(A < 0, min(-A*dual_clip, c), c)`. `ratio_level="sequence"` is
GSPO (per-sequence log ratio = masked token mean of `logp - old_logp`).

Value loss (`value_loss`): `v_clip = V_old + clip(V - V_old, -clip, clip)`,
`L = 0.5 * agg(max((V - R)^2, (v_clip - R)^2))`.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from gradflow.advantages import masked_mean

Mask = Bool[Array, "batch time"] | Float[Array, "batch time"]

AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_ESTIMATORS = ("k1", "abs", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")


def _check_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")


def aggregation_denominator(
    mask: Mask, mode: str, *, rows: Float[Array, ""] | None = None
) -> Float[Array, ""]:
    """Denominator of the aggregated loss for `mode`.

    `"token-mean"`: `sum(m)`; `"seq-mean-token-mean"` and `"seq-mean-token-sum"`: the number
    of sequences with at least one valid token; `"seq-mean-token-sum-norm"`: `rows * time`.

    **Arguments:**

    - `mask`: bool or float 0/1 completion mask.
    - `mode`: one of `AGG_MODES`.
    - `rows`: the sequence count in `seq-mean-token-sum-norm`'s constant (default: the mask's
        rows, Dr.GRPO's `B`; 1 gives verl's constant `time`).

    **Returns:**

    A float32 scalar.

    **Raises:**

    `ValueError` for an unknown mode.
    """
    _check_mode(mode)
    m = mask.astype(jnp.float32)
    if mode == "token-mean":
        return jnp.sum(m)
    if mode == "seq-mean-token-sum-norm":
        if rows is None:
            return jnp.asarray(m.shape[0] * m.shape[1], jnp.float32)
        return rows * m.shape[1]
    return jnp.sum(jnp.any(m > 0, axis=1).astype(jnp.float32))


def aggregation_numerator(
    values: Float[Array, "batch time"], mask: Mask, mode: str
) -> Float[Array, ""]:
    """Numerator of the aggregated loss for `mode`.

    `"seq-mean-token-mean"`: `sum_b (sum_t values*m) / max(sum_t m, 1)` (rows without valid
    tokens contribute 0); the other modes: `sum(values * m)`.

    **Arguments:**

    - `values`: per-token values (e.g. losses).
    - `mask`: bool or float 0/1 completion mask.
    - `mode`: one of `AGG_MODES`.

    **Returns:**

    A float32 scalar.

    **Raises:**

    `ValueError` for an unknown mode.
    """
    _check_mode(mode)
    m = mask.astype(jnp.float32)
    masked = values.astype(jnp.float32) * m
    if mode == "seq-mean-token-mean":
        row_counts = jnp.maximum(jnp.sum(m, axis=1), 1.0)
        return jnp.sum(jnp.sum(masked, axis=1) / row_counts)
    return jnp.sum(masked)


def aggregate(
    values: Float[Array, "batch time"],
    mask: Mask,
    mode: str,
    *,
    denominator: Float[Array, ""] | None = None,
) -> Float[Array, ""]:
    """Aggregate per-token values to a scalar: `numerator / max(denominator, 1e-8)`.

    **Arguments:**

    - `values`: per-token values (e.g. losses).
    - `mask`: bool or float 0/1 completion mask.
    - `mode`: one of `AGG_MODES`.
    - `denominator`: defaults to `aggregation_denominator(mask, mode)`. For gradient
        accumulation pass the whole minibatch's denominator with a micro-batch's values: the
        sum over micro-batches then equals the full-batch aggregate.

    **Returns:**

    A float32 scalar.

    **Raises:**

    `ValueError` for an unknown mode.
    """
    if denominator is None:
        denominator = aggregation_denominator(mask, mode)
    return aggregation_numerator(values, mask, mode) / jnp.maximum(denominator, 1e-8)


def kl(
    logp: Float[Array, "batch time"], ref_logp: Float[Array, "batch time"], estimator: str
) -> Float[Array, "batch time"]:
    """Per-token KL estimate between the current and the reference policy.

    With `d = logp - ref_logp`: `"k1"`: `d`; `"abs"`: `|d|`; `"k2"`: `d^2 / 2`; `"k3"`:
    `exp(-d) - 1 + d` with `d` clamped to `[-20, 20]` and the result clamped to `[-10, 10]`
    (verl's `low_var_kl`).

    **Arguments:**

    - `logp`: log-probs of the sampled tokens under the current policy.
    - `ref_logp`: log-probs under the reference policy.
    - `estimator`: one of `KL_ESTIMATORS`.

    **Returns:**

    Per-token float32 KL estimates (not masked: aggregate them with the mask).

    **Raises:**

    `ValueError` for an unknown estimator.
    """
    d = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
    if estimator == "k1":
        return d
    if estimator == "abs":
        return jnp.abs(d)
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        d = jnp.clip(d, -20.0, 20.0)
        return jnp.clip(jnp.exp(-d) - 1.0 + d, -10.0, 10.0)
    raise ValueError(
        f"unknown KL estimator {estimator!r}; valid estimators: {', '.join(KL_ESTIMATORS)}"
    )


def policy_loss(
    logp: Float[Array, "batch time"],
    old_logp: Float[Array, "batch time"],
    advantages: Float[Array, "batch time"],
    mask: Mask,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    ratio_level: str = "token",
    denominator: Float[Array, ""] | None = None,
    weights: Float[Array, "batch time"] | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """PPO-clip policy loss with clip-higher, dual clip and GSPO's sequence-level ratio.

    `log_ratio = clip(logp - old_logp, -20, 20)`, `ratio = exp(log_ratio)`,
    `l1 = -A*ratio`, `l2 = -A*clip(ratio, 1 - clip_low, 1 + clip_high)`, `c = max(l1, l2)`,
    `L = where(A < 0, min(-A*dual_clip, c), c)` (no dual clip when `dual_clip` is None), then
    `aggregate(w*L, mask, agg, denominator=denominator)` with per-token importance weights `w`
    (1 unless `weights` is given).

    With `ratio_level="sequence"` (GSPO) the log ratio of every token is the masked mean over
    its sequence of `logp - old_logp` (0 for a sequence without valid tokens; the gradient
    flows through the mean); the clipping is the same. GSPO's own settings
    (`clip_low=3e-4`, `clip_high=4e-4`, `dual_clip=None`) are the caller's to pass.

    Metrics, masked means over this (micro-)batch: `"approx_kl"` = `mean(-log_ratio)`,
    `"clipfrac"` = `mean(l2 > l1)`, `"clipfrac_high"` = `mean((l2 > l1) & (A > 0))` (the ratio
    clipped at `1 + clip_high`), `"clipfrac_lower"` = `mean((c > -A*dual_clip) & (A < 0))`
    (0 without dual clip).

    **Arguments:**

    - `logp`: log-probs of the sampled tokens under the current policy.
    - `old_logp`: log-probs under the behaviour (pre-update) policy.
    - `advantages`: per-token advantages.
    - `mask`: bool or float 0/1 completion mask.
    - `clip_low`, `clip_high`: the ratio is clipped to `[1 - clip_low, 1 + clip_high]`.
    - `dual_clip`: dual-clip constant (> 1) for negative advantages, or None.
    - `agg`: aggregation mode, one of `AGG_MODES`.
    - `ratio_level`: `"token"` (PPO) or `"sequence"` (GSPO).
    - `denominator`: aggregation denominator (see `aggregate`); the whole minibatch's for
        gradient accumulation.
    - `weights`: per-token importance weights of tokens drawn from a sampling distribution
        other than the behaviour policy (a top-k/top-p filter's kept mass, a sampler–trainer
        mismatch correction); treated as constants.

    **Returns:**

    `(loss, metrics)`: the float32 scalar loss and a dict of float32 scalar metrics.

    **Raises:**

    `ValueError` for an unknown `agg` or `ratio_level`, or `dual_clip <= 1`.
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(
            f"unknown ratio_level {ratio_level!r}; valid levels: {', '.join(RATIO_LEVELS)}"
        )
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m = mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)
    # Padding tokens get a log ratio of 0 so that garbage log-probs there stay finite.
    diff = jnp.where(m > 0, logp.astype(jnp.float32) - old_logp.astype(jnp.float32), 0.0)
    if ratio_level == "sequence":
        seq_diff = jnp.sum(diff * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        diff = jnp.broadcast_to(seq_diff[:, None], diff.shape)
    log_ratio = jnp.clip(diff, -20.0, 20.0)
    ratio = jnp.exp(log_ratio)
    l1 = -adv * ratio
    l2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    c = jnp.maximum(l1, l2)
    negative = adv < 0
    if dual_clip is None:
        loss_mat = c
        clipfrac_lower = jnp.zeros((), jnp.float32)
    else:
        loss_mat = jnp.where(negative, jnp.minimum(-adv * dual_clip, c), c)
        lower = (c > -adv * dual_clip) & negative
        clipfrac_lower = masked_mean(lower.astype(jnp.float32), m)
    if weights is not None:
        loss_mat = jax.lax.stop_gradient(weights.astype(jnp.float32)) * loss_mat
    loss = aggregate(loss_mat, m, agg, denominator=denominator)
    metrics = {
        "approx_kl": masked_mean(-log_ratio, m),
        "clipfrac": masked_mean((l2 > l1).astype(jnp.float32), m),
        "clipfrac_high": masked_mean(((l2 > l1) & (adv > 0)).astype(jnp.float32), m),
        "clipfrac_lower": clipfrac_lower,
    }
    return loss, jax.lax.stop_gradient(metrics)


def value_loss(
    values: Float[Array, "batch time"],
    old_values: Float[Array, "batch time"],
    returns: Float[Array, "batch time"],
    mask: Mask,
    *,
    clip: float = 0.5,
    agg: str = "token-mean",
    denominator: Float[Array, ""] | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Clipped value loss of the PPO critic.

    `v_clip = old + clip(v - old, -clip, clip)`,
    `L = 0.5 * aggregate(max((v - R)^2, (v_clip - R)^2))`.

    **Arguments:**

    - `values`: current critic values per token.
    - `old_values`: critic values at rollout time.
    - `returns`: value targets (from `gae`).
    - `mask`: bool or float 0/1 completion mask.
    - `clip`: value clip range.
    - `agg`: aggregation mode, one of `AGG_MODES`.
    - `denominator`: aggregation denominator (see `aggregate`).

    **Returns:**

    `(loss, metrics)` with the metric `"vf_clipfrac"` = `masked_mean((v_clip - R)^2 > (v - R)^2)`.

    **Raises:**

    `ValueError` for an unknown `agg`.
    """
    m = mask.astype(jnp.float32)
    v = values.astype(jnp.float32)
    old = old_values.astype(jnp.float32)
    ret = returns.astype(jnp.float32)
    v_clip = old + jnp.clip(v - old, -clip, clip)
    unclipped = (v - ret) ** 2
    clipped = (v_clip - ret) ** 2
    loss = 0.5 * aggregate(jnp.maximum(unclipped, clipped), m, agg, denominator=denominator)
    metrics = {"vf_clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), m)}
    return loss, jax.lax.stop_gradient(metrics)


def entropy(logits: Float[Array, "batch time vocab"]) -> Float[Array, "batch time"]:
    """Entropy of the categorical distribution given by `logits`, per token.

    Computed in float32 from `log_softmax`; vocabulary entries with probability 0 (e.g.
    `-inf` logits) contribute 0.

    **Arguments:**

    - `logits`: unnormalised log-probabilities.

    **Returns:**

    `-sum_v p_v log p_v` per token, float32.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    # `where` before the product keeps `0 * -inf` out of both the value and the gradient.
    return -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)
