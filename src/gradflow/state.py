"""The train state: everything a step reads and writes, one pytree that checkpoints and shards."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray

from .algorithms import Algorithm
from .critic import Critic
from .models import Decoder


class TrainState(eqx.Module):
    """Policy, optional critic, optional frozen reference, optimizer states, step and PRNG key.

    **Fields:**

    - `policy`: the model being trained.
    - `policy_opt`: its optimizer state.
    - `critic`, `critic_opt`: PPO's critic and its optimizer state (`None` otherwise).
    - `reference`: the frozen initial policy when the KL coefficient is > 0 (`None` otherwise).
    - `step`: RL steps taken.
    - `key`: the run's base PRNG key (step `i` uses `fold_in(key, i)`).
    """

    policy: Decoder
    policy_opt: optax.OptState
    critic: Critic | None
    critic_opt: optax.OptState | None
    reference: Decoder | None
    step: Int[Array, ""]
    key: PRNGKeyArray


def init_state(algorithm: Algorithm, policy: Decoder, *, key: PRNGKeyArray) -> TrainState:
    """The initial state for `algorithm`: a critic when it needs one, a reference when its loss
    stage needs one (β > 0).

    **Arguments:**

    - `algorithm`: the algorithm.
    - `policy`: the initial policy.
    - `key`: the run's base PRNG key.

    **Returns:**

    The `TrainState`.
    """
    params = eqx.filter(policy, eqx.is_inexact_array)
    critic = critic_opt = None
    if algorithm.critic_optimizer is not None:
        critic = Critic.from_policy(jax.tree.map(jnp.copy, policy))
        critic_params = eqx.filter(critic, eqx.is_inexact_array)
        critic_opt = algorithm.critic_optimizer.transform().init(critic_params)
    reference = None
    if algorithm.loss.needs_reference:
        reference = jax.tree.map(jnp.copy, policy)
    return TrainState(
        policy=policy,
        policy_opt=algorithm.optimizer.transform().init(params),
        critic=critic,
        critic_opt=critic_opt,
        reference=reference,
        step=jnp.asarray(0, jnp.int32),
        key=key,
    )
