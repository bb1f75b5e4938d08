"""The loss stage: the PPO-clip policy objective, KL to the reference, entropy bonus, value loss,
and the update schedule (epochs × minibatches × micro-batches) they are minimised with.
"""

import equinox as eqx

from ..losses import AGG_MODES, KL_ESTIMATORS, RATIO_LEVELS

KL_PLACEMENTS = ("loss", "reward")


class PolicyLoss(eqx.Module):
    """Hyperparameters of the policy update (symbols of `docs/algorithms.md`).

    **Fields:**

    - `clip_low`, `clip_high`: `eps_low`, `eps_high` of the clipped ratio (clip-higher when
      `clip_high > clip_low`).
    - `dual_clip`: the dual-clip constant `c` for negative advantages (`None`: off).
    - `agg`: loss aggregation mode (`token-mean`, `seq-mean-token-mean`, `seq-mean-token-sum`,
      `seq-mean-token-sum-norm`).
    - `ratio_level`: `"token"` (PPO) or `"sequence"` (GSPO).
    - `kl_coef`: `β` of the KL to the frozen reference policy (0: no reference at all).
    - `kl_placement`: `"loss"` (`+ β·agg(kl)`) or `"reward"` (`r_t -= β·kl_t`).
    - `kl_estimator`: `k1`, `k2`, `k3` or `abs` (`None`: k3 in the loss, k1 in the reward).
    - `entropy_coef`: weight of the entropy bonus (entropy is always logged).
    - `epochs`, `minibatches`: PPO's passes over the batch and minibatches per pass.
    - `micro_batches`: gradient-accumulation splits of each minibatch (exact).
    - `value_clip`: the critic's value clip (used when the state has a critic).
    - `mask_truncated`: drop completions without EOS from the loss (DAPO's overlong filtering).
    - `logprob_chunk`: completion positions per LM-head chunk when computing log-probs.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    agg: str = "token-mean"
    ratio_level: str = "token"
    kl_coef: float = 0.0
    kl_placement: str = "loss"
    kl_estimator: str | None = None
    entropy_coef: float = 0.0
    epochs: int = 1
    minibatches: int = 1
    micro_batches: int = 1
    value_clip: float = 0.5
    mask_truncated: bool = False
    logprob_chunk: int = 32

    def __check_init__(self):
        checks = {
            "agg": (self.agg, AGG_MODES),
            "ratio_level": (self.ratio_level, RATIO_LEVELS),
            "kl_placement": (self.kl_placement, KL_PLACEMENTS),
        }
        if self.kl_estimator is not None:
            checks["kl_estimator"] = (self.kl_estimator, KL_ESTIMATORS)
        for name, (value, valid) in checks.items():
            if value not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}; got {value!r}")
        for name in ("epochs", "minibatches", "micro_batches", "logprob_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.kl_coef < 0:
            raise ValueError("kl_coef must be >= 0")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None: off), got {self.dual_clip}")

    @property
    def estimator(self) -> str:
        """The KL estimator in use."""
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k3" if self.kl_placement == "loss" else "k1"

    @property
    def reuses_logprobs(self) -> bool:
        """With one epoch and one minibatch `old_logp = stop_gradient(logp)`: no extra forward."""
        return self.epochs * self.minibatches == 1
