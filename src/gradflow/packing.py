"""Packed updates: the sequences of a micro-batch laid end to end in rows of `tokens` slots.

The padded update computes `batch × (prompt_len + max_new_tokens)` positions however short the
completions are. Packed, each sequence's real tokens (its prompt without the left padding, then
its completion without the right padding) occupy a contiguous run of one row, tagged with a
segment id; `Decoder.hidden_states(..., segment_ids=...)` keeps attention inside a segment and
gives each token its position in the padded row, so every token gets the hidden state it gets
in the padded layout. The hidden states that predict the completion tokens are gathered back to
the padded `[batch, new]` layout, and the LM head runs only over chunks that hold completion
tokens (`gradflow.logprobs`), so the loss stage, its aggregation modes and its metrics see
exactly the arrays the padded update gives them.

**Shared prompts** (`share_prompts`, on by default). The sequences of a micro-batch (shard) with
the same prompt (its ids and mask: a group's `G` completions) are packed as one unit, the prompt
once and then their completions, `[prompt | completion_1 | … | completion_G]`, when the unit fits
a row; a group that does not fit falls back to one unit per sequence (its prompt repeated), as
without sharing. A completion is its own segment whose *prefix* is its unit's prompt: its tokens
see the prompt's and the earlier ones of their own completion, at the positions they have in the
padded row (the prompt's length, then on), so a completion token's keys, values and hidden
states are the padded row's: exact, not approximate (up to float summation order). The first
token of each completion is predicted from the prompt's last hidden state, gathered once per
completion, so its LM head, entropy and critic value are computed per completion and the
gradients of the `G` gathers add up in the shared prompt, as those of the `G` copies do padded.
With `G = 4`, 150-token prompts and completions of at most 96 tokens, prompts are at least
61 % of the unshared tokens (600 of at most 984 a group); shared, each prompt is computed once.

**The bound.** A micro-batch of `b` sequences is packed (first-fit, longest first) into `b`
rows of `tokens ≥ prompt_len + max_new_tokens` slots: every unit fits an empty row (a shared
unit is formed only where it fits), there are at most `b` units and a row is opened only for a
unit that fits no open one, so at most `b` rows are ever needed — no sequence is dropped or
cut, whatever the lengths. The rows are run in blocks (`lax.scan`
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
    - `share_prompts`: pack the sequences with the same prompt as one unit, the prompt once
      (see the module); `False`: every sequence with its own copy of its prompt.
    """

    tokens: int | None = eqx.field(static=True, default=None)
    shards: int = eqx.field(static=True, default=1)
    share_prompts: bool = eqx.field(static=True, default=True)


class Packed(eqx.Module):
    """A micro-batch in packed rows, and where its completion tokens went.

    **Fields:**

    - `ids`: the packed token ids (0 in empty slots).
    - `segments`: the run of tokens each slot belongs to (0: empty): a shard's row `i`'s
      completion is segment `1 + i`; the prompt of the unit led by row `u` is segment
      `1 + rows + u`.
    - `prefixes`: the segment each slot sees besides its own: its unit's prompt (a prompt's
      slots: their own segment).
    - `positions`: each slot's position (as in the padded row: `cumsum(mask) - 1`).
    - `slots`: the slot of each completion token in its shard's flattened rows.
    - `sources`: the slot whose hidden state predicts each completion token (the sequence's
      previous token: for the first, its prompt's last).
    - `present`: which completion positions hold a real token.
    """

    ids: Int[Array, "shards rows tokens"]
    segments: Int[Array, "shards rows tokens"]
    prefixes: Int[Array, "shards rows tokens"]
    positions: Int[Array, "shards rows tokens"]
    slots: Int[Array, "batch new"]
    sources: Int[Array, "batch new"]
    present: Bool[Array, "batch new"]


def _first_fit(lengths: Int[Array, " batch"], tokens: int) -> tuple[Array, Array]:
    """Each unit's row and first slot: first-fit, longest first, into `batch` rows."""
    order = jnp.argsort(-lengths, stable=True)

    def place(used, n):
        row = jnp.argmax(used + n <= tokens)
        return used.at[row].add(n), (row, used[row])

    _, (rows, starts) = jax.lax.scan(place, jnp.zeros_like(lengths), lengths[order])
    return (
        jnp.zeros_like(lengths).at[order].set(rows),
        jnp.zeros_like(lengths).at[order].set(starts),
    )


def _units(prompt_ids, prompt_mask, prompt_lengths, lengths, tokens):
    """The unit each row is packed in (its index: the unit's first row) and each unit's length
    (0 for a row that is not the first of its unit). Rows with the same prompt (ids and mask)
    form one unit, the prompt once and then their completions, when that fits a row of `tokens`
    slots; otherwise each of them is its own unit, as in per-sequence packing."""
    rows = prompt_ids.shape[0]
    ids = jnp.where(prompt_mask, prompt_ids, 0)
    same = jnp.all(
        (ids[:, None] == ids[None]) & (prompt_mask[:, None] == prompt_mask[None]), axis=-1
    )
    first = jnp.argmax(same, axis=1)  # the first row with this row's prompt
    shared_length = prompt_lengths + jnp.sum(jnp.where(same, lengths[None], 0), axis=1)
    shared = shared_length[first] <= tokens
    index = jnp.arange(rows)
    unit = jnp.where(shared, first, index)
    own = prompt_lengths + lengths
    unit_length = jnp.where(unit == index, jnp.where(shared, shared_length, own), 0)
    return unit, unit_length


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
        prompt_mask, completion_mask = mask[:, :prompt_len], mask[:, prompt_len:]
        prompt_lengths = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
        lengths = jnp.sum(completion_mask, axis=1, dtype=jnp.int32)
        if packing.share_prompts:
            unit, unit_length = _units(
                ids[:, :prompt_len], prompt_mask, prompt_lengths, lengths, tokens
            )
        else:
            unit, unit_length = jnp.arange(per), prompt_lengths + lengths
        rows, starts = _first_fit(unit_length, tokens)
        index = jnp.arange(per)
        start = (rows * tokens + starts)[unit]
        # The completions of a unit follow its prompt in row order.
        earlier = (unit[:, None] == unit[None]) & (index[None] < index[:, None])
        after = prompt_lengths + jnp.sum(jnp.where(earlier, lengths[None], 0), axis=1)
        prompt_slot = start[:, None] + jnp.cumsum(prompt_mask, axis=1, dtype=jnp.int32) - 1
        completion_slot = (
            (start + after)[:, None] + jnp.cumsum(completion_mask, axis=1, dtype=jnp.int32) - 1
        )
        slot = jnp.concatenate([prompt_slot, completion_slot], axis=1)
        # A unit's prompt is written by its first row only; the others' go out of range
        # (dropped by the scatter), as do the padding slots.
        owner = jnp.concatenate(
            [jnp.broadcast_to((unit == index)[:, None], prompt_mask.shape), completion_mask],
            axis=1,
        )
        written = jnp.where(mask & owner, slot, per * tokens)
        prompt_segment = jnp.broadcast_to((1 + per + unit)[:, None], prompt_mask.shape)
        segment = jnp.concatenate(
            [prompt_segment, jnp.broadcast_to((1 + index)[:, None], completion_mask.shape)], axis=1
        )
        prefix = jnp.concatenate(
            [prompt_segment, jnp.broadcast_to((1 + per + unit)[:, None], completion_mask.shape)],
            axis=1,
        )
        positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)

        def scatter(values):
            flat = jnp.zeros((per * tokens,), values.dtype).at[written].set(values, mode="drop")
            return flat.reshape(per, tokens)

        # The slot of each row's latest real token up to each position: the first completion
        # token's predecessor is its prompt's last token, wherever the unit's prompt was written.
        previous = jax.lax.cummax(jnp.where(mask, slot, -1), axis=1)
        return (
            scatter(ids),
            scatter(segment.astype(jnp.int32)),
            scatter(prefix.astype(jnp.int32)),
            scatter(positions),
            completion_slot,
            previous[:, prompt_len - 1 : -1],
        )

    packed_ids, segments, prefixes, positions, slots, sources = jax.vmap(one_shard)(
        ids.reshape(shards, per, total), mask.reshape(shards, per, total)
    )
    present = mask[:, prompt_len:]
    return Packed(
        ids=packed_ids,
        segments=segments,
        prefixes=prefixes,
        positions=positions,
        slots=jnp.where(present, slots.reshape(batch, -1), 0),
        sources=jnp.where(present, jnp.maximum(sources.reshape(batch, -1), 0), 0),
        present=present,
    )


def _block(rows: int) -> int:
    """Rows run together per scan step: the largest divisor of `rows` up to `rows / 8` (so the
    rows run past the last filled one are at most an eighth of the padded work)."""
    return max(d for d in range(1, max(rows // 8, 1) + 1) if rows % d == 0)


def packed_hidden(forward, packed: Packed) -> Float[Array, "batch new hidden"]:
    """The hidden state that predicts each completion token (the one in its source slot),
    from `forward` run over the packed rows a block at a time, skipping blocks of empty rows.

    **Arguments:**

    - `forward`: `(ids, segment_ids, prefix_ids, positions, block) -> hidden states`,
      `[rows, tokens]` to `[rows, tokens, hidden]` (`Decoder.hidden_states` with segment ids,
      prefix ids and positions); `block` is the index of the block of rows (a model with LoRA
      dropout folds it into its keys, so that each block draws its own masks, as each row of a
      padded batch does).
    - `packed`: the packed micro-batch.

    **Returns:**

    The hidden states in the padded completion layout (0 where no completion token is).
    """
    shards, per, tokens = packed.ids.shape
    block = _block(per)

    def blocks(x):  # [shards, per, tokens] -> [per / block, shards * block, tokens]
        x = x.reshape(shards, per // block, block, tokens).swapaxes(0, 1)
        return x.reshape(per // block, shards * block, tokens)

    indices = jnp.arange(per // block, dtype=jnp.int32)
    inputs = (
        *(blocks(x) for x in (packed.ids, packed.segments, packed.prefixes, packed.positions)),
        indices,
    )
    shape = jax.eval_shape(forward, *(x[0] for x in inputs))

    def empty(*_):
        return jnp.zeros(shape.shape, shape.dtype)

    def row(carry, xs):
        hidden = jax.lax.cond(jnp.any(xs[1] > 0), forward, empty, *xs)
        return carry, hidden

    _, hidden = jax.lax.scan(row, None, inputs)
    hidden = hidden.reshape(per // block, shards, block, tokens, -1).swapaxes(0, 1)
    flat = hidden.reshape(shards, per * tokens, -1)
    # The G completions of a shared prompt all gather its last hidden state (their gradients
    # add up there, as the G copies' would in the padded rows).
    sources = packed.sources.reshape(shards, -1)
    picked = jnp.take_along_axis(flat, sources[..., None], axis=1)
    picked = picked.reshape(*packed.sources.shape, shape.shape[-1])
    return jnp.where(packed.present[..., None], picked, jnp.zeros((), shape.dtype))
