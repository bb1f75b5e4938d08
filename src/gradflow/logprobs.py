"""Per-token log-probabilities and entropies of completions without materialising full logits.

The LM head runs over `chunk` completion positions at a time under `jax.checkpoint`, so neither
the forward nor the backward pass ever holds a `[batch, time, vocab]` tensor (with Qwen's 151,646-token
vocabulary that tensor is what makes TRL run out of memory). With a `Packing` the forward pass
runs on packed rows (`gradflow.packing`) and gives the same per-token values.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .models import Decoder
from .packing import Packing, pack, packed_hidden


def completion_logprobs(
    model: Decoder,
    input_ids: Int[Array, "batch total"],
    attention_mask: Bool[Array, "batch total"] | Int[Array, "batch total"],
    prompt_len: int,
    *,
    chunk: int = 128,
    temperature: float = 1.0,
    packing: Packing | None = None,
) -> tuple[Float[Array, "batch new"], Float[Array, "batch new"]]:
    """Log-probability and entropy of each completion token (float32).

    `input_ids` is the left-padded prompt (`prompt_len` slots) followed by the completion; the
    hidden state at slot `t-1` predicts token `t`.

    **Arguments:**

    - `model`: the policy.
    - `input_ids`: prompt + completion ids.
    - `attention_mask`: 1 on real tokens.
    - `prompt_len`: the number of prompt slots.
    - `chunk`: completion positions per LM-head chunk.
    - `temperature`: the logits are divided by it (the sampling temperature, as verl and TRL do,
      so that the trained policy is the one the completions were sampled from).
    - `packing`: run the forward pass on packed rows (`None`: the padded rows as given); the
      values at positions without a completion token are then 0.

    **Returns:**

    `(logprobs, entropies)` of shape `(batch, total - prompt_len)`.
    """
    targets = input_ids[:, prompt_len:]
    if packing is not None:
        if model.lora is not None and model.lora.dropout_key is not None:
            # LoRA dropout draws a mask per sequence, prompt included (as padded rows do): a
            # prompt shared by G completions would get one mask for all of them.
            packing = dataclasses.replace(packing, share_prompts=False)
        packed = pack(input_ids, attention_mask, prompt_len, packing)
        hidden = packed_hidden(
            lambda ids, segments, prefixes, positions, block: model.fold_in_dropout(
                block
            ).hidden_states(
                ids, segments > 0, segment_ids=segments, prefix_ids=prefixes, positions=positions
            ),
            packed,
        )
        return _present_logprobs(model, hidden, targets, packed.present, chunk, temperature)
    hidden = model.hidden_states(input_ids, attention_mask)[:, prompt_len - 1 : -1]
    return head_logprobs(model, hidden, targets, chunk=chunk, temperature=temperature)


def _present_logprobs(model, hidden, targets, present, chunk, temperature):
    """`head_logprobs` over the present positions only: they are moved to the front, the head
    runs over `batch × chunk` of them at a time (as many as one padded chunk: the same logits
    in memory, and the head's weight read once per call for as many positions), and the chunks
    past the last present one are skipped (`lax.cond`); the other positions get 0."""
    b, n, d = hidden.shape
    order = jnp.argsort(~present.reshape(-1), stable=True)
    count = jnp.sum(present, dtype=jnp.int32)
    chunk = min(chunk * b, b * n)
    pad = -(b * n) % chunk
    h = jnp.pad(hidden.reshape(b * n, d)[order], ((0, pad), (0, 0)))
    t = jnp.pad(targets.reshape(-1)[order], (0, pad))
    starts = jnp.arange(0, b * n + pad, chunk)

    # Checkpointed outside the `cond` too: a `cond` keeps its branch's residuals (the chunk's
    # logits) for the backward pass even when the branch is checkpointed inside.
    @jax.checkpoint
    def one(xs):
        h_c, t_c, start = xs
        zeros = jnp.zeros((1, chunk), jnp.float32)
        logp, ent = jax.lax.cond(
            start < count,
            lambda: head_logprobs(
                model, h_c[None], t_c[None], chunk=chunk, temperature=temperature
            ),
            lambda: (zeros, zeros),
        )
        return logp[0], ent[0]

    logp, ent = jax.lax.map(one, (h.reshape(-1, chunk, d), t.reshape(-1, chunk), starts))
    place = lambda x: jnp.zeros((b * n,), jnp.float32).at[order].set(x.reshape(-1)[: b * n])  # noqa: E731
    return (
        jnp.where(present, place(logp).reshape(b, n), 0.0),
        jnp.where(present, place(ent).reshape(b, n), 0.0),
    )


def head_logprobs(
    model: Decoder,
    hidden: Float[Array, "batch new hidden"],
    targets: Int[Array, "batch new"],
    *,
    chunk: int = 128,
    temperature: float = 1.0,
) -> tuple[Float[Array, "batch new"], Float[Array, "batch new"]]:
    """Log-probability of `targets` and the entropy under the logits of `hidden`, chunked.

    **Arguments:**

    - `model`: the model whose LM head is used.
    - `hidden`: final-normed hidden states.
    - `targets`: the token each position predicts.
    - `chunk`: positions per chunk.
    - `temperature`: divides the logits.

    **Returns:**

    `(logprobs, entropies)`, float32.
    """
    b, n, d = hidden.shape
    chunk = min(chunk, n)
    pad = -n % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    chunks = (n + pad) // chunk
    h = hidden.reshape(b, chunks, chunk, d).swapaxes(0, 1)
    t = targets.reshape(b, chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(xs):
        h_c, t_c = xs
        logits = model.logits(h_c)
        if temperature != 1.0:
            logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        probs = jnp.exp(logits - lse[..., None])
        entropy = lse - jnp.sum(probs * logits, axis=-1)
        return picked - lse, entropy

    logp, ent = jax.lax.map(one, (h, t))
    logp = logp.swapaxes(0, 1).reshape(b, chunks * chunk)[:, :n]
    ent = ent.swapaxes(0, 1).reshape(b, chunks * chunk)[:, :n]
    return logp, ent
