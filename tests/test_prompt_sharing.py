"""Shared prompts in the packed update (`gradflow.packing`): each group's prompt packed once,
its completions attending to it, against the unshared packed update and the padded one.

The batch holds 4 groups of 4 in rows of `2 × TOTAL` slots: group 0 (a one-token prompt) with
an empty completion and one-token ones, group 1 (a full prompt) with four full-length
completions, too long to share a row (it falls back to one unit per sequence), group 2 (a
left-padded prompt) with a one-token, a full-length and two middling completions, group 3 with
short ones. Every comparison is within 1e-5 relative: the three layouts compute the same values
in float32 (highest matmul precision), but attention sums its keys in another slot order and the
shared prompt's gradient adds the `G` completions' contributions in one place instead of `G`, so
they differ by rounding (about 1e-7 an operation, 1e-6 after two layers and the backward pass);
a wrong mask or position changes values at the 1e-2 level (the broken-mask control below).
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from test_algorithms import EOS, REWARD, SGD, FixedRollout

from gradflow.algorithms import make
from gradflow.batch import Prompts
from gradflow.config import MeshConfig
from gradflow.logprobs import completion_logprobs
from gradflow.losses import AGG_MODES
from gradflow.models import ModelConfig, init_from_config
from gradflow.packing import Packing, pack, packed_hidden
from gradflow.rollout import Completions
from gradflow.sharding import make_mesh, shard_prompts, shard_state
from gradflow.stages import PolicyLoss, UpdateBatch
from gradflow.state import init_state
from gradflow.step import step

PROMPTS, G, NEW, PROMPT_LEN = 4, 4, 8, 4
B, TOTAL = PROMPTS * G, PROMPT_LEN + NEW
ROW = 2 * TOTAL

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
LAYOUTS = {
    "padded": None,
    "unshared": Packing(tokens=ROW, share_prompts=False),
    "shared": Packing(tokens=ROW),
}


def _lora(model):
    """`model` with adapters drawn at random (fresh ones, `B = 0`, would hide the adapters'
    share of every activation)."""
    model = model.with_lora(4, 8, key=jax.random.key(3))
    leaves, treedef = jax.tree.flatten(model.lora)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    drawn = [
        0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    return model.replace_adapters(jax.tree.unflatten(treedef, drawn))


def _batch():
    rng = np.random.RandomState(0)
    prompt_ids = rng.randint(2, 32, (PROMPTS, PROMPT_LEN)).astype(np.int32)
    prompt_mask = np.ones((PROMPTS, PROMPT_LEN), bool)
    prompt_mask[0, :-1] = False  # a one-token prompt
    prompt_mask[2, :2] = False
    prompt_ids = np.where(prompt_mask, prompt_ids, 0)
    lengths = np.array([0, 1, 1, 2, 8, 8, 8, 8, 1, 8, 3, 5, 2, 3, 2, 1])
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


def test_a_group_that_fits_a_row_is_packed_with_its_prompt_once():
    """Groups 0, 2 and 3 hold their prompt once, group 1 (36 tokens > 24 slots) once a
    sequence; every completion token is placed once, at its padded position, after its prompt."""
    packed = pack(IDS, FULL_MASK, PROMPT_LEN, LAYOUTS["shared"])
    segments = np.asarray(packed.segments).reshape(-1)
    prompt_slots = segments > B  # prompt segments are 1 + rows + unit
    prompt_lengths = np.asarray(FULL_MASK[::G, :PROMPT_LEN]).sum(1)
    copies = np.array([1, G, 1, 1])
    assert prompt_slots.sum() == (prompt_lengths * copies).sum()
    unshared = pack(IDS, FULL_MASK, PROMPT_LEN, LAYOUTS["unshared"])
    assert (np.asarray(unshared.segments) > B).sum() == prompt_lengths.sum() * G
    present = np.asarray(packed.present)
    flat_ids = np.asarray(packed.ids).reshape(-1)
    slots = np.asarray(packed.slots)
    np.testing.assert_array_equal(
        flat_ids[slots][present], np.asarray(IDS)[:, PROMPT_LEN:][present]
    )
    positions = np.asarray(packed.positions).reshape(-1)[slots]
    padded_positions = np.cumsum(np.asarray(FULL_MASK), 1)[:, PROMPT_LEN:] - 1
    np.testing.assert_array_equal(positions[present], padded_positions[present])
    # The first token of each completion is predicted from its prompt's last token.
    sources = np.asarray(packed.sources)
    first = present[:, 0]
    assert np.all(prompt_slots[sources[first, 0]])
    assert np.all(flat_ids[sources[first, 0]] == np.asarray(IDS)[first, PROMPT_LEN - 1])
    rows_used = np.any(np.asarray(packed.segments) > 0, -1).sum()
    assert rows_used < np.any(np.asarray(unshared.segments) > 0, -1).sum()


@jax.jit
def _objectives(policy, batch):
    """Gradients and metrics of every aggregation mode (KL in the loss, an entropy bonus) in
    each layout: each layout's forward pass runs once, and each mode's gradient is its
    vector-Jacobian product (batched over the modes)."""
    out = {}
    for name, packing in LAYOUTS.items():
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


def _assert_close(new, old):
    a, b = jax.tree.leaves(new), jax.tree.leaves(old)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def _update_batch():
    old = completion_logprobs(REFERENCE, IDS, FULL_MASK, PROMPT_LEN)[0]
    mask = FULL_MASK[:, PROMPT_LEN:]
    rng = np.random.RandomState(1)
    return UpdateBatch(
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


def test_shared_objective_equals_unshared_and_padded_for_every_mode_full_and_lora():
    batch = _update_batch()
    for policy in (MODEL, _lora(MODEL)):
        out = _objectives(policy, batch)
        for other in ("unshared", "padded"):
            _assert_close(out["shared"], out[other])
        leaves = jax.tree.leaves(eqx.filter(out["shared"][0], eqx.is_inexact_array))
        per_mode = np.max(
            [np.max(np.abs(np.asarray(x)).reshape(len(AGG_MODES), -1), 1) for x in leaves], 0
        )
        assert np.all(per_mode > 1e-3)
        if policy.lora is not None:
            adapters = jax.tree.leaves(out["shared"][0][0].lora)
            assert max(float(np.max(np.abs(np.asarray(x)))) for x in adapters) > 1e-3


def test_sliding_windows_count_positions_not_slots():
    """A window of 3 on every other layer: in a shared row a completion's prompt lies further
    back in slots than in positions (the group's earlier completions sit between them)."""
    config = dataclasses.replace(
        CONFIG, sliding_window=3, layer_types=("sliding_attention", "full_attention")
    )
    model = init_from_config(config, key=jax.random.key(0))
    values = {
        name: completion_logprobs(model, IDS, FULL_MASK, PROMPT_LEN, packing=packing)
        for name, packing in LAYOUTS.items()
    }
    mask = np.asarray(FULL_MASK[:, PROMPT_LEN:])
    for name in ("unshared", "shared"):
        for new, old in zip(values[name], values["padded"], strict=True):
            np.testing.assert_allclose(
                np.asarray(new)[mask], np.asarray(old)[mask], rtol=1e-5, atol=1e-5
            )


def test_a_completion_that_does_not_see_its_prompt_gets_other_values():
    """The control: the shared rows with the prefixes dropped (each completion sees only
    itself) give log-probs that differ from the padded ones, so the comparisons above would
    catch a broken mask."""
    packed = pack(IDS, FULL_MASK, PROMPT_LEN, LAYOUTS["shared"])
    broken = eqx.tree_at(lambda p: p.prefixes, packed, packed.segments)

    def forward(ids, segments, prefixes, positions, block):
        return MODEL.hidden_states(
            ids, segments > 0, segment_ids=segments, prefix_ids=prefixes, positions=positions
        )

    good, bad = packed_hidden(forward, packed), packed_hidden(forward, broken)
    padded = MODEL.hidden_states(IDS, FULL_MASK)[:, PROMPT_LEN - 1 : -1]
    mask = np.asarray(FULL_MASK[:, PROMPT_LEN:])
    np.testing.assert_allclose(
        np.asarray(good)[mask], np.asarray(padded)[mask], rtol=1e-5, atol=1e-5
    )
    # The completions' later tokens (not the first, predicted from the prompt itself).
    later = mask & (np.arange(NEW) > 0)
    assert np.max(np.abs(np.asarray(bad)[later] - np.asarray(padded)[later])) > 1e-2


def _step(name, mesh, layout, policy, **overrides):
    packing = {
        "padded": dict(packing=False),
        "unshared": dict(pack_tokens=ROW, share_prompts=False),
        "shared": dict(pack_tokens=ROW),
    }[layout]
    algorithm = make(
        name,
        reward=REWARD,
        eos_token_ids=(EOS,),
        group_size=G,
        max_new_tokens=NEW,
        **packing,
        **overrides,
    )
    algorithm = eqx.tree_at(
        lambda a: a.rollout, algorithm, FixedRollout(COMPLETIONS, algorithm.rollout)
    )
    algorithm = eqx.tree_at(lambda a: a.optimizer, algorithm, SGD(learning_rate=0.1))
    if algorithm.critic_optimizer is not None:
        algorithm = eqx.tree_at(lambda a: a.critic_optimizer, algorithm, SGD(learning_rate=1.0))
    state = init_state(algorithm, jax.tree.map(jnp.copy, policy), key=jax.random.key(9))
    if state.reference is not None:
        state = eqx.tree_at(lambda s: s.reference, state, jax.tree.map(jnp.copy, REFERENCE))
    before = _flat((state.policy, state.critic))
    prompts = PROMPT_BATCH
    if mesh is not None:
        state, prompts = shard_state(state, mesh), shard_prompts(prompts, mesh)
    state, metrics = step(algorithm, state, prompts, jax.random.key(2), mesh=mesh)
    metrics = {k: np.asarray(v) for k, v in metrics.items() if not k.startswith("samples/")}
    return before - _flat((state.policy, state.critic)), metrics


def _flat(tree):
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def _assert_steps_equal(name, mesh, policy, **overrides):
    shared = _step(name, mesh, "shared", policy, **overrides)
    scale = np.max(np.abs(shared[0]))
    assert scale > 1e-3
    for layout in ("unshared", "padded"):
        other = _step(name, mesh, layout, policy, **overrides)
        np.testing.assert_allclose(shared[0], other[0], rtol=1e-5, atol=1e-5 * scale)
        assert shared[1].keys() == other[1].keys()
        for key, value in other[1].items():
            np.testing.assert_allclose(shared[1][key], value, rtol=1e-5, atol=1e-5, err_msg=key)


def test_shared_ppo_step_equals_unshared_and_padded_on_a_mesh_of_8_devices():
    """PPO, full fine-tuning, with its critic and the reference's KL in the reward, 2 epochs,
    over data × fsdp × tensor = 2 × 2 × 2 fake devices (4 batch shards: a group each)."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _assert_steps_equal(
        "ppo", mesh, MODEL, kl_coef=0.05, kl_placement="reward", agg="seq-mean-token-sum", epochs=2
    )


def test_shared_ppo_step_equals_unshared_and_padded_on_one_device_with_lora():
    """PPO with LoRA adapters, its critic and the reference's k3 KL in the loss, 2 shuffled
    minibatches × 2 micro-batches (so a micro-batch holds parts of groups) on one device."""
    _assert_steps_equal(
        "ppo",
        None,
        _lora(MODEL),
        kl_coef=0.1,
        kl_placement="loss",
        kl_estimator="k3",
        minibatches=2,
        micro_batches=2,
    )
