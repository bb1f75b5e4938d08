"""Reading a split from a file, a `datasets.save_to_disk` directory or the Hugging Face Hub.

Every format goes through `datasets` (Parquet through pyarrow); JSON-lines files are first
checked line by line, so a malformed line is reported as `FILE:LINE`.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from gradflow.assets import resolve_path
from gradflow.tasks.errors import DataError
from gradflow.tasks.rows import Rows

HUB_PREFIX = "hub:"
# File suffix → the `datasets` builder that reads it.
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def validate_jsonl(path: Path, *, string_fields: Sequence[str] = ()) -> int:
    """Checks every line of a JSON-lines file with the stdlib `json` module.

    **Arguments:**

    - `path`: the file.
    - `string_fields`: fields every line must have, as strings.

    **Returns:**

    The number of records (non-blank lines).

    **Raises:**

    `DataError` naming the file and the 1-based line number of the first malformed line.
    """
    count = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason})") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from e
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for field in string_fields:
                if field not in record:
                    raise DataError(f'{where}: missing field "{field}"')
                if not isinstance(record[field], str):
                    kind = type(record[field]).__name__
                    raise DataError(f'{where}: field "{field}" must be a string, got {kind}')
            count += 1
    return count


def _from_hub(name: str, split: str, what: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(
            f"{what}: could not load {name} (split {split!r}) from the Hugging Face Hub "
            f"({type(e).__name__}: {e}); download it and point {what} at the files"
        ) from e


def _from_disk(path: Path, split: str, what: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(
            f"{what}: {path} is a directory but not one written by datasets' save_to_disk "
            f"({type(e).__name__}: {e})"
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{what}: {path} has no split {split!r}; it has {', '.join(loaded)} "
                "(set task.train_split / task.test_split)"
            )
        return loaded[split]
    return loaded


def _from_file(path: Path, what: str) -> datasets.Dataset:
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"{what}: unknown format {path.suffix or '(no suffix)'!r} of {path}; valid: "
            f"{', '.join(FORMATS)}, a datasets.save_to_disk directory, or hub:ORG/NAME"
        )
    suffix = path.suffix.lower()
    empty = (suffix == ".jsonl" and validate_jsonl(path) == 0) or (
        suffix == ".parquet" and pq.ParquetFile(path).metadata.num_rows == 0
    )
    if empty:
        raise DataError(f"{what}: {path} has no rows")
    try:
        return datasets.load_dataset(
            builder, data_files=str(path), split="train", keep_in_memory=True
        )
    except Exception as e:
        raise DataError(
            f"{what}: could not read {path} as {builder} ({type(e).__name__}: {e})"
        ) from e


def read_rows(source: str, *, split: str, what: str) -> Rows:
    """Reads one split.

    **Arguments:**

    - `source`: a `.jsonl`/`.json`/`.parquet`/`.csv` file, a `datasets.save_to_disk` directory
        (a `DatasetDict`'s `split`, or a single `Dataset`), or `hub:ORG/NAME` (online).
    - `split`: the split to take from a hub data set or a `DatasetDict`.
    - `what`: the config key that named `source`, for messages (`task.train`).

    **Returns:**

    The rows, columns as `datasets` reads them (struct columns hold dicts).

    **Raises:**

    `FileNotFoundError` for a missing file; `DataError` for an unknown format, an unreadable
    file, a missing split or an empty one.
    """
    datasets.disable_progress_bars()
    if source.startswith(HUB_PREFIX):
        dataset = _from_hub(source[len(HUB_PREFIX) :], split, what)
    else:
        path = resolve_path(source)
        if not path.exists():
            raise FileNotFoundError(f"{what}: no data file or directory at {path}")
        dataset = _from_disk(path, split, what) if path.is_dir() else _from_file(path, what)
    if len(dataset) == 0:
        raise DataError(f"{what}: {source} has no rows")
    return Rows(columns=dataset.to_dict(), source=source)


def column(rows: Rows, key: str, what: str) -> list:
    """One column, or a field inside a struct column (`reward_model.ground_truth`).

    **Arguments:**

    - `rows`: the split.
    - `key`: a column name, or dotted names into struct columns.
    - `what`: the config key that named it, for messages.

    **Returns:**

    The values, one per row.

    **Raises:**

    `DataError` naming the source and listing the columns it has.
    """
    if key in rows.columns:
        return rows.columns[key]
    head, *fields = key.split(".")
    values = rows.columns.get(head)
    for field in fields:
        if values is None or not all(isinstance(v, dict) and field in v for v in values):
            values = None
            break
        values = [v[field] for v in values]
    if values is None or not fields:
        raise DataError(
            f"{what} = {key!r}: {rows.source} has no such column; its columns: "
            f"{', '.join(_describe(rows))}"
        )
    return values


def _describe(rows: Rows) -> list[str]:
    """Column names, with the fields of struct columns (`reward_model{style, ground_truth}`)."""
    names = []
    for name, values in rows.columns.items():
        first = values[0] if values else None
        names.append(f"{name}{{{', '.join(first)}}}" if isinstance(first, dict) else name)
    return names
