"""Per-token log-probabilities and entropies of completions without materialising full logits.

The LM head runs over `chunk` completion positions at a time under `jax.checkpoint`, so neither
the forward nor the backward pass ever holds a `[batch, time, vocab]` tensor (with Qwen's 151,646-token
vocabulary that tensor is what makes TRL run out of memory).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .models import Decoder


def completion_logprobs(
    model: Decoder,
    input_ids: Int[Array, "batch total"],
    attention_mask: Bool[Array, "batch total"] | Int[Array, "batch total"],
    prompt_len: int,
    *,
    chunk: int = 128,
    temperature: float = 1.0,
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

    **Returns:**

    `(logprobs, entropies)` of shape `(batch, total - prompt_len)`.
    """
    hidden = model.hidden_states(input_ids, attention_mask)[:, prompt_len - 1 : -1]
    targets = input_ids[:, prompt_len:]
    return head_logprobs(model, hidden, targets, chunk=chunk, temperature=temperature)


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
