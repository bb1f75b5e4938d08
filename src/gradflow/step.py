"""The one compiled RL step: rollout → reward → selection → advantage → update.

`step(algorithm, state, prompts, key)` folds the algorithm's stages; nothing in it knows which
algorithm runs. The update is a nested `lax.scan`: epochs, then a shuffled batch reshaped into
minibatches, then micro-batches whose gradients are accumulated exactly (losses are
numerator / whole-minibatch denominator). Old log-probs, reference log-probs and old values are
computed once, before the first epoch. Every metric is computed over the whole batch.

With a device mesh the sequences are split over `data × fsdp` (replicated for the host reward,
which scores the whole batch once), the state keeps the layout of `gradflow.sharding` (so its
donated buffers are reused and shardings never drift) and the metrics come out replicated.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .algorithms import Algorithm
from .batch import Prompts
from .critic import Critic
from .logprobs import completion_logprobs
from .losses import aggregate, aggregation_denominator, kl, policy_loss, value_loss
from .models import Decoder
from .sharding import constrain_replicated, constrain_rows, constrain_state
from .state import TrainState

SAMPLES_LOGGED = 4


class UpdateBatch(eqx.Module):
    """One row per trained sequence: prompt + completion ids and what the losses need."""

    ids: Int[Array, "batch total"]
    full_mask: Bool[Array, "batch total"]
    mask: Bool[Array, "batch new"]
    advantages: Float[Array, "batch new"]
    old_logp: Float[Array, "batch new"] | None
    sampling_logp: Float[Array, "batch new"] | None
    ref_logp: Float[Array, "batch new"] | None
    old_values: Float[Array, "batch new"] | None
    returns: Float[Array, "batch new"] | None


def _masked_mean(x: Array, mask: Array) -> Array:
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def _split(tree, parts: int, mesh: Mesh | None):
    split = jax.tree.map(lambda x: x.reshape(parts, x.shape[0] // parts, *x.shape[1:]), tree)
    return constrain_rows(split, mesh, axis=1)


def _merge(tree):
    return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), tree)


def _in_micro_batches(fn, inputs, parts: int, mesh: Mesh | None):
    """`fn` over `parts` row splits of `inputs`, one at a time (bounded memory)."""
    return constrain_rows(_merge(jax.lax.map(fn, _split(inputs, parts, mesh))), mesh)


def _token_rewards(
    rewards: Float[Array, " batch"], lengths: Int[Array, " batch"], new: int
) -> Float[Array, "batch new"]:
    last = jax.nn.one_hot(lengths - 1, new, dtype=jnp.float32)
    return last * rewards[:, None]


def _objective(
    policy: Decoder,
    critic: Critic | None,
    micro: UpdateBatch,
    algorithm: Algorithm,
    prompt_len: int,
    denominator: Float[Array, ""],
):
    """The loss of one micro-batch (its share of the minibatch loss) and summed metrics."""
    loss = algorithm.loss
    logp, entropy = completion_logprobs(
        policy,
        micro.ids,
        micro.full_mask,
        prompt_len,
        chunk=loss.logprob_chunk,
        temperature=_training_temperature(algorithm),
    )
    old = jax.lax.stop_gradient(logp) if micro.old_logp is None else micro.old_logp
    weights = None
    if micro.sampling_logp is not None:
        # Tokens drawn with top-k/top-p come from the truncated distribution μ, not from π_old:
        # each is weighed by π_old(y)/μ(y), the probability mass the filter kept at its step.
        weights = jnp.exp(jnp.where(micro.mask, old - micro.sampling_logp, 0.0))
    pg, pg_metrics = policy_loss(
        logp,
        old,
        micro.advantages,
        micro.mask,
        clip_low=loss.clip_low,
        clip_high=loss.clip_high,
        dual_clip=loss.dual_clip,
        agg=loss.agg,
        ratio_level=loss.ratio_level,
        denominator=denominator,
        weights=weights,
    )
    total = pg
    tokens = jnp.sum(micro.mask.astype(jnp.float32))
    sums = {f"loss/{k}": v * tokens for k, v in pg_metrics.items()}
    if weights is not None:
        sums["loss/kept_mass"] = jnp.sum(jnp.where(micro.mask, weights, 0.0))
    sums["loss/entropy"] = jnp.sum(jnp.where(micro.mask, entropy, 0.0))
    if loss.entropy_coef:
        total = total - loss.entropy_coef * aggregate(
            entropy, micro.mask, loss.agg, denominator=denominator
        )
    if micro.ref_logp is not None:
        kl_tokens = kl(logp, micro.ref_logp, loss.estimator)
        sums["loss/kl_ref"] = jnp.sum(jnp.where(micro.mask, kl_tokens, 0.0))
        if loss.kl_placement == "loss":
            total = total + loss.kl_coef * aggregate(
                kl_tokens, micro.mask, loss.agg, denominator=denominator
            )
    parts = {"loss/policy": pg, "loss/total": total}
    value = jnp.zeros((), jnp.float32)
    if critic is not None:
        values = critic.values(micro.ids, micro.full_mask, prompt_len)
        value, v_metrics = value_loss(
            values,
            micro.old_values,
            micro.returns,
            micro.mask,
            clip=loss.value_clip,
            agg=loss.agg,
            denominator=denominator,
        )
        parts["loss/value"] = value
        sums.update({f"loss/{k}": v * tokens for k, v in v_metrics.items()})
    sums["tokens"] = tokens
    return total + value, (parts, sums)


def _training_temperature(algorithm: Algorithm) -> float:
    """The temperature the completions were sampled at (1 for greedy rollouts)."""
    return algorithm.rollout.temperature or 1.0


def _nonfinite(tree) -> Bool[Array, ""]:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return ~jnp.all(jnp.stack(leaves))


def _update(
    algorithm: Algorithm,
    state: TrainState,
    batch: UpdateBatch,
    prompt_len: int,
    key: PRNGKeyArray,
    mesh: Mesh | None,
) -> tuple[TrainState, dict[str, Array]]:
    """Epochs × minibatches × micro-batches of optimizer updates (nested `lax.scan`)."""
    loss = algorithm.loss
    rows = batch.ids.shape[0]
    epochs, minibatches, micro = loss.epochs, loss.minibatches, loss.micro_batches
    if rows % (minibatches * micro):
        raise ValueError(
            f"the update batch ({rows} sequences) must divide into minibatches × micro_batches "
            f"= {minibatches} × {micro}"
        )
    policy_tx = algorithm.optimizer.transform()
    critic_tx = (
        None if algorithm.critic_optimizer is None else algorithm.critic_optimizer.transform()
    )
    train_critic = state.critic is not None

    def objective(models, micro_batch, denominator):
        policy, critic = models
        return _objective(policy, critic, micro_batch, algorithm, prompt_len, denominator)

    grad_fn = eqx.filter_grad(objective, has_aux=True)

    def minibatch_step(carry, minibatch: UpdateBatch):
        policy, policy_opt, critic, critic_opt = carry
        models = (policy, critic)
        denominator = aggregation_denominator(minibatch.mask, loss.agg)
        micro_batches = _split(minibatch, micro, mesh)

        def micro_step(acc, micro_batch):
            out = grad_fn(models, micro_batch, denominator)
            return jax.tree.map(jnp.add, acc, out), None

        shapes = eqx.filter_eval_shape(
            grad_fn, models, jax.tree.map(lambda x: x[0], micro_batches), denominator
        )
        init = constrain_state(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), mesh)
        (grads, (parts, sums)), _ = jax.lax.scan(micro_step, init, micro_batches)
        grads = constrain_state(grads, mesh)
        g_policy, g_critic = grads
        skipped = _nonfinite(g_policy) | (_nonfinite(g_critic) if train_critic else False)
        params = eqx.filter(policy, eqx.is_inexact_array)
        # optax's bias correction raises a Python float to an int32 count, which strict dtype
        # promotion (used in tests) rejects; the result is the same under standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, new_opt = policy_tx.update(g_policy, policy_opt, params)
        new_policy = eqx.apply_updates(policy, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(skipped, b, a), new, old)  # noqa: E731
        policy, policy_opt = keep((new_policy, new_opt), (policy, policy_opt))
        metrics = {**parts, **sums, "grad_norm": optax.tree.norm(g_policy)}
        if train_critic:
            c_params = eqx.filter(critic, eqx.is_inexact_array)
            with jax.numpy_dtype_promotion("standard"):
                c_updates, new_copt = critic_tx.update(g_critic, critic_opt, c_params)
            critic, critic_opt = keep(
                (eqx.apply_updates(critic, c_updates), new_copt), (critic, critic_opt)
            )
            metrics["critic_grad_norm"] = optax.tree.norm(g_critic)
        metrics["skipped"] = skipped.astype(jnp.float32)
        return (policy, policy_opt, critic, critic_opt), metrics

    def epoch(carry, epoch_key):
        shuffled = batch
        if minibatches > 1:
            order = jax.random.permutation(epoch_key, rows)
            shuffled = jax.tree.map(lambda x: x[order], batch)
        return jax.lax.scan(minibatch_step, carry, _split(shuffled, minibatches, mesh))

    carry = (state.policy, state.policy_opt, state.critic, state.critic_opt)
    carry, per_update = jax.lax.scan(epoch, carry, jax.random.split(key, epochs))
    policy, policy_opt, critic, critic_opt = carry
    updates_done = epochs * minibatches
    tokens = jnp.maximum(jnp.sum(per_update["tokens"]), 1.0)
    metrics = {}
    for name, values in per_update.items():
        if name == "tokens":
            continue
        if name in ("loss/policy", "loss/total", "loss/value", "grad_norm", "critic_grad_norm"):
            metrics[name] = jnp.mean(values)
        elif name == "skipped":
            metrics["update/skipped"] = jnp.sum(values)
        else:
            metrics[name] = jnp.sum(values) / tokens
    # The rate of this step's first update, from the optimizer's own count (which skipped,
    # non-finite updates do not advance).
    schedule = algorithm.optimizer.learning_rate_schedule()
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    counts = [
        s.count for s in jax.tree.leaves(state.policy_opt, is_leaf=is_schedule) if is_schedule(s)
    ]
    count = counts[0] if counts else state.step * updates_done
    metrics["learning_rate"] = jnp.asarray(schedule(count), jnp.float32)
    new_state = eqx.tree_at(
        lambda s: (s.policy, s.policy_opt, s.critic, s.critic_opt, s.step),
        state,
        (policy, policy_opt, critic, critic_opt, state.step + 1),
        is_leaf=lambda x: x is None,
    )
    return new_state, metrics


def _rollout_metrics(completions, rewards) -> dict[str, Array]:
    lengths = completions.lengths.astype(jnp.float32)
    metrics = {
        "reward/mean": jnp.mean(rewards.total),
        "reward/std": jnp.std(rewards.total),
        "reward/min": jnp.min(rewards.total),
        "reward/max": jnp.max(rewards.total),
        "completion/length_mean": jnp.mean(lengths),
        "completion/length_max": jnp.max(lengths),
        "completion/truncation_rate": 1.0 - jnp.mean(completions.finished.astype(jnp.float32)),
        "completion/tokens": jnp.sum(lengths),
    }
    for name, values in rewards.parts.items():
        metrics[f"reward/{name}"] = jnp.mean(values)
    if "correct" in rewards.parts:
        metrics["train/accuracy"] = jnp.mean(rewards.parts["correct"])
    return metrics


def step(
    algorithm: Algorithm,
    state: TrainState,
    prompts: Prompts,
    key: PRNGKeyArray,
    *,
    mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, Array]]:
    """One RL iteration, compiled as a whole; the state's buffers are donated.

    **Arguments:**

    - `algorithm`: the stages and their hyperparameters.
    - `state`: the train state (donated; laid out by `gradflow.sharding.shard_state` when `mesh`
      is given).
    - `prompts`: `algorithm.rollout.prompts_to_sample(P)` prompts for a step that trains on `P`.
    - `key`: this step's PRNG key.
    - `mesh`: the device mesh (`None`: no sharding constraints).

    **Returns:**

    `(new_state, metrics)`: scalar metrics over the whole batch, plus a few `samples/*` arrays
    (the first completions, their prompt index and reward) for logging.
    """
    return _compiled_step((algorithm, prompts, key, mesh), state)


@eqx.filter_jit(donate="all-except-first")
def _compiled_step(inputs, state: TrainState) -> tuple[TrainState, dict[str, Array]]:
    algorithm, prompts, key, mesh = inputs
    rollout_key, update_key = jax.random.split(key)
    sampled = prompts.ids.shape[0]
    trained = sampled // algorithm.rollout.prompts_to_sample(1)
    group = algorithm.rollout.group_size
    completions = constrain_rows(algorithm.rollout(state.policy, prompts, rollout_key), mesh)
    repeated = constrain_rows(prompts.repeat(group), mesh)
    # A host reward sees the whole batch once (its callback runs on one device); its small
    # outputs are broadcast to every device.
    whole_prompts, whole = constrain_replicated((repeated, completions), mesh)
    rewards = constrain_replicated(algorithm.reward(whole_prompts, whole), mesh)
    metrics = _rollout_metrics(completions, rewards)
    # The logged samples are cut from the replicated copies: replicating a few rows sliced out
    # of the row-split arrays fails XLA's HLO verifier after SPMD partitioning (seen with 8
    # sequences over 8 devices).
    shown = min(SAMPLES_LOGGED, completions.tokens.shape[0])
    metrics.update(
        {
            "samples/tokens": whole.tokens[:shown],
            "samples/mask": whole.mask[:shown],
            "samples/prompt_index": whole_prompts.index[:shown],
            "samples/reward": rewards.total[:shown],
        }
    )
    rows, selection = algorithm.rollout.select(rewards.total, trained)
    metrics.update(selection)
    completions = jax.tree.map(lambda x: x[rows], completions)
    repeated = repeated.take(rows)
    total = rewards.total[rows]

    loss = algorithm.loss
    prompt_len = prompts.ids.shape[1]
    new = completions.tokens.shape[1]
    ids = jnp.concatenate([repeated.ids, completions.tokens], axis=1)
    full_mask = jnp.concatenate([repeated.mask, completions.mask], axis=1)
    mask = completions.mask
    if loss.mask_truncated:
        mask = mask & completions.finished[:, None]
    parts = loss.minibatches * loss.micro_batches
    inputs = (ids, full_mask)

    def logprobs_of(model):
        return _in_micro_batches(
            lambda x: completion_logprobs(
                model,
                x[0],
                x[1],
                prompt_len,
                chunk=loss.logprob_chunk,
                temperature=_training_temperature(algorithm),
            )[0],
            inputs,
            parts,
            mesh,
        )

    old_logp = None
    kl_in_reward = state.reference is not None and loss.kl_placement == "reward"
    if not loss.reuses_logprobs or kl_in_reward:
        old_logp = jax.lax.stop_gradient(logprobs_of(state.policy))
        if _training_temperature(algorithm) == 1.0:
            # the sampler's log-probs are those of the untempered policy
            metrics["rollout/logprob_abs_diff"] = _masked_mean(
                jnp.abs(old_logp - completions.logprobs), mask
            )
    ref_logp = None
    if state.reference is not None:
        ref_logp = jax.lax.stop_gradient(logprobs_of(state.reference))
    old_values = None
    if state.critic is not None:
        old_values = jax.lax.stop_gradient(
            _in_micro_batches(
                lambda x: state.critic.values(x[0], x[1], prompt_len), inputs, parts, mesh
            )
        )
    token_rewards = _token_rewards(total, completions.lengths, new)
    if kl_in_reward:
        kl_tokens = kl(old_logp, ref_logp, loss.estimator)
        token_rewards = token_rewards - loss.kl_coef * jnp.where(mask, kl_tokens, 0.0)
    advantages, returns = algorithm.advantage(token_rewards, mask, old_values, group)
    metrics["advantage/mean"] = _masked_mean(advantages, mask)
    metrics["advantage/std"] = jnp.sqrt(
        _masked_mean((advantages - metrics["advantage/mean"]) ** 2, mask)
    )
    if old_values is not None:
        metrics["critic/value_mean"] = _masked_mean(old_values, mask)
    batch = constrain_rows(
        UpdateBatch(
            ids=ids,
            full_mask=full_mask,
            mask=mask,
            advantages=jax.lax.stop_gradient(advantages),
            old_logp=old_logp if not loss.reuses_logprobs else None,
            sampling_logp=completions.sampling_logprobs if algorithm.rollout.filtered else None,
            ref_logp=ref_logp,
            old_values=old_values,
            returns=None if returns is None else jax.lax.stop_gradient(returns),
        ),
        mesh,
    )
    state, update_metrics = _update(algorithm, state, batch, prompt_len, update_key, mesh)
    metrics.update(update_metrics)
    return constrain_state(state, mesh), constrain_replicated(metrics, mesh)
