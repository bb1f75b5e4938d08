"""The prefill's attention in blocks: an online (flash-style) softmax over key blocks.

A prompt's causal self-attention computed at once materialises `[rows, heads, T, T]` float32
scores (and a mask of that size), which for long prompts costs more memory traffic than the
matrix products themselves. `attend_blocked` walks query blocks of `block` tokens and, for each,
only the key blocks it can see — those at or before it, and no further back than the layer's
sliding window — keeping a running maximum, normaliser and weighted sum per query. Every shape
is static (the number of key blocks a query block visits is a loop bound, not a shape), so it
compiles once per prompt length; the masks are those of `layers.attend`.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

PREFILL_BLOCK = 64
"""Query and key tokens per block of `attend_blocked` (measured on the CPU: see BENCHMARKS.md)."""


def attend_blocked(
    q: Float[Array, "batch time heads head_dim"],
    k: Float[Array, "batch time kv_heads head_dim"],
    v: Float[Array, "batch time kv_heads head_dim"],
    key_valid: Bool[Array, "batch time"],
    window: Int[Array, ""] | None,
    scale: float,
    block: int = PREFILL_BLOCK,
) -> Float[Array, "batch time heads head_dim"]:
    """Causal grouped-query self-attention of a prompt, block by block (forward only).

    Query `t` sits at slot `t` and sees the valid slots at or before it, fewer than `window`
    slots back (and always itself, so that padding rows stay finite) — `layers.attend` with
    `query_index = arange(time)`. Scores and softmax statistics are float32; the weighted sum of
    values runs in the values' dtype with a float32 accumulator.

    **Arguments:**

    - `q`, `k`, `v`: queries, keys and values (`heads` a multiple of `kv_heads`).
    - `key_valid`: which slots hold real tokens.
    - `window`: how many slots a query sees (itself included); `None`: all before it.
    - `scale`: the factor on query·key scores.
    - `block`: tokens per query and key block (the prompt is padded to a multiple of it).

    **Returns:**

    The attention outputs, in `q`'s dtype.
    """
    batch, time, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    block = min(block, time)
    blocks = -(-time // block)
    pad = blocks * block - time
    pad_tokens = ((0, 0), (0, pad), (0, 0), (0, 0))
    # [blocks, batch, kv_heads, (group,) block, head_dim]: one block indexed by the loops.
    qb = jnp.pad(q, pad_tokens).reshape(batch, blocks, block, kv_heads, group, head_dim)
    qb = qb.transpose(1, 0, 3, 4, 2, 5)
    kb = jnp.pad(k, pad_tokens).reshape(batch, blocks, block, kv_heads, head_dim)
    kb = kb.transpose(1, 0, 3, 2, 4)
    vb = jnp.pad(v, pad_tokens).reshape(batch, blocks, block, kv_heads, head_dim)
    vb = vb.transpose(1, 0, 3, 2, 4)
    valid = jnp.pad(key_valid, ((0, 0), (0, pad))).reshape(batch, blocks, block).transpose(1, 0, 2)
    offsets = jnp.arange(block)
    lowest = jnp.finfo(jnp.float32).min
    scale = jnp.float32(scale)

    def query_block(i):
        queries = qb[i]
        query_slots = i * block + offsets

        def key_block(j, carry):
            top, total, acc = carry
            scores = jnp.einsum(
                "bkgqd,bksd->bkgqs", queries, kb[j], preferred_element_type=jnp.float32
            )
            distance = query_slots[:, None] - (j * block + offsets)[None, :]
            allowed = (distance >= 0) & (valid[j][:, None, :] | (distance == 0))
            if window is not None:
                allowed = allowed & (distance < window)
            allowed = allowed[:, None, None]
            scores = jnp.where(allowed, scores * scale, lowest)
            new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
            weights = jnp.where(allowed, jnp.exp(scores - new_top[..., None]), 0.0)
            correction = jnp.exp(top - new_top)
            total = total * correction + jnp.sum(weights, axis=-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqs,bksd->bkgqd",
                weights.astype(v.dtype),
                vb[j],
                preferred_element_type=jnp.float32,
            )
            return new_top, total, acc

        # The first key block holding a slot some query of this block sees.
        first = 0
        if window is not None:
            first = jnp.maximum(i * block - window + 1, 0) // block
        stats = (batch, kv_heads, group, block)
        init = (
            jnp.full(stats, lowest),
            jnp.zeros(stats, jnp.float32),
            jnp.zeros((*stats, head_dim), jnp.float32),
        )
        _, total, acc = jax.lax.fori_loop(first, i + 1, key_block, init)
        return (acc / total[..., None]).astype(q.dtype)

    out = jax.lax.map(query_block, jnp.arange(blocks))  # [blocks, batch, kv, group, block, d]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, blocks * block, heads, head_dim)
    return out[:, :time]
