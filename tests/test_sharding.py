"""Partition rules, the batch check, and the sharded step against the one-device step."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gradflow.evaluate
from gradflow import algorithms
from gradflow.batch import Prompts
from gradflow.config import ConfigError, MeshConfig, build_config
from gradflow.models import ModelConfig, init_from_config
from gradflow.rollout import generate
from gradflow.sharding import (
    check_batch,
    make_mesh,
    shard_prompts,
    shard_state,
    state_shardings,
)
from gradflow.stages import HostReward
from gradflow.state import init_state
from gradflow.step import step
from gradflow.tasks import build_tokenizer
from gradflow.tasks.task import build_task

SHAPE = ModelConfig(
    model_type="qwen2",
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=True,
    max_position_embeddings=64,
)


def _scorer(tokens: np.ndarray, mask: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Deterministic: the fraction of completion tokens divisible by 3."""
    return np.stack([((tokens % 3 == 0) & mask).mean(axis=1)]).astype(np.float32)


REWARD = HostReward(scorer=_scorer, parts=("thirds",), weights=(1.0,))


def _mesh(data: int, fsdp: int, tensor: int):
    return make_mesh(MeshConfig(data, fsdp, tensor), jax.devices()[: data * fsdp * tensor])


def _specs(tree, mesh) -> dict[str, P]:
    shardings = state_shardings(tree, mesh)
    flat, _ = jax.tree_util.tree_flatten_with_path(shardings)
    return {jax.tree_util.keystr(path): s.spec for path, s in flat}


def test_partition_rules_cover_policy_critic_reference_and_optimizer():
    algorithm = algorithms.make("ppo", reward=REWARD, kl_coef=0.01)
    state = eqx.filter_eval_shape(  # shapes are all the rules look at
        lambda: init_state(
            algorithm, init_from_config(SHAPE, key=jax.random.key(0)), key=jax.random.key(1)
        )
    )
    specs = _specs(state, _mesh(2, 2, 2))
    expected = {
        "layers.q_proj": P(None, "tensor", "fsdp"),
        "layers.k_proj": P(None, "tensor", "fsdp"),
        "layers.up_proj": P(None, "tensor", "fsdp"),
        "layers.o_proj": P(None, "fsdp", "tensor"),
        "layers.down_proj": P(None, "fsdp", "tensor"),
        "layers.q_bias": P(None, "tensor"),
        "layers.input_norm": P(),
        "embed": P("tensor", "fsdp"),
        "lm_head": P("tensor", "fsdp"),
        "final_norm": P(),
    }
    # The same rules wherever the weight sits: the policy, the reference, the critic's backbone
    # and the Adam moments (mu, nu) of the policy's and the critic's optimizers.
    for name, spec in expected.items():
        where = [k for k in specs if k.endswith("." + name)]
        assert len(where) == 7, where
        assert all(specs[k] == spec for k in where), {k: specs[k] for k in where}
    assert specs[".critic.head"] == P()
    assert specs[".step"] == P() and specs[".key"] == P()
    assert all(spec == P() for k, spec in specs.items() if k.endswith(".count"))


def test_a_dimension_that_does_not_divide_stays_unsplit():
    odd = SHAPE.replace(vocab_size=63, num_heads=3, num_kv_heads=1, head_dim=2)
    policy = eqx.filter_eval_shape(lambda: init_from_config(odd, key=jax.random.key(0)))
    specs = _specs(policy, _mesh(1, 2, 4))
    assert specs[".embed"] == P(None, "fsdp")  # 63 rows do not split over tensor = 4
    assert specs[".layers.q_proj"] == P(None, None, "fsdp")  # 3 heads × 2 = 6 rows
    assert specs[".layers.o_proj"] == P(None, "fsdp")
    assert specs[".layers.gate_proj"] == P(None, "tensor", "fsdp")  # 32 rows do split


def test_attention_weights_split_over_tensor_only_in_whole_heads():
    """Two KV heads of 4 (8 rows) over tensor = 4 stay unsplit: 8 rows would divide, but each
    device would hold half a head. The 4 query heads split."""
    policy = eqx.filter_eval_shape(lambda: init_from_config(SHAPE, key=jax.random.key(0)))
    specs = _specs(policy, _mesh(1, 2, 4))
    assert specs[".layers.k_proj"] == P(None, None, "fsdp")
    assert specs[".layers.v_bias"] == P()
    assert specs[".layers.q_proj"] == P(None, "tensor", "fsdp")
    assert specs[".layers.o_proj"] == P(None, "fsdp", "tensor")
    assert specs[".layers.up_proj"] == P(None, "tensor", "fsdp")


def test_batch_that_does_not_divide_over_data_and_fsdp_is_a_clear_error():
    mesh = _mesh(2, 2, 2)
    check_batch(2, 2, mesh)  # 4 sequences over data × fsdp = 4
    with pytest.raises(ConfigError, match=r"3 × 2 = 6 sequences do not divide .* = 4 devices"):
        check_batch(3, 2, mesh)


def _run(mesh, prompts):
    algorithm = algorithms.make(
        "grpo",
        reward=REWARD,
        group_size=4,
        max_new_tokens=6,
        learning_rate=1e-2,
        eos_token_ids=(1,),
        minibatches=2,
        kl_coef=0.0,
    )
    policy = init_from_config(SHAPE, key=jax.random.key(0))
    state = shard_state(init_state(algorithm, policy, key=jax.random.key(1)), mesh)
    before = state_shardings(state, mesh)
    old = state
    state, metrics = step(
        algorithm, state, shard_prompts(prompts, mesh), jax.random.key(7), mesh=mesh
    )
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))  # donated
    after = jax.tree.map(lambda x: x.sharding, state)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.is_equivalent_to(b, 3), after, before))
    return state, metrics


def test_sharded_step_matches_one_device():
    rng = np.random.default_rng(0)
    mask = np.ones((4, 5), bool)
    mask[0, :2] = False
    prompts = Prompts(
        ids=jnp.asarray(rng.integers(2, 64, (4, 5)), jnp.int32),
        mask=jnp.asarray(mask),
        index=jnp.arange(4, dtype=jnp.int32),
    )
    single, m_single = _run(_mesh(1, 1, 1), prompts)
    sharded, m_sharded = _run(_mesh(2, 2, 2), prompts)
    assert sharded.policy.layers.q_proj.sharding.spec == P(None, "tensor", "fsdp")
    np.testing.assert_allclose(m_sharded["reward/mean"], m_single["reward/mean"], rtol=1e-6)
    initial = eqx.filter(init_from_config(SHAPE, key=jax.random.key(0)), eqx.is_array)
    moved = 0.0
    for a, b, c in zip(
        jax.tree.leaves(eqx.filter(single.policy, eqx.is_array)),
        jax.tree.leaves(eqx.filter(sharded.policy, eqx.is_array)),
        jax.tree.leaves(initial),
        strict=True,
    ):
        # float32 sums in another order (per-shard packing, sharded matmuls) move a near-zero
        # gradient's Adam step: 1e-4 is a few percent of the largest move (> 1e-3, below)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=0)
        moved = max(moved, float(np.max(np.abs(np.asarray(a) - np.asarray(c)))))
    assert moved > 1e-3  # the update did something


def test_group_rows_split_with_their_prompts_over_8_devices():
    """`generate(group_size=G)` on 8 prompts split over 8 devices: each device holds the `G`
    consecutive rows of its own prompt, and every row is the one-device row of the prompts
    repeated `G` times (same key)."""
    group = 2
    rng = np.random.default_rng(2)
    ids = rng.integers(2, 64, (8, 5)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[0, :2] = False
    mask[5, :4] = False
    policy = init_from_config(SHAPE, key=jax.random.key(3))
    settings = dict(key=jax.random.key(6), max_new_tokens=4, temperature=1.0)
    alone = generate(
        policy,
        jnp.asarray(np.repeat(ids, group, axis=0)),
        jnp.asarray(np.repeat(mask, group, axis=0)),
        **settings,
    )
    mesh = _mesh(8, 1, 1)
    placed_ids, placed_mask = shard_prompts((ids, mask), mesh)
    assert len(placed_ids.addressable_shards[0].data) == 1  # a prompt per device
    split = generate(
        shard_state(policy, mesh), placed_ids, placed_mask, group_size=group, **settings
    )
    np.testing.assert_array_equal(np.asarray(split.tokens), np.asarray(alone.tokens))
    # Sharded matmuls sum in another order: float32 rounding relative to the log-probs.
    np.testing.assert_allclose(
        np.asarray(split.logprobs), np.asarray(alone.logprobs), rtol=1e-5, atol=1e-6
    )
    assert len({row.tobytes() for row in np.asarray(alone.tokens)}) > 8  # rows of a group differ
    shards = split.tokens.addressable_shards
    assert len(shards) == 8
    for shard in shards:
        prompt = mesh.devices.reshape(-1).tolist().index(shard.device)
        rows = shard.index[0]
        assert (rows.start, rows.stop) == (prompt * group, (prompt + 1) * group)
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(alone.tokens)[rows])


def test_evaluation_splits_its_rows_over_the_mesh(monkeypatch):
    """Held-out generation on a mesh gets its prompt rows split over data × fsdp (each device
    decodes its share, not the whole batch) and grades exactly as on one device."""
    tokenizer = build_tokenizer()
    shape = SHAPE.replace(vocab_size=len(tokenizer))
    policy = init_from_config(shape, key=jax.random.key(3))
    rng = np.random.default_rng(1)
    ids = rng.integers(2, len(tokenizer), (8, 5)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[0, :2] = False
    raw = {
        "model": {"path": "gradflow:toy-arith"},
        "task": {"train_size": 8, "test_size": 8, "reward_workers": 0},
        "algorithm": {"name": "grpo"},
    }
    task = build_task(build_config(raw))
    seen = []

    def spy(model, prompt_ids, *args, **kwargs):
        seen.append(prompt_ids.sharding)
        return generate(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(gradflow.evaluate, "generate", spy)

    def run(mesh):
        placed = policy if mesh is None else shard_state(policy, mesh)
        return gradflow.evaluate.evaluate(
            placed,
            task,
            task.test,
            ids,
            mask,
            key=jax.random.key(4),
            max_new_tokens=4,
            batch_size=8,
            samples=2,
            mesh=mesh,
        )

    alone = run(None)
    mesh = _mesh(4, 2, 1)
    split = run(mesh)
    assert split[1] == alone[1] and split[0] == alone[0]
    assert seen[-1].is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 2)
