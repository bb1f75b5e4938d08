"""The sampler: prefill, then a `lax.while_loop` of one-token decode steps over a KV cache.

Everything runs inside one compiled function: no Python loop per token and no host sync per token.
The cache is allocated inside the compiled function and updated in place by the loop. With
`group_size = G` each distinct prompt is prefilled once and its keys and values are copied to the
`G` rows that continue it.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .models import Decoder, DecodingModel


class Turns(eqx.Module):
    """What a multi-turn rollout adds to its completions (`gradflow.environments.sampler`).

    - `observed`: 1 on the tokens of the environments' answers: context, attended to and never
      trained on.
    - `reward`: the sum of each trajectory's turn rewards.
    - `failed`: whether its environment raised or timed out (the trajectory ended there).
    - `turns`: its model turns.
    - `truncated`: its answers cut to `max_observation_tokens`.
    """

    observed: Bool[Array, "batch new"]
    reward: Float[Array, " batch"]
    failed: Bool[Array, " batch"]
    turns: Int[Array, " batch"]
    truncated: Int[Array, " batch"]


class Completions(eqx.Module):
    """Sampled completions of a batch of prompts.

    - `tokens`: the sampled ids (after a row's EOS: `pad_token_id`).
    - `mask`: 1 on generated tokens up to and including EOS.
    - `logprobs`: float32 log-probability of each sampled token under the unmodified policy
      (temperature 1, no top-k/top-p), 0 where `mask` is 0.
    - `sampling_logprobs`: float32 log-probability of each sampled token under the distribution
      it was drawn from (temperature, top-k and top-p applied; 0 for greedy decoding and where
      `mask` is 0). With top-k/top-p, `exp(tempered log-prob - sampling_logprobs)` is the
      probability mass the filter kept.
    - `lengths`: number of generated tokens of each row.
    - `finished`: whether the row ended with EOS (otherwise it was truncated).
    - `turns`: a multi-turn rollout's environment answers and counts (`None`: one turn).
    """

    tokens: Int[Array, "batch new"]
    mask: Bool[Array, "batch new"]
    logprobs: Float[Array, "batch new"]
    sampling_logprobs: Float[Array, "batch new"]
    lengths: Int[Array, " batch"]
    finished: Bool[Array, " batch"]
    turns: Turns | None = None

    @property
    def context_mask(self) -> Bool[Array, "batch new"]:
        """1 on every token of the completion the model attends to: its own and the inserted
        ones (which `mask` leaves out)."""
        return self.mask if self.turns is None else self.mask | self.turns.observed

    def metrics(self) -> dict[str, Array]:
        """The rollout's own metrics beyond the lengths: for multi-turn rollouts
        `rollout/turns_mean`, `turns_max`, `observation_tokens_mean`, `observations_truncated`
        (answers cut) and `env_errors` (trajectories whose environment failed), over the batch.

        **Returns:**

        Scalar metrics (none for single-turn completions).
        """
        if self.turns is None:
            return {}
        turns = self.turns.turns.astype(jnp.float32)
        observed = jnp.sum(self.turns.observed.astype(jnp.float32), axis=1)
        return {
            "rollout/turns_mean": jnp.mean(turns),
            "rollout/turns_max": jnp.max(turns),
            "rollout/observation_tokens_mean": jnp.mean(observed),
            "rollout/observations_truncated": jnp.sum(self.turns.truncated.astype(jnp.float32)),
            "rollout/env_errors": jnp.sum(self.turns.failed.astype(jnp.float32)),
        }


def filter_logits(
    logits: Float[Array, "batch vocab"], *, temperature: float, top_k: int, top_p: float
) -> Float[Array, "batch vocab"]:
    """Applies temperature, then top-k, then top-p (nucleus) filtering; removed entries get -inf.

    **Arguments:**

    - `logits`: float32 next-token logits.
    - `temperature`: divides the logits (> 0).
    - `top_k`: keep the `top_k` largest (0 keeps all).
    - `top_p`: keep the smallest set of most likely tokens whose probability reaches `top_p`.

    **Returns:**

    The filtered logits.
    """
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        sorted_keep = before < top_p
        keep = (
            jnp.zeros_like(sorted_keep)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(sorted_keep)
        )
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def sample_token(
    logits: Float[Array, "batch vocab"],
    uniform: Float[Array, " batch"],
    *,
    temperature: float,
    top_k: int,
    top_p: float,
) -> tuple[Int[Array, " batch"], Float[Array, " batch"], Float[Array, " batch"]]:
    """Draws one token per row (greedy when `temperature == 0`) and its log-probabilities.

    **Arguments:**

    - `logits`: float32 next-token logits.
    - `uniform`: one uniform number in `[0, 1)` per row: all the randomness of the draw.
    - `temperature`, `top_k`, `top_p`: see `filter_logits`.

    **Returns:**

    `(tokens, logprobs, sampling_logprobs)`: the token ids, their log-probabilities under
    `softmax(logits)` (temperature 1, no filtering), and under the distribution they were drawn
    from (`softmax(filter_logits(logits))`; 0 when greedy).
    """
    unmodified = temperature == 1.0 and top_k == 0 and top_p == 1.0
    if temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        normalizer = jax.nn.logsumexp(logits, axis=-1)
        sampling_logprobs = jnp.zeros(tokens.shape, jnp.float32)
    elif unmodified:
        tokens, normalizer = inverse_cdf_sample(logits, uniform)
    else:
        filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        tokens, filtered_normalizer = inverse_cdf_sample(filtered, uniform)
        picked = jnp.take_along_axis(filtered, tokens[:, None], axis=-1)[:, 0]
        sampling_logprobs = picked - filtered_normalizer
        normalizer = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    logprobs = chosen - normalizer
    if unmodified:
        sampling_logprobs = logprobs
    return tokens, logprobs, sampling_logprobs


def inverse_cdf_sample(
    logits: Float[Array, "batch vocab"], uniform: Float[Array, " batch"], *, block: int = 512
) -> tuple[Int[Array, " batch"], Float[Array, " batch"]]:
    """Draws one index per row from `softmax(logits)` with a single uniform number per row.

    Two-level inverse-CDF sampling: choose a block of `block` entries by the cumulative block
    masses, then an entry inside it by its cumulative probabilities. It is exact (up to float
    rounding) and needs no random bits per vocabulary entry, which is what makes
    `jax.random.categorical` slow for 151k-token vocabularies. It passes over the logits twice
    (their maximum, then exponentials summed per block) and returns the log-normaliser as well,
    so that the sampled token's log-probability costs no third pass. Entries at `-inf` are never
    drawn.

    **Arguments:**

    - `logits`: unnormalised log-probabilities (at least one finite entry per row).
    - `uniform`: one uniform number in `[0, 1)` per row.
    - `block`: entries per block.

    **Returns:**

    `(indices, logsumexp)`: the drawn indices and each row's `logsumexp(logits)`.
    """
    batch, vocab = logits.shape
    block = min(block, vocab)
    pad = -vocab % block
    top = jnp.max(logits, axis=-1)
    padded = jnp.pad(logits, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    weights = jnp.exp(padded - top[:, None]).reshape(batch, -1, block)
    mass = jnp.sum(weights, axis=-1)
    block_cdf = jnp.cumsum(mass, axis=-1)
    total = block_cdf[:, -1]
    u = uniform * total
    u = jnp.minimum(u, jnp.nextafter(total, jnp.zeros_like(total)))
    chosen = jnp.argmax(block_cdf > u[:, None], axis=-1)
    rows = jnp.arange(batch)
    inside = weights[rows, chosen]
    cdf = jnp.cumsum(inside, axis=-1)
    rest = jnp.clip(u - (block_cdf[rows, chosen] - mass[rows, chosen]), 0.0, None)
    rest = jnp.minimum(rest, jnp.nextafter(cdf[:, -1], jnp.zeros_like(total)))
    index = chosen * block + jnp.argmax(cdf > rest[:, None], axis=-1)
    return index.astype(jnp.int32), top + jnp.log(total)


@functools.partial(
    eqx.filter_jit,
    donate="none",
)
def generate(
    model: Decoder,
    prompt_ids: Int[Array, "batch prompt"],
    prompt_mask: Bool[Array, "batch prompt"] | Int[Array, "batch prompt"],
    *,
    key: PRNGKeyArray,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    decode_attention: str = "auto",
    group_size: int = 1,
) -> Completions:
    """Samples `group_size` completions for each prompt of a left-padded batch.

    Each prompt is prefilled once and its keys and values are copied to its `group_size` rows,
    which then decode independently (the same completions as the prompt repeated `group_size`
    times, for a `1/group_size` of the prefill). Rows stop at EOS independently; the loop ends
    when every row has stopped or after `max_new_tokens`.

    **Arguments:**

    - `model`: the policy.
    - `prompt_ids`: left-padded prompt ids, one row per distinct prompt.
    - `prompt_mask`: 1 on real prompt tokens (left padding: real tokens last).
    - `key`: PRNG key.
    - `max_new_tokens`: the completion cap.
    - `temperature`: sampling temperature; 0 is greedy.
    - `top_p`, `top_k`: nucleus and top-k filtering (1.0 and 0 turn them off).
    - `eos_token_ids`: tokens that end a row.
    - `pad_token_id`: written after a row's end.
    - `decode_attention`: `"xla"`, `"pallas"` (JAX's Triton decode-attention kernel, which reads
      only the cache blocks in use) or `"auto"` (Pallas on a single GPU, XLA elsewhere).
    - `group_size`: completions per prompt (`G`).

    **Returns:**

    The `Completions` of `prompts × group_size` rows in consecutive groups: rows
    `p*G … p*G+G-1` continue prompt `p`.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return _generate(
        model,
        prompt_ids,
        prompt_mask,
        key,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        eos_token_ids=tuple(eos_token_ids),
        pad_token_id=pad_token_id,
        decode_attention=decode_attention,
        group_size=group_size,
    )


def _generate(
    model: Decoder,
    prompt_ids: Int[Array, "batch prompt"],
    prompt_mask: Bool[Array, "batch prompt"] | Int[Array, "batch prompt"],
    key: PRNGKeyArray,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_token_ids: tuple[int, ...],
    pad_token_id: int,
    decode_attention: str = "auto",
    group_size: int = 1,
) -> Completions:
    """`generate` without its own `jit`, for use inside a larger compiled step."""
    prompts, prompt_len = prompt_ids.shape
    batch = prompts * group_size
    decoding = DecodingModel.from_decoder(model, decode_attention)
    slots = decoding.cache_slots(prompt_len + max_new_tokens)
    hidden, cache = model.prefill(prompt_ids, prompt_mask, slots)
    hidden = jnp.repeat(hidden, group_size, axis=0)
    cache = cache.repeat(group_size)
    prompt_lengths = jnp.repeat(jnp.sum(prompt_mask.astype(jnp.int32), axis=1), group_size)
    eos = jnp.asarray(eos_token_ids if eos_token_ids else (-1,), jnp.int32)
    # All the randomness up front: one uniform number per row and token (no PRNG work per step).
    uniforms = jax.random.uniform(key, (max_new_tokens, batch), jnp.float32)

    def cond(carry):
        i, done = carry[0], carry[5]
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tokens, mask, logprobs, sampling_logprobs, done, hidden, cache = carry
        logits = decoding.logits(hidden)
        token, logp, sampling_logp = sample_token(
            logits, uniforms[i], temperature=temperature, top_k=top_k, top_p=top_p
        )
        token = jnp.where(done, pad_token_id, token)
        live = ~done
        tokens = tokens.at[:, i].set(token)
        mask = mask.at[:, i].set(live)
        logprobs = logprobs.at[:, i].set(jnp.where(live, logp, 0.0))
        sampling_logprobs = sampling_logprobs.at[:, i].set(jnp.where(live, sampling_logp, 0.0))
        done = done | jnp.any(token[:, None] == eos[None, :], axis=-1)
        hidden, cache = decoding.decode(token, prompt_lengths + i, prompt_len + i, cache)
        return i + 1, tokens, mask, logprobs, sampling_logprobs, done, hidden, cache

    init = (
        jnp.asarray(0, jnp.int32),
        jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32),
        jnp.zeros((batch, max_new_tokens), bool),
        jnp.zeros((batch, max_new_tokens), jnp.float32),
        jnp.zeros((batch, max_new_tokens), jnp.float32),
        jnp.zeros((batch,), bool),
        hidden,
        cache,
    )
    _, tokens, mask, logprobs, sampling_logprobs, done, _, _ = jax.lax.while_loop(cond, body, init)
    return Completions(
        tokens=tokens,
        mask=mask,
        logprobs=logprobs,
        sampling_logprobs=sampling_logprobs,
        lengths=jnp.sum(mask.astype(jnp.int32), axis=1),
        finished=done,
    )
