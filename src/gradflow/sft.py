"""Supervised fine-tuning (teacher forcing) of a small random model on the arithmetic task.

This is how the embedded default base model (`gradflow/assets/toy-arith`) is made: a random
Qwen2-architecture decoder over the character tokenizer (`gradflow.tasks.tokenizer`) learns to
complete `task_prompt(question)` with `answer + <eos>` in two phases:

1. worked answers until the held-out greedy accuracy reaches `eval.stop_at_accuracy`;
2. (when `data.direct_fraction > 0`) a mix in which that fraction of the targets is the final
   `#### N` line alone, until the held-out greedy accuracy falls to `eval.stop_below_accuracy`.

The model then knows how to work a problem out but by default answers directly, and is mostly
wrong doing so: partial competence that RL turns into accuracy by learning to show its work.

The loss is the mean cross-entropy over the answer tokens and the EOS (the prompt is not
trained), computed by `gradflow.logprobs.completion_logprobs` on a left-padded prompt followed by
the right-padded completion: the same layout and the same code RL uses for its log-probs.

The config is TOML with the sections below (frozen dataclasses, every key read; unknown keys are
`ConfigError`s listing the valid keys and the closest match). `[optimizer]` takes the fields of
`gradflow.optim.Optimizer`.
"""

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .config import ConfigError, _suggest, build_section, read_toml
from .logprobs import completion_logprobs
from .models import Decoder, ModelConfig, init_from_config, save_hf
from .optim import Optimizer
from .rewards.gsm8k import is_correct
from .rollout import generate as sample
from .tasks import ArithmeticTask, build_tokenizer, generate, save_tokenizer, task_prompt
from .tasks.rows import Problem
from .tasks.task import tokenize_prompts


@dataclasses.dataclass(frozen=True)
class SFTRunConfig:
    """`[run]`: the seed (initialisation and batch order) and where the checkpoint goes."""

    seed: int = 0
    output_dir: str = ""


@dataclasses.dataclass(frozen=True)
class SFTModelConfig:
    """`[model]`: the decoder's shape (`gradflow.models.ModelConfig` names; the vocabulary is the
    tokenizer's)."""

    model_type: str = "qwen2"
    hidden_size: int = 96
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 24
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = True
    max_position_embeddings: int = 128


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    """`[data]`: the arithmetic problems (default `ArithmeticTask`) trained and evaluated on.

    `eval_seed` should differ from the RL run's test seed (`run.seed + 1` there) so that the RL
    held-out set is not the one that picked the stopping point. `direct_fraction` of the training
    targets skip the worked steps and give only the final `#### N` line: the model learns both
    styles and, sampling, chooses between them (answering directly is much less accurate for a
    model this small, which is what RL discovers).
    """

    train_size: int = 20000
    train_seed: int = 0
    eval_size: int = 200
    eval_seed: int = 2
    direct_fraction: float = 0.0


@dataclasses.dataclass(frozen=True)
class SFTTrainConfig:
    """`[train]`: optimizer steps, sequences per step and how often to print the loss."""

    max_steps: int = 2000
    direct_steps: int = 0
    batch_size: int = 64
    log_every: int = 10


@dataclasses.dataclass(frozen=True)
class SFTEvalConfig:
    """`[eval]`: held-out greedy accuracy every `every` steps; stop at `stop_at_accuracy`."""

    every: int = 10
    stop_at_accuracy: float = 0.3
    stop_below_accuracy: float = 0.0
    direct_every: int = 10
    max_new_tokens: int = 32


SFT_SECTIONS: dict[str, type] = {
    "run": SFTRunConfig,
    "model": SFTModelConfig,
    "data": SFTDataConfig,
    "train": SFTTrainConfig,
    "optimizer": Optimizer,
    "eval": SFTEvalConfig,
}


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The whole resolved SFT config."""

    run: SFTRunConfig = SFTRunConfig()
    model: SFTModelConfig = SFTModelConfig()
    data: SFTDataConfig = SFTDataConfig()
    train: SFTTrainConfig = SFTTrainConfig()
    optimizer: Optimizer = Optimizer()
    eval: SFTEvalConfig = SFTEvalConfig()
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as nested dictionaries (TOML/JSON-serialisable).

        **Returns:**

        One dictionary per section.
        """
        return {
            name: {f.name: getattr(getattr(self, name), f.name) for f in dataclasses.fields(cls)}
            for name, cls in SFT_SECTIONS.items()
        }


def _positive(where: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value!r}")


def build_sft_config(raw: dict[str, Any], *, source: str = "") -> SFTConfig:
    """Validates a parsed SFT config dictionary.

    **Arguments:**

    - `raw`: nested dictionaries as TOML gives them.
    - `source`: where they came from.

    **Returns:**

    The validated `SFTConfig`.

    **Raises:**

    `ConfigError` for unknown sections or keys, wrong types and out-of-range values.
    """
    for section in raw:
        if section not in SFT_SECTIONS:
            raise ConfigError(
                f"unknown section [{section}]{_suggest(section, SFT_SECTIONS)}; valid sections: "
                f"{', '.join(sorted(SFT_SECTIONS))}"
            )
    sections = {
        name: build_section(name, raw.get(name, {}), cls) for name, cls in SFT_SECTIONS.items()
    }
    config = SFTConfig(source=source, **sections)
    if not config.run.output_dir:
        raise ConfigError("run.output_dir is empty: set the directory the checkpoint is written to")
    if config.model.model_type not in ("qwen2", "llama"):
        raise ConfigError(
            f"model.model_type: {config.model.model_type!r} is not one of 'qwen2', 'llama'"
        )
    for where, value in (
        ("data.train_size", config.data.train_size),
        ("data.eval_size", config.data.eval_size),
        ("train.max_steps", config.train.max_steps),
        ("train.batch_size", config.train.batch_size),
        ("train.log_every", config.train.log_every),
        ("eval.every", config.eval.every),
        ("eval.max_new_tokens", config.eval.max_new_tokens),
        ("eval.direct_every", config.eval.direct_every),
        ("optimizer.learning_rate", config.optimizer.learning_rate),
    ):
        _positive(where, value)
    for where, value in (
        ("data.direct_fraction", config.data.direct_fraction),
        ("eval.stop_below_accuracy", config.eval.stop_below_accuracy),
    ):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}: must be in [0, 1], got {value!r}")
    if config.train.direct_steps < 0:
        raise ConfigError(f"train.direct_steps: must be >= 0, got {config.train.direct_steps!r}")
    if config.train.batch_size > config.data.train_size:
        raise ConfigError(
            f"train.batch_size = {config.train.batch_size} is larger than data.train_size = "
            f"{config.data.train_size}"
        )
    if not 0.0 < config.eval.stop_at_accuracy <= 1.0:
        raise ConfigError(
            f"eval.stop_at_accuracy: must be in (0, 1], got {config.eval.stop_at_accuracy!r}"
        )
    return config


def load_sft_config(path: "str | Path", overrides: "list[str] | tuple[str, ...]" = ()) -> SFTConfig:
    """Reads an SFT TOML config and applies `section.key=value` overrides.

    **Arguments:**

    - `path`: the TOML file.
    - `overrides`: dotted overrides (values parsed as TOML, else strings).

    **Returns:**

    The validated `SFTConfig`.

    **Raises:**

    `ConfigError` for a missing or invalid file, a malformed override or an invalid config.
    """
    raw = read_toml(path, overrides)
    return build_sft_config(raw, source=str(path))


def model_config(config: SFTModelConfig, vocab_size: int, eos_token_id: int) -> ModelConfig:
    """The decoder shape of an `[model]` section over a vocabulary.

    **Arguments:**

    - `config`: the `[model]` section.
    - `vocab_size`: the tokenizer's size.
    - `eos_token_id`: written to `config.json`.

    **Returns:**

    The `ModelConfig`.
    """
    return ModelConfig(
        vocab_size=vocab_size, eos_token_id=eos_token_id, **dataclasses.asdict(config)
    )


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def teacher_forcing_batch(
    tokenizer, problems: list[Problem], prompt_len: int, completion_len: int
) -> tuple[Int[np.ndarray, "batch total"], Bool[np.ndarray, "batch total"]]:
    """Token ids and attention mask of prompts (left-padded) followed by answers (right-padded).

    Row `i` is `task_prompt(question)` right-aligned in the first `prompt_len` slots, then
    `answer + <eos>` from slot `prompt_len` on; padding is the tokenizer's pad id with mask 0.

    **Arguments:**

    - `tokenizer`: the character tokenizer.
    - `problems`: the problems.
    - `prompt_len`: prompt slots (at least the longest prompt).
    - `completion_len`: completion slots (at least the longest answer plus EOS).

    **Returns:**

    `(ids, mask)` of shape `(len(problems), prompt_len + completion_len)`.
    """
    ids = np.full((len(problems), prompt_len + completion_len), tokenizer.pad_token_id, np.int32)
    mask = np.zeros(ids.shape, bool)
    prompts = _encode(tokenizer, [task_prompt(p.question) for p in problems])
    answers = _encode(tokenizer, [p.answer for p in problems])
    for row, (problem, prompt, answer) in enumerate(zip(problems, prompts, answers, strict=True)):
        completion = [*answer, tokenizer.eos_token_id]
        if len(prompt) > prompt_len or len(completion) > completion_len:
            raise ValueError(
                f"problem {problem.question!r} needs {len(prompt)} prompt and {len(completion)} "
                f"completion slots, more than {prompt_len} and {completion_len}"
            )
        ids[row, prompt_len - len(prompt) : prompt_len] = prompt
        mask[row, prompt_len - len(prompt) : prompt_len] = True
        ids[row, prompt_len : prompt_len + len(completion)] = completion
        mask[row, prompt_len : prompt_len + len(completion)] = True
    return ids, mask


def sft_loss(
    model: Decoder,
    input_ids: Int[Array, "batch total"],
    attention_mask: Bool[Array, "batch total"],
    prompt_len: int,
) -> Float[Array, ""]:
    """Mean cross-entropy of the completion tokens (answer and EOS) under teacher forcing.

    **Arguments:**

    - `model`: the model.
    - `input_ids`: left-padded prompts followed by right-padded completions.
    - `attention_mask`: 1 on real tokens.
    - `prompt_len`: the number of prompt slots.

    **Returns:**

    The token-mean negative log-likelihood over the completions' real tokens.
    """
    logprobs, _ = completion_logprobs(model, input_ids, attention_mask, prompt_len)
    weights = attention_mask[:, prompt_len:].astype(jnp.float32)
    return -jnp.sum(logprobs * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def evaluate(
    model: Decoder,
    tokenizer,
    problems: list[Problem],
    *,
    key: PRNGKeyArray,
    temperature: float = 0.0,
    max_new_tokens: int = 32,
) -> float:
    """Held-out accuracy: one completion per problem, graded by `is_correct(mode="strict")`.

    **Arguments:**

    - `model`: the model.
    - `tokenizer`: the character tokenizer.
    - `problems`: the problems.
    - `key`: PRNG key (unused when greedy).
    - `temperature`: 0 for greedy decoding, else the sampling temperature.
    - `max_new_tokens`: the completion cap.

    **Returns:**

    The fraction of problems answered correctly.
    """
    bank = tokenize_prompts(
        tokenizer, [task_prompt(p.question) for p in problems], max_tokens=0, split="held-out"
    )
    completions = sample(
        model,
        jnp.asarray(bank.ids),
        jnp.asarray(bank.mask),
        key=key,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
    )
    tokens = np.asarray(completions.tokens)
    lengths = np.asarray(completions.lengths)
    texts = tokenizer.batch_decode(
        [row[:length].tolist() for row, length in zip(tokens, lengths, strict=True)],
        skip_special_tokens=True,
    )
    correct = [
        is_correct(text, problem.answer, mode="strict")
        for text, problem in zip(texts, problems, strict=True)
    ]
    return float(np.mean(correct))


def _model_card(config: SFTConfig, record: dict[str, Any]) -> str:
    m, o = config.model, config.optimizer
    shape = (
        f"hidden {m.hidden_size}, {m.num_layers} layers, {m.num_heads} attention heads "
        f"({m.num_kv_heads} key-value heads, head_dim {m.head_dim}), intermediate "
        f"{m.intermediate_size}, tied embeddings: {record['num_parameters']:,} parameters (float32)"
    )
    training = (
        f"seed {config.run.seed}; {record['steps']} AdamW steps of {config.train.batch_size} "
        f"sequences (learning rate {o.learning_rate}, {o.warmup_steps} warmup steps); "
        "cross-entropy on the answer and EOS tokens only; phase 1 (worked answers) stopped at "
        f"the first held-out evaluation (every {config.eval.every} steps) with greedy accuracy "
        f">= {config.eval.stop_at_accuracy}; phase 2 ({config.data.direct_fraction:.0%} of the "
        f"targets reduced to the final `#### N` line) stopped at the first evaluation with "
        f"greedy accuracy <= {config.eval.stop_below_accuracy} (every {config.eval.direct_every} steps)"
    )
    return f"""# toy-arith: gradflow's embedded default base model

A tiny {m.model_type} decoder in Hugging Face format, the model gradflow's RL examples start from
(`model.path = "gradflow:toy-arith"`). It was trained from random weights by supervised
fine-tuning (teacher forcing) on gradflow's embedded arithmetic task (`gradflow.tasks.arithmetic`,
default `ArithmeticTask()`) and deliberately stopped at partial competence: it can work a problem
out step by step, but by default it answers directly (`#### N` alone), which a model this small
mostly gets wrong. RL improves it by learning to show its work.

- Prompt: `task_prompt(question)`, e.g. `41+17-25=?` and a newline. Completion: the worked
  answer, one step per line, ending in `#### N`, then `<eos>`.
- Tokenizer: the character-level tokenizer of `gradflow.tasks.tokenizer` ({record["vocab_size"]}
  tokens, `<pad>` 0, `<eos>` 1, left padding); loads with `transformers.AutoTokenizer`.
- Shape: {shape}.
- Training: {training}.
- Held-out accuracy on {record["eval_size"]} test-split problems (strict `#### N` grading):
  greedy {record["greedy_accuracy"]:.3f}; sampled at temperature 1 {record["sampled_accuracy"]:.3f}.

Made with (from the repository root; deterministic for a given seed on CPU):

```
{record["command"]}
```

`training.json` holds the seed, the steps, the accuracies, the evaluation history and the full
resolved config.
"""


def with_direct_answers(problems: list[Problem], fraction: float, *, seed: int) -> list[Problem]:
    """A copy of `problems` where a random `fraction` answer with the `#### N` line alone.

    **Arguments:**

    - `problems`: worked problems.
    - `fraction`: the share of answers reduced to their final line.
    - `seed`: which ones.

    **Returns:**

    The training problems.
    """
    direct = np.random.default_rng([seed, 1]).random(len(problems)) < fraction
    return [
        Problem(p.question, p.answer.splitlines()[-1]) if d else p
        for p, d in zip(problems, direct, strict=True)
    ]


def run_sft(
    config: SFTConfig,
    *,
    log: Callable[[str], None] = print,
    command: str = "",
) -> Path:
    """Trains a random model by teacher forcing until partial competence and saves it.

    Every `eval.every` steps (and at the last step) the held-out greedy accuracy on
    `data.eval_size` test-split problems is measured; training stops at the first evaluation
    reaching `eval.stop_at_accuracy`, or after `train.max_steps`. The output directory receives
    `config.json` + `model.safetensors` (`save_hf`), the tokenizer (`save_tokenizer`),
    `training.json` and a model card `README.md`.

    **Arguments:**

    - `config`: the SFT config.
    - `log`: called with each progress line.
    - `command`: the command line that made the run, recorded in the model card.

    **Returns:**

    The output directory.
    """
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    eos = tokenizer.eos_token_id
    shape = model_config(config.model, len(tokenizer), eos)
    key = jax.random.key(config.run.seed)
    init_key, eval_key = jax.random.split(key)
    model = init_from_config(shape, key=init_key)

    task = ArithmeticTask()
    train = generate(task, config.data.train_size, seed=config.data.train_seed, split="train")
    held_out = generate(task, config.data.eval_size, seed=config.data.eval_seed, split="test")
    prompt_len = max(len(p) for p in _encode(tokenizer, [task_prompt(p.question) for p in train]))
    completion_len = 1 + max(len(a) for a in _encode(tokenizer, [p.answer for p in train]))
    if prompt_len + completion_len > shape.max_position_embeddings:
        raise ConfigError(
            f"model.max_position_embeddings = {shape.max_position_embeddings} is shorter than "
            f"the longest training sequence ({prompt_len + completion_len} tokens)"
        )
    ids, mask = teacher_forcing_batch(tokenizer, train, prompt_len, completion_len)

    optimizer = config.optimizer.transform()
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def train_step(model, opt_state, batch_ids, batch_mask):
        loss, grads = eqx.filter_value_and_grad(sft_loss)(model, batch_ids, batch_mask, prompt_len)
        params = eqx.filter(model, eqx.is_inexact_array)
        # optax's bias correction raises a Python float to an int32 count, which strict dtype
        # promotion (used in tests) rejects; the result is the same under standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, loss

    def held_out_accuracy(model, temperature: float, key) -> float:
        return evaluate(
            model,
            tokenizer,
            held_out,
            key=key,
            temperature=temperature,
            max_new_tokens=config.eval.max_new_tokens,
        )

    rng = np.random.default_rng(config.run.seed)
    order = rng.permutation(len(train))
    cursor = 0
    batch_size = config.train.batch_size
    history: list[dict[str, float]] = []
    accuracy = 0.0
    losses: list[float] = []
    step = 0
    log(
        f"sft: {shape.num_parameters:,} parameters, {len(train)} train / {len(held_out)} "
        f"held-out problems, sequences of {prompt_len}+{completion_len} tokens"
    )

    def phase(model, opt_state, ids, mask, first: int, steps: int, every: int, stop):
        nonlocal order, cursor, accuracy
        step = first - 1
        for step in range(first, first + steps):
            if cursor + batch_size > len(order):
                order, cursor = rng.permutation(len(train)), 0
            rows = order[cursor : cursor + batch_size]
            cursor += batch_size
            model, opt_state, loss = train_step(
                model, opt_state, jnp.asarray(ids[rows]), jnp.asarray(mask[rows])
            )
            losses.append(float(loss))
            if step % config.train.log_every == 0:
                log(f"step {step:5d}  loss {np.mean(losses[-config.train.log_every :]):.4f}")
            if step % every == 0 or step == first + steps - 1:
                accuracy = held_out_accuracy(model, 0.0, eval_key)
                history.append({"step": step, "loss": losses[-1], "greedy_accuracy": accuracy})
                log(f"step {step:5d}  held-out greedy accuracy {accuracy:.3f}")
                if stop(accuracy):
                    log(f"stopping at step {step}: held-out greedy accuracy {accuracy:.3f}")
                    break
        return model, opt_state, step

    model, opt_state, step = phase(
        model,
        opt_state,
        ids,
        mask,
        1,
        config.train.max_steps,
        config.eval.every,
        lambda accuracy: accuracy >= config.eval.stop_at_accuracy,
    )
    if config.data.direct_fraction > 0 and config.train.direct_steps > 0:
        mixed = with_direct_answers(train, config.data.direct_fraction, seed=config.data.train_seed)
        mixed_ids, mixed_mask = teacher_forcing_batch(tokenizer, mixed, prompt_len, completion_len)
        log(f"direct-answer phase: {config.data.direct_fraction:.0%} of targets are `#### N` alone")
        model, opt_state, step = phase(
            model,
            opt_state,
            mixed_ids,
            mixed_mask,
            step + 1,
            config.train.direct_steps,
            config.eval.direct_every,
            lambda accuracy: accuracy <= config.eval.stop_below_accuracy,
        )
    sampled = held_out_accuracy(model, 1.0, eval_key)
    log(f"held-out accuracy sampled at temperature 1: {sampled:.3f}")

    output = Path(config.run.output_dir)
    save_hf(model, output)
    save_tokenizer(output)
    record = {
        "seed": config.run.seed,
        "steps": step,
        "greedy_accuracy": accuracy,
        "sampled_accuracy": sampled,
        "eval_size": len(held_out),
        "final_loss": losses[-1],
        "num_parameters": shape.num_parameters,
        "vocab_size": len(tokenizer),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "command": command or f"python pipelines/sft.py {config.source}",
        "history": history,
        "config": config.to_dict(),
    }
    (output / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (output / "README.md").write_text(_model_card(config, record))
    log(f"saved {output} ({step} steps, {record['wall_seconds']} s)")
    return output
