"""Packed updates (`gradflow.packing`) against the padded update: same gradients, same metrics.

The batch holds a sequence of length 1 (a one-token prompt with an empty completion), one-token
completions and sequences of the full length; the step runs on a mesh of 8 fake devices.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_algorithms import EOS, REWARD, SGD, FixedRollout, flat

from gradflow.algorithms import make
from gradflow.batch import Prompts
from gradflow.config import MeshConfig
from gradflow.logprobs import completion_logprobs
from gradflow.losses import AGG_MODES
from gradflow.models import ModelConfig, init_from_config
from gradflow.packing import Packing, pack
from gradflow.rollout import Completions
from gradflow.sharding import make_mesh, shard_prompts, shard_state
from gradflow.stages import PolicyLoss, UpdateBatch
from gradflow.state import init_state
from gradflow.step import step

PROMPTS, G, NEW, PROMPT_LEN = 4, 8, 8, 4
B, TOTAL = PROMPTS * G, PROMPT_LEN + NEW

CONFIG = ModelConfig(
    model_type="qwen2",
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=1e4,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_bias=True,
    max_position_embeddings=64,
)
MODEL = init_from_config(CONFIG, key=jax.random.key(0))
REFERENCE = init_from_config(CONFIG, key=jax.random.key(1))


def _batch():
    rng = np.random.RandomState(0)
    prompt_ids = rng.randint(2, 32, (PROMPTS, PROMPT_LEN)).astype(np.int32)
    prompt_mask = np.ones((PROMPTS, PROMPT_LEN), bool)
    prompt_mask[0, :-1] = False  # group 0: a one-token prompt
    prompt_mask[1, :2] = False
    prompt_ids = np.where(prompt_mask, prompt_ids, 0)
    lengths = rng.randint(1, NEW + 1, B)
    lengths[0], lengths[1] = 0, 1  # a sequence of length 1, a one-token completion
    lengths[G * 3 :: 2] = NEW  # group 3 (full prompts): sequences of the full length
    tokens = rng.choice(np.arange(2, 32), (B, NEW)).astype(np.int32)
    mask = np.arange(NEW)[None, :] < lengths[:, None]
    finished = rng.rand(B) < 0.7
    tokens[np.arange(B), np.maximum(lengths - 1, 0)] = np.where(finished, EOS, tokens[:, 0])
    tokens = np.where(mask, tokens, 0)
    completions = Completions(
        tokens=jnp.asarray(tokens),
        mask=jnp.asarray(mask),
        logprobs=jnp.asarray(rng.uniform(-3, -0.5, (B, NEW)), jnp.float32),
        sampling_logprobs=jnp.zeros((B, NEW), jnp.float32),
        lengths=jnp.asarray(lengths, jnp.int32),
        finished=jnp.asarray(finished & (lengths > 0)),
    )
    prompts = Prompts(
        ids=jnp.asarray(prompt_ids), mask=jnp.asarray(prompt_mask), index=jnp.arange(PROMPTS)
    )
    ids = np.concatenate([np.repeat(prompt_ids, G, 0), tokens], 1)
    full_mask = np.concatenate([np.repeat(prompt_mask, G, 0), mask], 1)
    return prompts, completions, jnp.asarray(ids), jnp.asarray(full_mask)


PROMPT_BATCH, COMPLETIONS, IDS, FULL_MASK = _batch()


def test_packing_places_every_token_once_and_never_needs_more_rows_than_sequences():
    """The bound of `gradflow.packing`: all full-length sequences take one row each (every row
    used, nothing dropped), short ones share rows, and a row shorter than a sequence is refused."""
    full = jnp.ones((6, TOTAL), bool)
    ids = jnp.arange(6 * TOTAL, dtype=jnp.int32).reshape(6, TOTAL) + 1
    packed = pack(ids, full, PROMPT_LEN, Packing(shards=2))
    assert packed.ids.shape == (2, 3, TOTAL)
    assert sorted(np.asarray(packed.ids).ravel().tolist()) == list(range(1, 6 * TOTAL + 1))
    packed = pack(IDS, FULL_MASK, PROMPT_LEN, Packing(tokens=2 * TOTAL))
    real = np.asarray(IDS)[np.asarray(FULL_MASK)]
    placed = np.asarray(packed.ids)[np.asarray(packed.segments) > 0]
    assert sorted(placed.tolist()) == sorted(real.tolist())
    rows_used = np.any(np.asarray(packed.segments) > 0, axis=-1).sum()
    assert rows_used < B // 2  # short sequences share rows
    flat_ids = np.asarray(packed.ids).reshape(-1)
    np.testing.assert_array_equal(
        flat_ids[np.asarray(packed.slots)][np.asarray(packed.present)],
        np.asarray(IDS)[:, PROMPT_LEN:][np.asarray(FULL_MASK)[:, PROMPT_LEN:]],
    )
    with pytest.raises(ValueError, match="pack_tokens"):
        pack(IDS, FULL_MASK, PROMPT_LEN, Packing(tokens=TOTAL - 1))


@jax.jit
def _objectives(policy, batch):
    """Gradients and metrics of every aggregation mode (with KL in the loss and an entropy
    bonus), padded and packed into rows of 2 × TOTAL slots, in one small program: each layout's
    forward pass runs once, and the gradient of each mode's objective is its vector-Jacobian
    product (batched over the modes)."""
    out = {}
    for name, packing in (("padded", None), ("packed", Packing(tokens=2 * TOTAL))):
        outputs, pullback = jax.vjp(
            lambda p, packing=packing: completion_logprobs(
                p, batch.ids, batch.full_mask, PROMPT_LEN, packing=packing
            ),
            policy,
        )
        cotangents, metrics = [], []
        for agg in AGG_MODES:
            loss = PolicyLoss(agg=agg, kl_coef=0.1, entropy_coef=0.01)
            objective = lambda o, loss=loss: loss(*o, None, batch, loss.denominator(batch))  # noqa: E731
            cotangent, metric = jax.grad(objective, has_aux=True)(outputs)
            cotangents.append(cotangent)
            metrics.append(metric)
        stacked = jax.tree.map(lambda *x: jnp.stack(x), *cotangents)
        out[name] = jax.vmap(pullback)(stacked), metrics
    return out


def _assert_close(packed, padded):
    a, b = jax.tree.leaves(packed), jax.tree.leaves(padded)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_packed_objective_equals_padded_for_every_aggregation_mode():
    old = completion_logprobs(REFERENCE, IDS, FULL_MASK, PROMPT_LEN)[0]
    mask = FULL_MASK[:, PROMPT_LEN:]
    rng = np.random.RandomState(1)
    batch = UpdateBatch(
        ids=IDS,
        full_mask=FULL_MASK,
        mask=mask,
        trained=jnp.ones((B,), bool),
        advantages=jnp.where(mask, jnp.asarray(rng.normal(size=(B, NEW)), jnp.float32), 0.0),
        old_logp=old * 0.5,  # ratios away from 1: the clipping is active
        sampling_logp=None,
        sampler_logp=None,
        ref_logp=old,
        old_values=None,
        returns=None,
    )
    out = _objectives(MODEL, batch)
    _assert_close(out["packed"], out["padded"])
    leaves = jax.tree.leaves(eqx.filter(out["padded"][0], eqx.is_inexact_array))
    per_mode = np.max(
        [np.max(np.abs(np.asarray(x)).reshape(len(AGG_MODES), -1), 1) for x in leaves], 0
    )
    assert np.all(per_mode > 1e-3)
    assert out["padded"][1][0]["loss/clipfrac"].total > 0


def _step(name, mesh, **overrides):
    algorithm = make(
        name, reward=REWARD, eos_token_ids=(EOS,), group_size=G, max_new_tokens=NEW, **overrides
    )
    algorithm = eqx.tree_at(
        lambda a: a.rollout, algorithm, FixedRollout(COMPLETIONS, algorithm.rollout)
    )
    algorithm = eqx.tree_at(lambda a: a.optimizer, algorithm, SGD(learning_rate=0.1))
    if algorithm.critic_optimizer is not None:
        algorithm = eqx.tree_at(lambda a: a.critic_optimizer, algorithm, SGD(learning_rate=1.0))
    state = init_state(algorithm, jax.tree.map(jnp.copy, MODEL), key=jax.random.key(9))
    if state.reference is not None:
        state = eqx.tree_at(lambda s: s.reference, state, jax.tree.map(jnp.copy, REFERENCE))
    state, metrics = step(
        algorithm,
        shard_state(state, mesh),
        shard_prompts(PROMPT_BATCH, mesh),
        jax.random.key(2),
        mesh=mesh,
    )
    metrics = {k: np.asarray(v) for k, v in metrics.items() if not k.startswith("samples/")}
    return (flat(MODEL) - flat(state.policy), flat(state.critic)), metrics


def test_packed_ppo_step_equals_padded_on_a_mesh_of_8_devices():
    """PPO with a critic, KL in the reward, 2 minibatches × 2 micro-batches, rows of
    2 × TOTAL slots, over data × fsdp × tensor = 2 × 2 × 2 fake devices."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    overrides = dict(
        kl_coef=0.05,
        kl_placement="reward",
        agg="seq-mean-token-sum",
        minibatches=2,
        micro_batches=2,
    )
    packed = _step("ppo", mesh, pack_tokens=2 * TOTAL, **overrides)
    padded = _step("ppo", mesh, packing=False, **overrides)
    for new, old in zip(packed[0], padded[0], strict=True):
        scale = np.max(np.abs(old))
        assert scale > 1e-3
        np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5 * scale)
    assert packed[1].keys() == padded[1].keys()
    for key, value in padded[1].items():
        np.testing.assert_allclose(packed[1][key], value, rtol=1e-5, atol=1e-5, err_msg=key)
