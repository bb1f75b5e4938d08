"""An algorithm is a value: four stages (rollout, reward, advantage, loss) and its optimizers.

`make(name, **hyperparameters)` builds the named presets; a user composes a new algorithm by
building `Algorithm(...)` with a stage of their own (any subclass of the abstract stage types).

| name | rollout | advantage | loss |
|---|---|---|---|
| `reinforce` | sampling | global baseline, whitened | PPO-clip, 1 epoch × 1 minibatch |
| `ppo` | sampling | GAE with a critic | PPO-clip, 1 epoch × 4 minibatches, value loss |
| `grpo` | sampling | group-normalised | PPO-clip, KL k3 in the loss (β=0.001) |
| `dapo` | dynamic sampling (×3), overlong shaping | group-normalised | clip-higher 0.2/0.28, token-mean, overlong filtering, no KL |
| `rloo` | sampling | leave-one-out | PPO-clip |
| `reinforce_pp` | sampling | REINFORCE++ token returns, whitened | PPO-clip, KL k1 in the reward (β=0.001) |
| `reinforce_pp_baseline` | sampling | group mean baseline, whitened | PPO-clip, KL k3 in the loss (β=0.001) |
| `dr_grpo` | sampling | group mean baseline (no std) | `seq-mean-token-sum-norm` |
| `gspo` | sampling | group-normalised | sequence ratio, clip 3e-4/4e-4, 2 minibatches |
"""

import dataclasses
import difflib
from typing import Any

import equinox as eqx

from .optim import Optimizer
from .stages import (
    GAE,
    GRPO,
    RLOO,
    AbstractAdvantage,
    AbstractReward,
    AbstractRollout,
    DynamicSampling,
    OverlongPenalty,
    PolicyLoss,
    Reinforce,
    ReinforcePP,
    ReinforcePPBaseline,
    Sampling,
)


class Algorithm(eqx.Module):
    """An RL post-training algorithm: what `gradflow.step.step` folds together.

    **Fields:**

    - `rollout`: samples completions and selects the groups trained on.
    - `reward`: scores completions.
    - `advantage`: turns rewards (and values) into advantages.
    - `loss`: the policy objective and its update schedule.
    - `optimizer`: the policy's optimizer.
    - `critic_optimizer`: the critic's optimizer, exactly when the advantage needs values.
    """

    rollout: AbstractRollout
    reward: AbstractReward
    advantage: AbstractAdvantage
    loss: PolicyLoss
    optimizer: Optimizer
    critic_optimizer: Optimizer | None = None

    def __check_init__(self):
        if self.advantage.needs_values != (self.critic_optimizer is not None):
            raise ValueError(
                "critic_optimizer must be set exactly when the advantage estimator needs a critic"
            )


# Per preset: (advantage, loss overrides, rollout kind, uses a critic).
_PRESETS: dict[str, tuple[type, dict[str, Any], dict[str, Any], str]] = {
    "reinforce": (Reinforce, {}, {}, "sampling"),
    "ppo": (GAE, {}, {"minibatches": 4}, "sampling"),
    "grpo": (GRPO, {}, {"kl_coef": 0.001}, "sampling"),
    "dapo": (
        GRPO,
        {},
        {"clip_high": 0.28, "agg": "token-mean", "mask_truncated": True, "kl_coef": 0.0},
        "dynamic",
    ),
    "rloo": (RLOO, {}, {}, "sampling"),
    "reinforce_pp": (ReinforcePP, {}, {"kl_coef": 0.001, "kl_placement": "reward"}, "sampling"),
    "reinforce_pp_baseline": (ReinforcePPBaseline, {}, {"kl_coef": 0.001}, "sampling"),
    "dr_grpo": (GRPO, {"scale_by_std": False}, {"agg": "seq-mean-token-sum-norm"}, "sampling"),
    "gspo": (
        GRPO,
        {},
        {
            "ratio_level": "sequence",
            "clip_low": 3e-4,
            "clip_high": 4e-4,
            "dual_clip": None,
            "agg": "seq-mean-token-mean",
            "minibatches": 2,
        },
        "sampling",
    ),
}
NAMES = tuple(_PRESETS)
# `overlong_buffer = None` means a quarter of `max_new_tokens`.
DAPO_FIELDS = {"oversample": 3, "overlong_buffer": None, "overlong_factor": 1.0}
CRITIC_PREFIX = "critic_"


def _fields(module_type: type) -> list[str]:
    return [f.name for f in dataclasses.fields(module_type) if f.init]


def hyperparameters(name: str) -> dict[str, Any]:
    """Every hyperparameter `make(name, ...)` accepts, with its default.

    **Arguments:**

    - `name`: an algorithm name (see `NAMES`).

    **Returns:**

    A name → default dictionary.
    """
    _check_name(name)
    advantage, advantage_defaults, loss_defaults, kind = _PRESETS[name]
    values: dict[str, Any] = {}
    sampling = Sampling()
    values.update({f: getattr(sampling, f) for f in _fields(Sampling)})
    for f in ("eos_token_ids", "pad_token_id"):
        values.pop(f)
    if kind == "dynamic":
        values.update(DAPO_FIELDS)
    values.update({f: getattr(advantage(), f) for f in _fields(advantage)})
    values.update(advantage_defaults)
    loss = PolicyLoss(**loss_defaults)
    values.update({f: getattr(loss, f) for f in _fields(PolicyLoss)})
    optimizer = Optimizer()
    values.update({f: getattr(optimizer, f) for f in _fields(Optimizer)})
    if advantage.needs_values:
        critic = Optimizer(learning_rate=1e-5)
        values.update({CRITIC_PREFIX + f: getattr(critic, f) for f in _fields(Optimizer)})
    return values


def _check_name(name: str) -> None:
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown algorithm {name!r}{hint}; valid: {', '.join(NAMES)}")


def make(
    name: str,
    *,
    reward: AbstractReward,
    eos_token_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    **overrides: Any,
) -> Algorithm:
    """Builds a named algorithm.

    **Arguments:**

    - `name`: one of `NAMES`.
    - `reward`: the task's reward stage.
    - `eos_token_ids`, `pad_token_id`: from the tokenizer.
    - `overrides`: hyperparameters by name (see `hyperparameters(name)`); the critic's optimizer
      fields take a `critic_` prefix.

    **Returns:**

    The `Algorithm`.
    """
    _check_name(name)
    valid = hyperparameters(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown hyperparameter {key!r} for {name}{hint}; valid: {', '.join(sorted(valid))}"
        )
    values = {**valid, **overrides}
    advantage_type, _, _, kind = _PRESETS[name]

    def pick(module_type: type, prefix: str = "") -> dict[str, Any]:
        return {f: values[prefix + f] for f in _fields(module_type) if prefix + f in values}

    sampling = Sampling(
        **pick(Sampling), eos_token_ids=tuple(eos_token_ids), pad_token_id=pad_token_id
    )
    rollout: AbstractRollout = sampling
    if kind == "dynamic":
        rollout = DynamicSampling(sampling=sampling, oversample=values["oversample"])
        reward = OverlongPenalty(
            inner=reward,
            max_new_tokens=sampling.max_new_tokens,
            buffer=values["overlong_buffer"]
            if values["overlong_buffer"] is not None
            else max(1, sampling.max_new_tokens // 4),
            factor=values["overlong_factor"],
        )
    critic_optimizer = None
    if advantage_type.needs_values:
        critic_optimizer = Optimizer(**pick(Optimizer, CRITIC_PREFIX))
    return Algorithm(
        rollout=rollout,
        reward=reward,
        advantage=advantage_type(**pick(advantage_type)),
        loss=PolicyLoss(**pick(PolicyLoss)),
        optimizer=Optimizer(**pick(Optimizer)),
        critic_optimizer=critic_optimizer,
    )
