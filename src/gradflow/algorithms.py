"""An algorithm is a value: four stages (rollout, reward, advantage, loss) and its optimizers.

Each preset in `PRESETS` is an `Algorithm` value holding its stages with their defaults;
`TaskReward()` stands for the task's reward, which `make(name, reward=...)` puts in its place. A
user composes a new algorithm by building `Algorithm(...)` with a stage of their own (any subclass
of the abstract stage types).

A preset's hyperparameters (what `make` and a config's `[algorithm]` table accept, with their
types) are its stages' fields: a field's own name, or the one its
`eqx.field(metadata={"hyperparameter": ...})` gives; the fields of `critic_optimizer` take a
`critic_` prefix; fields with `metadata={"task": True}` (the tokenizer's ids) are set by `make`
from its own arguments. Two stages of one preset sharing a name is an error when the preset is
defined.

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
import typing
from collections.abc import Iterator
from typing import Any, NamedTuple

import equinox as eqx

from .batch import Prompts
from .environments.episodes import Episodes
from .optim import Optimizer
from .rollout import Completions
from .stages import (
    GAE,
    GRPO,
    RLOO,
    AbstractAdvantage,
    AbstractLoss,
    AbstractReward,
    AbstractRollout,
    DynamicSampling,
    EnvironmentReward,
    MultiTurn,
    OverlongPenalty,
    PolicyLoss,
    Reinforce,
    ReinforcePP,
    ReinforcePPBaseline,
    RewardOutput,
    Sampling,
)


class Algorithm(eqx.Module):
    """An RL post-training algorithm: what `gradflow.step.step` folds together.

    **Fields:**

    - `rollout`: samples completions and selects the groups trained on.
    - `reward`: scores completions.
    - `advantage`: turns rewards (and values) into advantages.
    - `loss`: the objective and its update schedule.
    - `optimizer`: the policy's optimizer.
    - `critic_optimizer`: the critic's optimizer, exactly when the advantage needs values.
    """

    rollout: AbstractRollout
    reward: AbstractReward
    advantage: AbstractAdvantage
    loss: AbstractLoss
    optimizer: Optimizer
    critic_optimizer: Optimizer | None = eqx.field(default=None, metadata={"prefix": "critic_"})

    def __check_init__(self):
        if self.advantage.needs_values != (self.critic_optimizer is not None):
            raise ValueError(
                "critic_optimizer must be set exactly when the advantage estimator needs a critic"
            )


class TaskReward(AbstractReward):
    """Stands for the task's reward in a preset; `make` puts the task's reward in its place."""

    def __call__(self, prompts: Prompts, completions: Completions) -> RewardOutput:
        raise TypeError("TaskReward stands for the task's reward: build the algorithm with make")


PRESETS: dict[str, Algorithm] = {
    "reinforce": Algorithm(Sampling(), TaskReward(), Reinforce(), PolicyLoss(), Optimizer()),
    "ppo": Algorithm(
        Sampling(),
        TaskReward(),
        GAE(),
        PolicyLoss(minibatches=4),
        Optimizer(),
        critic_optimizer=Optimizer(learning_rate=1e-5),
    ),
    "grpo": Algorithm(Sampling(), TaskReward(), GRPO(), PolicyLoss(kl_coef=0.001), Optimizer()),
    "dapo": Algorithm(
        DynamicSampling(sampling=Sampling(), oversample=3),
        OverlongPenalty(inner=TaskReward()),
        GRPO(),
        PolicyLoss(clip_high=0.28, agg="token-mean", mask_truncated=True, kl_coef=0.0),
        Optimizer(),
    ),
    "rloo": Algorithm(Sampling(), TaskReward(), RLOO(), PolicyLoss(), Optimizer()),
    "reinforce_pp": Algorithm(
        Sampling(),
        TaskReward(),
        ReinforcePP(),
        PolicyLoss(kl_coef=0.001, kl_placement="reward"),
        Optimizer(),
    ),
    "reinforce_pp_baseline": Algorithm(
        Sampling(), TaskReward(), ReinforcePPBaseline(), PolicyLoss(kl_coef=0.001), Optimizer()
    ),
    "dr_grpo": Algorithm(
        Sampling(),
        TaskReward(),
        GRPO(scale_by_std=False),
        PolicyLoss(agg="seq-mean-token-sum-norm"),
        Optimizer(),
    ),
    "gspo": Algorithm(
        Sampling(),
        TaskReward(),
        GRPO(),
        PolicyLoss(
            ratio_level="sequence",
            clip_low=3e-4,
            clip_high=4e-4,
            dual_clip=None,
            agg="seq-mean-token-mean",
            minibatches=2,
        ),
        Optimizer(),
    ),
}
NAMES = tuple(PRESETS)


class Hyperparameter(NamedTuple):
    """Where a hyperparameter lives in its preset, its default and its type."""

    path: tuple[str, ...]
    default: Any
    type: Any


class _Leaf(NamedTuple):
    owner: eqx.Module
    field: dataclasses.Field
    path: tuple[str, ...]
    value: Any
    prefix: str


def _leaves(module: eqx.Module, path: tuple[str, ...] = (), prefix: str = "") -> Iterator[_Leaf]:
    """Every field of `module` and its sub-modules that is not itself a module (`None` fields of
    the `Algorithm` are absent stages, not values)."""
    for field in dataclasses.fields(module):
        value = getattr(module, field.name)
        where = (*path, field.name)
        if isinstance(value, eqx.Module):
            yield from _leaves(value, where, prefix + field.metadata.get("prefix", ""))
            if isinstance(value, TaskReward):
                yield _Leaf(module, field, where, value, prefix)
        elif value is not None or path:
            yield _Leaf(module, field, where, value, prefix)


def hyperparameter_table(algorithm: Algorithm) -> dict[str, Hyperparameter]:
    """The hyperparameters of a preset: its stages' fields, by name.

    **Arguments:**

    - `algorithm`: a preset (the task's reward a `TaskReward()`).

    **Returns:**

    A name → `Hyperparameter` dictionary.

    **Raises:**

    `ValueError` when two fields have the same name.
    """
    table: dict[str, Hyperparameter] = {}
    for leaf in _leaves(algorithm):
        if isinstance(leaf.value, TaskReward) or leaf.field.metadata.get("task"):
            continue
        name = leaf.prefix + leaf.field.metadata.get("hyperparameter", leaf.field.name)
        if name in table:
            raise ValueError(
                f"hyperparameter {name!r} is a field of both {'.'.join(table[name].path)} and "
                f"{'.'.join(leaf.path)}: give one of them another name"
            )
        kind = typing.get_type_hints(type(leaf.owner))[leaf.field.name]
        table[name] = Hyperparameter(leaf.path, leaf.value, kind)
    return table


_TABLES = {name: hyperparameter_table(preset) for name, preset in PRESETS.items()}


def _check_name(name: str) -> None:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown algorithm {name!r}{hint}; valid: {', '.join(NAMES)}")


def hyperparameters(name: str) -> dict[str, Any]:
    """Every hyperparameter `make(name, ...)` accepts, with its default.

    **Arguments:**

    - `name`: an algorithm name (see `NAMES`).

    **Returns:**

    A name → default dictionary.
    """
    _check_name(name)
    return {key: h.default for key, h in _TABLES[name].items()}


def hyperparameter_types(name: str) -> dict[str, Any]:
    """The type of every hyperparameter `make(name, ...)` accepts (its stage field's annotation).

    **Arguments:**

    - `name`: an algorithm name (see `NAMES`).

    **Returns:**

    A name → type dictionary.
    """
    _check_name(name)
    return {key: h.type for key, h in _TABLES[name].items()}


def _rebuild(module: eqx.Module, values: dict[tuple[str, ...], Any], path=()) -> eqx.Module:
    """`module` with the fields at `values`' paths replaced (each changed module re-checked)."""
    changes = {}
    for field in dataclasses.fields(module):
        where = (*path, field.name)
        value = getattr(module, field.name)
        if where in values:
            changes[field.name] = values[where]
        elif isinstance(value, eqx.Module):
            new = _rebuild(value, values, where)
            if new is not value:
                changes[field.name] = new
    return dataclasses.replace(module, **changes) if changes else module


def make(
    name: str,
    *,
    reward: AbstractReward,
    eos_token_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    **overrides: Any,
) -> Algorithm:
    """Builds a named algorithm: its preset with the task's reward and the overrides.

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
    table = _TABLES[name]
    unknown = sorted(set(overrides) - set(table))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, table, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown hyperparameter {key!r} for {name}{hint}; valid: {', '.join(sorted(table))}"
        )
    task = {"eos_token_ids": tuple(eos_token_ids), "pad_token_id": pad_token_id}
    values = {table[key].path: value for key, value in overrides.items()}
    for leaf in _leaves(PRESETS[name]):
        if isinstance(leaf.value, TaskReward):
            values[leaf.path] = reward
        elif leaf.field.metadata.get("task"):
            values[leaf.path] = task[leaf.field.name]
    return _rebuild(PRESETS[name], values)


def multi_turn(
    algorithm: Algorithm,
    episodes: Episodes,
    *,
    max_turns: int,
    max_turn_tokens: int,
    max_observation_tokens: int,
) -> Algorithm:
    """`algorithm` with multi-turn rollouts: its sampling becomes a `MultiTurn` rollout over
    `episodes` and its reward an `EnvironmentReward` around the task's.

    **Arguments:**

    - `algorithm`: an algorithm whose rollout is plain `Sampling`.
    - `episodes`: the environments of the train split.
    - `max_turns`, `max_turn_tokens`, `max_observation_tokens`: the `[environment]` limits.

    **Returns:**

    The multi-turn `Algorithm`.

    **Raises:**

    `ValueError` for a rollout other than `Sampling` (DAPO's dynamic sampling), or an advantage
    over token returns (`ReinforcePP`, `GAE`), whose returns would restart at every environment
    answer (the loss mask's gaps).
    """
    if not isinstance(algorithm.rollout, Sampling):
        raise ValueError(
            f"multi-turn rollouts replace plain sampling; this algorithm samples with "
            f"{type(algorithm.rollout).__name__}"
        )
    if isinstance(algorithm.advantage, ReinforcePP | GAE):
        raise ValueError(
            f"multi-turn rollouts need a sequence-level advantage (grpo, rloo, reinforce, "
            f"dr_grpo, ...); {type(algorithm.advantage).__name__} accumulates token returns, "
            "which would restart at every environment answer"
        )
    rollout = MultiTurn(
        sampling=algorithm.rollout,
        episodes=episodes,
        max_turns=max_turns,
        max_turn_tokens=max_turn_tokens,
        max_observation_tokens=max_observation_tokens,
    )
    return dataclasses.replace(
        algorithm, rollout=rollout, reward=EnvironmentReward(inner=algorithm.reward)
    )
