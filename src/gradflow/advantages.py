"""Advantage estimators and masked statistics (see `docs/algorithms.md`).

Sequences are grouped consecutively: `batch = prompts * group_size`, rows
`g*G ... g*G+G-1` share prompt `g`. Masks may be bool or float (0/1); they are converted
to float32 inside. All statistics are over the whole array passed in: under `jit` with
sharded arrays the `jnp` reductions are already global across devices and hosts.

Config name -> formula (`s` sequence reward, `r` token reward, `m` mask, `V` values):

- `reinforce`: `A_b = (s_b - mean_B s) / (std_B s + eps)`; `whiten=False`: `s_b - mean_B s`.
- `grpo`: `A_b = (s_b - mean_g) / (std_g + eps)`; `scale_by_std=False` (Dr.GRPO):
  `s_b - mean_g`. A group of size 1 has mean 0 and std 1 (verl).
- `rloo`: `A_b = G/(G-1) * (s_b - mean_g)` (leave-one-out baseline); `G == 1`: `A_b = s_b`.
- `reinforce_pp` (REINFORCE++): `R_t = r_t + gamma * R_{t+1}` (reset at padding), then
  `masked_whiten(R, m)`.
- `reinforce_pp_baseline`: `s_b - mean_g` broadcast over valid tokens, then `masked_whiten`.
- `gae` (PPO): `delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t`,
  `A_t = delta_t + gamma * lam * A_{t+1}`, `returns = A + V` (before whitening), then
  `A = masked_whiten(A, m)`.

The sequence-level estimators (`reinforce`, `grpo`, `rloo`) return one value per sequence;
callers spread them over tokens with `broadcast_to_tokens`. The token-level ones return
`[batch, time]` arrays that are 0 where the mask is 0.

Helpers: `masked_mean(x, m) = sum(x*m) / (sum(m) + 1e-8)`, `masked_var` unbiased (Bessel
`N/(N-1)`, `N = sum(m)`), `masked_whiten(x, m) = (x - mean) / sqrt(var + 1e-8)`.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

Mask = Bool[Array, "batch time"] | Float[Array, "batch time"]


def _f32_mask(mask: Array) -> Array:
    return mask.astype(jnp.float32)


def masked_mean(
    x: Float[Array, "*shape"], mask: Bool[Array, "*shape"] | Float[Array, "*shape"]
) -> Float[Array, ""]:
    """Mean of `x` over the entries where `mask` is 1: `sum(x*m) / (sum(m) + 1e-8)`.

    **Arguments:**

    - `x`: values, any shape.
    - `mask`: bool or float 0/1 mask of the same shape.

    **Returns:**

    A float32 scalar (0 when the mask is empty).
    """
    m = _f32_mask(mask)
    x = x.astype(jnp.float32)
    return jnp.sum(x * m) / (jnp.sum(m) + 1e-8)


def masked_var(
    x: Float[Array, "*shape"], mask: Bool[Array, "*shape"] | Float[Array, "*shape"]
) -> Float[Array, ""]:
    """Unbiased variance of `x` over the entries where `mask` is 1.

    `masked_mean((x - masked_mean(x, m))**2, m) * N / (N - 1)` with `N = sum(m)`. With
    `N <= 1` the biased variance is 0 and the result is 0 (the Bessel factor is taken as
    `N / max(N - 1, 1)` to avoid `0 * inf`).

    **Arguments:**

    - `x`: values, any shape.
    - `mask`: bool or float 0/1 mask of the same shape.

    **Returns:**

    A float32 scalar.
    """
    m = _f32_mask(mask)
    x = x.astype(jnp.float32)
    centered = x - masked_mean(x, m)
    n = jnp.sum(m)
    return masked_mean(centered**2, m) * (n / jnp.maximum(n - 1.0, 1.0))


def masked_whiten(
    x: Float[Array, "*shape"], mask: Bool[Array, "*shape"] | Float[Array, "*shape"]
) -> Float[Array, "*shape"]:
    """Whiten `x` with the statistics of its valid entries.

    `(x - masked_mean(x, m)) / sqrt(masked_var(x, m) + 1e-8)`, then set to 0 where `m == 0`.

    **Arguments:**

    - `x`: values, any shape.
    - `mask`: bool or float 0/1 mask of the same shape.

    **Returns:**

    A float32 array shaped like `x`, 0 where the mask is 0.
    """
    m = _f32_mask(mask)
    x = x.astype(jnp.float32)
    whitened = (x - masked_mean(x, m)) * jax.lax.rsqrt(masked_var(x, m) + 1e-8)
    return whitened * m


def _grouped(rewards: Array, group_size: int) -> Array:
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"batch size {rewards.shape[0]} is not a multiple of group_size={group_size}"
        )
    return rewards.astype(jnp.float32).reshape(-1, group_size)


def _group_centered(rewards: Array, group_size: int) -> Array:
    """`s - mean_g` per group, `[prompts, group_size]`; a group of size 1 has mean 0.

    The group's first reward is subtracted before the mean is taken (the same value in exact
    arithmetic): a group whose rewards are all equal then gives exactly 0 in float32.
    """
    scores = _grouped(rewards, group_size)
    if group_size == 1:
        return scores
    shifted = scores - scores[:, :1]
    return shifted - jnp.mean(shifted, axis=1, keepdims=True)


def grpo(
    rewards: Float[Array, " batch"],
    group_size: int,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> Float[Array, " batch"]:
    """GRPO advantage: `(s_b - mean_g) / (std_g + eps)` per group of `group_size` rows.

    `std_g` is the unbiased standard deviation of the group. A group of size 1 has mean 0 and
    std 1 (verl), so `group_size=1` returns `s / (1 + eps)`. A group whose rewards are all
    equal gets advantage 0.

    **Arguments:**

    - `rewards`: sequence rewards, `batch = prompts * group_size`, grouped consecutively.
    - `group_size`: completions per prompt `G`.
    - `scale_by_std`: divide by `std_g + eps`; `False` is Dr.GRPO (`s_b - mean_g`).
    - `eps`: added to the standard deviation.

    **Returns:**

    Per-sequence float32 advantages.
    """
    centered = _group_centered(rewards, group_size)
    if scale_by_std:
        if group_size == 1:
            std = jnp.ones_like(centered)
        else:
            std = jnp.std(centered, axis=1, ddof=1, keepdims=True)
        centered = centered / (std + eps)
    return centered.reshape(-1)


def reinforce(
    rewards: Float[Array, " batch"], *, whiten: bool = True, eps: float = 1e-6
) -> Float[Array, " batch"]:
    """REINFORCE with a global baseline: `(s_b - mean_B s) / (std_B s + eps)`.

    The statistics are over the whole batch (unbiased std): this is `grpo` with one group
    holding the whole batch, so a batch of one sequence has mean 0 and std 1.

    **Arguments:**

    - `rewards`: sequence rewards.
    - `whiten`: divide by `std + eps`; `False` gives `s_b - mean_B s`.
    - `eps`: added to the standard deviation.

    **Returns:**

    Per-sequence float32 advantages.
    """
    return grpo(rewards, rewards.shape[0], scale_by_std=whiten, eps=eps)


def rloo(rewards: Float[Array, " batch"], group_size: int) -> Float[Array, " batch"]:
    """RLOO leave-one-out advantage: `s_b - mean_{j != b in g} s_j = G/(G-1) * (s_b - mean_g)`.

    No whitening. For `group_size == 1` there is no other sample to form a baseline: the
    reward is returned unchanged (verl: the group mean is 0).

    **Arguments:**

    - `rewards`: sequence rewards, `batch = prompts * group_size`, grouped consecutively.
    - `group_size`: completions per prompt `G`.

    **Returns:**

    Per-sequence float32 advantages.
    """
    centered = _group_centered(rewards, group_size)
    if group_size > 1:
        centered = centered * (group_size / (group_size - 1))
    return centered.reshape(-1)


def broadcast_to_tokens(
    seq_values: Float[Array, " batch"], mask: Mask
) -> Float[Array, "batch time"]:
    """Spread one value per sequence over its valid tokens.

    **Arguments:**

    - `seq_values`: one value per sequence.
    - `mask`: bool or float 0/1 completion mask.

    **Returns:**

    `seq_values[:, None] * mask` in float32 (0 where the mask is 0).
    """
    return seq_values.astype(jnp.float32)[:, None] * _f32_mask(mask)


def token_rewards(
    rewards: Float[Array, " batch"], lengths: Int[Array, " batch"], time: int
) -> Float[Array, "batch time"]:
    """The sequence reward on each completion's last token, 0 elsewhere.

    A completion of length 0 (possible from a user-written rollout stage) holds its reward at
    position 0, so that the sequence-level estimators, which sum the token rewards, still see
    it in the group statistics.

    **Arguments:**

    - `rewards`: one reward per sequence.
    - `lengths`: completion lengths.
    - `time`: the completions' padded length.

    **Returns:**

    Float32 token rewards.
    """
    last = jax.nn.one_hot(jnp.maximum(lengths - 1, 0), time, dtype=jnp.float32)
    return last * rewards.astype(jnp.float32)[:, None]


def _reverse_discounted(x: Array, m: Array, discount: float) -> Array:
    """`y_t = m_t * (x_t + discount * y_{t+1})`, `y_T = 0`, scanned in reverse over time."""

    def step(carry: Array, xs: tuple[Array, Array]) -> tuple[Array, Array]:
        x_t, m_t = xs
        y_t = m_t * (x_t + discount * carry)
        return y_t, y_t

    init = jnp.zeros(x.shape[0], jnp.float32)
    _, ys = jax.lax.scan(step, init, (x.T, m.T), reverse=True)
    return ys.T


def reinforce_pp(
    token_rewards: Float[Array, "batch time"], mask: Mask, *, gamma: float = 1.0
) -> Float[Array, "batch time"]:
    """REINFORCE++ advantage: whitened discounted returns.

    `R_t = r_t + gamma * R_{t+1}`, reset at padding (`R_t = 0` where `m_t = 0`, so nothing
    flows back across a masked token), then `masked_whiten(R, m)` over the whole batch.

    **Arguments:**

    - `token_rewards`: per-token rewards (the sequence reward on the last valid token).
    - `mask`: bool or float 0/1 completion mask.
    - `gamma`: discount factor.

    **Returns:**

    Per-token float32 advantages, 0 where the mask is 0.
    """
    m = _f32_mask(mask)
    returns = _reverse_discounted(token_rewards.astype(jnp.float32), m, gamma)
    return masked_whiten(returns, m)


def reinforce_pp_baseline(
    rewards: Float[Array, " batch"], mask: Mask, group_size: int
) -> Float[Array, "batch time"]:
    """REINFORCE++ with a group baseline: `s_b - mean_g` over valid tokens, then whitened.

    A group of size 1 has mean 0. The whitening statistics are over all valid tokens of the
    batch.

    **Arguments:**

    - `rewards`: sequence rewards, `batch = prompts * group_size`, grouped consecutively.
    - `mask`: bool or float 0/1 completion mask.
    - `group_size`: completions per prompt `G`.

    **Returns:**

    Per-token float32 advantages, 0 where the mask is 0.
    """
    centered = _group_centered(rewards, group_size).reshape(-1)
    return masked_whiten(broadcast_to_tokens(centered, mask), mask)


def gae(
    token_rewards: Float[Array, "batch time"],
    values: Float[Array, "batch time"],
    mask: Mask,
    *,
    gamma: float,
    lam: float,
) -> tuple[Float[Array, "batch time"], Float[Array, "batch time"]]:
    """Generalised advantage estimation (PPO).

    `delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t` (the value after the last valid token
    is 0), `A_t = m_t * (delta_t + gamma * lam * A_{t+1})` scanned in reverse over time,
    `returns = (A + V) * m` formed before whitening, then `A = masked_whiten(A, m)`.

    **Arguments:**

    - `token_rewards`: per-token rewards.
    - `values`: critic values per token.
    - `mask`: bool or float 0/1 completion mask.
    - `gamma`: discount factor.
    - `lam`: GAE lambda.

    **Returns:**

    `(advantages, returns)`, float32, both 0 where the mask is 0.
    """
    m = _f32_mask(mask)
    r = token_rewards.astype(jnp.float32)
    v = values.astype(jnp.float32)
    next_v = jnp.concatenate([v[:, 1:] * m[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    delta = r + gamma * next_v - v
    adv = _reverse_discounted(delta, m, gamma * lam)
    returns = (adv + v) * m
    return masked_whiten(adv, m), returns
