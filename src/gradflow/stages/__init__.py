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
from .loss import AbstractLoss, AbstractMetric, Max, Mean, PolicyLoss, Share, UpdateBatch
from .reward import AbstractReward, EnvironmentReward, HostReward, OverlongPenalty, RewardOutput
from .rollout import AbstractRollout, DynamicSampling, MultiTurn, Sampling

__all__ = [
    "GAE",
    "GRPO",
    "RLOO",
    "AbstractAdvantage",
    "AbstractLoss",
    "AbstractMetric",
    "AbstractReward",
    "AbstractRollout",
    "DynamicSampling",
    "EnvironmentReward",
    "HostReward",
    "Max",
    "Mean",
    "MultiTurn",
    "OverlongPenalty",
    "PolicyLoss",
    "Reinforce",
    "ReinforcePP",
    "ReinforcePPBaseline",
    "RewardOutput",
    "Sampling",
    "Share",
    "UpdateBatch",
]
