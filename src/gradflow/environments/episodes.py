"""The host side of multi-turn rollouts: one environment per trajectory, its answers turned into
observation tokens, every call under a timeout.

An environment is any class (or zero-argument callable) whose instances have

```python
def reset(self, **row) -> str | None: ...      # the dataset row's columns; a first message
def step(self, completion: str) -> tuple[str | None, float, bool]: ...  # answer, reward, done
```

and optionally `role` (`"user"` by default; `"tool"` for tool results). An answer enters the
trajectory as a turn of that role through the chat template (`prompt_template = "chat"`: the
text the template puts between the model's end-of-turn token and the next assistant turn; a
template without tool turns gets them as Qwen2.5's writes them, a user turn holding
`<tool_response>` tags), or as it is (`"plain"`; tool results wrapped in `<tool_response>` tags). An answer longer than
`max_observation_tokens` is cut (its text, not the template's markers) and counted.

The rollout calls `reset` and `step` from a host callback inside the compiled step; they never
raise there: an environment that raises or outlives `timeout_s` ends its trajectory, which
then scores 0 and counts as failed (XLA's collectives on several devices abort when a callback
raises or blocks for long).
"""

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from gradflow.tasks.rows import Rows

logger = logging.getLogger(__name__)

_MARK = "\x00GRADFLOW\x00"


def run_timed(calls: Sequence[Callable[[], object]], timeout_s: float) -> list:
    """Runs calls side by side in daemon threads, waiting at most `timeout_s` for all of them.

    **Arguments:**

    - `calls`: zero-argument callables.
    - `timeout_s`: the deadline for the whole set.

    **Returns:**

    Each call's result, or the exception it raised (`TimeoutError` for one still running: its
    thread is abandoned).
    """
    results: list = [TimeoutError(f"no answer within {timeout_s} s")] * len(calls)

    def run(i: int, fn: Callable[[], object]) -> None:
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            results[i] = e

    threads = [
        threading.Thread(target=run, args=(i, fn), daemon=True) for i, fn in enumerate(calls)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    return list(results)  # a late thread writes into the old list, not this one


@dataclasses.dataclass(frozen=True)
class TurnFormat:
    """The tokens around an environment's answer: `head + answer + tail` (`tail` ends with the
    next assistant turn's header under a chat template)."""

    head: tuple[int, ...]
    tail: tuple[int, ...]


def turn_format(tokenizer, role: str, template: str, chat_template_kwargs: dict) -> TurnFormat:
    """How an answer of `role` is written after a model turn.

    **Arguments:**

    - `tokenizer`: the tokenizer.
    - `role`: `"user"` or `"tool"`.
    - `template`: `"chat"` or `"plain"`.
    - `chat_template_kwargs`: passed to `apply_chat_template`.

    **Returns:**

    The `TurnFormat`.
    """

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    if template == "plain":
        if role == "tool":
            return TurnFormat(ids("<tool_response>\n"), ids("\n</tool_response>\n"))
        return TurnFormat((), ())
    turn = "\x01TURN\x01"
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": turn}]

    def render(message: dict) -> str:
        return tokenizer.apply_chat_template(
            [*history, message], tokenize=False, add_generation_prompt=True, **chat_template_kwargs
        )

    text = render({"role": role, "content": _MARK})
    if _MARK not in text:  # a template without tool turns (Qwen2): write them as Qwen2.5 does
        text = render({"role": "user", "content": f"<tool_response>\n{_MARK}\n</tool_response>"})
    after = text[text.index(turn) + len(turn) :]
    end = tokenizer.eos_token or ""
    for token in ("<|im_end|>", end):  # the model's end-of-turn token is its own
        if token and after.startswith(token):
            after = after[len(token) :]
            break
    head, _, tail = after.partition(_MARK)
    return TurnFormat(ids(head), ids(tail))


class Episodes:
    """One environment per trajectory of a batch, called by the multi-turn rollout.

    **Arguments:**

    - `factory`: makes one environment (the environment class).
    - `rows`: the split the trajectories' prompts come from (`reset` gets a row's columns).
    - `tokenizer`: decodes turns, encodes answers.
    - `template`: `"chat"` or `"plain"` (`task.prompt_template`).
    - `max_observation_tokens`: the longest observation (template markers included).
    - `timeout_s`: the longest a batch of `reset` or `step` calls may take.
    - `chat_template_kwargs`: passed to `apply_chat_template`.
    """

    def __init__(
        self,
        factory: Callable[[], object],
        rows: Rows,
        tokenizer,
        *,
        template: str,
        max_observation_tokens: int,
        timeout_s: float,
        chat_template_kwargs: dict | None = None,
    ):
        self.factory = factory
        self.rows = rows
        self.tokenizer = tokenizer
        self.template = template
        self.max_observation_tokens = max_observation_tokens
        self.timeout_s = timeout_s
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._formats: dict[str, TurnFormat] = {}
        self._envs: list = []
        self._warned: set[str] = set()

    def _warn(self, what: str, error: BaseException) -> None:
        key = f"{what}:{type(error).__name__}"
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(
                "environment %s failed (%s: %s); its trajectory ends, scores 0 and counts in "
                "reward/failed (warned once)",
                what,
                type(error).__name__,
                error,
            )

    def _observation(self, env, answer: str) -> tuple[list[int], bool]:
        role = getattr(env, "role", "user")
        if role not in self._formats:
            self._formats[role] = turn_format(
                self.tokenizer, role, self.template, self.chat_template_kwargs
            )
        form = self._formats[role]
        room = max(self.max_observation_tokens - len(form.head) - len(form.tail), 0)
        body = self.tokenizer.encode(str(answer), add_special_tokens=False)
        tokens = [*form.head, *body[:room], *form.tail][: self.max_observation_tokens]
        return tokens, len(body) > room

    def _observations(self, envs, answers, live) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        batch = len(answers)
        ids = np.full((batch, self.max_observation_tokens), self.pad, np.int32)
        lengths = np.zeros(batch, np.int32)
        truncated = np.zeros(batch, bool)
        for b in range(batch):
            if live[b] and answers[b] is not None:
                tokens, truncated[b] = self._observation(envs[b], answers[b])
                ids[b, : len(tokens)] = tokens
                lengths[b] = len(tokens)
        return ids, lengths, truncated

    def reset(self, index: np.ndarray) -> tuple[np.ndarray, ...]:
        """Makes a new environment for every trajectory and resets it with its row.

        **Arguments:**

        - `index`: each trajectory's row in `rows`.

        **Returns:**

        `(ids, lengths, failed, truncated)`: first-message tokens `[batch, max_observation_tokens]`
        and their count, whether the environment failed, whether the message was cut.
        """
        index = np.asarray(index)
        batch = index.shape[0]
        try:
            columns = self.rows.take(index.tolist())

            def start(b: int):
                env = self.factory()
                return env, env.reset(**{k: v[b] for k, v in columns.items()})

            results = run_timed([lambda b=b: start(b) for b in range(batch)], self.timeout_s)
            failed = np.zeros(batch, bool)
            self._envs, answers = [None] * batch, [None] * batch
            for b, result in enumerate(results):
                if isinstance(result, BaseException):
                    self._warn("reset", result)
                    failed[b] = True
                else:
                    self._envs[b], answers[b] = result
            ids, lengths, truncated = self._observations(self._envs, answers, ~failed)
            return ids, lengths, failed, truncated
        except Exception as e:  # never raise into the compiled step
            self._warn("reset", e)
            shape = (batch, self.max_observation_tokens)
            empty = np.zeros(batch, bool)
            return np.full(shape, self.pad, np.int32), np.zeros(batch, np.int32), ~empty, empty

    def step(
        self, ended: np.ndarray, tokens: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        """Hands the turns that just ended to their environments.

        **Arguments:**

        - `ended`: the trajectories whose model turn ended.
        - `tokens`: each trajectory's current turn `[batch, max_turn_tokens]`.
        - `lengths`: its token count.

        **Returns:**

        `(ids, lengths, reward, done, failed, truncated)`: the answers' tokens and counts, the
        turn rewards, whether the environment ended the trajectory, whether it failed, whether
        its answer was cut (all 0 where `ended` is false).
        """
        ended = np.asarray(ended)
        batch = ended.shape[0]
        reward = np.zeros(batch, np.float32)
        done = np.zeros(batch, bool)
        failed = np.zeros(batch, bool)
        try:
            rows = np.flatnonzero(ended).tolist()
            texts = self.tokenizer.batch_decode(
                [np.asarray(tokens[b][: lengths[b]]).tolist() for b in rows],
                skip_special_tokens=True,
            )
            calls = [
                lambda b=b, t=t: self._envs[b].step(t) for b, t in zip(rows, texts, strict=True)
            ]
            answers = [None] * batch
            for b, result in zip(rows, run_timed(calls, self.timeout_s), strict=True):
                try:
                    if isinstance(result, BaseException):
                        raise result
                    answer, r, d = result
                    reward[b] = float(r)
                    if not np.isfinite(reward[b]):
                        raise ValueError(f"non-finite turn reward {r!r}")
                    answers[b], done[b] = answer, bool(d)
                except BaseException as e:  # noqa: BLE001 - counted, never raised
                    self._warn("step", e)
                    reward[b], failed[b] = 0.0, True
            ids, counts, truncated = self._observations(self._envs, answers, ended & ~failed)
            return ids, counts, reward, done, failed, truncated
        except Exception as e:  # never raise into the compiled step
            self._warn("step", e)
            shape = (batch, self.max_observation_tokens)
            return (
                np.full(shape, self.pad, np.int32),
                np.zeros(batch, np.int32),
                np.zeros(batch, np.float32),
                np.zeros(batch, bool),
                ended.copy(),
                np.zeros(batch, bool),
            )
