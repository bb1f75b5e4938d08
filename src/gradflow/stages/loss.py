"""The loss stage: the objective an update minimises, its metrics, and the update schedule.

`gradflow.step` computes, for each micro-batch, the policy's log-probs and entropies (and the
critic's values) and calls the loss stage for that micro-batch's share of the minibatch objective;
it sums the gradients over micro-batches and steps the optimizers. Everything the objective is
made of (policy loss, importance weights, KL to the reference in the loss or in the reward,
entropy bonus, value loss) is the loss stage's.

A metric a loss returns says how it combines over the micro-batches and updates of a step
(`Mean`, `Share`, `Max`), so a new metric of a user-written loss is reduced right.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Bool, Float, Int

from ..losses import (
    AGG_MODES,
    KL_ESTIMATORS,
    RATIO_LEVELS,
    aggregate,
    aggregation_denominator,
    kl,
    policy_loss,
    value_loss,
)

KL_PLACEMENTS = ("loss", "reward")
ROLLOUT_CORRECTIONS = ("none", "token_tis", "token_mask", "sequence_mask")
NORM_CONSTANTS = ("batch_time", "time")


class UpdateBatch(eqx.Module):
    """One row per trained sequence: prompt + completion ids and what the losses need.

    **Fields:**

    - `ids`, `full_mask`: prompt + completion ids and their attention mask.
    - `mask`: the completion tokens trained on (all False on a row that is not trained on).
    - `trained`: whether each row is trained on (False: a refill group of dynamic sampling).
    - `advantages`: per-token advantages.
    - `old_logp`: the behaviour policy's log-probs, computed before the first update (`None` in
      the step's batch when one update reuses the update's own forward pass; the loss stage
      always sees them, as `stop_gradient(logp)` then).
    - `sampling_logp`: log-probs of the distribution the tokens were drawn from, when it is
      top-k/top-p truncated (`None` otherwise).
    - `sampler_logp`: the sampler's log-probs of the tokens under the policy at the training
      temperature, unfiltered (what `old_logp` recomputes; `None` when the sampler cannot give
      them: top-k/top-p at a temperature other than 1).
    - `ref_logp`: the frozen reference's log-probs (`None` without a reference).
    - `old_values`, `returns`: the critic's values before the update and its targets (`None`
      without a critic).
    """

    ids: Int[Array, "batch total"]
    full_mask: Bool[Array, "batch total"]
    mask: Bool[Array, "batch new"]
    trained: Bool[Array, " batch"]
    advantages: Float[Array, "batch new"]
    old_logp: Float[Array, "batch new"] | None
    sampling_logp: Float[Array, "batch new"] | None
    sampler_logp: Float[Array, "batch new"] | None
    ref_logp: Float[Array, "batch new"] | None
    old_values: Float[Array, "batch new"] | None
    returns: Float[Array, "batch new"] | None


class AbstractMetric(eqx.Module):
    """One micro-batch's value of a logged metric, and how a step's values combine.

    The step stacks each metric's fields over `[epochs, minibatches, micro_batches]`; `reduce`
    turns the stacked fields into the logged scalar.
    """

    @abc.abstractmethod
    def reduce(self) -> Float[Array, ""]:
        """The logged value, from the fields stacked over epochs, minibatches, micro-batches."""


class Mean(AbstractMetric):
    """`Σ total / Σ count` over every micro-batch and update (e.g. a masked token sum and the
    token count: the mean over every token the step trained on)."""

    total: Float[Array, "*stack"]
    count: Float[Array, "*stack"]

    def reduce(self) -> Float[Array, ""]:
        return jnp.sum(self.total) / jnp.maximum(jnp.sum(self.count), 1.0)


class Share(AbstractMetric):
    """A micro-batch's share of a minibatch value (a loss: numerator over the minibatch's
    denominator): summed over micro-batches, then averaged over updates."""

    value: Float[Array, "*stack"]

    def reduce(self) -> Float[Array, ""]:
        return jnp.mean(jnp.sum(self.value, axis=-1))


class Max(AbstractMetric):
    """The largest value over every micro-batch and update."""

    value: Float[Array, "*stack"]

    def reduce(self) -> Float[Array, ""]:
        return jnp.max(self.value)


class AbstractLoss(eqx.Module):
    """What an update minimises, and the schedule it is minimised with.

    **Fields** (the schedule, read by `gradflow.step`):

    - `epochs`, `minibatches`: passes over the batch and minibatches per pass.
    - `micro_batches`: gradient-accumulation splits of each minibatch (exact when `__call__`
      divides by the minibatch's `denominator`).
    - `logprob_chunk`: completion positions per LM-head chunk when computing log-probs.
    - `packing`: run the update's forward passes (old and reference log-probs, the critic's
      values, each micro-batch's objective) on packed rows (`gradflow.packing`); the objective
      and metrics are the padded update's.
    - `pack_tokens`: slots per packed row (`None`: `prompt_len + max_new_tokens`).
    - `share_prompts`: with `packing`, pack each group's prompt once, its completions attending
      to it (exact: the same values as without; `False` only to measure or compare).
    - `mask_truncated`: drop completions without EOS from the loss (DAPO's overlong filtering).
    - `needs_reference`: whether the train state keeps a frozen reference policy.
    - `needs_old_logprobs`: whether `shape_rewards` needs the behaviour policy's log-probs
      (they are computed anyway when there are several updates).
    """

    epochs: AbstractVar[int]
    minibatches: AbstractVar[int]
    micro_batches: AbstractVar[int]
    logprob_chunk: AbstractVar[int]
    packing: AbstractVar[bool]
    pack_tokens: AbstractVar[int | None]
    share_prompts: AbstractVar[bool]
    mask_truncated: AbstractVar[bool]
    needs_reference: AbstractVar[bool]
    needs_old_logprobs: AbstractVar[bool]

    @abc.abstractmethod
    def shape_rewards(
        self,
        token_rewards: Float[Array, "batch new"],
        mask: Bool[Array, "batch new"],
        old_logp: Float[Array, "batch new"] | None,
        ref_logp: Float[Array, "batch new"] | None,
    ) -> Float[Array, "batch new"]:
        """The token rewards the advantage stage sees (e.g. minus a KL penalty)."""

    @abc.abstractmethod
    def denominator(self, minibatch: UpdateBatch) -> Float[Array, ""]:
        """The normaliser of a minibatch's objective, shared by its micro-batches."""

    @abc.abstractmethod
    def __call__(
        self,
        logp: Float[Array, "batch new"],
        entropy: Float[Array, "batch new"],
        values: Float[Array, "batch new"] | None,
        batch: UpdateBatch,
        denominator: Float[Array, ""],
    ) -> tuple[Float[Array, ""], dict[str, AbstractMetric]]:
        """One micro-batch's objective (its numerator over the minibatch's `denominator`) and
        its metrics, given the policy's log-probs and entropies of the completion tokens (and
        the critic's values, when the state has a critic)."""


def _kept_mass(
    old_logp: Float[Array, "batch new"],
    sampling_logp: Float[Array, "batch new"],
    sampler_logp: Float[Array, "batch new"] | None,
    mask: Bool[Array, "batch new"],
) -> Float[Array, "batch new"]:
    """The mass `Z = π_sampler(y_t) / μ(y_t)` the top-k/top-p filter kept at each token, capped at
    1 (rounding), from the sampler's own log-probs; without them (a filter at a temperature other
    than 1) `π_old(y_t) / μ(y_t)`, which is `Z` times the mismatch ratio `ρ_t`."""
    unfiltered = old_logp if sampler_logp is None else sampler_logp
    return jnp.minimum(jnp.exp(jnp.where(mask, unfiltered - sampling_logp, 0.0)), 1.0)


def _importance_weights(
    rollout_correction: str,
    threshold: float,
    lower: float,
    old_logp: Float[Array, "batch new"],
    sampler_logp: Float[Array, "batch new"],
    mask: Bool[Array, "batch new"],
) -> tuple[Float[Array, "batch new"] | None, dict[str, AbstractMetric]]:
    """Rollout-correction weights `w` from `ρ_t = π_old(y_t) / π_sampler(y_t)` and their metrics
    (the mask modes reject ratios above `threshold` or below `lower`)."""
    m = mask.astype(jnp.float32)
    tokens = jnp.sum(m)
    log_ratio = jnp.where(mask, old_logp - sampler_logp, 0.0)
    ratio = jnp.exp(jnp.clip(log_ratio, -20.0, 20.0))
    metrics: dict[str, AbstractMetric] = {
        "rollout/is_mean": Mean(jnp.sum(ratio * m), tokens),
        "rollout/is_max": Max(jnp.max(jnp.where(mask, ratio, 0.0))),
    }
    if rollout_correction == "none":
        return None, metrics
    if rollout_correction == "token_tis":
        weights = jnp.minimum(ratio, threshold)
        metrics["rollout/is_truncated"] = Mean(
            jnp.sum((ratio > threshold).astype(jnp.float32) * m), tokens
        )
        return weights, metrics
    if rollout_correction == "sequence_mask":
        ratio = jnp.exp(jnp.clip(jnp.sum(log_ratio, axis=1, keepdims=True), -20.0, 20.0))
        ratio = jnp.broadcast_to(ratio, mask.shape)
    rejected = (ratio > threshold) | (ratio < lower)
    metrics["rollout/is_masked"] = Mean(jnp.sum(rejected.astype(jnp.float32) * m), tokens)
    return jnp.where(rejected, 0.0, ratio), metrics


class PolicyLoss(AbstractLoss):
    """The PPO-clip family's objective (symbols of `docs/algorithms.md`): clipped policy loss
    with importance weights, KL to the reference, entropy bonus and, with a critic, the value
    loss.

    **Fields:**

    - `clip_low`, `clip_high`: `eps_low`, `eps_high` of the clipped ratio (clip-higher when
      `clip_high > clip_low`).
    - `dual_clip`: the dual-clip constant `c` for negative advantages (`None`: off).
    - `agg`: loss aggregation mode (`token-mean`, `seq-mean-token-mean`, `seq-mean-token-sum`,
      `seq-mean-token-sum-norm`).
    - `norm_constant`: the constant of `seq-mean-token-sum-norm`: `"batch_time"` divides by
      `B·T` (the trained sequences times the completion cap: Dr.GRPO, TRL's `dr_grpo`),
      `"time"` by `T` alone (verl's `loss_mask.shape[-1]`).
    - `ratio_level`: `"token"` (PPO) or `"sequence"` (GSPO).
    - `kl_coef`: `β` of the KL to the frozen reference policy (0: no reference at all).
    - `kl_placement`: `"loss"` (`+ β·agg(kl)`) or `"reward"` (`r_t -= β·kl_t`).
    - `kl_estimator`: `k1`, `k2`, `k3` or `abs` (`None`: k3 in the loss, k1 in the reward).
    - `entropy_coef`: weight of the entropy bonus (entropy is always logged).
    - `rollout_correction`: sampler–trainer mismatch correction with
      `ρ_t = π_old(y_t) / π_sampler(y_t)` (the recomputed log-probs against the sampler's):
      `"none"`, `"token_tis"` (weights `min(ρ_t, threshold)`), `"token_mask"` (weights `ρ_t`,
      0 where `ρ_t > threshold` or `ρ_t < threshold_lower`), `"sequence_mask"` (weights
      `ρ = Π_t ρ_t` of the sequence, 0 where `ρ > threshold` or `ρ < threshold_lower`). A
      rejected token keeps its place in the aggregation denominators (TRL's convention).
    - `rollout_correction_threshold`: the truncation / masking threshold (> 1).
    - `rollout_correction_threshold_lower`: the mask modes' lower threshold, in `[0, 1)` (0:
      none, as TRL; verl rejects below `1 / threshold`).
    - `epochs`, `minibatches`, `micro_batches`, `logprob_chunk`, `packing`, `pack_tokens`,
      `share_prompts`, `mask_truncated`: the schedule (see `AbstractLoss`).
    - `value_clip`: the critic's value clip (used when the state has a critic).

    With top-k/top-p sampling each token's policy loss is also weighed by the probability mass
    the filter kept, `Z = π_sampler(y)/μ(y)` (`μ` the filtered distribution the token was drawn
    from), so that the weight is `Z · w(ρ)`: each factor once. At a temperature other than 1 the
    sampler keeps no unfiltered tempered log-prob, so `Z` is estimated by `min(π_old(y)/μ(y), 1)`
    (which holds `ρ` too) and a `rollout_correction` other than `"none"` is an error.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    agg: str = "token-mean"
    norm_constant: str = "batch_time"
    ratio_level: str = "token"
    kl_coef: float = 0.0
    kl_placement: str = "loss"
    kl_estimator: str | None = None
    entropy_coef: float = 0.0
    rollout_correction: str = "none"
    rollout_correction_threshold: float = 2.0
    rollout_correction_threshold_lower: float = 0.0
    epochs: int = 1
    minibatches: int = 1
    micro_batches: int = 1
    value_clip: float = 0.5
    mask_truncated: bool = False
    logprob_chunk: int = 32
    packing: bool = True
    pack_tokens: int | None = None
    share_prompts: bool = True

    def __check_init__(self):
        checks = {
            "agg": (self.agg, AGG_MODES),
            "norm_constant": (self.norm_constant, NORM_CONSTANTS),
            "ratio_level": (self.ratio_level, RATIO_LEVELS),
            "kl_placement": (self.kl_placement, KL_PLACEMENTS),
            "rollout_correction": (self.rollout_correction, ROLLOUT_CORRECTIONS),
        }
        if self.kl_estimator is not None:
            checks["kl_estimator"] = (self.kl_estimator, KL_ESTIMATORS)
        for name, (value, valid) in checks.items():
            if value not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}; got {value!r}")
        for name in ("epochs", "minibatches", "micro_batches", "logprob_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.pack_tokens is not None and self.pack_tokens < 1:
            raise ValueError("pack_tokens must be >= 1 (or None: the padded row length)")
        if self.kl_coef < 0:
            raise ValueError("kl_coef must be >= 0")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None: off), got {self.dual_clip}")
        if not self.rollout_correction_threshold > 1.0:
            raise ValueError(
                f"rollout_correction_threshold must be > 1, got {self.rollout_correction_threshold}"
            )
        if not 0.0 <= self.rollout_correction_threshold_lower < 1.0:
            raise ValueError(
                "rollout_correction_threshold_lower must be in [0, 1) (0: no lower threshold; "
                "verl's is 1 / rollout_correction_threshold), got "
                f"{self.rollout_correction_threshold_lower}"
            )

    @property
    def estimator(self) -> str:
        """The KL estimator in use."""
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k3" if self.kl_placement == "loss" else "k1"

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def needs_old_logprobs(self) -> bool:
        return self.kl_placement == "reward" and self.needs_reference

    def shape_rewards(self, token_rewards, mask, old_logp, ref_logp):
        if self.kl_placement != "reward" or ref_logp is None:
            return token_rewards
        kl_tokens = kl(old_logp, ref_logp, self.estimator)
        return token_rewards - self.kl_coef * jnp.where(mask, kl_tokens, 0.0)

    def denominator(self, minibatch):
        rows = jnp.sum(minibatch.trained.astype(jnp.float32))
        if self.norm_constant == "time":
            rows = jnp.ones((), jnp.float32)
        return aggregation_denominator(minibatch.mask, self.agg, rows=rows)

    def __call__(self, logp, entropy, values, batch, denominator):
        old = batch.old_logp
        mask = batch.mask
        weights = None
        sums: dict[str, AbstractMetric] = {}
        if batch.sampling_logp is not None:
            # Tokens drawn with top-k/top-p come from the truncated distribution μ, not from the
            # sampler's π: each is weighed by the mass Z = π/μ the filter kept at its step. The
            # mismatch ρ = π_old/π is the rollout correction's alone, so Z comes from the
            # sampler's own log-probs where it has them (π_old/μ would hold ρ a second time).
            weights = _kept_mass(old, batch.sampling_logp, batch.sampler_logp, mask)
            sums["loss/kept_mass"] = Mean(
                jnp.sum(jnp.where(mask, weights, 0.0)), jnp.sum(mask.astype(jnp.float32))
            )
        if batch.sampler_logp is not None:
            correction, is_metrics = _importance_weights(
                self.rollout_correction,
                self.rollout_correction_threshold,
                self.rollout_correction_threshold_lower,
                old,
                batch.sampler_logp,
                mask,
            )
            sums.update(is_metrics)
            if correction is not None:
                weights = correction if weights is None else weights * correction
        elif self.rollout_correction != "none":
            raise ValueError(
                "rollout_correction needs the sampler's log-probs at the training temperature, "
                "which top-k/top-p sampling at a temperature other than 1 does not give"
            )
        pg, pg_metrics = policy_loss(
            logp,
            old,
            batch.advantages,
            mask,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            dual_clip=self.dual_clip,
            agg=self.agg,
            ratio_level=self.ratio_level,
            denominator=denominator,
            weights=weights,
        )
        total = pg
        tokens = jnp.sum(mask.astype(jnp.float32))
        sums.update({f"loss/{k}": Mean(v * tokens, tokens) for k, v in pg_metrics.items()})
        sums["loss/entropy"] = Mean(jnp.sum(jnp.where(mask, entropy, 0.0)), tokens)
        if self.entropy_coef:
            total = total - self.entropy_coef * aggregate(
                entropy, mask, self.agg, denominator=denominator
            )
        if batch.ref_logp is not None:
            kl_tokens = kl(logp, batch.ref_logp, self.estimator)
            sums["loss/kl_ref"] = Mean(jnp.sum(jnp.where(mask, kl_tokens, 0.0)), tokens)
            if self.kl_placement == "loss":
                total = total + self.kl_coef * aggregate(
                    kl_tokens, mask, self.agg, denominator=denominator
                )
        sums["loss/policy"] = Share(pg)
        sums["loss/total"] = Share(total)
        if values is None:
            return total, jax.lax.stop_gradient(sums)
        value, v_metrics = value_loss(
            values,
            batch.old_values,
            batch.returns,
            mask,
            clip=self.value_clip,
            agg=self.agg,
            denominator=denominator,
        )
        sums["loss/value"] = Share(value)
        sums.update({f"loss/{k}": Mean(v * tokens, tokens) for k, v in v_metrics.items()})
        return total + value, jax.lax.stop_gradient(sums)
