"""Held-out evaluation with the task's evaluation functions (the reward functions, or
`eval.functions`): greedy scores, and with `samples = k > 1` pass@k and maj@k at the configured
temperature for 0/1-valued functions.

With a multi-turn rollout the functions score whole trajectories (environment answers
included), i.e. the answer standing by the last turn, and `eval/environment` (the mean of the
environment's summed turn rewards) and `eval/turns_mean` are reported as well.
"""

import collections
import dataclasses
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray

from .batch import Prompts
from .checkpoint import to_host
from .config import EnvironmentConfig
from .models import Decoder
from .rollout import generate
from .sharding import shard_prompts
from .stages import MultiTurn, Sampling
from .tasks.rows import Rows
from .tasks.task import Task


def evaluation_turns(task: Task, rows: Rows, environment: EnvironmentConfig) -> MultiTurn | None:
    """The multi-turn rollout that evaluation samples held-out trajectories with (its
    temperature is set per call; no top-p/top-k, as for single-turn evaluation).

    **Arguments:**

    - `task`: the task (its environment class and tokenizer).
    - `rows`: the held-out rows evaluated.
    - `environment`: the `[environment]` section.

    **Returns:**

    The `MultiTurn` over `rows`' environments, or `None` without `environment.class`.
    """
    if not environment.class_:
        return None
    return MultiTurn(
        sampling=Sampling(eos_token_ids=task.eos_token_ids, pad_token_id=task.pad_token_id),
        episodes=task.episodes(rows, environment.max_observation_tokens),
        max_turns=environment.max_turns,
        max_turn_tokens=environment.max_turn_tokens,
        max_observation_tokens=environment.max_observation_tokens,
    )


@eqx.filter_jit
def _trajectories(turns: MultiTurn, policy, ids, mask, index, key, temperature: float):
    sampling = dataclasses.replace(turns.sampling, temperature=temperature, group_size=1)
    return dataclasses.replace(turns, sampling=sampling)(
        policy, Prompts(ids=ids, mask=mask, index=index), key
    )


def _complete(
    policy,
    ids,
    mask,
    rows_index,
    key,
    *,
    batch_size,
    samples,
    max_new_tokens,
    temperature,
    eos,
    pad,
    mesh,
    turns,
):
    """`samples` completions of every prompt row (consecutive), in fixed-size batches of prompts
    (one compilation; each prompt prefilled once), each batch's prompts split over the mesh's
    `data × fsdp` devices when it has one; with `turns` multi-turn trajectories (`rows_index`:
    each prompt's row in `turns.episodes.rows`; prompts repeated `samples` times, each
    trajectory with an environment of its own), with their environment rewards and turn
    counts."""
    if turns is not None and samples > 1:
        ids, mask = np.repeat(ids, samples, axis=0), np.repeat(mask, samples, axis=0)
        rows_index, samples = np.repeat(rows_index, samples), 1
    texts_tokens, rewards, counts = [], [], []
    rows = ids.shape[0]
    for start in range(0, rows, batch_size):
        chunk_ids = ids[start : start + batch_size]
        chunk_mask = mask[start : start + batch_size]
        index = rows_index[start : start + batch_size]
        short = batch_size - chunk_ids.shape[0]
        if short:
            chunk_ids = np.concatenate([chunk_ids, np.repeat(chunk_ids[-1:], short, 0)])
            chunk_mask = np.concatenate([chunk_mask, np.repeat(chunk_mask[-1:], short, 0)])
            index = np.concatenate([index, np.repeat(index[-1:], short)])
        key, sub = jax.random.split(key)
        chunk = (chunk_ids, chunk_mask, index.astype(np.int32))
        chunk = jax.tree.map(jnp.asarray, chunk) if mesh is None else shard_prompts(chunk, mesh)
        if turns is None:
            out = generate(
                policy,
                *chunk[:2],
                key=sub,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                eos_token_ids=eos,
                pad_token_id=pad,
                group_size=samples,
            )
        else:
            out = _trajectories(turns, policy, *chunk, sub, temperature)
            rewards.extend(to_host(out.turns.reward)[: batch_size - short].tolist())
            counts.extend(to_host(out.turns.turns)[: batch_size - short].tolist())
        tokens, keep = to_host(out.tokens), to_host(out.context_mask)
        texts_tokens.extend(tokens[i][keep[i]] for i in range((batch_size - short) * samples))
    return texts_tokens, rewards, counts


def majority_score(
    texts: Sequence[str], scores: Sequence[float] | np.ndarray, vote_key: Callable[[str], object]
) -> float:
    """The score of the answer most completions give (maj@k).

    **Arguments:**

    - `texts`: the sampled completions of one prompt.
    - `scores`: each completion's score.
    - `vote_key`: the answer a completion gives (`None`: none); completions with equal keys
        vote together (GSM8K: by value, so `3/4` and `0.75` agree). A tie goes to the answer
        seen first.

    **Returns:**

    The score of the first completion giving the most voted answer (0 without any answer).
    """
    keys = [vote_key(t) for t in texts]
    votes = collections.Counter(k for k in keys if k is not None).most_common(1)
    if not votes:
        return 0.0
    return float(scores[keys.index(votes[0][0])])


def _is_binary(values: np.ndarray) -> bool:
    seen = values[~np.isnan(values)]
    return seen.size > 0 and bool(np.isin(seen, (0.0, 1.0)).all())


def evaluate(
    policy: Decoder,
    task: Task,
    rows: Rows,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    *,
    key: PRNGKeyArray,
    max_new_tokens: int,
    batch_size: int = 256,
    samples: int = 1,
    temperature: float = 1.0,
    mesh: Mesh | None = None,
    turns: MultiTurn | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Evaluates `policy` on held-out rows.

    **Arguments:**

    - `policy`: the model.
    - `task`: the task (tokenizer, evaluation functions, scorer).
    - `rows`: the held-out rows.
    - `prompt_ids`, `prompt_mask`: their left-padded prompts.
    - `key`: PRNG key for sampled completions.
    - `max_new_tokens`: completion cap.
    - `batch_size`: prompts per generation call (with `samples = k`, `k` rows each).
    - `samples`: k for pass@k / maj@k (1: greedy only).
    - `temperature`: sampling temperature for k > 1.
    - `mesh`: the training mesh (each generation batch's rows are split over `data × fsdp`), or
      `None`.
    - `turns`: a multi-turn rollout whose `episodes` hold `rows` (`None`: one turn).

    **Returns:**

    `(metrics, records)`: `eval/<name>` for each evaluation function (greedy; the mean over the
    rows it applies to), `eval/pass@k` and `eval/maj@k` for the first 0/1-valued one
    (`eval/<name>/pass@k`, `eval/<name>/maj@k` for the others; maj@k needs a function that
    carries a `vote_key`), `eval/failed`, and one record per row (prompt, completion, scores).
    """
    common = dict(
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        eos=task.eos_token_ids,
        pad=task.pad_token_id,
        mesh=mesh,
        turns=turns,
    )
    functions = task.evaluations
    which = [task.scorer.functions.index(f) for f in functions]
    indices = list(range(len(rows)))
    greedy, rewards, counts = _complete(
        policy,
        prompt_ids,
        prompt_mask,
        np.arange(len(rows)),
        key,
        samples=1,
        temperature=0.0,
        **common,
    )
    batch = task.batch(rows, indices, greedy)
    values, failed = task.scorer.score(batch, which)
    metrics = {}
    if turns is not None:
        metrics["eval/environment"] = float(np.mean(rewards))
        metrics["eval/turns_mean"] = float(np.mean(counts))
    for function, row in zip(functions, values, strict=True):
        metrics[f"eval/{function.name}"] = float(np.nanmean(row)) if (~np.isnan(row)).any() else 0.0
    metrics["eval/failed"] = float(np.mean(failed > 0))
    texts = [c if isinstance(c, str) else c[0]["content"] for c in batch.completions]
    records = []
    for i, prompt in enumerate(batch.prompts):
        record = {task.prompt_key: prompt, "completion": texts[i]}
        if turns is not None:
            record.update(environment=rewards[i], turns=counts[i])
        for function, row in zip(functions, values, strict=True):
            record[function.name] = None if np.isnan(row[i]) else float(row[i])
        records.append(record)
    if samples > 1:
        sampled, _, _ = _complete(
            policy,
            prompt_ids,
            prompt_mask,
            np.asarray(indices),
            key,
            samples=samples,
            temperature=temperature,
            **common,
        )
        sampled_batch = task.batch(rows, np.repeat(indices, samples).tolist(), sampled)
        sampled_values, _ = task.scorer.score(sampled_batch, which)
        sampled_texts = [
            c if isinstance(c, str) else c[0]["content"] for c in sampled_batch.completions
        ]
        binary = [i for i, row in enumerate(sampled_values) if _is_binary(row)]
        for position, f in enumerate(binary):
            name = "" if position == 0 else f"{functions[f].name}/"
            scores = np.nan_to_num(sampled_values[f]).reshape(len(rows), samples)
            metrics[f"eval/{name}pass@{samples}"] = float(np.mean(scores.max(axis=1)))
            vote_key = getattr(functions[f].function, "vote_key", None)
            if vote_key is not None:
                majorities = [
                    majority_score(
                        sampled_texts[i * samples : (i + 1) * samples], scores[i], vote_key
                    )
                    for i in range(len(rows))
                ]
                metrics[f"eval/{name}maj@{samples}"] = float(np.mean(majorities))
    return metrics, records
