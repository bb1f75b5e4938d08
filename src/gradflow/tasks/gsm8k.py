"""Problems (question + reference answer) from JSON-lines files and from GSM8K."""

import os
from pathlib import Path

import datasets

from gradflow.assets import asset_path
from gradflow.tasks.errors import DataError
from gradflow.tasks.files import validate_jsonl
from gradflow.tasks.rows import Problem

SPLITS = ("train", "test")
SOURCES = ("local", "hub")
_FIELDS = ("question", "answer")


def _problems(ds: datasets.Dataset) -> list[Problem]:
    """The rows of a dataset with `question` and `answer` columns, as problems."""
    return [Problem(q, a) for q, a in zip(ds["question"], ds["answer"], strict=True)]


def load_jsonl_problems(path: str | os.PathLike[str]) -> list[Problem]:
    """Read problems from a JSON-lines file with `question` and `answer` string fields.

    Every line is validated first (blank lines are skipped); the file is then loaded with
    `datasets.load_dataset("json", ...)` in memory, which needs no network.

    **Arguments:**

    - `path`: the `.jsonl` file. Extra fields on a line are ignored.

    **Returns:**

    The problems, in file order.

    **Raises:**

    `FileNotFoundError` when the file does not exist; `DataError` (a `ValueError`) naming the file
    and line for a malformed line, or naming the file when it holds no problems.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    count = validate_jsonl(path, string_fields=_FIELDS)
    if count == 0:
        raise DataError(f"no problems in {path}")
    ds = datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    if len(ds) != count:
        raise DataError(f"{path}: datasets read {len(ds)} rows, expected {count}")
    return _problems(ds)


def load_gsm8k(
    split: str = "train",
    *,
    source: str = "local",
    path: str | os.PathLike[str] | None = None,
) -> list[Problem]:
    """Load GSM8K problems.

    **Arguments:**

    - `split`: `"train"` (7,473 problems) or `"test"` (1,319 problems).
    - `source`: `"local"` reads the copy shipped in `gradflow/assets/gsm8k` (no network);
        `"hub"` downloads `openai/gsm8k` (config `"main"`) from the Hugging Face Hub.
    - `path`: with `source="local"`, a `.jsonl` file to read instead of the shipped split
        (`split` is then only validated).

    **Returns:**

    The problems; each `answer` is the full solution ending in `#### N`.

    **Raises:**

    `ValueError` for an unknown split or source, or a `path` that is not a `.jsonl` file or is
    given with `source="hub"`; `DataError` when the hub cannot be reached or the file is malformed.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown GSM8K split {split!r}; valid splits: {', '.join(SPLITS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown GSM8K source {source!r}; valid sources: {', '.join(SOURCES)}")
    if source == "hub":
        if path is not None:
            raise ValueError('`path` is only used with source="local"')
        try:
            ds = datasets.load_dataset("openai/gsm8k", "main", split=split)
        except Exception as e:
            raise DataError(
                f"could not load openai/gsm8k ({split}) from the Hugging Face Hub "
                f'({type(e).__name__}: {e}); use source="local" for the shipped copy'
            ) from e
        return _problems(ds)
    if path is None:
        return load_jsonl_problems(asset_path("gsm8k", f"{split}.jsonl"))
    if Path(path).suffix != ".jsonl":
        raise ValueError(f"GSM8K `path` must be a .jsonl file, got {path}")
    return load_jsonl_problems(path)
