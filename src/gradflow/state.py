"""The train state: everything a step reads and writes, one pytree that checkpoints and shards."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray

from .algorithms import Algorithm
from .critic import Critic
from .models import Decoder, trainable


class TrainState(eqx.Module):
    """Policy, optional critic, optional frozen reference, optimizer states, step and PRNG key.

    **Fields:**

    - `policy`: the model being trained (with LoRA adapters, only they are: `trainable`).
    - `policy_opt`: its optimizer state (of the trained arrays only).
    - `critic`, `critic_opt`: PPO's critic and its optimizer state (`None` otherwise).
    - `reference`: the frozen initial policy when the KL coefficient is > 0 and the policy is
      trained whole (`None` otherwise).
    - `step`: RL steps taken.
    - `key`: the run's base PRNG key (step `i` uses `fold_in(key, i)`).
    - `reference_is_base`: the reference is the policy with its adapters switched off (LoRA:
      no second copy of the weights).
    """

    policy: Decoder
    policy_opt: optax.OptState
    critic: Critic | None
    critic_opt: optax.OptState | None
    reference: Decoder | None
    step: Int[Array, ""]
    key: PRNGKeyArray
    reference_is_base: bool = eqx.field(static=True, default=False)

    @property
    def reference_policy(self) -> Decoder | None:
        """The frozen reference policy, or `None` without one."""
        return self.policy.adapters_off() if self.reference_is_base else self.reference

    def trained(self) -> "TrainState":
        """The state without the frozen base weights (`None` in their place): what a checkpoint
        holds.

        **Returns:**

        The partial `TrainState`.
        """
        return eqx.filter(self, _kept(self))

    def with_trained(self, trained: "TrainState") -> "TrainState":
        """This state with the arrays of `trained` (as `trained()` gives them) put in.

        **Arguments:**

        - `trained`: a partial state.

        **Returns:**

        The whole `TrainState`.
        """
        return eqx.combine(trained, eqx.filter(self, _kept(self), inverse=True))


def _kept(state: TrainState):
    """The trained arrays, and everything that is not a model weight (counters, keys)."""
    spec = trainable(state)
    return jax.tree.map(lambda keep, x: keep or not eqx.is_inexact_array(x), spec, state)


def init_state(algorithm: Algorithm, policy: Decoder, *, key: PRNGKeyArray) -> TrainState:
    """The initial state for `algorithm`: a critic when it needs one, a reference when its loss
    stage needs one (β > 0; with LoRA the base itself).

    **Arguments:**

    - `algorithm`: the algorithm.
    - `policy`: the initial policy.
    - `key`: the run's base PRNG key.

    **Returns:**

    The `TrainState`.
    """
    params = eqx.filter(policy, trainable(policy))
    critic = critic_opt = None
    if algorithm.critic_optimizer is not None:
        critic = Critic.from_policy(jax.tree.map(jnp.copy, policy))
        critic_params = eqx.filter(critic, trainable(critic))
        critic_opt = algorithm.critic_optimizer.transform().init(critic_params)
    reference = None
    lora = policy.lora is not None
    if algorithm.loss.needs_reference and not lora:
        reference = jax.tree.map(jnp.copy, policy)
    return TrainState(
        policy=policy,
        policy_opt=algorithm.optimizer.transform().init(params),
        critic=critic,
        critic_opt=critic_opt,
        reference=reference,
        step=jnp.asarray(0, jnp.int32),
        key=key,
        reference_is_base=algorithm.loss.needs_reference and lora,
    )
