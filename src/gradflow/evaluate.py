"""Held-out evaluation, independent of the training reward: greedy accuracy (strict and flexible
answer matching), and with `samples = k > 1` pass@k and maj@k at the configured temperature.
"""

import collections
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray

from .checkpoint import to_host
from .data import Problem
from .models import Decoder
from .rewards.gsm8k import answer_value, extract_answer, is_correct, reference_answer
from .rollout import generate
from .sharding import shard_prompts


def _complete(policy, ids, mask, key, *, batch_size, max_new_tokens, temperature, eos, pad, mesh):
    """Completions for every prompt row, in fixed-size batches (one compilation), each batch's
    rows split over the mesh's `data × fsdp` devices when it has one."""
    texts_tokens = []
    rows = ids.shape[0]
    for start in range(0, rows, batch_size):
        chunk_ids = ids[start : start + batch_size]
        chunk_mask = mask[start : start + batch_size]
        short = batch_size - chunk_ids.shape[0]
        if short:
            chunk_ids = np.concatenate([chunk_ids, np.repeat(chunk_ids[-1:], short, 0)])
            chunk_mask = np.concatenate([chunk_mask, np.repeat(chunk_mask[-1:], short, 0)])
        key, sub = jax.random.split(key)
        chunk = (chunk_ids, chunk_mask)
        chunk = jax.tree.map(jnp.asarray, chunk) if mesh is None else shard_prompts(chunk, mesh)
        out = generate(
            policy,
            *chunk,
            key=sub,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_ids=eos,
            pad_token_id=pad,
        )
        tokens, keep = to_host(out.tokens), to_host(out.mask)
        texts_tokens.extend(tokens[i][keep[i]] for i in range(batch_size - short))
    return texts_tokens


def majority_correct(texts: Sequence[str], reference: str) -> bool:
    """Whether the majority answer of `texts` (strict extraction; votes counted by value, so
    `3/4` and `0.75` vote together; a tie goes to the answer seen first) equals the reference.

    **Arguments:**

    - `texts`: the sampled completions of one problem.
    - `reference`: its reference (`#### N` or a bare number).

    **Returns:**

    `True` when the most voted value is the reference's (`False` without any answer).
    """
    answers = [a for a in (extract_answer(t, mode="strict") for t in texts) if a]
    votes = collections.Counter(answer_value(a) for a in answers).most_common(1)
    return bool(votes) and votes[0][0] == answer_value(reference_answer(reference))


def evaluate(
    policy: Decoder,
    tokenizer,
    problems: Sequence[Problem],
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    *,
    key: PRNGKeyArray,
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...],
    pad_token_id: int,
    batch_size: int = 256,
    samples: int = 1,
    temperature: float = 1.0,
    mesh: Mesh | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Evaluates `policy` on held-out problems.

    **Arguments:**

    - `policy`: the model.
    - `tokenizer`: decodes completions.
    - `problems`: the held-out problems (references in `answer`).
    - `prompt_ids`, `prompt_mask`: their left-padded prompts.
    - `key`: PRNG key for sampled completions.
    - `max_new_tokens`: completion cap.
    - `eos_token_ids`, `pad_token_id`: from the tokenizer.
    - `batch_size`: prompts per generation call.
    - `samples`: k for pass@k / maj@k (1: greedy only).
    - `temperature`: sampling temperature for k > 1.
    - `mesh`: the training mesh (each generation batch's rows are split over `data × fsdp`), or
      `None`.

    **Returns:**

    `(metrics, records)`: `eval/accuracy` (greedy, strict), `eval/accuracy_flexible`,
    `eval/pass@k`, `eval/maj@k`, and one record per problem (question, completion, correct).
    """
    common = dict(
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        eos=eos_token_ids,
        pad=pad_token_id,
        mesh=mesh,
    )
    greedy = _complete(policy, prompt_ids, prompt_mask, key, temperature=0.0, **common)
    records, strict, flexible = [], [], []
    for problem, tokens in zip(problems, greedy, strict=True):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        ok_strict = is_correct(text, problem.answer, mode="strict")
        ok_flexible = is_correct(text, problem.answer, mode="flexible")
        strict.append(ok_strict)
        flexible.append(ok_flexible)
        records.append({"question": problem.question, "completion": text, "correct": ok_strict})
    metrics = {
        "eval/accuracy": float(np.mean(strict)),
        "eval/accuracy_flexible": float(np.mean(flexible)),
    }
    if samples > 1:
        ids = np.repeat(prompt_ids, samples, axis=0)
        mask = np.repeat(prompt_mask, samples, axis=0)
        sampled = _complete(policy, ids, mask, key, temperature=temperature, **common)
        passes, majorities = [], []
        for i, problem in enumerate(problems):
            texts = [
                tokenizer.decode(t, skip_special_tokens=True)
                for t in sampled[i * samples : (i + 1) * samples]
            ]
            passes.append(any(is_correct(t, problem.answer, mode="strict") for t in texts))
            majorities.append(majority_correct(texts, problem.answer))
        metrics[f"eval/pass@{samples}"] = float(np.mean(passes))
        metrics[f"eval/maj@{samples}"] = float(np.mean(majorities))
    return metrics, records
