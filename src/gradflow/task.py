"""A task: tokenizer, train/test problems, their tokenized prompts, and the reward stage.

`build_task(config)` assembles it from `[task]` and `[model]`: the embedded arithmetic task (with
its character tokenizer, shipped next to the toy model) or GSM8K (chat-template prompts).
"""

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .assets import ASSETS
from .config import Config
from .data import Problem
from .data.gsm8k import load_gsm8k, load_jsonl_problems
from .prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, chat_prompt, load_tokenizer, plain_prompt
from .rewards.text import correctness, format_reward, text_scorer
from .stages import HostReward
from .tasks import ArithmeticTask, generate, task_prompt

ASSET_PREFIX = "gradflow:"


def model_directory(path: str) -> Path:
    """The model directory a config names, checked to exist.

    **Arguments:**

    - `path`: `model.path` as written in the config.

    **Returns:**

    The directory.
    """
    directory = resolve_path(path)
    if not directory.is_dir():
        repo = f"Qwen/{directory.name}" if "qwen" in directory.name.lower() else "ORG/MODEL"
        raise FileNotFoundError(
            f"model.path {directory} does not exist: download an HF model, e.g. "
            f"`huggingface-cli download {repo} --local-dir {directory}`, or "
            "set model.path to a local directory with config.json and *.safetensors"
        )
    return directory


def resolve_path(path: str) -> Path:
    """A config path: `gradflow:NAME` is a shipped asset, anything else is relative to the cwd.

    **Arguments:**

    - `path`: the path as written in the config.

    **Returns:**

    The path.
    """
    if path.startswith(ASSET_PREFIX):
        return ASSETS / path[len(ASSET_PREFIX) :]
    return Path(path)


@dataclasses.dataclass(frozen=True)
class PromptBank:
    """Left-padded token ids of every prompt of a split (one static prompt length)."""

    ids: np.ndarray
    mask: np.ndarray

    @property
    def prompt_len(self) -> int:
        """The padded prompt length."""
        return self.ids.shape[1]


def tokenize_prompts(tokenizer, texts: Sequence[str], *, max_tokens: int, split: str) -> PromptBank:
    """Tokenizes prompts into one left-padded array.

    **Arguments:**

    - `tokenizer`: the tokenizer.
    - `texts`: prompt texts.
    - `max_tokens`: the longest prompt allowed (0: no limit).
    - `split`: the split's name, for errors.

    **Returns:**

    The `PromptBank`.
    """
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    if not encoded:
        raise ValueError(f"the {split} split has no problems")
    longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
    if max_tokens and len(encoded[longest]) > max_tokens:
        raise ValueError(
            f"{split} prompt {longest} has {len(encoded[longest])} tokens, more than "
            f"task.max_prompt_tokens = {max_tokens}"
        )
    length = len(encoded[longest])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(encoded), length), pad, np.int32)
    mask = np.zeros((len(encoded), length), bool)
    for row, tokens in enumerate(encoded):
        if tokens:
            ids[row, length - len(tokens) :] = tokens
            mask[row, length - len(tokens) :] = True
    return PromptBank(ids=ids, mask=mask)


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything the run needs to know about the problems it trains and evaluates on."""

    tokenizer: object
    train: list[Problem]
    test: list[Problem]
    train_prompts: PromptBank
    test_prompts: PromptBank
    reward_functions: dict[str, Callable[[str, str], float]]
    weights: dict[str, float]
    eos_token_ids: tuple[int, ...]
    pad_token_id: int

    def reward(self) -> HostReward:
        """The reward stage over the train split.

        **Returns:**

        A `HostReward` with one part per reward function plus `failed` (weight 0).
        """
        parts = (*self.reward_functions, "failed")
        weights = (*(self.weights[p] for p in self.reward_functions), 0.0)
        scorer = text_scorer(self.tokenizer, self.train, self.reward_functions)
        return HostReward(scorer=scorer, parts=parts, weights=weights)


def _eos_ids(tokenizer, model_dir: Path | None) -> tuple[int, ...]:
    """The tokens that end a completion: the tokenizer's EOS, the turn ends of Qwen's chat
    template, and the model's own EOS list (`generation_config.json`, else `config.json`: what
    HF `generate` stops on, e.g. Llama 3's `<|eot_id|>`, `<|eom_id|>` and `<|end_of_text|>`)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    if model_dir is not None:
        for name in ("generation_config.json", "config.json"):
            if (model_dir / name).is_file():
                eos = json.loads((model_dir / name).read_text()).get("eos_token_id")
                ids.update([eos] if isinstance(eos, int) else eos or [])
                break
    return tuple(sorted(ids))


def _bos_text(tokenizer) -> str:
    """The BOS token's text when the tokenizer puts one before every text it encodes (Llama 3;
    not Qwen), for prompts that no chat template writes it into."""
    encoded = tokenizer.encode("a")
    bos = tokenizer.bos_token_id
    return tokenizer.bos_token if bos is not None and encoded and encoded[0] == bos else ""


def build_task(config: Config) -> Task:
    """Loads the tokenizer and problems and tokenizes the prompts.

    **Arguments:**

    - `config`: the run config.

    **Returns:**

    The `Task`.
    """
    tc = config.task
    model_dir = None
    if config.model.path:
        model_dir = resolve_path(config.model.path)
        if config.model.init == "pretrained":
            model_dir = model_directory(config.model.path)
        elif not model_dir.is_dir():
            model_dir = None  # random weights: a model directory is optional
    tokenizer_path = config.model.tokenizer or (str(model_dir) if model_dir else None)
    tokenizer = load_tokenizer(resolve_path(tokenizer_path) if tokenizer_path else None)
    if tc.name == "arithmetic":
        spec = ArithmeticTask()
        train = generate(spec, tc.train_size, seed=config.run.seed, split="train")
        test = generate(spec, tc.test_size, seed=config.run.seed + 1, split="test")

        def text(question: str) -> str:
            return task_prompt(question)
    else:
        if tc.train_path:
            train = load_jsonl_problems(resolve_path(tc.train_path))
        else:
            train = load_gsm8k("train", source=tc.source)
        if tc.test_path:
            test = load_jsonl_problems(resolve_path(tc.test_path))
        else:
            test = load_gsm8k("test", source=tc.source)
        train, test = train[: tc.train_size], test[: tc.test_size]
        instruction = tc.instruction or DEFAULT_INSTRUCTION
        bos = _bos_text(tokenizer)

        def text(question: str) -> str:
            if tc.prompt_template == "plain":
                return bos + plain_prompt(question, instruction)
            return chat_prompt(
                tokenizer, question, system=tc.system or DEFAULT_SYSTEM, instruction=instruction
            )

    functions = {"correct": correctness(tc.reward_mode), "format": format_reward}
    return Task(
        tokenizer=tokenizer,
        train=train,
        test=test,
        train_prompts=tokenize_prompts(
            tokenizer,
            [text(p.question) for p in train],
            max_tokens=tc.max_prompt_tokens,
            split="train",
        ),
        test_prompts=tokenize_prompts(
            tokenizer,
            [text(p.question) for p in test],
            max_tokens=tc.max_prompt_tokens,
            split="test",
        ),
        reward_functions=functions,
        weights={"correct": tc.correct_weight, "format": tc.format_weight},
        eos_token_ids=_eos_ids(tokenizer, model_dir),
        pad_token_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
    )
