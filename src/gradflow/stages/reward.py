"""Reward stages: a sequence reward per completion, with its named parts for logging.

Rewards written in Python over decoded text (`HostReward`) enter the compiled step through
`jax.pure_callback`; rewards written in JAX over tokens (`OverlongPenalty`) run in place.
"""

import abc
import logging
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from ..batch import Prompts
from ..rollout import Completions

# scorer(completion_tokens [B, N], completion_mask [B, N], prompt_index [B]) -> float32 [parts, B]
logger = logging.getLogger(__name__)

HostScorer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class RewardOutput(eqx.Module):
    """The total reward of each completion and its named parts (unweighted).

    **Fields:**

    - `total`: the reward the advantage sees.
    - `parts`: each part's value (0 where it does not apply).
    - `applicable`: where each part applies (a reward function that returned `None` does not);
        a part missing here applies everywhere. Logged means count only these samples.
    """

    total: Float[Array, " batch"]
    parts: dict[str, Float[Array, " batch"]]
    applicable: dict[str, Bool[Array, " batch"]] = eqx.field(default_factory=dict)


class AbstractReward(eqx.Module):
    """Scores completions of (repeated) prompts."""

    @abc.abstractmethod
    def __call__(self, prompts: Prompts, completions: Completions) -> RewardOutput:
        """The reward of each completion."""


class HostReward(AbstractReward):
    """A Python scorer over decoded text, called on the host through `jax.pure_callback`.

    The scorer sees every token of a completion the model attended to (a multi-turn
    trajectory's environment answers included). It returns one row per named part; the total is their weighted sum. NaN in a row
    means "does not apply" (a reward function's `None`): that sample's part counts 0 in the
    total and is left out of the part's logged mean. A part named `correct` is also reported as
    accuracy. Scorers catch their own failures (`gradflow.tasks.scoring`): a failing sample
    scores 0 and the run goes on; the part `failed` counts them. A scorer that raises costs its
    batch (every part 0, `failed` 1), not the step.

    **Fields:**

    - `scorer`: `(tokens, mask, prompt_index) -> float32 [len(parts), batch]` (NaN: does not
        apply).
    - `parts`: the names of the scorer's rows.
    - `weights`: the weight of each part in the total.
    """

    scorer: HostScorer = eqx.field(static=True)
    parts: tuple[str, ...] = eqx.field(static=True)
    weights: tuple[float, ...] = eqx.field(static=True)

    def __check_init__(self):
        if len(self.parts) != len(self.weights):
            raise ValueError("parts and weights must have the same length")

    def __call__(self, prompts: Prompts, completions: Completions) -> RewardOutput:
        batch = completions.tokens.shape[0]
        shape = jax.ShapeDtypeStruct((len(self.parts), batch), jnp.float32)

        def host(tokens, mask, index):
            try:
                out = np.asarray(
                    self.scorer(np.asarray(tokens), np.asarray(mask), np.asarray(index)),
                    np.float32,
                )
            except Exception:  # an error here would stop every device's step: count it instead
                logger.exception(
                    "the reward scorer failed; this batch scores 0 (counted as failed)"
                )
                out = np.full((len(self.parts), batch), np.nan, np.float32)
                if "failed" in self.parts:
                    out[self.parts.index("failed")] = 1.0
            return np.where(np.isinf(out), np.nan, out)

        values = jax.pure_callback(
            host,
            shape,
            completions.tokens,
            completions.context_mask,
            prompts.index,
            vmap_method="sequential",
        )
        applicable = {name: ~jnp.isnan(values[i]) for i, name in enumerate(self.parts)}
        parts = {name: jnp.nan_to_num(values[i]) for i, name in enumerate(self.parts)}
        total = sum(w * parts[name] for name, w in zip(self.parts, self.weights, strict=True))
        return RewardOutput(
            total=jnp.asarray(total, jnp.float32), parts=parts, applicable=applicable
        )


class EnvironmentReward(AbstractReward):
    """Another reward plus the environment's turn rewards of multi-turn trajectories.

    The turn rewards' sum is the part `environment` (weight 1). A trajectory whose environment
    failed scores 0 in total and counts in the part `failed`.

    **Fields:**

    - `inner`: the task's reward of the trajectory text.
    """

    inner: AbstractReward

    def __call__(self, prompts: Prompts, completions: Completions) -> RewardOutput:
        turns = completions.turns
        if turns is None:
            raise ValueError("EnvironmentReward needs multi-turn completions (a MultiTurn rollout)")
        out = self.inner(prompts, completions)
        failed = turns.failed.astype(jnp.float32)
        parts = {
            **out.parts,
            "environment": turns.reward,
            "failed": out.parts.get("failed", jnp.zeros_like(failed)) + failed,
        }
        total = jnp.where(turns.failed, 0.0, out.total + turns.reward)
        return RewardOutput(total=total, parts=parts, applicable=out.applicable)


class OverlongPenalty(AbstractReward):
    """DAPO's overlong reward shaping on top of another reward (pure JAX over lengths).

    With `L_max` the completion cap (the completions' width: the rollout's `max_new_tokens`), a
    completion longer than `L_max - buffer` gets `-(length - (L_max - buffer)) / buffer * factor`,
    capped at `-factor`.

    **Fields:**

    - `inner`: the reward being shaped.
    - `buffer`: `L_buf` (`None`: a quarter of `L_max`); hyperparameter `overlong_buffer`.
    - `factor`: the largest penalty; hyperparameter `overlong_factor`.
    """

    inner: AbstractReward
    buffer: int | None = eqx.field(default=None, metadata={"hyperparameter": "overlong_buffer"})
    factor: float = eqx.field(default=1.0, metadata={"hyperparameter": "overlong_factor"})

    def __check_init__(self):
        if self.buffer is not None and self.buffer < 1:
            raise ValueError(f"overlong buffer must be >= 1, got {self.buffer}")

    def __call__(self, prompts: Prompts, completions: Completions) -> RewardOutput:
        out = self.inner(prompts, completions)
        cap = completions.tokens.shape[1]
        buffer = max(1, cap // 4) if self.buffer is None else self.buffer
        if buffer > cap:
            raise ValueError(f"overlong buffer {buffer} exceeds the completion cap {cap}")
        excess = completions.lengths.astype(jnp.float32) - (cap - buffer)
        penalty = -jnp.clip(excess / buffer, 0.0, 1.0) * self.factor
        parts = {**out.parts, "overlong_penalty": penalty}
        return RewardOutput(total=out.total + penalty, parts=parts, applicable=out.applicable)
