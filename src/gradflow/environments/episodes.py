"""The host side of multi-turn rollouts: one environment per trajectory, its answers turned into
observation tokens, every call under a timeout.

An environment is any class (or zero-argument callable) whose instances have

```python
def reset(self, **row) -> str | None: ...      # the dataset row's columns; a first message
def step(self, completion: str) -> tuple[str | None, float, bool]: ...  # answer, reward, done
```

and optionally `role` (`"user"` by default; `"tool"` for tool results). Under a chat template
(`prompt_template = "chat"`) the trajectory is the conversation as the tokenizer's own template
writes it (`TurnFormat` derives every piece from the template, for no model family in
particular): the prompt ends with its last turn closed, the first message (a user turn) or none
follows, then the generation prompt; a model turn is closed once by the template's end-of-turn
token (the model's own when it wrote it; added when the turn was cut at `max_turn_tokens` or
ended by another EOS), then come the answer's turn of the environment's role and the next
generation prompt. A template without tool turns gets them as Qwen2.5's writes them, a user turn
holding `<tool_response>` tags. Under `"plain"` answers go in as they are (tool results wrapped
in `<tool_response>` tags). An answer longer than `max_observation_tokens` is cut (its text,
never the template's framing) and counted.

The rollout calls `reset` and `step` from a host callback inside the compiled step; they never
raise there: an environment that raises or outlives `timeout_s` ends its trajectory, which
then scores 0 and counts as failed (XLA's collectives on several devices abort when a callback
raises or blocks for long).
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
from jaxtyping import Bool, Float, Int

from gradflow.tasks.rows import Rows

logger = logging.getLogger(__name__)

_TURN = "\x01TURN\x01"  # a model turn's text in the conversations rendered to find the framing
_MARK = "\x00GRADFLOW\x00"  # an answer's text in them
_PROBE = ({"role": "user", "content": "q"},)  # the conversation they continue


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


class TurnFormat:
    """How the chat template writes the turns around the model's, found by rendering small
    conversations with placeholder texts through the tokenizer's own template.

    **Arguments:**

    - `tokenizer`: the tokenizer (its chat template).
    - `template`: `"chat"` or `"plain"` (`task.prompt_template`).
    - `chat_template_kwargs`: passed to `apply_chat_template`.

    Attributes: `opening`, the generation prompt (what opens a model turn); `closing`, what the
    template writes after a model turn's text (`"<|im_end|>\\n"`); `end_of_turn`, the id of the
    token `closing` starts with when it is an added token, the one the model ends its turn with
    (`None`: no such token).
    """

    def __init__(self, tokenizer, template: str, chat_template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.kwargs = dict(chat_template_kwargs or {})
        self._writes: dict[str, bool] = {"user": True}
        self.opening = self.closing = self._closed = ""
        self.end_of_turn: int | None = None
        if template == "plain":
            return
        name = getattr(tokenizer, "name_or_path", "")
        closed = self._render(list(_PROBE), False)
        opened = self._render(list(_PROBE), True)
        if closed is None or opened is None or not opened.startswith(closed):
            raise ValueError(
                f"tokenizer {name!r}: cannot find the chat template's generation prompt (what "
                "add_generation_prompt appends to a conversation)"
            )
        self._closed, self.opening = closed, opened[len(closed) :]
        model = self._render([*_PROBE, {"role": "assistant", "content": _TURN}], False)
        if model is None or _TURN not in model:
            raise ValueError(f"tokenizer {name!r}: the chat template writes no assistant turn")
        self.closing = model[model.index(_TURN) + len(_TURN) :]
        ids = self._ids(self.closing)
        token = tokenizer.added_tokens_decoder.get(ids[0]) if ids else None
        if token is not None and self.closing.startswith(token.content):
            self.end_of_turn = ids[0]
        if not self.after_turn("user", _MARK).startswith(self.closing):
            raise ValueError(
                f"tokenizer {name!r}: the chat template closes an assistant turn differently "
                "when another turn follows"
            )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str | None:
        """The conversation's text, or `None` when the template refuses it."""
        from jinja2 import TemplateError  # what a template's raise_exception raises

        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, **self.kwargs
            )
        except TemplateError:  # e.g. Gemma 3's roles must alternate
            return None

    def _message(self, role: str, content: str) -> dict:
        """An answer of `role` as a message the template writes."""
        if role not in self._writes:
            model = [*_PROBE, {"role": "assistant", "content": _TURN}]
            text = self._render([*model, {"role": role, "content": _MARK}], True)
            self._writes[role] = text is not None and _MARK in text
        if self._writes[role]:
            return {"role": role, "content": content}
        if role != "tool":
            raise ValueError(f"the chat template writes no {role!r} turn")
        # Qwen2's and Gemma 3's templates have no tool turns: as Qwen2.5's writes them.
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}

    def end_of_turn_text(self) -> str:
        """The text of `end_of_turn`.

        **Returns:**

        The token's text, `""` without one.
        """
        if self.end_of_turn is None:
            return ""
        return self.tokenizer.added_tokens_decoder[self.end_of_turn].content

    def first(self, message: str | None) -> str:
        """The text after the prompt (whose last turn the template closed).

        **Arguments:**

        - `message`: the environment's first message (a user turn), or `None`.

        **Returns:**

        The message's turn as the template writes it after the prompt's, then the generation
        prompt.
        """
        if self.template == "plain":
            return message or ""
        if message is None:
            return self.opening
        text = self._render([*_PROBE, {"role": "user", "content": message}], True)
        if text is not None and text.startswith(self._closed):
            return text[len(self._closed) :]
        # A template that refuses two user turns in a row (Gemma 3's roles must alternate):
        # the message's turn as the template writes a user turn after a model turn.
        return self.after_turn("user", message)[len(self.closing) :]

    def after_turn(self, role: str, answer: str | None) -> str:
        """The text after a model turn's text.

        **Arguments:**

        - `role`: the answer's role (`"user"` or `"tool"`).
        - `answer`: the environment's answer, or `None`.

        **Returns:**

        The template's closing of the model turn (`closing`), the answer's turn, the next
        generation prompt (`"plain"`: the answer alone, tool results in `<tool_response>` tags).
        """
        if self.template == "plain":
            if answer is None or role != "tool":
                return answer or ""
            return f"<tool_response>\n{answer}\n</tool_response>\n"
        messages = [*_PROBE, {"role": "assistant", "content": _TURN}]
        if answer is not None:
            messages.append(self._message(role, answer))
        text = self._render(messages, True)
        if text is None:
            raise ValueError(f"the chat template refuses a {role!r} turn after an assistant turn")
        return text[text.index(_TURN) + len(_TURN) :]

    def framing(self, role: str | None, closed: bool) -> tuple[str, str]:
        """The template's text around an answer, which is never cut.

        **Arguments:**

        - `role`: the answer's role; `None` for the first message (after the prompt).
        - `closed`: whether the model wrote `end_of_turn` itself (it is then no part of it).

        **Returns:**

        `(head, tail)`: the texts before and after the answer's.
        """
        text = self.first(_MARK) if role is None else self.after_turn(role, _MARK)
        if role is not None and closed:
            text = text.removeprefix(self.end_of_turn_text())
        head, _, tail = text.partition(_MARK)
        return head, tail


class Episodes:
    """One environment per trajectory of a batch, called by the multi-turn rollout.

    **Arguments:**

    - `factory`: makes one environment (the environment class; its `role` attribute, `"user"`
      without one, sizes the start-up check).
    - `rows`: the split the trajectories' prompts come from (`reset` gets a row's columns).
    - `tokenizer`: decodes turns, encodes answers.
    - `template`: `"chat"` or `"plain"` (`task.prompt_template`).
    - `max_observation_tokens`: the longest observation (the template's framing included).
    - `timeout_s`: the longest a batch of `reset` or `step` calls may take.
    - `chat_template_kwargs`: passed to `apply_chat_template`.

    **Raises:**

    `ValueError` when `max_observation_tokens` cannot hold the template's framing of an answer
    and one token of its text (naming the number it needs), or when no framing can be found in
    the template.
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
        self.format = TurnFormat(tokenizer, template, self.chat_template_kwargs)
        self.end_of_turn = self.format.end_of_turn
        self._framing: dict[tuple[str | None, bool], tuple[list[int], list[int]]] = {}
        self._envs: list = []
        self._warned: set[str] = set()
        role = getattr(factory, "role", "user")
        kinds = [(None, False), (role, False)]  # the first message; an answer to an open turn
        longest = max(kinds, key=lambda kind: sum(map(len, self._framed(*kind))))
        bare = (self.format.first(None), self.format.after_turn(role, None))  # no message
        framing = sum(map(len, self._framed(*longest)))
        needed = max(
            framing + 1, *(len(tokenizer.encode(t, add_special_tokens=False)) for t in bare)
        )
        if max_observation_tokens < needed:
            head, tail = self.format.framing(*longest)
            what = "the first message" if longest[0] is None else f"a {role} answer"
            raise ValueError(
                f"max_observation_tokens = {max_observation_tokens} leaves no room for an "
                f"answer: the {template} template frames {what} with {framing} tokens "
                f"({head!r} ... {tail!r}), which are never cut; set "
                f"environment.max_observation_tokens >= {needed}"
            )

    def _framed(self, role: str | None, closed: bool) -> tuple[list[int], list[int]]:
        """The token ids of `TurnFormat.framing`."""
        if (role, closed) not in self._framing:
            head, tail = self.format.framing(role, closed)
            ids = self.tokenizer.encode
            self._framing[role, closed] = (
                ids(head, add_special_tokens=False),
                ids(tail, add_special_tokens=False),
            )
        return self._framing[role, closed]

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

    def _observation(
        self, role: str | None, answer: object, closed: bool
    ) -> tuple[list[int], bool]:
        """The tokens after the prompt (`role` None) or after a model turn, and whether the
        answer was cut."""
        answer = None if answer is None else str(answer)
        if role is None:
            text = self.format.first(answer)
        else:
            text = self.format.after_turn(role, answer)
            if closed:  # the model wrote the end-of-turn token: the template's closing starts it
                text = text.removeprefix(self.format.end_of_turn_text())
        tokens = self.tokenizer.encode(text, add_special_tokens=False)
        if len(tokens) <= self.max_observation_tokens:
            return tokens, False
        if answer is None:  # a role other than the class's: it was not checked at start-up
            raise ValueError(f"max_observation_tokens is too small for a {role} turn's framing")
        head, tail = self.format.framing(role, closed)
        inside = len(text) >= len(head) + len(tail) and text.startswith(head)
        body = text[len(head) : len(text) - len(tail)] if inside and text.endswith(tail) else answer
        head_ids, tail_ids = self._framed(role, closed)
        room = self.max_observation_tokens - len(head_ids) - len(tail_ids)
        if room < 1:  # a role other than the class's: its framing was not checked at start-up
            raise ValueError(f"max_observation_tokens is too small for a {role} answer's framing")
        cut = self.tokenizer.encode(body, add_special_tokens=False)[:room]
        return [*head_ids, *cut, *tail_ids], True

    def _observations(
        self, answers: list, roles: list, closed: np.ndarray, live: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        batch = len(answers)
        ids = np.full((batch, self.max_observation_tokens), self.pad, np.int32)
        lengths = np.zeros(batch, np.int32)
        truncated = np.zeros(batch, bool)
        failed = np.zeros(batch, bool)
        for b in np.flatnonzero(live).tolist():
            try:
                tokens, truncated[b] = self._observation(roles[b], answers[b], bool(closed[b]))
            except Exception as e:  # the template refuses the answer: its trajectory fails
                self._warn("answer", e)
                failed[b] = True
                continue
            ids[b, : len(tokens)] = tokens
            lengths[b] = len(tokens)
        return ids, lengths, truncated, failed

    def reset(
        self, index: Int[np.ndarray, " batch"]
    ) -> tuple[
        Int[np.ndarray, "batch obs"],
        Int[np.ndarray, " batch"],
        Bool[np.ndarray, " batch"],
        Bool[np.ndarray, " batch"],
    ]:
        """Makes a new environment for every trajectory and resets it with its row.

        **Arguments:**

        - `index`: each trajectory's row in `rows`.

        **Returns:**

        `(ids, lengths, failed, truncated)`: the tokens after the prompt
        `[batch, max_observation_tokens]` (the first message's turn, if any, and the
        generation prompt) and their count, whether the environment failed, whether the
        message was cut.
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
            empty = np.zeros(batch, bool)
            ids, lengths, truncated, refused = self._observations(
                answers, [None] * batch, empty, ~failed
            )
            return ids, lengths, failed | refused, truncated
        except Exception as e:  # never raise into the compiled step
            self._warn("reset", e)
            shape = (batch, self.max_observation_tokens)
            empty = np.zeros(batch, bool)
            return np.full(shape, self.pad, np.int32), np.zeros(batch, np.int32), ~empty, empty

    def step(
        self,
        ended: Bool[np.ndarray, " batch"],
        tokens: Int[np.ndarray, "batch turn"],
        lengths: Int[np.ndarray, " batch"],
    ) -> tuple[
        Int[np.ndarray, "batch obs"],
        Int[np.ndarray, " batch"],
        Float[np.ndarray, " batch"],
        Bool[np.ndarray, " batch"],
        Bool[np.ndarray, " batch"],
        Bool[np.ndarray, " batch"],
    ]:
        """Hands the turns that just ended to their environments.

        **Arguments:**

        - `ended`: the trajectories whose model turn ended.
        - `tokens`: each trajectory's current turn `[batch, max_turn_tokens]`.
        - `lengths`: its token count.

        **Returns:**

        `(ids, lengths, reward, done, failed, truncated)`: the tokens after the turns (the
        template's closing of the turn, without the end-of-turn token where the model wrote it,
        the answer's turn and the next generation prompt; none after a trajectory's end) and
        their counts, the turn rewards, whether the environment ended the trajectory, whether
        it failed, whether its answer was cut (all 0 where `ended` is false).
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
            last = np.take_along_axis(tokens, np.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
            closed = (lengths > 0) & (
                last == (-1 if self.end_of_turn is None else self.end_of_turn)
            )
            roles = [getattr(env, "role", "user") for env in self._envs]
            ids, counts, truncated, refused = self._observations(
                answers, roles, closed, ended & ~failed & ~done
            )
            return ids, counts, reward, done, failed | refused, truncated
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
