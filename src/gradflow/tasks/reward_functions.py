"""User and built-in reward functions: where they come from, how they are called, what they
must return.

A function is named `FILE.py:NAME` (a file, relative to the working directory) or
`package.module:NAME`, and has TRL's `GRPOTrainer` signature:

```python
def fn(prompts, completions, completion_ids, **columns) -> list[float | None]: ...
```

called with keywords, once per batch, with lists of equal length. `columns` holds every dataset
column except the prompt, plus the reference column under the name `answer`. `None` means "not
applicable". With `style = "verl"` the function is verl's
`compute_score(data_source, solution_str, ground_truth, extra_info)`, called once per sample,
returning a number or a dict with `"score"`.
"""

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import numbers
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

STYLES = ("trl", "verl")


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded, or returns what no reward can be."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """The inputs of one reward call (TRL's names): one entry per completion.

    **Arguments:**

    - `prompts`: prompt strings, or chat-message lists.
    - `completions`: completion strings, or `[{"role": "assistant", "content": text}]`.
    - `completion_ids`: the completion token ids.
    - `columns`: every other dataset column (and `answer`), one value per completion.
    """

    prompts: list
    completions: list
    completion_ids: list[list[int]]
    columns: dict[str, list]

    def __len__(self) -> int:
        return len(self.completions)

    def part(self, start: int, stop: int) -> "Batch":
        """The completions `start:stop`.

        **Arguments:**

        - `start`, `stop`: the slice.

        **Returns:**

        The smaller batch.
        """
        return Batch(
            self.prompts[start:stop],
            self.completions[start:stop],
            self.completion_ids[start:stop],
            {k: v[start:stop] for k, v in self.columns.items()},
        )


@dataclasses.dataclass(frozen=True)
class RewardFunction:
    """One reward or evaluation function of a task.

    **Arguments:**

    - `name`: the part it is logged as (`reward/<name>`, `eval/<name>`).
    - `function`: the callable.
    - `weight`: its weight in the total reward.
    - `style`: `"trl"` (batch call, TRL's signature) or `"verl"` (verl's `compute_score`).
    - `spec`: `FILE.py:NAME` / `package.module:NAME` it was loaded from (worker processes load
        it from there), or `""` for a callable given from Python (sent to them pickled).
    """

    name: str
    function: Callable = dataclasses.field(repr=False)
    weight: float = 1.0
    style: str = "trl"
    spec: str = ""

    def __post_init__(self):
        if self.style not in STYLES:
            raise RewardFunctionError(
                f"reward function {self.name}: style {self.style!r} is not one of "
                f"{', '.join(map(repr, STYLES))}"
            )


def _load_file(path: Path, spec: str):
    if not path.is_file():
        raise RewardFunctionError(f"reward function {spec}: no file {path}")
    name = f"gradflow_user_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise RewardFunctionError(
            f"reward function {spec}: importing {path} failed ({type(e).__name__}: {e})"
        ) from e
    return module


def load_function(spec: str) -> Callable:
    """Imports a function named `FILE.py:NAME` or `package.module:NAME`.

    **Arguments:**

    - `spec`: the name.

    **Returns:**

    The callable.

    **Raises:**

    `RewardFunctionError` naming `spec`: a malformed name, a missing file or module, an import
    that fails, no such function.
    """
    where, sep, attribute = spec.rpartition(":")
    if not sep or not where or not attribute:
        raise RewardFunctionError(
            f"reward function {spec!r} must look like FILE.py:NAME or package.module:NAME"
        )
    if where.endswith(".py"):
        module = _load_file(Path(where), spec)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise RewardFunctionError(
                f"reward function {spec}: no module {where} ({e}); a file needs its .py suffix"
            ) from e
        except Exception as e:
            raise RewardFunctionError(
                f"reward function {spec}: importing {where} failed ({type(e).__name__}: {e})"
            ) from e
    function = getattr(module, attribute, None)
    if function is None:
        defined = [
            n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
        ]
        close = difflib.get_close_matches(attribute, defined, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RewardFunctionError(
            f"reward function {spec}: {where} has no {attribute!r}{hint}; it defines: "
            f"{', '.join(sorted(defined)) or 'no functions'}"
        )
    if not callable(function):
        raise RewardFunctionError(f"reward function {spec}: {attribute} is not callable")
    return function


def from_spec(
    spec: str, *, weight: float = 1.0, style: str = "trl", name: str = ""
) -> RewardFunction:
    """A `RewardFunction` loaded from its name.

    **Arguments:**

    - `spec`: `FILE.py:NAME` or `package.module:NAME`.
    - `weight`: its weight in the total reward.
    - `style`: `"trl"` or `"verl"`.
    - `name`: the part's name (default: the function's name).

    **Returns:**

    The `RewardFunction`.
    """
    function = load_function(spec)
    return RewardFunction(
        name=name or spec.rpartition(":")[2],
        function=function,
        weight=weight,
        style=style,
        spec=spec,
    )


def _verl_calls(function: Callable, batch: Batch) -> list:
    from gradflow.rewards.completions import completion_texts

    n = len(batch)
    columns = batch.columns
    if "reward_model" in columns:
        truths = [(r or {}).get("ground_truth") for r in columns["reward_model"]]
    else:
        truths = columns.get("answer", [None] * n)
    sources = columns.get("data_source", [None] * n)
    extras = columns.get("extra_info", [None] * n)
    out = []
    for text, source, truth, extra in zip(
        completion_texts(batch.completions), sources, truths, extras, strict=True
    ):
        value = function(
            data_source=source, solution_str=text, ground_truth=truth, extra_info=extra
        )
        out.append(value["score"] if isinstance(value, dict) else value)
    return out


def call(reward: RewardFunction, batch: Batch) -> list[float | None]:
    """Calls a reward function on a batch and checks what it returns.

    **Arguments:**

    - `reward`: the function.
    - `batch`: the completions and their columns.

    **Returns:**

    One value per completion: a float (NaN/inf included: the caller counts those as failures),
    or `None` (not applicable).

    **Raises:**

    Whatever the function raises; `RewardFunctionError` naming the function when it returns
    the wrong number of values or something that is not a number or `None`.
    """
    if reward.style == "verl":
        values = _verl_calls(reward.function, batch)
    else:
        values = reward.function(
            prompts=batch.prompts,
            completions=batch.completions,
            completion_ids=batch.completion_ids,
            **batch.columns,
        )
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, list | tuple):
        raise RewardFunctionError(
            f"reward function {reward.name} returned {type(values).__name__}; expected a list "
            f"of {len(batch)} numbers or None"
        )
    if len(values) != len(batch):
        raise RewardFunctionError(
            f"reward function {reward.name} returned {len(values)} values for "
            f"{len(batch)} completions"
        )
    out: list[float | None] = []
    for index, value in enumerate(values):
        if value is None:
            out.append(None)
        elif isinstance(value, numbers.Real):
            out.append(float(value))
        else:
            raise RewardFunctionError(
                f"reward function {reward.name} returned {type(value).__name__} {value!r} at "
                f"position {index}; expected a number or None"
            )
    return out
