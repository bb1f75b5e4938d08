"""The one compiled RL step: rollout → reward → selection → advantage → update.

`step(algorithm, state, prompts, key)` folds the algorithm's stages; nothing in it knows which
algorithm runs, and the objective is the loss stage's. The update is a nested `lax.scan`: epochs,
then a shuffled batch reshaped into minibatches, then micro-batches whose gradients are
accumulated exactly (the loss stage returns numerator / whole-minibatch denominator). Old
log-probs, reference log-probs and old values are computed once, before the first epoch. With
`loss.packing` every forward pass of the update runs on packed rows (`gradflow.packing`). Every
metric is computed over the whole batch; each loss metric says how it reduces
(`gradflow.stages.AbstractMetric`).

With a device mesh the sequences are split over `data × fsdp` (replicated for the host reward,
which scores the whole batch once), the state keeps the layout of `gradflow.sharding` (so its
donated buffers are reused and shardings never drift) and the metrics come out replicated.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .advantages import token_rewards
from .algorithms import Algorithm
from .batch import Prompts
from .critic import Critic
from .logprobs import completion_logprobs
from .models import Decoder, trainable
from .packing import Packing
from .sharding import batch_size_divisor, constrain_replicated, constrain_rows, constrain_state
from .stages import Mean, UpdateBatch
from .state import TrainState

SAMPLES_LOGGED = 4


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


def _objective(
    policy: Decoder,
    critic: Critic | None,
    micro: UpdateBatch,
    algorithm: Algorithm,
    prompt_len: int,
    denominator: Float[Array, ""],
    packing: Packing | None,
    dropout_key: PRNGKeyArray,
):
    """The loss stage's objective of one micro-batch (its share of the minibatch loss) and its
    metrics, from the policy's log-probs (with its LoRA dropout, if any) and the critic's values."""
    loss = algorithm.loss
    logp, entropy = completion_logprobs(
        policy.with_dropout(dropout_key),
        micro.ids,
        micro.full_mask,
        prompt_len,
        chunk=loss.logprob_chunk,
        temperature=_training_temperature(algorithm),
        packing=packing,
    )
    if micro.old_logp is None:
        micro = eqx.tree_at(
            lambda b: b.old_logp, micro, jax.lax.stop_gradient(logp), is_leaf=lambda x: x is None
        )
    values = None
    if critic is not None:
        values = critic.values(micro.ids, micro.full_mask, prompt_len, packing)
    objective, metrics = loss(logp, entropy, values, micro, denominator)
    if micro.sampler_logp is not None:
        m = micro.mask.astype(jnp.float32)
        diff = jnp.where(micro.mask, jnp.abs(micro.old_logp - micro.sampler_logp), 0.0)
        metrics["rollout/logprob_abs_diff"] = Mean(jnp.sum(diff), jnp.sum(m))
    return objective, metrics


def _sampler_logprobs(algorithm: Algorithm, completions) -> Float[Array, "batch new"] | None:
    """The sampler's log-probs of the sampled tokens under the policy at the training
    temperature, unfiltered: what the trainer recomputes (`None` with top-k/top-p at a
    temperature other than 1, whose tempered unfiltered log-probs the sampler does not keep)."""
    if _training_temperature(algorithm) == 1.0:
        return completions.logprobs
    if not algorithm.rollout.filtered:
        return completions.sampling_logprobs
    return None


def _training_temperature(algorithm: Algorithm) -> float:
    """The temperature the completions were sampled at (1 for greedy rollouts)."""
    return algorithm.rollout.temperature or 1.0


def _packing(algorithm: Algorithm, mesh: Mesh | None) -> Packing | None:
    """The update's packing (packed per batch shard on a mesh), or `None` when it is padded."""
    if not algorithm.loss.packing:
        return None
    shards = 1 if mesh is None else batch_size_divisor(mesh)
    return Packing(
        tokens=algorithm.loss.pack_tokens, shards=shards, share_prompts=algorithm.loss.share_prompts
    )


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

    packing = _packing(algorithm, mesh)

    # Gradients, optimizer updates and the scans' carry hold only what is trained (with LoRA: the
    # adapters); the frozen base is read from the state, never copied through the loops.
    models = (state.policy, state.critic)
    trained, frozen = eqx.partition(models, trainable(models))

    def objective(trained, frozen, micro_batch, denominator, dropout_key):
        policy, critic = eqx.combine(trained, frozen)
        return _objective(
            policy, critic, micro_batch, algorithm, prompt_len, denominator, packing, dropout_key
        )

    grad_fn = eqx.filter_grad(objective, has_aux=True)

    def minibatch_step(carry, inputs):
        minibatch, minibatch_key = inputs
        params, policy_opt, c_params, critic_opt = carry
        trained = (params, c_params)
        denominator = loss.denominator(minibatch)
        micro_batches = _split(minibatch, micro, mesh)

        def micro_step(acc, inputs):
            micro_batch, dropout_key = inputs
            grads, metrics = grad_fn(trained, frozen, micro_batch, denominator, dropout_key)
            return jax.tree.map(jnp.add, acc, grads), metrics

        dropout_keys = jax.random.split(minibatch_key, micro)
        shapes, _ = eqx.filter_eval_shape(
            grad_fn,
            trained,
            frozen,
            jax.tree.map(lambda x: x[0], micro_batches),
            denominator,
            dropout_keys[0],
        )
        init = constrain_state(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), mesh)
        grads, loss_metrics = jax.lax.scan(micro_step, init, (micro_batches, dropout_keys))
        grads = constrain_state(grads, mesh)
        g_policy, g_critic = grads
        skipped = _nonfinite(g_policy) | (_nonfinite(g_critic) if train_critic else False)
        # optax's bias correction raises a Python float to an int32 count, which strict dtype
        # promotion (used in tests) rejects; the result is the same under standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, new_opt = policy_tx.update(g_policy, policy_opt, params)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(skipped, b, a), new, old)  # noqa: E731
        params, policy_opt = keep(
            (eqx.apply_updates(params, updates), new_opt), (params, policy_opt)
        )
        metrics = {"loss": loss_metrics, "grad_norm": optax.tree.norm(g_policy)}
        if train_critic:
            with jax.numpy_dtype_promotion("standard"):
                c_updates, new_copt = critic_tx.update(g_critic, critic_opt, c_params)
            c_params, critic_opt = keep(
                (eqx.apply_updates(c_params, c_updates), new_copt), (c_params, critic_opt)
            )
            metrics["critic_grad_norm"] = optax.tree.norm(g_critic)
        metrics["skipped"] = skipped.astype(jnp.float32)
        return (params, policy_opt, c_params, critic_opt), metrics

    def epoch(carry, epoch_key):
        shuffled = batch
        if minibatches > 1:
            order = jax.random.permutation(epoch_key, rows)
            shuffled = jax.tree.map(lambda x: x[order], batch)
        # The order's key is the epoch's own; the dropout keys fold it in (LoRA dropout only).
        dropout_keys = jax.random.split(jax.random.fold_in(epoch_key, 1), minibatches)
        return jax.lax.scan(
            minibatch_step, carry, (_split(shuffled, minibatches, mesh), dropout_keys)
        )

    carry = (trained[0], state.policy_opt, trained[1], state.critic_opt)
    carry, per_update = jax.lax.scan(epoch, carry, jax.random.split(key, epochs))
    params, policy_opt, c_params, critic_opt = carry
    policy, critic = eqx.combine((params, c_params), frozen)
    updates_done = epochs * minibatches
    metrics = {name: metric.reduce() for name, metric in per_update.pop("loss").items()}
    metrics["update/skipped"] = jnp.sum(per_update.pop("skipped"))
    metrics.update({name: jnp.mean(values) for name, values in per_update.items()})
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


def _rollout_metrics(completions, rewards, group: int) -> dict[str, Array]:
    lengths = completions.lengths.astype(jnp.float32)
    grouped = rewards.total.reshape(-1, group)
    no_spread = jnp.max(grouped, axis=1) == jnp.min(grouped, axis=1)
    metrics = {
        "reward/mean": jnp.mean(rewards.total),
        "reward/std": jnp.std(rewards.total),
        "reward/min": jnp.min(rewards.total),
        "reward/max": jnp.max(rewards.total),
        "reward/zero_std_groups": jnp.mean(no_spread.astype(jnp.float32)),
        "completion/length_mean": jnp.mean(lengths),
        "completion/length_max": jnp.max(lengths),
        "completion/truncation_rate": 1.0 - jnp.mean(completions.finished.astype(jnp.float32)),
        "completion/tokens": jnp.sum(lengths),
        **completions.metrics(),
    }
    for name, values in rewards.parts.items():
        applies = rewards.applicable.get(name, jnp.ones_like(values, bool))
        metrics[f"reward/{name}"] = _masked_mean(values, applies)
    if "correct" in rewards.parts:
        metrics["train/accuracy"] = metrics["reward/correct"]
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


def lower_step(
    algorithm: Algorithm,
    state: TrainState,
    prompts: Prompts,
    key: PRNGKeyArray,
    *,
    mesh: Mesh | None = None,
):
    """`step` lowered for these inputs without running it (to compile it and read its memory).

    **Arguments:**

    As for `step`.

    **Returns:**

    JAX's `jax.stages.Lowered` (`.compile().memory_analysis()`).
    """
    return _compiled_step.lower((algorithm, prompts, key, mesh), state).lowered


@eqx.filter_jit(donate="all-except-first")
def _compiled_step(inputs, state: TrainState) -> tuple[TrainState, dict[str, Array]]:
    algorithm, prompts, key, mesh = inputs
    rollout_key, update_key = jax.random.split(key)
    sampled = prompts.ids.shape[0]
    prompts_trained = sampled // algorithm.rollout.prompts_to_sample(1)
    group = algorithm.rollout.group_size
    completions = constrain_rows(algorithm.rollout(state.policy, prompts, rollout_key), mesh)
    repeated = constrain_rows(prompts.repeat(group), mesh)
    # A host reward sees the whole batch once (its callback runs on one device); its small
    # outputs are broadcast to every device.
    whole_prompts, whole = constrain_replicated((repeated, completions), mesh)
    rewards = constrain_replicated(algorithm.reward(whole_prompts, whole), mesh)
    metrics = _rollout_metrics(completions, rewards, group)
    # The logged samples are cut from the replicated copies: replicating a few rows sliced out
    # of the row-split arrays fails XLA's HLO verifier after SPMD partitioning (seen with 8
    # sequences over 8 devices).
    shown = min(SAMPLES_LOGGED, completions.tokens.shape[0])
    metrics.update(
        {
            "samples/tokens": whole.tokens[:shown],
            "samples/mask": whole.context_mask[:shown],
            "samples/prompt_index": whole_prompts.index[:shown],
            "samples/reward": rewards.total[:shown],
        }
    )
    rows, trained, selection = algorithm.rollout.select(rewards, prompts_trained)
    metrics.update(selection)
    completions = jax.tree.map(lambda x: x[rows], completions)
    repeated = repeated.take(rows)
    total = rewards.total[rows]

    loss = algorithm.loss
    prompt_len = prompts.ids.shape[1]
    new = completions.tokens.shape[1]
    ids = jnp.concatenate([repeated.ids, completions.tokens], axis=1)
    full_mask = jnp.concatenate([repeated.mask, completions.context_mask], axis=1)
    mask = completions.mask & trained[:, None]
    if loss.mask_truncated:
        mask = mask & completions.finished[:, None]
    parts = loss.minibatches * loss.micro_batches
    inputs = (ids, full_mask)
    packing = _packing(algorithm, mesh)

    def logprobs_of(model):
        return _in_micro_batches(
            lambda x: completion_logprobs(
                model,
                x[0],
                x[1],
                prompt_len,
                chunk=loss.logprob_chunk,
                temperature=_training_temperature(algorithm),
                packing=packing,
            )[0],
            inputs,
            parts,
            mesh,
        )

    old_logp = None
    # One update: the objective's own log-probs (stop-gradient) are the old ones, unless LoRA
    # dropout makes them another policy's than the one that sampled.
    lora = state.policy.lora
    dropout = lora is not None and lora.dropout > 0
    reuses_logprobs = loss.epochs * loss.minibatches == 1 and not dropout
    if not reuses_logprobs or loss.needs_old_logprobs:
        old_logp = jax.lax.stop_gradient(logprobs_of(state.policy))
    ref_logp = None
    if state.reference_policy is not None:
        ref_logp = jax.lax.stop_gradient(logprobs_of(state.reference_policy))
    old_values = None
    if state.critic is not None:
        old_values = jax.lax.stop_gradient(
            _in_micro_batches(
                lambda x: state.critic.values(x[0], x[1], prompt_len, packing),
                inputs,
                parts,
                mesh,
            )
        )
    rewards_per_token = loss.shape_rewards(
        token_rewards(total, completions.lengths, new), mask, old_logp, ref_logp
    )
    advantages, returns = algorithm.advantage(rewards_per_token, mask, old_values, group)
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
            trained=trained,
            advantages=jax.lax.stop_gradient(advantages),
            old_logp=old_logp if not reuses_logprobs else None,
            sampling_logp=completions.sampling_logprobs if algorithm.rollout.filtered else None,
            sampler_logp=_sampler_logprobs(algorithm, completions),
            ref_logp=ref_logp,
            old_values=old_values,
            returns=None if returns is None else jax.lax.stop_gradient(returns),
        ),
        mesh,
    )
    state, update_metrics = _update(algorithm, state, batch, prompt_len, update_key, mesh)
    metrics.update(update_metrics)
    return constrain_state(state, mesh), constrain_replicated(metrics, mesh)
