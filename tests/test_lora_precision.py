"""LoRA where users run it: a bfloat16 base, dropout with packed rows, one update per step.

- The sampler decodes the policy that is trained: in bfloat16 its log-probs of its own tokens
  match the training forward pass's as closely as the base model's own do (adapters off), while
  a merged-then-cast decode weight loses most of a small adapter.
- Adapters and their optimizer moments are float32 on a bfloat16 base (fresh, and read from a
  PEFT file), and an Adam step of 1e-4 moves every entry of `A`.
- Packed rows draw a dropout mask per row, as padded rows do.
- With dropout at one update per step, the old log-probs are the policy's without dropout.
"""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gradflow import algorithms
from gradflow.batch import Prompts
from gradflow.logprobs import completion_logprobs
from gradflow.models import load_hf, lora_policy, save_peft
from gradflow.packing import Packing
from gradflow.rollout import generate
from gradflow.state import init_state
from gradflow.step import step

TOY = Path(__file__).resolve().parents[1] / "src" / "gradflow" / "assets" / "toy-arith"


def _with_b(policy, scale: float, key):
    """`policy` with every `B` drawn as `scale · N(0, 1)` (a fresh `B = 0` adds nothing)."""
    lora = policy.lora
    for name, k in zip(lora.targets, jax.random.split(key, len(lora.targets)), strict=True):
        b = getattr(lora, name).b
        lora = eqx.tree_at(
            lambda x, n=name: getattr(x, n).b, lora, scale * jax.random.normal(k, b.shape, b.dtype)
        )
    return policy.replace_adapters(lora)


def _sampler_against_trainer(model, ids, mask):
    """Mean |sampler − trainer| log-prob of the sampled tokens, the trainer's log-probs, and the
    completion ids and mask."""
    out = generate(model, ids, mask, key=jax.random.key(4), max_new_tokens=24)
    full = jnp.concatenate([ids, out.tokens], axis=1)
    full_mask = jnp.concatenate([mask, out.mask], axis=1)
    trainer, _ = completion_logprobs(model, full, full_mask, ids.shape[1])
    real = np.asarray(out.mask)
    gap = np.abs(np.asarray(out.logprobs) - np.asarray(trainer))[real].mean()
    return gap, trainer, full, full_mask


def test_bf16_sampler_decodes_the_policy_that_is_trained():
    base = load_hf(TOY, dtype=jnp.bfloat16)
    # A small adapter, as after some steps: B ~ 1e-3 · N(0, 1), so s·BA is mostly below half a
    # bfloat16 step of the base weights.
    policy = _with_b(base.with_lora(8, 16, key=jax.random.key(1)), 1e-3, jax.random.key(2))
    ids = jax.random.randint(jax.random.key(3), (64, 6), 2, 40)
    mask = jnp.ones_like(ids, bool)
    # The base model's own bf16 noise: its sampler against its trainer, no adapters (prefill and
    # decode against one forward pass: other programs, other bfloat16 roundings).
    base_noise, _, _, _ = _sampler_against_trainer(base, ids, mask)
    gap, trainer, full, full_mask = _sampler_against_trainer(policy, ids, mask)
    # The adapter's own effect on the trainer's log-probs of these tokens.
    without, _ = completion_logprobs(base, full, full_mask, ids.shape[1])
    real = np.asarray(full_mask[:, ids.shape[1] :])
    effect = np.abs(np.asarray(trainer) - np.asarray(without))[real].mean()
    assert effect > base_noise  # the adapter matters at the scale of the noise
    # The sampler decodes the trained policy: its gap to the trainer is the base's own noise
    # (measured 1.02x; 1.25x allows another draw of tokens). Merged-then-cast decode weights
    # lose most of s·BA: 1.55x here.
    assert gap <= 1.25 * base_noise, (gap, base_noise, effect)


def test_adapters_are_float32_on_a_bf16_base_and_learn(tmp_path):
    base = load_hf(TOY, dtype=jnp.bfloat16)
    fresh = base.with_lora(4, 8, key=jax.random.key(0))
    save_peft(_with_b(fresh, 1e-2, jax.random.key(1)), tmp_path / "adapter")
    read = lora_policy(
        base,
        rank=4,
        alpha=8,
        targets="all-linear",
        adapter=tmp_path / "adapter",
        key=jax.random.key(0),
    )
    for policy in (fresh, read):
        dtypes = {x.dtype for x in jax.tree.leaves(policy.lora)}
        assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
        assert policy.layers.q_proj.dtype == jnp.bfloat16  # the base stays as it was
    fresh = load_hf(TOY, dtype=jnp.bfloat16).with_lora(4, 8, key=jax.random.key(0))  # donated
    algorithm = algorithms.make(
        "grpo", reward=_thirds(), group_size=4, max_new_tokens=8, learning_rate=1e-4
    )
    state = init_state(algorithm, _with_b(fresh, 1e-2, jax.random.key(1)), key=jax.random.key(1))
    moments = [x for x in jax.tree.leaves(state.policy_opt) if x.ndim > 0]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    before = np.asarray(state.policy.lora.q_proj.a)
    # The backward pass of jax's XLA attention promotes bfloat16 against float32 inside jax,
    # which the tests' strict promotion rejects (users run with standard promotion).
    with jax.numpy_dtype_promotion("standard"):
        state, metrics = step(algorithm, state, _prompts(), jax.random.key(0))
    assert float(metrics["update/skipped"]) == 0.0
    moved = np.asarray(state.policy.lora.q_proj.a) != before
    # Adam's first step is ±learning rate on every entry with a gradient; in bfloat16 the
    # entries of A (about 1/√96 ≈ 0.1) would not move at all.
    assert moved.mean() > 0.99, moved.mean()


def _thirds():
    from gradflow.stages import HostReward

    def thirds(tokens, mask, index):
        return np.stack([((tokens % 3 == 0) & mask).mean(axis=1)]).astype(np.float32)

    return HostReward(scorer=thirds, parts=("correct",), weights=(1.0,))


def _prompts():
    rng = np.random.default_rng(0)
    return Prompts(
        ids=jnp.asarray(rng.integers(2, 40, (4, 5)), jnp.int32),
        mask=jnp.ones((4, 5), bool),
        index=jnp.arange(4, dtype=jnp.int32),
    )


def test_packed_rows_draw_their_own_dropout_masks():
    base = load_hf(TOY)
    policy = _with_b(
        base.with_lora(4, 8, dropout=0.5, key=jax.random.key(1)), 0.3, jax.random.key(2)
    )
    rows = 16
    ids = jnp.tile(jax.random.randint(jax.random.key(3), (1, 10), 2, 40), (rows, 1))
    mask = jnp.ones_like(ids, bool)
    dropped = policy.with_dropout(jax.random.key(4))
    for packing in (None, Packing()):
        logp, _ = completion_logprobs(dropped, ids, mask, 4, packing=packing)
        distinct = {tuple(np.round(np.asarray(row), 5)) for row in logp}
        # 16 identical sequences, 16 masks: padded each row draws its own, and so must packed
        # rows (several sequences per row, several rows per block, several blocks).
        assert len(distinct) == rows, (packing, len(distinct))


def test_old_logprobs_are_the_policy_without_dropout_at_one_update():
    """One epoch of one minibatch: the sampler and the trainer compute the same float32 policy,
    so the sampler-trainer gap is rounding, whatever the dropout of the objective."""
    gaps = {}
    for rate in (0.0, 0.5):
        base = load_hf(TOY)  # the step donates the state, base weights included
        policy = _with_b(
            base.with_lora(4, 8, dropout=rate, key=jax.random.key(1)), 0.3, jax.random.key(2)
        )
        algorithm = algorithms.make(
            "grpo", reward=_thirds(), group_size=4, max_new_tokens=8, learning_rate=1e-4
        )
        assert algorithm.loss.epochs * algorithm.loss.minibatches == 1
        state = init_state(algorithm, policy, key=jax.random.key(1))
        _, metrics = step(algorithm, state, _prompts(), jax.random.key(0))
        gaps[rate] = float(metrics["rollout/logprob_abs_diff"])
    # Dropout in the old log-probs moved them by ~1e-1 from the sampler's; without it the gap
    # is float32 rounding of two programs (decode against a full forward pass).
    assert gaps[0.5] < 1e-4 and gaps[0.0] < 1e-4, gaps
