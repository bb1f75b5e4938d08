"""The texts inside the `completions` a reward function receives (TRL's convention): plain
strings for string prompts, `[{"role": "assistant", "content": text}]` for chat-message prompts."""

from collections.abc import Sequence


def completion_texts(completions: Sequence[str | Sequence[dict]]) -> list[str]:
    """The text of each completion.

    **Arguments:**

    - `completions`: strings, or message lists whose last message holds the completion.

    **Returns:**

    One string per completion.
    """
    return [c if isinstance(c, str) else str(c[-1]["content"]) for c in completions]
