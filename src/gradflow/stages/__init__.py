"""The four stage kinds an `Algorithm` is made of: rollout, reward, advantage, loss."""

from .advantage import (
    GAE,
    GRPO,
    RLOO,
    AbstractAdvantage,
    Reinforce,
    ReinforcePP,
    ReinforcePPBaseline,
)
from .loss import PolicyLoss
from .reward import AbstractReward, HostReward, OverlongPenalty, RewardOutput
from .rollout import AbstractRollout, DynamicSampling, Sampling

__all__ = [
    "GAE",
    "GRPO",
    "RLOO",
    "AbstractAdvantage",
    "AbstractReward",
    "AbstractRollout",
    "DynamicSampling",
    "HostReward",
    "OverlongPenalty",
    "PolicyLoss",
    "Reinforce",
    "ReinforcePP",
    "ReinforcePPBaseline",
    "RewardOutput",
    "Sampling",
]
