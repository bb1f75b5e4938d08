"""Advantage stages: small modules over the pure estimators in `gradflow.advantages`.

Each takes the token rewards (the sequence reward on the last valid token, minus any KL placed
in the reward), the completion mask and, for GAE, the critic's values; sequence-level estimators
use the sum of the token rewards as the sequence score.
"""

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .. import advantages as estimators


class AbstractAdvantage(eqx.Module):
    """Turns rewards (and values) into per-token advantages (and returns, for a critic)."""

    needs_values: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(
        self,
        token_rewards: Float[Array, "batch time"],
        mask: Bool[Array, "batch time"],
        values: Float[Array, "batch time"] | None,
        group_size: int,
    ) -> tuple[Float[Array, "batch time"], Float[Array, "batch time"] | None]:
        """`(advantages, returns)`; returns is None without a critic."""


def _scores(token_rewards: Float[Array, "batch time"]) -> Float[Array, " batch"]:
    return jnp.sum(token_rewards, axis=1)


class Reinforce(AbstractAdvantage):
    """Global-baseline REINFORCE: `(s - mean_B s) / (std_B s + eps)` (`whiten=False`: `s - mean`)."""

    whiten: bool = True

    def __call__(self, token_rewards, mask, values, group_size):
        seq = estimators.reinforce(_scores(token_rewards), whiten=self.whiten)
        return estimators.broadcast_to_tokens(seq, mask), None


class GRPO(AbstractAdvantage):
    """Group-normalised advantage `(s - mean_g) / (std_g + std_eps)`; `scale_by_std=False` is
    Dr.GRPO. (Not `eps`: `make` takes every stage's fields as one namespace, and AdamW has `eps`.)
    """

    scale_by_std: bool = True
    std_eps: float = 1e-6

    def __call__(self, token_rewards, mask, values, group_size):
        seq = estimators.grpo(
            _scores(token_rewards), group_size, scale_by_std=self.scale_by_std, eps=self.std_eps
        )
        return estimators.broadcast_to_tokens(seq, mask), None


class RLOO(AbstractAdvantage):
    """Leave-one-out baseline `s_b - mean_{j≠b} s_j`; no whitening."""

    def __call__(self, token_rewards, mask, values, group_size):
        seq = estimators.rloo(_scores(token_rewards), group_size)
        return estimators.broadcast_to_tokens(seq, mask), None


class ReinforcePP(AbstractAdvantage):
    """REINFORCE++: discounted token returns, whitened over the batch."""

    gamma: float = 1.0

    def __call__(self, token_rewards, mask, values, group_size):
        return estimators.reinforce_pp(token_rewards, mask, gamma=self.gamma), None


class ReinforcePPBaseline(AbstractAdvantage):
    """REINFORCE++-baseline: `s - mean_g` over valid tokens, whitened over the batch."""

    def __call__(self, token_rewards, mask, values, group_size):
        return estimators.reinforce_pp_baseline(_scores(token_rewards), mask, group_size), None


class GAE(AbstractAdvantage):
    """Generalised advantage estimation with a critic (PPO); returns are formed before whitening."""

    needs_values: ClassVar[bool] = True
    gamma: float = 1.0
    lam: float = 1.0

    def __call__(self, token_rewards, mask, values, group_size):
        if values is None:
            raise ValueError("GAE needs a critic: the train state has none")
        return estimators.gae(token_rewards, values, mask, gamma=self.gamma, lam=self.lam)
