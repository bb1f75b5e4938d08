"""Advantage estimators against numpy references written from `docs/algorithms.md`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradflow.advantages import (
    broadcast_to_tokens,
    gae,
    grpo,
    masked_mean,
    masked_var,
    masked_whiten,
    reinforce,
    reinforce_pp,
    reinforce_pp_baseline,
    rloo,
)
from gradflow.advantages import token_rewards as sequence_to_token_rewards

SETTINGS = settings(max_examples=30, deadline=None)
TIME = 7

# ---------------------------------------------------------------------------------------------
# Independent numpy references (float64, plain loops).


def ref_masked_mean(x, m):
    total, count = 0.0, 0.0
    for xi, mi in zip(np.ravel(x), np.ravel(m), strict=True):
        total += float(xi) * float(mi)
        count += float(mi)
    return total / (count + 1e-8)


def ref_masked_var(x, m):
    mean = ref_masked_mean(x, m)
    n = float(np.sum(m))
    sq = [(float(xi) - mean) ** 2 for xi in np.ravel(x)]
    biased = ref_masked_mean(np.array(sq), m)
    return biased * n / (n - 1)


def ref_masked_whiten(x, m):
    mean, var = ref_masked_mean(x, m), ref_masked_var(x, m)
    out = np.zeros(np.shape(x))
    for idx in np.ndindex(*np.shape(x)):
        if m[idx]:
            out[idx] = (float(x[idx]) - mean) / np.sqrt(var + 1e-8)
    return out


def ref_group_stats(group):
    """Mean and unbiased std of one group; a group of size 1 has mean 0 and std 1 (verl)."""
    n = len(group)
    if n == 1:
        return 0.0, 1.0
    mean = sum(float(v) for v in group) / n
    std = np.sqrt(sum((float(v) - mean) ** 2 for v in group) / (n - 1))
    return mean, std


def ref_grpo(s, group_size, scale_by_std=True, eps=1e-6):
    out = np.zeros(len(s))
    for start in range(0, len(s), group_size):
        group = s[start : start + group_size]
        mean, std = ref_group_stats(group)
        for j, v in enumerate(group):
            a = float(v) - mean
            out[start + j] = a / (std + eps) if scale_by_std else a
    return out


def ref_reinforce(s, whiten=True, eps=1e-6):
    mean, std = ref_group_stats(s)
    return np.array([(float(v) - mean) / (std + eps) if whiten else float(v) - mean for v in s])


def ref_rloo(s, group_size):
    """Leave-one-out baseline written directly: `s_b - mean of the other rewards of the group`."""
    out = np.zeros(len(s))
    for start in range(0, len(s), group_size):
        group = [float(v) for v in s[start : start + group_size]]
        for j, v in enumerate(group):
            others = group[:j] + group[j + 1 :]
            out[start + j] = v - (sum(others) / len(others) if others else 0.0)
    return out


def ref_returns(r, m, gamma):
    batch, time = r.shape
    out = np.zeros((batch, time))
    for b in range(batch):
        running = 0.0
        for t in reversed(range(time)):
            running = float(r[b, t]) + gamma * running if m[b, t] else 0.0
            out[b, t] = running
    return out


def ref_gae(r, v, m, gamma, lam):
    batch, time = r.shape
    adv = np.zeros((batch, time))
    for b in range(batch):
        next_adv = 0.0
        for t in reversed(range(time)):
            if not m[b, t]:
                next_adv = 0.0
                continue
            next_v = float(v[b, t + 1]) if t + 1 < time and m[b, t + 1] else 0.0
            delta = float(r[b, t]) + gamma * next_v - float(v[b, t])
            next_adv = delta + gamma * lam * next_adv
            adv[b, t] = next_adv
    returns = np.where(m, adv + v, 0.0)
    return ref_masked_whiten(adv, m), returns


# ---------------------------------------------------------------------------------------------
# Inputs: an all-equal group, ragged masks, a fully masked row, a mask with a hole.


def make_rewards(rng, prompts, group_size):
    s = rng.normal(size=prompts * group_size).astype(np.float32)
    s[:group_size] = 0.5  # a group whose rewards are all equal
    if group_size > 2:
        s[group_size : 2 * group_size] = rng.integers(0, 2, size=group_size)  # 0/1 rewards
        s[group_size] = 0.0
        s[group_size + 1] = 1.0
    return s


def make_mask(rng, batch, time=TIME, hole=False):
    lengths = rng.integers(1, time + 1, size=batch)
    lengths[0] = time
    lengths[1] = 0  # fully masked row
    mask = np.arange(time)[None, :] < lengths[:, None]
    if hole:
        mask[0, time // 2] = False  # a masked token inside a sequence (e.g. a tool output)
    return mask


def token_rewards(rng, s, mask):
    """`s` on the last valid token, small per-token shaping elsewhere, garbage on padding."""
    r = np.where(mask, 0.01 * rng.normal(size=mask.shape), 5.0).astype(np.float32)
    for b in range(mask.shape[0]):
        valid = np.flatnonzero(mask[b])
        if len(valid):
            r[b, valid[-1]] += s[b]
    return r


def as_mask(mask, kind):
    return jnp.asarray(mask) if kind == "bool" else jnp.asarray(mask, jnp.float32)


def close(actual, expected, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Helpers.


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masked_helpers(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, TIME)).astype(np.float32) * 3 + 1
    mask = make_mask(rng, 6)
    m = as_mask(mask, kind)
    close(masked_mean(jnp.asarray(x), m), ref_masked_mean(x, mask))
    close(masked_var(jnp.asarray(x), m), ref_masked_var(x, mask), rtol=1e-4)
    out = masked_whiten(jnp.asarray(x), m)
    assert out.dtype == jnp.float32
    close(out, ref_masked_whiten(x, mask), atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(out)[~mask] == 0.0)


def test_masked_helpers_degenerate_masks():
    x = jnp.arange(6.0).reshape(2, 3)
    empty = jnp.zeros((2, 3), bool)
    one = empty.at[0, 1].set(True)
    assert float(masked_mean(x, empty)) == 0.0
    assert float(masked_var(x, empty)) == 0.0
    assert float(masked_var(x, one)) == 0.0
    assert np.all(np.asarray(masked_whiten(x, empty)) == 0.0)
    assert np.all(np.isfinite(np.asarray(masked_whiten(x, one))))


# ---------------------------------------------------------------------------------------------
# Sequence-level estimators.


@pytest.mark.parametrize("group_size", [1, 2, 4])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo(group_size, scale_by_std):
    s = make_rewards(np.random.default_rng(group_size), 3, group_size)
    out = grpo(jnp.asarray(s), group_size, scale_by_std=scale_by_std)
    assert out.shape == s.shape and out.dtype == jnp.float32
    close(out, ref_grpo(s, group_size, scale_by_std), atol=1e-4, rtol=1e-4)
    if group_size > 1:
        assert np.all(np.asarray(out)[:group_size] == 0.0)  # all-equal group


def test_grpo_eps():
    s = np.array([0.0, 1.0, 1.0, 3.0], np.float32)
    close(grpo(jnp.asarray(s), 2, eps=0.5), ref_grpo(s, 2, eps=0.5), atol=1e-6)


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("batch", [1, 6])
def test_reinforce(whiten, batch):
    s = make_rewards(np.random.default_rng(1), batch, 1)
    s[-1] = 2.0
    close(reinforce(jnp.asarray(s), whiten=whiten), ref_reinforce(s, whiten), atol=1e-5)


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_rloo(group_size):
    s = make_rewards(np.random.default_rng(2), 3, group_size)
    out = rloo(jnp.asarray(s), group_size)
    close(out, ref_rloo(s, group_size), atol=1e-5)
    if group_size == 1:
        np.testing.assert_array_equal(np.asarray(out), s)


def test_group_size_must_divide_batch():
    with pytest.raises(ValueError, match="group_size"):
        grpo(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        rloo(jnp.zeros(6), 4)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_broadcast_to_tokens(kind):
    rng = np.random.default_rng(3)
    mask = make_mask(rng, 4)
    seq = rng.normal(size=4).astype(np.float32)
    out = broadcast_to_tokens(jnp.asarray(seq), as_mask(mask, kind))
    expected = np.array([[seq[b] if mask[b, t] else 0.0 for t in range(TIME)] for b in range(4)])
    close(out, expected, atol=0)


def test_token_rewards_keep_the_reward_of_an_empty_completion():
    """The reward sits on the last token; a completion of length 0 keeps it at position 0, so
    the group statistics of the sequence-level estimators still count it."""
    rewards = np.array([0.5, 1.0, 2.0, 0.0], np.float32)
    lengths = np.array([3, 0, TIME, 1])
    out = np.asarray(sequence_to_token_rewards(jnp.asarray(rewards), jnp.asarray(lengths), TIME))
    expected = np.zeros((4, TIME))
    expected[[0, 1, 2, 3], [2, 0, TIME - 1, 0]] = rewards
    close(out, expected, atol=0)
    close(grpo(jnp.asarray(out.sum(1)), 4), ref_grpo(rewards, 4, True, 1e-6), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Token-level estimators.


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_reinforce_pp(gamma, kind):
    rng = np.random.default_rng(4)
    mask = make_mask(rng, 8, hole=True)
    s = make_rewards(rng, 4, 2)
    r = token_rewards(rng, s, mask)
    out = reinforce_pp(jnp.asarray(r), as_mask(mask, kind), gamma=gamma)
    expected = ref_masked_whiten(ref_returns(r, mask, gamma), mask)
    close(out, expected, atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(out)[~mask] == 0.0)


@pytest.mark.parametrize("group_size", [1, 2, 4])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_reinforce_pp_baseline(group_size, kind):
    rng = np.random.default_rng(5 + group_size)
    s = make_rewards(rng, 3, group_size)
    mask = make_mask(rng, len(s))
    out = reinforce_pp_baseline(jnp.asarray(s), as_mask(mask, kind), group_size)
    centered = ref_grpo(s, group_size, scale_by_std=False)
    tokens = np.where(mask, centered[:, None], 0.0)
    close(out, ref_masked_whiten(tokens, mask), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_gae(gamma, lam, kind):
    rng = np.random.default_rng(6)
    mask = make_mask(rng, 6, hole=True)
    s = make_rewards(rng, 3, 2)
    r = token_rewards(rng, s, mask)
    v = rng.normal(size=mask.shape).astype(np.float32)  # garbage on padding too
    adv, returns = gae(jnp.asarray(r), jnp.asarray(v), as_mask(mask, kind), gamma=gamma, lam=lam)
    ref_adv, ref_ret = ref_gae(r, v, mask, gamma, lam)
    close(adv, ref_adv, atol=1e-4, rtol=1e-4)
    close(returns, ref_ret, atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(adv)[~mask] == 0.0)
    assert np.all(np.asarray(returns)[~mask] == 0.0)


def test_token_estimators_jit():
    rng = np.random.default_rng(7)
    mask = jnp.asarray(make_mask(rng, 4))
    r = jnp.asarray(rng.normal(size=(4, TIME)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(4, TIME)), jnp.float32)
    eager = gae(r, v, mask, gamma=0.99, lam=0.95)
    jitted = jax.jit(lambda *a: gae(*a, gamma=0.99, lam=0.95))(r, v, mask)
    for a, b in zip(eager, jitted, strict=True):
        close(a, np.asarray(b), atol=1e-6)
    close(jax.jit(reinforce_pp)(r, mask), np.asarray(reinforce_pp(r, mask)), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Properties.


@st.composite
def grouped_rewards(draw, min_group=1):
    prompts = draw(st.integers(1, 4))
    group_size = draw(st.integers(min_group, 5))
    s = draw(
        hnp.arrays(
            np.float32,
            prompts * group_size,
            elements=st.floats(-10, 10, width=32) | st.sampled_from([0.0, 1.0]),
        )
    )
    return s, group_size


@SETTINGS
@given(grouped_rewards(), st.floats(-100, 100), st.floats(0.1, 10), st.data())
def test_grpo_group_mean_zero_and_invariance(sg, shift, scale, data):
    s, group_size = sg
    out = np.asarray(grpo(jnp.asarray(s), group_size))
    if group_size > 1:
        np.testing.assert_allclose(out.reshape(-1, group_size).mean(axis=1), 0.0, atol=1e-4)
    group = data.draw(st.integers(0, len(s) // group_size - 1))
    rows = slice(group * group_size, (group + 1) * group_size)
    assume(group_size > 1 and np.std(s[rows].astype(np.float64), ddof=1) > 0.1)
    moved = s.copy()
    moved[rows] = s[rows] * np.float32(scale) + np.float32(shift)
    np.testing.assert_allclose(np.asarray(grpo(jnp.asarray(moved), group_size)), out, atol=2e-3)


@SETTINGS
@given(grouped_rewards(min_group=2))
def test_rloo_is_scaled_dr_grpo(sg):
    s, group_size = sg
    dr_grpo = np.asarray(grpo(jnp.asarray(s), group_size, scale_by_std=False))
    expected = group_size / (group_size - 1) * dr_grpo
    np.testing.assert_allclose(np.asarray(rloo(jnp.asarray(s), group_size)), expected, atol=1e-5)


@SETTINGS
@given(
    hnp.arrays(np.float32, (4, 5), elements=st.floats(-10, 10, width=32)),
    hnp.arrays(np.bool_, (4, 5)),
)
def test_masked_whiten_standardises(x, mask):
    valid = x[mask].astype(np.float64)
    assume(valid.size >= 2 and np.var(valid, ddof=1) > 1e-2)
    out = np.asarray(masked_whiten(jnp.asarray(x), jnp.asarray(mask)), np.float64)
    assert abs(out[mask].mean()) < 1e-4
    np.testing.assert_allclose(np.var(out[mask], ddof=1), 1.0, rtol=1e-3)
    assert np.all(out[~mask] == 0.0)
