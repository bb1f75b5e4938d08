"""Prompt text (plain, or through the tokenizer's chat template), and the tokenizer that encodes
it."""

import logging
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from gradflow.assets import asset_path

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_INSTRUCTION = (
    "Let's think step by step, then give the final answer on its own last line "
    "in the form `#### <number>`."
)
# Any of these in a directory means it holds a tokenizer `AutoTokenizer` can load.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


def plain_prompt(question: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """Prompt text for a model without a chat template (`prompt.template = "plain"`).

    **Arguments:**

    - `question`: the problem.
    - `instruction`: appended on the line after the question.

    **Returns:**

    `question + "\\n" + instruction + "\\n"`.
    """
    return f"{question}\n{instruction}\n"


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    *,
    system: str | None = DEFAULT_SYSTEM,
    instruction: str = DEFAULT_INSTRUCTION,
    chat_template_kwargs: dict | None = None,
    generation_prompt: bool = True,
) -> str:
    """Prompt text from the tokenizer's chat template, ending with the assistant's turn opened.

    **Arguments:**

    - `tokenizer`: a tokenizer with a chat template.
    - `question`: the problem.
    - `system`: the system message, or `None` for none (the template may add its own default).
    - `instruction`: appended to the user message on the line after the question.
    - `chat_template_kwargs`: passed to `apply_chat_template` (e.g. `enable_thinking`).
    - `generation_prompt`: whether the text ends with the assistant's turn opened; `False`
      ends it with the user's turn closed (multi-turn rollouts open the model's turn after
      the environment's first message).

    **Returns:**

    The prompt text (not tokenized).

    **Raises:**

    `ValueError` when the tokenizer has no chat template.
    """
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": f"{question}\n{instruction}"})
    return chat_text(tokenizer, messages, chat_template_kwargs or {}, generation_prompt)


def chat_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    kwargs: dict,
    generation_prompt: bool = True,
) -> str:
    """Chat messages through the tokenizer's chat template, the assistant's turn opened.

    **Arguments:**

    - `tokenizer`: a tokenizer with a chat template.
    - `messages`: `[{"role": ..., "content": ...}, ...]`.
    - `kwargs`: passed to `apply_chat_template`.
    - `generation_prompt`: `False` leaves the assistant's turn unopened (see `chat_prompt`).

    **Returns:**

    The prompt text (not tokenized).

    **Raises:**

    `ValueError` when the tokenizer has no chat template.
    """
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; "
            'set task.prompt_template = "plain" to use the prompts as they are'
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
    )


def _messages(prompt: object) -> list[dict] | None:
    """The prompt as chat messages when it is a list of `{role, content}` dicts, else `None`."""
    if isinstance(prompt, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt
    ):
        return prompt
    return None


def row_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: object,
    *,
    template: str,
    system: str,
    chat_template_kwargs: dict,
    bos: str,
    where: str,
    generation_prompt: bool = True,
) -> str:
    """The prompt text of one dataset row.

    **Arguments:**

    - `tokenizer`: the tokenizer.
    - `prompt`: the row's prompt: a string, or chat messages (`[{role, content}, ...]`).
    - `template`: `"chat"` (strings become one user turn; messages go through the chat template
        as they are) or `"plain"` (strings used as they are).
    - `system`: a system message put before string prompts (and before messages that have none);
        `""` for none.
    - `chat_template_kwargs`: passed to `apply_chat_template`.
    - `bos`: the BOS text plain prompts start with (`""` for tokenizers that add none).
    - `where`: names the row in messages.
    - `generation_prompt`: `False` leaves a chat prompt's assistant turn unopened (see
        `chat_prompt`).

    **Returns:**

    The prompt text.
    """
    messages = _messages(prompt)
    if messages is None and not isinstance(prompt, str):
        raise ValueError(
            f"{where}: the prompt is {type(prompt).__name__}, expected a string or chat messages "
            "([{role, content}, ...])"
        )
    if template == "plain":
        if messages is not None:
            raise ValueError(
                f'{where}: the prompt is chat messages; set task.prompt_template = "chat"'
            )
        return bos + prompt
    if messages is None:
        messages = [{"role": "user", "content": prompt}]
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return chat_text(tokenizer, messages, chat_template_kwargs, generation_prompt)


def load_tokenizer(path: str | os.PathLike[str] | None) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory, padding on the left (for generation).

    **Arguments:**

    - `path`: a directory with tokenizer files (e.g. a model checkpoint). When `None`, or when
        the directory has no tokenizer files, the Qwen2 tokenizer shipped in
        `gradflow/assets/qwen2` is used (logged at INFO level).

    **Returns:**

    The tokenizer, with `padding_side="left"`.

    **Raises:**

    `FileNotFoundError` naming `path` when it does not exist; `NotADirectoryError` when it is a
    file.
    """
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer directory at {path}")
        if not path.is_dir():
            raise NotADirectoryError(f"tokenizer path {path} is a file, expected a directory")
    if path is None or not any((path / name).is_file() for name in _TOKENIZER_FILES):
        shipped = asset_path("qwen2")
        source = "no tokenizer path given" if path is None else f"no tokenizer files in {path}"
        logger.info("%s; using the shipped Qwen2 tokenizer at %s", source, shipped)
        path = shipped
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    return tokenizer
