"""Rollout stages: how completions are sampled and which groups enter the update.

`MultiTurn` samples trajectories in which an environment answers each model turn
(`gradflow.environments`); for the rest of the step they are completions like any other.

`select` runs after the reward: plain sampling keeps every group; DAPO's dynamic sampling
oversamples prompts and keeps `prompts` groups whose accuracy is not all equal (static shapes).
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Bool, Int, PRNGKeyArray

from ..batch import Prompts
from ..environments.episodes import Episodes
from ..environments.sampler import completion_slots, generate_turns
from ..models import Decoder
from ..rollout import Completions, _generate
from .reward import RewardOutput


class AbstractRollout(eqx.Module):
    """Samples `group_size` completions per prompt and selects the groups that are trained on."""

    group_size: AbstractVar[int]
    max_new_tokens: AbstractVar[int]
    temperature: AbstractVar[float]
    filtered: AbstractVar[bool]

    @abc.abstractmethod
    def prompts_to_sample(self, prompts_per_step: int) -> int:
        """How many prompts are sampled for a step that trains on `prompts_per_step`."""

    @abc.abstractmethod
    def __call__(self, policy: Decoder, prompts: Prompts, key: PRNGKeyArray) -> Completions:
        """Samples `group_size` completions per prompt, in the rows of
        `prompts.repeat(group_size)`."""

    @abc.abstractmethod
    def select(
        self, rewards: RewardOutput, prompts_per_step: int
    ) -> tuple[Int[Array, " kept"], Bool[Array, " kept"], dict[str, Array]]:
        """The sampled rows that enter the update batch, whether each is trained on (a row
        that only fills the batch's static size is not: it adds nothing to the loss), and
        selection metrics."""


class Sampling(AbstractRollout):
    """Plain sampling with temperature / top-p / top-k; every group is kept.

    **Fields:**

    - `group_size`: completions per prompt (`G`).
    - `max_new_tokens`: completion cap.
    - `temperature`, `top_p`, `top_k`: sampling (see `gradflow.rollout.generate`).
    - `eos_token_ids`, `pad_token_id`: from the tokenizer (`gradflow.algorithms.make` sets
      them: they are not hyperparameters).
    """

    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_ids: tuple[int, ...] = eqx.field(default=(), metadata={"task": True})
    pad_token_id: int = eqx.field(default=0, metadata={"task": True})

    def __check_init__(self):
        if self.group_size < 1 or self.max_new_tokens < 1:
            raise ValueError("group_size and max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"sampling needs temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got "
                f"temperature={self.temperature}, top_p={self.top_p}, top_k={self.top_k}"
            )

    @property
    def filtered(self) -> bool:
        """Whether tokens are drawn from a top-k/top-p truncated distribution (then the update
        weighs each token by the probability mass the filter kept: see `gradflow.step`)."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1.0)

    def prompts_to_sample(self, prompts_per_step: int) -> int:
        return prompts_per_step

    def __call__(self, policy: Decoder, prompts: Prompts, key: PRNGKeyArray) -> Completions:
        return _generate(
            policy,
            prompts.ids,
            prompts.mask,
            key,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            group_size=self.group_size,
        )

    def select(
        self, rewards: RewardOutput, prompts_per_step: int
    ) -> tuple[Int[Array, " kept"], Bool[Array, " kept"], dict[str, Array]]:
        rows = rewards.total.shape[0]
        return jnp.arange(rows), jnp.ones(rows, bool), {}


class MultiTurn(AbstractRollout):
    """Multi-turn trajectories: the model's turns answered by an environment (one per
    trajectory, on the host), all inside the compiled step (`gradflow.environments.sampler`).
    Every group is kept.

    **Fields:**

    - `sampling`: how each model turn samples (`group_size`, `temperature`, `top_p`, `top_k`,
      the tokenizer's ids; its `max_new_tokens` is not used: `max_turn_tokens` is).
    - `episodes`: the environments of the train split.
    - `max_turns`: model turns per trajectory.
    - `max_turn_tokens`: new tokens per model turn.
    - `max_observation_tokens`: tokens per environment answer.
    """

    sampling: Sampling
    episodes: Episodes = eqx.field(static=True)
    max_turns: int = 4
    max_turn_tokens: int = 128
    max_observation_tokens: int = 64

    def __check_init__(self):
        if min(self.max_turns, self.max_turn_tokens, self.max_observation_tokens) < 1:
            raise ValueError("max_turns, max_turn_tokens and max_observation_tokens must be >= 1")

    @property
    def group_size(self) -> int:
        return self.sampling.group_size

    @property
    def max_new_tokens(self) -> int:
        """The completion width: every turn and answer at their longest."""
        return completion_slots(self.max_turns, self.max_turn_tokens, self.max_observation_tokens)

    @property
    def temperature(self) -> float:
        return self.sampling.temperature

    @property
    def filtered(self) -> bool:
        return self.sampling.filtered

    def prompts_to_sample(self, prompts_per_step: int) -> int:
        return prompts_per_step

    def __call__(self, policy: Decoder, prompts: Prompts, key: PRNGKeyArray) -> Completions:
        repeated = prompts.repeat(self.group_size)
        s = self.sampling
        return generate_turns(
            policy,
            repeated.ids,
            repeated.mask,
            repeated.index,
            key,
            episodes=self.episodes,
            max_turns=self.max_turns,
            max_turn_tokens=self.max_turn_tokens,
            max_observation_tokens=self.max_observation_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            eos_token_ids=s.eos_token_ids,
            pad_token_id=s.pad_token_id,
        )

    def select(
        self, rewards: RewardOutput, prompts_per_step: int
    ) -> tuple[Int[Array, " kept"], Bool[Array, " kept"], dict[str, Array]]:
        return self.sampling.select(rewards, prompts_per_step)


class DynamicSampling(AbstractRollout):
    """DAPO's dynamic sampling: sample `oversample × prompts` groups, keep informative ones.

    A group is informative when its values of the reward part `metric` are not all equal: by
    default the correctness part, the accuracy (the DAPO paper; verl's `filter_groups.metric =
    acc`), not the overlong-shaped total (under which an all-correct group with one answer in
    the overlong buffer would count, and GRPO's division by the group std would turn its small
    penalty into a full-size advantage). The first `prompts_per_step` informative groups are
    kept, in sampling order; when fewer exist the update batch keeps its static size with refill
    groups (the first uninformative ones), which are not trained on: no loss term and no tokens
    in any denominator.

    Metrics: `dynamic_sampling/informative_groups` and `uninformative_groups` (of the sampled
    groups), `dropped_groups` (sampled groups left out of the loss, refill groups included) and
    `refill_groups`.

    **Fields:**

    - `sampling`: the underlying sampler.
    - `oversample`: prompts sampled per trained prompt (an integer ≥ 1).
    - `metric`: the reward part groups are judged by (`reward/<metric>` of the task; the
      hyperparameter `dynamic_sampling_metric`).
    """

    sampling: Sampling
    oversample: int = 3
    metric: str = eqx.field(
        default="correct", metadata={"hyperparameter": "dynamic_sampling_metric"}
    )

    def __check_init__(self):
        if self.oversample < 1:
            raise ValueError("oversample must be >= 1")

    @property
    def group_size(self) -> int:
        return self.sampling.group_size

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    @property
    def temperature(self) -> float:
        return self.sampling.temperature

    @property
    def filtered(self) -> bool:
        return self.sampling.filtered

    def prompts_to_sample(self, prompts_per_step: int) -> int:
        return prompts_per_step * self.oversample

    def __call__(self, policy: Decoder, prompts: Prompts, key: PRNGKeyArray) -> Completions:
        return self.sampling(policy, prompts, key)

    def select(
        self, rewards: RewardOutput, prompts_per_step: int
    ) -> tuple[Int[Array, " kept"], Bool[Array, " kept"], dict[str, Array]]:
        if self.metric not in rewards.parts:
            raise ValueError(
                f"dynamic_sampling_metric {self.metric!r} is not a part of the reward; its "
                f"parts: {', '.join(rewards.parts)}"
            )
        g = self.group_size
        grouped = rewards.parts[self.metric].reshape(-1, g)
        groups = grouped.shape[0]
        informative = jnp.max(grouped, axis=1) > jnp.min(grouped, axis=1)
        order = jnp.argsort(~informative, stable=True)[:prompts_per_step]
        rows = (order[:, None] * g + jnp.arange(g)[None, :]).reshape(-1)
        trained = jnp.repeat(informative[order], g)
        found = jnp.sum(informative.astype(jnp.int32))
        metrics = {
            "dynamic_sampling/informative_groups": found,
            "dynamic_sampling/uninformative_groups": groups - found,
            "dynamic_sampling/dropped_groups": groups - jnp.minimum(found, prompts_per_step),
            "dynamic_sampling/refill_groups": jnp.maximum(prompts_per_step - found, 0),
        }
        return jax.lax.stop_gradient(rows), trained, metrics
