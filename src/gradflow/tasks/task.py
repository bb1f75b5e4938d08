"""A task = data + prompts + rewards: the train and test rows, their tokenized prompts, and the
reward and evaluation functions, all built by `build_task(config)` from `[task]`, `[[reward]]`,
`[eval]` and `[model]`.

- `dataset`: the user's files (`task.train` / `task.test`), prompts from `task.prompt_key`,
  the reference from `task.answer_key`, rewards from `[[reward]]`. A file in verl's schema
  trains as it is: its reference is `reward_model.ground_truth`, and its chat-message prompts
  go through the chat template.
- `arithmetic` (the embedded default) and `gsm8k`: built-in rows (`question`, `answer`) and
  built-in reward functions of the same signature (`correct`, `format`); `[[reward]]` may
  replace them.

With `[environment]` the task also holds the environment class, whose tools (a
`ToolEnvironment`'s `schemas`) chat prompts list.
"""

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from gradflow.assets import resolve_path
from gradflow.config import Config, ConfigError
from gradflow.environments.episodes import Episodes
from gradflow.models.gguf_io import gguf_tokenizer, is_gguf, resolve_model_path
from gradflow.rewards import functions as builtin
from gradflow.stages import HostReward
from gradflow.tasks.arithmetic import ArithmeticTask, generate, task_prompt
from gradflow.tasks.files import column, read_rows
from gradflow.tasks.gsm8k import load_gsm8k, load_jsonl_problems
from gradflow.tasks.prompts import (
    DEFAULT_INSTRUCTION,
    DEFAULT_SYSTEM,
    chat_prompt,
    load_tokenizer,
    plain_prompt,
    row_prompt,
)
from gradflow.tasks.reward_functions import (
    Batch,
    RewardFunction,
    RewardFunctionError,
    call,
    from_spec,
    load_function,
)
from gradflow.tasks.rows import Rows
from gradflow.tasks.scoring import Scorer

logger = logging.getLogger(__name__)

# Where verl's data preprocessing puts a row's reference (`reward_model: {style, ground_truth}`).
VERL_REFERENCE = "reward_model.ground_truth"


def model_directory(path: str) -> Path:
    """The model directory a config names (or its GGUF file), checked to exist.

    **Arguments:**

    - `path`: `model.path` as written in the config (`package:MODULE/FILE.gguf` names a file
      inside an installed Python package).

    **Returns:**

    The directory, or the `.gguf` file.
    """
    directory = resolve_model_path(path)
    if is_gguf(directory):
        if not directory.is_file():
            raise FileNotFoundError(f"model.path {directory}: no such GGUF file")
        return directory
    if not directory.is_dir():
        repo = f"Qwen/{directory.name}" if "qwen" in directory.name.lower() else "ORG/MODEL"
        raise FileNotFoundError(
            f"model.path {directory} does not exist: download an HF model, e.g. "
            f"`huggingface-cli download {repo} --local-dir {directory}`, or "
            "set model.path to a local directory with config.json and *.safetensors"
        )
    return directory


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
    """Everything the run needs to know about the rows it trains and evaluates on.

    **Arguments:**

    - `tokenizer`: encodes prompts, decodes completions.
    - `train`, `test`: the rows of each split (every column; `answer` holds the reference).
    - `train_prompts`, `test_prompts`: their tokenized prompts.
    - `prompt_key`: the column the prompts come from (not passed to reward functions).
    - `rewards`: the reward functions; the total reward is their weighted sum.
    - `evaluations`: the functions held-out evaluation reports (`eval/<name>`).
    - `scorer`: calls the functions (worker processes, timeouts).
    - `eos_token_ids`, `pad_token_id`: from the tokenizer and the model.
    - `environment`: makes the environment of one multi-turn trajectory (`None`: one turn).
    - `prompt_template`, `chat_template_kwargs`: how environment answers are written
        (`task.prompt_template`).
    """

    tokenizer: object
    train: Rows
    test: Rows
    train_prompts: PromptBank
    test_prompts: PromptBank
    prompt_key: str
    rewards: tuple[RewardFunction, ...]
    evaluations: tuple[RewardFunction, ...]
    scorer: Scorer
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    environment: Callable[[], object] | None = None
    prompt_template: str = "plain"
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)

    def episodes(self, rows: Rows, max_observation_tokens: int) -> Episodes:
        """The host side of multi-turn rollouts over some rows.

        **Arguments:**

        - `rows`: the split the prompts come from.
        - `max_observation_tokens`: the longest environment answer.

        **Returns:**

        The `Episodes` (environment calls under `task.reward_timeout_s`).
        """
        if self.environment is None:
            raise ValueError("the task has no environment ([environment] class)")
        return Episodes(
            self.environment,
            rows,
            self.tokenizer,
            template=self.prompt_template,
            max_observation_tokens=max_observation_tokens,
            timeout_s=self.scorer.timeout_s,
            chat_template_kwargs=self.chat_template_kwargs,
        )

    def batch(self, rows: Rows, indices: Sequence[int], completion_ids: Sequence) -> Batch:
        """The reward functions' inputs for completions of some rows (TRL's convention).

        **Arguments:**

        - `rows`: the split the rows come from.
        - `indices`: the row of each completion.
        - `completion_ids`: each completion's token ids.

        **Returns:**

        The `Batch`: string prompts give string completions; chat-message prompts give
        `[{"role": "assistant", "content": text}]` completions.
        """
        columns = rows.take(indices)
        prompts = columns.pop(self.prompt_key)
        ids = [[int(t) for t in tokens] for tokens in completion_ids]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        completions = [
            text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]
            for prompt, text in zip(prompts, texts, strict=True)
        ]
        return Batch(prompts, completions, ids, columns)

    def reward(self) -> HostReward:
        """The reward stage over the train split.

        **Returns:**

        A `HostReward` with one part per reward function plus `failed` (weight 0): the number of
        functions that failed on each sample.
        """
        which = [self.scorer.functions.index(f) for f in self.rewards]

        def scorer(tokens: np.ndarray, mask: np.ndarray, index: np.ndarray) -> np.ndarray:
            ids = [t[m] for t, m in zip(tokens, mask, strict=True)]
            batch = self.batch(self.train, index.tolist(), ids)
            values, failed = self.scorer.score(batch, which)
            return np.concatenate([values, failed[None]], axis=0)

        parts = (*(f.name for f in self.rewards), "failed")
        weights = (*(f.weight for f in self.rewards), 0.0)
        return HostReward(scorer=scorer, parts=parts, weights=weights)

    def close(self) -> None:
        """Stops the reward worker processes."""
        self.scorer.close()


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


def _builtin_rows(config: Config) -> tuple[Rows, Rows]:
    tc = config.task
    if tc.name == "arithmetic":
        try:
            spec = ArithmeticTask(
                num_operands=tuple(tc.num_operands), max_value=tc.max_value, operators=tc.operators
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[task] arithmetic: {e}") from None
        train = generate(spec, tc.train_size, seed=config.run.seed, split="train")
        test = generate(spec, tc.test_size, seed=config.run.seed + 1, split="test")
        return Rows.from_problems(train, "arithmetic"), Rows.from_problems(test, "arithmetic")
    splits = []
    for split, path in (("train", tc.train), ("test", tc.test)):
        problems = (
            load_jsonl_problems(resolve_path(path)) if path else load_gsm8k(split, source=tc.source)
        )
        size = tc.train_size if split == "train" else tc.test_size
        splits.append(Rows.from_problems(problems[:size], path or f"gsm8k ({split})"))
    return splits[0], splits[1]


def _reference_key(rows: Rows, answer_key: str) -> str:
    """The column the reference comes from: `task.answer_key`, except that `"answer"` in a file
    without such a column but with verl's `reward_model.ground_truth` (verl's schema: the
    reference of a verl file) names that field."""
    if answer_key != "answer" or "answer" in rows.columns:
        return answer_key
    verl = rows.columns.get("reward_model")
    if verl and all(isinstance(v, dict) and "ground_truth" in v for v in verl):
        return VERL_REFERENCE
    return answer_key


def _dataset_rows(config: Config) -> tuple[Rows, Rows]:
    tc = config.task
    if not tc.train or not tc.test:
        raise ConfigError(
            'task.name = "dataset" needs task.train and task.test (files or hub:ORG/NAME)'
        )
    out = []
    for key, source, split, size in (
        ("task.train", tc.train, tc.train_split, tc.train_size),
        ("task.test", tc.test, tc.test_split, tc.test_size),
    ):
        rows = read_rows(source, split=split, what=key).head(size)
        column(rows, tc.prompt_key, "task.prompt_key")
        if tc.answer_key:
            answers = column(rows, _reference_key(rows, tc.answer_key), "task.answer_key")
            rows = Rows({**rows.columns, "answer": answers}, rows.source)
        out.append(rows)
    return out[0], out[1]


def _environment(config: Config) -> tuple[Callable[[], object] | None, list]:
    """The environment class `[environment]` names, and its tools' schemas (if it has any)."""
    spec = config.environment.class_
    if not spec:
        return None, []
    try:
        factory = load_function(spec)
    except RewardFunctionError as e:
        raise ConfigError(str(e).replace("reward function", "environment.class", 1)) from None
    try:
        probe = factory()
    except Exception as e:
        raise ConfigError(f"environment.class {spec}: {type(e).__name__}: {e}") from None
    for method in ("reset", "step"):
        if not callable(getattr(probe, method, None)):
            raise ConfigError(f"environment.class {spec} has no {method} method")
    return factory, list(getattr(probe, "schemas", []))


def _template(config: Config, splits: Sequence[Rows], prompt_key: str) -> str:
    """How prompts and environment answers are written: `task.prompt_template`, except that a
    dataset whose prompts are chat messages (verl's and TRL's conversational schema) goes
    through the chat template, the only way messages can be written."""
    messages = any(isinstance(p, list) for rows in splits for p in rows.columns[prompt_key])
    return "chat" if config.task.name == "dataset" and messages else config.task.prompt_template


def _prompt_texts(
    config: Config, tokenizer, rows: Rows, prompt_key: str, tools: list, template: str
) -> list[str]:
    tc = config.task
    prompts = rows.columns[prompt_key]
    if tc.name == "arithmetic" and template == "plain":
        return [task_prompt(q) for q in prompts]
    bos = _bos_text(tokenizer)
    kwargs = dict(tc.chat_template_kwargs)
    if tools:
        kwargs["tools"] = tools
    opened = not config.environment.class_  # multi-turn: the environment opens the model's turn
    if tc.name in ("gsm8k", "arithmetic"):
        instruction = tc.instruction or DEFAULT_INSTRUCTION
        if template == "plain":
            return [bos + plain_prompt(q, instruction) for q in prompts]
        system = tc.system or DEFAULT_SYSTEM
        return [
            chat_prompt(
                tokenizer,
                q,
                system=system,
                instruction=instruction,
                chat_template_kwargs=kwargs,
                generation_prompt=opened,
            )
            for q in prompts
        ]
    return [
        row_prompt(
            tokenizer,
            prompt,
            template=template,
            system=tc.system,
            chat_template_kwargs=kwargs,
            bos=bos,
            where=f"{rows.source} row {i}",
            generation_prompt=opened,
        )
        for i, prompt in enumerate(prompts)
    ]


def _builtin_rewards(config: Config) -> tuple[RewardFunction, ...]:
    tc = config.task
    correct = builtin.gsm8k_strict if tc.reward_mode == "strict" else builtin.gsm8k_flexible
    return (
        RewardFunction(
            "correct", correct, tc.correct_weight, spec=f"gradflow.rewards:{correct.__name__}"
        ),
        RewardFunction(
            "format", builtin.gsm8k_format, tc.format_weight, spec="gradflow.rewards:gsm8k_format"
        ),
    )


def _unique_names(functions: Sequence[RewardFunction], what: str) -> None:
    names = [f.name for f in functions]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{what}: two functions named {repeated[0]!r}; give one a `name`")
    reserved = {"failed", "overlong_penalty", "mean", "std", "min", "max"} & set(names)
    if reserved:
        raise ConfigError(
            f"{what}: {sorted(reserved)[0]!r} is a reserved metric name; give it another `name`"
        )


def _check_returns(functions: Sequence[RewardFunction], probe: Batch) -> None:
    """Calls each function once on a few rows (their references as completions) so that a
    function returning the wrong count or type stops the run before it starts; one that
    raises here is only logged (it may not expect such completions)."""
    for function in functions:
        try:
            call(function, probe)
        except RewardFunctionError:
            raise
        except Exception as e:
            logger.info(
                "reward %s raised %s on the start-up probe: %s", function.name, type(e).__name__, e
            )


def build_task(config: Config) -> Task:
    """Loads the tokenizer, the rows and the reward functions, and tokenizes the prompts.

    **Arguments:**

    - `config`: the run config.

    **Returns:**

    The `Task`.
    """
    tc = config.task
    model_dir = None
    if config.model.path:
        model_dir = resolve_model_path(config.model.path)
        if config.model.init == "pretrained":
            model_dir = model_directory(config.model.path)
        elif not (model_dir.is_dir() or is_gguf(model_dir) and model_dir.is_file()):
            model_dir = None  # random weights: a model directory is optional
    tokenizer_path = config.model.tokenizer or (str(model_dir) if model_dir else None)
    tokenizer_path = resolve_model_path(tokenizer_path) if tokenizer_path else None
    if tokenizer_path is not None and is_gguf(tokenizer_path):
        tokenizer = gguf_tokenizer(tokenizer_path)  # a GGUF file's own tokenizer
    else:
        tokenizer = load_tokenizer(tokenizer_path)
    if tc.name == "dataset":
        train, test = _dataset_rows(config)
        prompt_key = tc.prompt_key
    else:
        train, test = _builtin_rows(config)
        prompt_key = "question"
    if config.reward:
        rewards = tuple(
            from_spec(r.function, weight=r.weight, style=r.style, name=r.name)
            for r in config.reward
        )
    elif tc.name == "dataset":
        raise ConfigError('task.name = "dataset" needs at least one [[reward]] function')
    else:
        rewards = _builtin_rewards(config)
    if config.eval.functions:
        evaluations = tuple(from_spec(spec) for spec in config.eval.functions)
    elif tc.name == "dataset" or config.reward:
        evaluations = rewards
    else:
        evaluations = (
            RewardFunction("accuracy", builtin.gsm8k_strict, spec="gradflow.rewards:gsm8k_strict"),
            RewardFunction(
                "accuracy_flexible", builtin.gsm8k_flexible, spec="gradflow.rewards:gsm8k_flexible"
            ),
        )
    _unique_names(rewards, "[[reward]]")
    _unique_names(evaluations, "eval.functions")
    functions = tuple(dict.fromkeys((*rewards, *evaluations)))
    scorer = Scorer(functions, workers=tc.reward_workers, timeout_s=tc.reward_timeout_s)
    environment, tools = _environment(config)
    template = _template(config, (train, test), prompt_key)
    task = Task(
        tokenizer=tokenizer,
        train=train,
        test=test,
        train_prompts=tokenize_prompts(
            tokenizer,
            _prompt_texts(config, tokenizer, train, prompt_key, tools, template),
            max_tokens=tc.max_prompt_tokens,
            split="train",
        ),
        test_prompts=tokenize_prompts(
            tokenizer,
            _prompt_texts(config, tokenizer, test, prompt_key, tools, template),
            max_tokens=tc.max_prompt_tokens,
            split="test",
        ),
        prompt_key=prompt_key,
        rewards=rewards,
        evaluations=evaluations,
        scorer=scorer,
        eos_token_ids=_eos_ids(tokenizer, model_dir),
        pad_token_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        environment=environment,
        prompt_template=template,
        chat_template_kwargs=dict(tc.chat_template_kwargs),
    )
    probe_rows = list(range(min(2, len(train))))
    references = [str(a) for a in task.train.take(probe_rows).get("answer", [""] * len(probe_rows))]
    probe = task.batch(
        train, probe_rows, [tokenizer.encode(r, add_special_tokens=False) for r in references]
    )
    _check_returns(functions, probe)
    return task
