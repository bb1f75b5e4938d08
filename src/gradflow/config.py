"""TOML → typed, frozen, validated config.

Each `[section]` is a frozen dataclass below; every key is read by the run. Unknown keys are
errors that list the valid keys and the closest match; wrong types name the key and the
expected type. `[algorithm]` takes `name` plus the hyperparameters of that algorithm (the list
comes from the algorithm's own stage fields: `gradflow.algorithms.hyperparameters`).
Command-line overrides are dotted `section.key=value` (values parsed as TOML, else strings).
"""

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from . import algorithms


class ConfigError(ValueError):
    """A user error in a config file or override: one line, no traceback."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """`[run]`: where the run writes and how it is seeded."""

    seed: int = 0
    output_dir: str = ""
    resume: bool = False
    nonfinite: str = "skip"
    compilation_cache: bool = True


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`[model.lora]`: train LoRA adapters on a frozen base (`gradflow.models.lora`)."""

    rank: int = 32
    alpha: float = 64.0
    targets: str | list = "all-linear"
    dropout: float = 0.0
    adapter: str = ""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """`[model]`: which policy to start from and how it computes (`[model.lora]`: LoRA)."""

    path: str = ""
    init: str = "pretrained"
    config: str = ""
    overrides: dict = dataclasses.field(default_factory=dict)
    tokenizer: str = ""
    dtype: str = "float32"
    compute_dtype: str = ""
    remat: str = "auto"
    scan_layers: bool = True
    lora: LoraConfig | None = None


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """`[task]`: the rows, the prompts built from them and how rewards are computed."""

    name: str = "arithmetic"
    source: str = "local"
    train: str = ""
    test: str = ""
    train_split: str = "train"
    test_split: str = "test"
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    train_size: int = 20000
    test_size: int = 500
    num_operands: list = dataclasses.field(default_factory=lambda: [2, 3])
    max_value: int = 99
    operators: str = "+-"
    prompt_template: str = "plain"
    system: str = ""
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)
    instruction: str = ""
    max_prompt_tokens: int = 0
    reward_mode: str = "strict"
    correct_weight: float = 1.0
    format_weight: float = 0.0
    reward_workers: int = -1
    reward_timeout_s: float = 30.0


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """One `[[reward]]` table: a reward function and its weight."""

    function: str = ""
    weight: float = 1.0
    style: str = "trl"
    name: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`[train]`: RL steps and prompts per step."""

    steps: int = 40
    prompts_per_step: int = 32


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`[eval]`: held-out evaluation (greedy accuracy; pass@k with `samples > 1`)."""

    every: int = 10
    size: int = 200
    batch_size: int = 256
    samples: int = 1
    temperature: float = 1.0
    functions: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """`[checkpoint]`: how often to checkpoint and how many to keep (`every = 0`: end only)."""

    every: int = 0
    keep: int = 2


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """`[logging]`: W&B and local logs."""

    wandb: str = "offline"
    project: str = "gradflow"
    name: str = ""
    tags: list = dataclasses.field(default_factory=list)
    samples_every: int = 5
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class EnvironmentConfig:
    """`[environment]`: multi-turn rollouts, each model turn answered by an environment
    (`gradflow.environments`); without `class`, one turn. The key `class` is the field
    `class_`."""

    class_: str = ""
    max_turns: int = 4
    max_turn_tokens: int = 128
    max_observation_tokens: int = 64


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """`[mesh]`: device mesh axes (`-1`: the rest of the devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


# The [task] keys that configure the built-in rewards, which [[reward]] replaces.
BUILTIN_REWARD_KEYS = ("reward_mode", "correct_weight", "format_weight")
# The [task] keys of prompts written through the chat template.
CHAT_KEYS = ("prompt_template", "system", "chat_template_kwargs")
# The [task] keys each task reads besides name, train_size, test_size, max_prompt_tokens and the
# reward pool's settings.
TASK_KEYS: dict[str, tuple[str, ...]] = {
    "arithmetic": (
        "num_operands",
        "max_value",
        "operators",
        *CHAT_KEYS,
        "instruction",
        *BUILTIN_REWARD_KEYS,
    ),
    "gsm8k": ("source", "train", "test", *CHAT_KEYS, "instruction", *BUILTIN_REWARD_KEYS),
    "dataset": (
        "train",
        "test",
        "train_split",
        "test_split",
        "prompt_key",
        "answer_key",
        *CHAT_KEYS,
    ),
}

SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "task": TaskConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "mesh": MeshConfig,
    "environment": EnvironmentConfig,
}
# TOML keys that are not valid Python names, and the fields that hold them.
FIELD_NAMES: dict[str, str] = {"environment.class": "class_"}
CHOICES: dict[str, tuple[str, ...]] = {
    "run.nonfinite": ("skip", "stop"),
    "model.init": ("pretrained", "random"),
    "model.dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("", "float32", "bfloat16"),
    "model.remat": ("auto", "none", "full", "dots"),
    "task.name": ("arithmetic", "gsm8k", "dataset"),
    "task.source": ("local", "hub"),
    "task.prompt_template": ("plain", "chat"),
    "task.reward_mode": ("strict", "flexible"),
    "reward.style": ("trl", "verl"),
    "logging.wandb": ("online", "offline", "disabled"),
}
# The smallest value each numeric key accepts.
MINIMUMS: dict[str, float] = {
    "task.train_size": 1,
    "task.test_size": 1,
    "task.max_prompt_tokens": 0,
    "task.reward_workers": -1,
    "task.reward_timeout_s": 0.001,
    "model.lora.rank": 1,
    "model.lora.alpha": 0.0,
    "train.steps": 1,
    "train.prompts_per_step": 1,
    "eval.every": 0,
    "eval.size": 1,
    "eval.batch_size": 1,
    "eval.samples": 1,
    "eval.temperature": 0.0,
    "checkpoint.every": 0,
    "checkpoint.keep": 1,
    "logging.samples_every": 0,
    "environment.max_turns": 1,
    "environment.max_turn_tokens": 1,
    "environment.max_observation_tokens": 1,
}


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole resolved config."""

    algorithm: dict[str, Any]
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    mesh: MeshConfig = MeshConfig()
    environment: EnvironmentConfig = EnvironmentConfig()
    reward: tuple[RewardConfig, ...] = ()
    source: str = ""

    @property
    def algorithm_name(self) -> str:
        """The algorithm's name."""
        return self.algorithm["name"]

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The algorithm's hyperparameter overrides (without `name`)."""
        return {k: v for k, v in self.algorithm.items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as nested dictionaries (what `--print-config` prints).

        **Returns:**

        A TOML-serialisable dictionary.
        """
        out: dict[str, Any] = {"algorithm": dict(self.algorithm)}
        renamed = {tuple(k.split(".")[:1]) + (f,): k.split(".")[1] for k, f in FIELD_NAMES.items()}
        for section in SECTIONS:
            if section == "environment" and not self.environment.class_:
                continue  # single-turn: the section is left out (as in configs before it)
            values = dataclasses.asdict(getattr(self, section))
            out[section] = {renamed.get((section, k), k): v for k, v in values.items()}
        if self.reward:
            out["reward"] = [dataclasses.asdict(r) for r in self.reward]
        return out

    def to_toml(self) -> str:
        """The resolved config as TOML text (`None` values are left out).

        **Returns:**

        TOML text.
        """
        import tomli_w  # lazy: not needed on machines that only run benchmarks

        return tomli_w.dumps(_drop_none(self.to_dict()))


def _drop_none(tree):
    if isinstance(tree, dict):
        return {k: _drop_none(v) for k, v in tree.items() if v is not None}
    return tree


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is Any:
        return True
    return isinstance(value, origin or annotation)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _check_value(where: str, value: Any, expected: Any) -> Any:
    if not _type_ok(value, expected):
        raise ConfigError(
            f"{where}: expected {_type_name(expected)}, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, int) and not isinstance(value, bool) and expected is float:
        value = float(value)
    if where in MINIMUMS and value < MINIMUMS[where]:
        raise ConfigError(f"{where}: must be >= {MINIMUMS[where]}, got {value!r}")
    if where in CHOICES and value not in CHOICES[where]:
        raise ConfigError(
            f"{where}: {value!r} is not one of {', '.join(repr(c) for c in CHOICES[where])}"
        )
    return value


def build_section(name: str, table: Any, cls: type) -> Any:
    """Validates one `[section]` table into its frozen dataclass.

    **Arguments:**

    - `name`: the section's name, for messages.
    - `table`: the parsed table.
    - `cls`: the section's dataclass.

    **Returns:**

    The `cls` instance.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    hints = typing.get_type_hints(cls)
    field_of = {k.partition(".")[2]: f for k, f in FIELD_NAMES.items() if k.startswith(f"{name}.")}
    key_of = {f: k for k, f in field_of.items()}
    keys = [key_of.get(f.name, f.name) for f in dataclasses.fields(cls)]
    values = {}
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(
                f"unknown key {name}.{key}{_suggest(key, keys)}; valid keys in [{name}]: "
                f"{', '.join(sorted(keys))}"
            )
        field = field_of.get(key, key)
        nested = [a for a in typing.get_args(hints[field]) if dataclasses.is_dataclass(a)]
        if nested and isinstance(value, dict):  # a sub-table, e.g. [model.lora]
            values[field] = build_section(f"{name}.{key}", value, nested[0])
            continue
        values[field] = _check_value(f"{name}.{key}", value, hints[field])
    try:
        return cls(**values)
    except ValueError as error:
        raise ConfigError(f"[{name}]: {error}") from None


def _build_algorithm(table: Any) -> dict[str, Any]:
    if not isinstance(table, dict) or "name" not in table:
        raise ConfigError(f"[algorithm] needs a name: one of {', '.join(algorithms.NAMES)}")
    name = table["name"]
    if name not in algorithms.NAMES:
        raise ConfigError(
            f"algorithm.name: unknown algorithm {name!r}{_suggest(str(name), algorithms.NAMES)}; "
            f"valid: {', '.join(algorithms.NAMES)}"
        )
    types = algorithms.hyperparameter_types(name)
    resolved: dict[str, Any] = {"name": name}
    for key, value in table.items():
        if key == "name":
            continue
        if key not in types:
            raise ConfigError(
                f"unknown key algorithm.{key} for {name}{_suggest(key, types)}; valid keys: "
                f"name, {', '.join(sorted(types))}"
            )
        resolved[key] = _check_value(f"algorithm.{key}", value, types[key])
    return resolved


def _build_rewards(tables: Any) -> tuple[RewardConfig, ...]:
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("[[reward]] must be an array of tables: [[reward]] function = ...")
    rewards = tuple(build_section("reward", table, RewardConfig) for table in tables)
    for reward in rewards:
        if not reward.function:
            raise ConfigError('[[reward]] needs function = "FILE.py:NAME" or "package.module:NAME"')
    return rewards


def _check_task_keys(config: Config) -> None:
    """Refuses [task] keys that the chosen task does not read."""
    defaults = TaskConfig()
    read = set(TASK_KEYS[config.task.name])
    if config.reward:
        read -= set(BUILTIN_REWARD_KEYS)
    for key in sorted({k for keys in TASK_KEYS.values() for k in keys} - read):
        if getattr(config.task, key) != getattr(defaults, key):
            if config.reward and key in BUILTIN_REWARD_KEYS:
                raise ConfigError(
                    f"task.{key} configures the built-in rewards, which [[reward]] replaces"
                )
            readers = [name for name, keys in TASK_KEYS.items() if key in keys]
            raise ConfigError(
                f"task.{key} applies to task.name = {' or '.join(map(repr, readers))}, not to "
                f"{config.task.name!r}"
            )


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses one `section.key=value` command-line override.

    **Arguments:**

    - `text`: the override.

    **Returns:**

    `(path, value)`: the dotted path split into parts and the value (TOML-parsed, else a string).
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def read_toml(path: "str | Path", overrides: "list[str] | tuple[str, ...]" = ()) -> dict[str, Any]:
    """Reads a TOML file and applies `section.key=value` overrides to the parsed tables.

    **Arguments:**

    - `path`: the TOML file.
    - `overrides`: dotted overrides (values parsed as TOML, else strings).

    **Returns:**

    Nested dictionaries, as TOML gives them.

    **Raises:**

    `ConfigError` for a missing or invalid file or a malformed override.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    for override in overrides:
        keys, value = parse_override(override)
        if len(keys) < 2:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        table = raw
        for part in keys[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"override {override!r}: {part} is not a table")
        table[keys[-1]] = value
    return raw


def load_config(path: "str | Path", overrides: "list[str] | tuple[str, ...]" = ()) -> Config:
    """Reads a TOML config and applies `section.key=value` overrides.

    **Arguments:**

    - `path`: the TOML file.
    - `overrides`: dotted overrides.

    **Returns:**

    The validated `Config`.
    """
    return build_config(read_toml(path, overrides), source=str(path))


def build_config(raw: dict[str, Any], *, source: str = "") -> Config:
    """Validates a parsed config dictionary.

    **Arguments:**

    - `raw`: nested dictionaries as TOML gives them.
    - `source`: where they came from.

    **Returns:**

    The validated `Config`.
    """
    valid = {"algorithm", "reward", *SECTIONS}
    for section in raw:
        if section not in valid:
            raise ConfigError(
                f"unknown section [{section}]{_suggest(section, valid)}; valid sections: "
                f"{', '.join(sorted(valid))}"
            )
    sections = {name: build_section(name, raw.get(name, {}), cls) for name, cls in SECTIONS.items()}
    config = Config(
        algorithm=_build_algorithm(raw.get("algorithm")),
        reward=_build_rewards(raw.get("reward", [])),
        source=source,
        **sections,
    )
    if config.model.init == "pretrained" and not config.model.path:
        raise ConfigError(
            "model.path is empty: point it to a local HF model directory (config.json + "
            '*.safetensors), or set model.init = "random" with model.config'
        )
    _check_task_keys(config)
    if "environment" in raw and not config.environment.class_:
        raise ConfigError(
            '[environment] needs class = "FILE.py:NAME" or "package.module:NAME" (the '
            "environment answering each model turn)"
        )
    if config.environment.class_ and "max_new_tokens" in config.algorithm:
        cap = config.algorithm["max_new_tokens"]
        raise ConfigError(
            "algorithm.max_new_tokens does not apply with [environment], whose keys bound a "
            "trajectory: environment.max_turns × (environment.max_turn_tokens + "
            "environment.max_observation_tokens) tokens; remove algorithm.max_new_tokens "
            f"({cap}) and write environment.max_turn_tokens = {cap} to cap each model turn as "
            "it capped the completion"
        )
    if config.model.init == "random" and not (config.model.config or config.model.path):
        raise ConfigError('model.init = "random" needs model.config (an HF config.json)')
    lora = config.model.lora
    if lora is not None and not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {lora.dropout!r}")
    if lora is not None and lora.adapter and config.model.init == "random":
        raise ConfigError(
            'model.lora.adapter was trained on a pretrained base, not on model.init = "random" '
            "weights: drop one of them"
        )
    return config
