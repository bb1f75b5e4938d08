"""Packed updates: the sequences of a micro-batch laid end to end in rows of `tokens` slots.

The padded update computes `batch × (prompt_len + max_new_tokens)` positions however short the
completions are. Packed, each sequence's real tokens (its prompt without the left padding, then
its completion without the right padding) occupy a contiguous run of one row, tagged with a
segment id; `Decoder.hidden_states(..., segment_ids=...)` keeps attention inside a segment and
restarts positions in each, so every token gets the hidden state it gets in the padded layout.
The hidden states that predict the completion tokens are gathered back to the padded
`[batch, new]` layout, and the LM head runs only over chunks that hold completion tokens
(`gradflow.logprobs`), so the loss stage, its aggregation modes and its metrics see exactly the
arrays the padded update gives them.

**The bound.** A micro-batch of `b` sequences is packed (first-fit, longest first) into `b`
rows of `tokens ≥ prompt_len + max_new_tokens` slots: every sequence fits an empty row and a
row is opened only for a sequence that fits no open one, so at most `b` rows are ever needed —
no sequence is dropped or cut, whatever the lengths. The rows are run in blocks (`lax.scan`
over blocks of about `b / 8` rows; longest-first placement fills the first rows), and a block
holding no sequence is skipped at run time (`lax.cond`), so the work follows the rows the
batch fills, while every shape stays static and the step compiles once. On a mesh the
micro-batch is packed per batch shard (`shards` groups of `b / shards` sequences), and each
scan step runs one block of every shard.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


class Packing(eqx.Module):
    """How an update packs its sequences (static: part of the compiled step).

    **Fields:**

    - `tokens`: slots per packed row (`None`: the padded row length,
      `prompt_len + max_new_tokens`).
    - `shards`: the number of batch shards packed separately (`data × fsdp` on a mesh).
    """

    tokens: int | None = eqx.field(static=True, default=None)
    shards: int = eqx.field(static=True, default=1)


class Packed(eqx.Module):
    """A micro-batch in packed rows, and where its completion tokens went.

    **Fields:**

    - `ids`: the packed token ids (0 in empty slots).
    - `segments`: the sequence each slot holds (`1 + its index in the shard`; 0: empty).
    - `slots`: the slot of each completion token in its shard's flattened rows.
    - `present`: which completion positions hold a real token.
    """

    ids: Int[Array, "shards rows tokens"]
    segments: Int[Array, "shards rows tokens"]
    slots: Int[Array, "batch new"]
    present: Bool[Array, "batch new"]


def _first_fit(lengths: Int[Array, " batch"], tokens: int) -> tuple[Array, Array]:
    """Each sequence's row and first slot: first-fit, longest first, into `batch` rows."""
    order = jnp.argsort(-lengths, stable=True)

    def place(used, n):
        row = jnp.argmax(used + n <= tokens)
        return used.at[row].add(n), (row, used[row])

    _, (rows, starts) = jax.lax.scan(place, jnp.zeros_like(lengths), lengths[order])
    return (
        jnp.zeros_like(lengths).at[order].set(rows),
        jnp.zeros_like(lengths).at[order].set(starts),
    )


def pack(
    ids: Int[Array, "batch total"],
    full_mask: Bool[Array, "batch total"] | Int[Array, "batch total"],
    prompt_len: int,
    packing: Packing,
) -> Packed:
    """Packs the real tokens of each row into rows of `packing.tokens` slots (see the module).

    **Arguments:**

    - `ids`: prompt + completion ids (left-padded prompt of `prompt_len` slots).
    - `full_mask`: 1 on real tokens.
    - `prompt_len`: the number of prompt slots.
    - `packing`: the row budget and the number of shards.

    **Returns:**

    The `Packed` micro-batch (`batch / shards` rows per shard).
    """
    batch, total = ids.shape
    tokens = total if packing.tokens is None else packing.tokens
    if tokens < total:
        raise ValueError(
            f"algorithm.pack_tokens = {tokens} is shorter than a full sequence (prompt + "
            f"max_new_tokens = {total} slots): it must hold the longest sequence"
        )
    shards = packing.shards if batch % packing.shards == 0 else 1
    per = batch // shards
    mask = full_mask.astype(bool)

    def one_shard(ids, mask):
        rows, starts = _first_fit(jnp.sum(mask, axis=1, dtype=jnp.int32), tokens)
        offset = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
        slot = (rows * tokens + starts)[:, None] + offset
        slot = jnp.where(mask, slot, per * tokens)  # out of range: dropped by the scatter
        segment = jnp.broadcast_to(jnp.arange(1, per + 1, dtype=jnp.int32)[:, None], ids.shape)
        flat = jnp.zeros((per * tokens,), ids.dtype).at[slot].set(ids, mode="drop")
        segments = jnp.zeros((per * tokens,), jnp.int32).at[slot].set(segment, mode="drop")
        return flat.reshape(per, tokens), segments.reshape(per, tokens), slot[:, prompt_len:]

    packed_ids, segments, slots = jax.vmap(one_shard)(
        ids.reshape(shards, per, total), mask.reshape(shards, per, total)
    )
    return Packed(
        ids=packed_ids,
        segments=segments,
        slots=jnp.where(mask[:, prompt_len:], slots.reshape(batch, -1), 0),
        present=mask[:, prompt_len:],
    )


def _block(rows: int) -> int:
    """Rows run together per scan step: the largest divisor of `rows` up to `rows / 8` (so the
    rows run past the last filled one are at most an eighth of the padded work)."""
    return max(d for d in range(1, max(rows // 8, 1) + 1) if rows % d == 0)


def packed_hidden(forward, packed: Packed) -> Float[Array, "batch new hidden"]:
    """The hidden state that predicts each completion token (the one in the slot before it),
    from `forward` run over the packed rows a block at a time, skipping blocks of empty rows.

    **Arguments:**

    - `forward`: `(ids, segment_ids, block) -> hidden states`, `[rows, tokens]` to
      `[rows, tokens, hidden]` (`Decoder.hidden_states` with segment ids); `block` is the index
      of the block of rows (a model with LoRA dropout folds it into its keys, so that each block
      draws its own masks, as each row of a padded batch does).
    - `packed`: the packed micro-batch.

    **Returns:**

    The hidden states in the padded completion layout (0 where no completion token is).
    """
    shards, per, tokens = packed.ids.shape
    block = _block(per)

    def blocks(x):  # [shards, per, tokens] -> [per / block, shards * block, tokens]
        x = x.reshape(shards, per // block, block, tokens).swapaxes(0, 1)
        return x.reshape(per // block, shards * block, tokens)

    ids, segments = blocks(packed.ids), blocks(packed.segments)
    indices = jnp.arange(per // block, dtype=jnp.int32)
    shape = jax.eval_shape(forward, ids[0], segments[0], indices[0])

    def empty(ids, segments, index):
        return jnp.zeros(shape.shape, shape.dtype)

    def row(carry, xs):
        row_ids, row_segments, index = xs
        present = jnp.any(row_segments > 0)
        hidden = jax.lax.cond(present, forward, empty, row_ids, row_segments, index)
        return carry, hidden

    _, hidden = jax.lax.scan(row, None, (ids, segments, indices))
    hidden = hidden.reshape(per // block, shards, block, tokens, -1).swapaxes(0, 1)
    flat = hidden.reshape(shards, per * tokens, -1)
    # A completion token is never the first of its segment (its prompt has a token), so the
    # slot before it is in its own segment.
    before = jnp.maximum(packed.slots.reshape(shards, -1) - 1, 0)
    picked = jnp.take_along_axis(flat, before[..., None], axis=1)
    picked = picked.reshape(*packed.slots.shape, shape.shape[-1])
    return jnp.where(packed.present[..., None], picked, jnp.zeros((), shape.dtype))
