"""Multi-turn sampling inside one compiled function: model turns and environment answers share
one KV cache and one decode loop.

Every row's tokens stay contiguous in the cache (prompt, turn, answer, turn, …), so a decode
step writes all rows at the same slot and attends over `start[b] … slot` as single-turn
sampling does. A row whose turn ends (EOS, the chat template's end-of-turn token, or
`max_turn_tokens`) is answered by its environment through a host callback at that step, and
the answer's tokens (with the template's framing: `episodes.Episodes`) are fed through the
following decode steps (as the prompt's would be, without sampling: the loop never re-reads the
growing context) while the other rows go on generating; the next model turn follows. A row
the environment ends (or that used `max_turns`) stops. The shapes are static: the completion
region holds `max_turns × (max_turn_tokens + max_observation_tokens)` slots, and one
compilation serves every batch.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jaxtyping import Array, Bool, Int, PRNGKeyArray

from ..models import Decoder, DecodingModel
from ..rollout import Completions, Turns, sample_token
from .episodes import Episodes

GENERATE, OBSERVE, DONE = 0, 1, 2


def completion_slots(max_turns: int, max_turn_tokens: int, max_observation_tokens: int) -> int:
    """The width of a multi-turn completion: every turn and answer at their longest.

    **Arguments:**

    - `max_turns`, `max_turn_tokens`, `max_observation_tokens`: the `[environment]` limits.

    **Returns:**

    `max_turns × (max_turn_tokens + max_observation_tokens)`.
    """
    return max_turns * (max_turn_tokens + max_observation_tokens)


def generate_turns(
    model: Decoder,
    prompt_ids: Int[Array, "batch prompt"],
    prompt_mask: Bool[Array, "batch prompt"] | Int[Array, "batch prompt"],
    index: Int[Array, " batch"],
    key: PRNGKeyArray,
    *,
    episodes: Episodes,
    max_turns: int,
    max_turn_tokens: int,
    max_observation_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_token_ids: tuple[int, ...],
    pad_token_id: int,
    decode_attention: str = "auto",
) -> Completions:
    """Samples multi-turn trajectories (no `jit` of its own: call it inside a compiled step).

    **Arguments:**

    - `model`: the policy.
    - `prompt_ids`, `prompt_mask`: left-padded prompts.
    - `index`: each prompt's row in `episodes.rows` (what its environment is reset with).
    - `key`: PRNG key.
    - `episodes`: the host side (environments, answer tokens, timeouts).
    - `max_turns`: model turns per trajectory.
    - `max_turn_tokens`: new tokens per model turn.
    - `max_observation_tokens`: tokens per environment answer (`episodes` cuts longer ones).
    - `temperature`, `top_p`, `top_k`: sampling (see `gradflow.rollout.generate`).
    - `eos_token_ids`: tokens that end a model turn (besides the chat template's end-of-turn
      token, `episodes.end_of_turn`).
    - `pad_token_id`: written after a trajectory's end.
    - `decode_attention`: see `gradflow.rollout.generate`.

    **Returns:**

    The `Completions`: `mask` (what is trained on), `logprobs` and `lengths` cover the model's
    tokens only; `turns` holds the answers' positions (`observed`) and the environment's
    rewards and counts; `finished` is false for a trajectory whose last turn hit
    `max_turn_tokens` without EOS.
    """
    batch, prompt_len = prompt_ids.shape
    width = completion_slots(max_turns, max_turn_tokens, max_observation_tokens)
    obs_width = max_observation_tokens
    decoding = DecodingModel.from_decoder(model, decode_attention)
    hidden, cache = model.prefill(prompt_ids, prompt_mask, decoding.cache_slots(prompt_len + width))
    prompt_lengths = jnp.sum(prompt_mask.astype(jnp.int32), axis=1)
    stops = (*eos_token_ids, *([] if episodes.end_of_turn is None else [episodes.end_of_turn]))
    eos = jnp.asarray(tuple(dict.fromkeys(stops)) or (-1,), jnp.int32)
    uniforms = jax.random.uniform(key, (width, batch), jnp.float32)
    answer_shapes = (
        jax.ShapeDtypeStruct((batch, obs_width), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )
    flags = jax.ShapeDtypeStruct((batch,), jnp.bool_)

    def host_reset(rows):
        return episodes.reset(np.asarray(rows))

    def host_step(ended, turn, turn_len):
        return episodes.step(np.asarray(ended), np.asarray(turn), np.asarray(turn_len))

    obs, obs_len, failed, truncated = io_callback(
        host_reset, (*answer_shapes, flags, flags), index, ordered=False
    )
    mode = jnp.where(failed, DONE, jnp.where(obs_len > 0, OBSERVE, GENERATE))
    state = dict(
        mode=mode.astype(jnp.int32),
        obs=obs,
        obs_len=obs_len,
        obs_pos=jnp.zeros(batch, jnp.int32),
        turn=jnp.full((batch, max_turn_tokens), pad_token_id, jnp.int32),
        turn_len=jnp.zeros(batch, jnp.int32),
        turns=jnp.zeros(batch, jnp.int32),
        reward=jnp.zeros(batch, jnp.float32),
        failed=failed,
        truncated=truncated.astype(jnp.int32),
        finished=jnp.zeros(batch, bool),
    )

    def answer(s, ended):
        """The environments' answers to the turns that ended (a host callback)."""
        shapes = (*answer_shapes, jax.ShapeDtypeStruct((batch,), jnp.float32), flags, flags, flags)
        ids, count, reward, done, failed, truncated = io_callback(
            host_step, shapes, ended, s["turn"], s["turn_len"], ordered=False
        )
        stop = done | failed | (s["turns"] >= max_turns)
        next_mode = jnp.where(stop, DONE, jnp.where(count > 0, OBSERVE, GENERATE))
        return dict(
            s,
            mode=jnp.where(ended, next_mode, s["mode"]),
            obs=jnp.where(ended[:, None], ids, s["obs"]),
            obs_len=jnp.where(ended, count, s["obs_len"]),
            obs_pos=jnp.where(ended, 0, s["obs_pos"]),
            turn_len=jnp.where(ended, 0, s["turn_len"]),
            reward=s["reward"] + jnp.where(ended, reward, 0.0),
            failed=s["failed"] | (ended & failed),
            truncated=s["truncated"] + (ended & truncated).astype(jnp.int32),
        )

    def cond(carry):
        return (carry[0] < width) & ~jnp.all(carry[2]["mode"] == DONE)

    def body(carry):
        i, out, s, hidden, cache = carry
        sampled, logp, sampling_logp = sample_token(
            decoding.logits(hidden), uniforms[i], temperature=temperature, top_k=top_k, top_p=top_p
        )
        generating = s["mode"] == GENERATE
        observing = s["mode"] == OBSERVE
        fed = jnp.take_along_axis(s["obs"], jnp.minimum(s["obs_pos"], obs_width - 1)[:, None], 1)
        token = jnp.where(generating, sampled, jnp.where(observing, fed[:, 0], pad_token_id))
        out = dict(
            tokens=out["tokens"].at[:, i].set(token),
            mask=out["mask"].at[:, i].set(generating),
            observed=out["observed"].at[:, i].set(observing),
            logprobs=out["logprobs"].at[:, i].set(jnp.where(generating, logp, 0.0)),
            sampling_logprobs=out["sampling_logprobs"]
            .at[:, i]
            .set(jnp.where(generating, sampling_logp, 0.0)),
        )
        at_eos = jnp.any(token[:, None] == eos[None, :], axis=-1)
        turn_len = s["turn_len"] + generating.astype(jnp.int32)
        turn = jnp.where(
            generating[:, None] & (jnp.arange(max_turn_tokens)[None, :] == s["turn_len"][:, None]),
            token[:, None],
            s["turn"],
        )
        ended = generating & (at_eos | (turn_len >= max_turn_tokens))
        obs_pos = s["obs_pos"] + observing.astype(jnp.int32)
        mode = jnp.where(observing & (obs_pos >= s["obs_len"]), GENERATE, s["mode"])
        s = dict(
            s,
            mode=mode,
            obs_pos=obs_pos,
            turn=turn,
            turn_len=turn_len,
            turns=s["turns"] + ended.astype(jnp.int32),
            finished=jnp.where(ended, at_eos, s["finished"]),
        )
        s = jax.lax.cond(jnp.any(ended), lambda: answer(s, ended), lambda: s)
        hidden, cache = decoding.decode(token, prompt_lengths + i, prompt_len + i, cache)
        return i + 1, out, s, hidden, cache

    out = dict(
        tokens=jnp.full((batch, width), pad_token_id, jnp.int32),
        mask=jnp.zeros((batch, width), bool),
        observed=jnp.zeros((batch, width), bool),
        logprobs=jnp.zeros((batch, width), jnp.float32),
        sampling_logprobs=jnp.zeros((batch, width), jnp.float32),
    )
    init = (jnp.asarray(0, jnp.int32), out, state, hidden, cache)
    _, out, s, _, _ = jax.lax.while_loop(cond, body, init)
    return Completions(
        tokens=out["tokens"],
        mask=out["mask"],
        logprobs=out["logprobs"],
        sampling_logprobs=out["sampling_logprobs"],
        lengths=jnp.sum(out["mask"].astype(jnp.int32), axis=1),
        finished=s["finished"] & ~s["failed"],
        turns=Turns(
            observed=out["observed"],
            reward=s["reward"],
            failed=s["failed"],
            turns=s["turns"],
            truncated=s["truncated"],
        ),
    )


generate_turns_jit = eqx.filter_jit(generate_turns)
