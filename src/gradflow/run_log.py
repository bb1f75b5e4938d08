"""The run's logs: `metrics.jsonl`, `samples.jsonl`, W&B (online, offline or disabled).

W&B mode: `WANDB_MODE` in the environment wins over `[logging] wandb`. `online` without an API
key, or with a server it cannot reach, falls back to `offline` with a one-line notice saying how
to `wandb sync` later. On resume, records after the restored step are dropped so the files read
as one uninterrupted run. With several processes only process 0 writes (the others keep the
history in memory).
"""

import json
import logging
import math
import os
import struct
import uuid
from pathlib import Path
from typing import Any

from .config import Config
from .files import write_replacing

logger = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _truncate(path: Path, last_step: int) -> list[dict]:
    """Keeps the records of `path` with step ≤ `last_step` (and returns them)."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if record.get("step", 0) <= last_step:
            kept.append(record)
    text = "".join(json.dumps(r) + "\n" for r in kept)
    write_replacing(path, lambda tmp: tmp.write_text(text))  # a crash keeps the old file whole
    return kept


def wandb_mode(configured: str) -> str:
    """The W&B mode to use: the environment's `WANDB_MODE`, else the config's, with `online`
    falling back to `offline` when there is no API key.

    **Arguments:**

    - `configured`: `[logging] wandb`.

    **Returns:**

    `"online"`, `"offline"` or `"disabled"`.
    """
    mode = os.environ.get("WANDB_MODE", configured)
    if mode == "online":
        import wandb

        if not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
            print(
                "W&B: no API key, logging offline; upload later with `wandb sync <run>/wandb/"
                "offline-run-*`"
            )
            return "offline"
    return mode


class RunLogger:
    """Writes metrics and samples to the run directory and to W&B."""

    def __init__(
        self, run_dir: Path, config: Config, *, resumed_step: int | None, write: bool = True
    ):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.history: list[dict] = []
        self.write = write
        self.run = None
        if not write:
            return
        if resumed_step is not None:
            self.history = _truncate(self.metrics_path, resumed_step)
            _truncate(self.samples_path, resumed_step)
        else:
            for path in (self.metrics_path, self.samples_path):
                path.unlink(missing_ok=True)
        mode = wandb_mode(config.logging.wandb)
        if mode != "disabled":
            import wandb

            def start(mode: str):
                return wandb.init(
                    project=config.logging.project,
                    name=config.logging.name or run_dir.name,
                    tags=list(config.logging.tags),
                    dir=str(run_dir),
                    mode=mode,
                    config=config.to_dict(),
                    id=self._run_id(run_dir),
                    resume="allow",
                )

            try:
                self.run = start(mode)
            except wandb.errors.Error as error:
                if mode != "online":
                    raise
                print(
                    f"W&B: cannot reach the server ({str(error).splitlines()[0][:120]}), logging "
                    "offline; upload later with `wandb sync <run>/wandb/offline-run-*`"
                )
                wandb.teardown()  # the failed run holds its id in W&B's service process
                self.run = start("offline")

    @staticmethod
    def _run_id(run_dir: Path) -> str:
        id_file = run_dir / "wandb_id.txt"
        if id_file.exists():
            return id_file.read_text().strip()
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        return run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Appends one record to `metrics.jsonl` and W&B.

        **Arguments:**

        - `step`: the RL step the record belongs to.
        - `metrics`: scalar metrics.

        **Returns:**

        Nothing.
        """
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.history.append(record)
        if not self.write:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Appends completion samples to `samples.jsonl` and a W&B table.

        **Arguments:**

        - `step`: the RL step.
        - `rows`: dicts with `prompt`, `completion`, `reward`.

        **Returns:**

        Nothing.
        """
        if not self.write:
            return
        with open(self.samples_path, "a") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}) + "\n")
        if self.run is not None and rows:
            import wandb

            columns = ["step", *rows[0]]
            table = wandb.Table(columns=columns, data=[[step, *r.values()] for r in rows])
            self.run.log({"samples": table}, step=step)

    def finish(self) -> None:
        """Closes the W&B run."""
        if self.run is not None:
            self.run.finish()


def wandb_records(path: Path):
    """The records of a W&B transaction log (`run-*.wandb`), as `wandb_internal_pb2.Record`s
    (what an offline run leaves to check it, e.g. its config).

    The format is LevelDB's log: a 7-byte file header (`:W&B`, magic, version), then 32 KiB
    blocks of chunks, each with a 7-byte header (CRC, length, type: full/first/middle/last).

    **Arguments:**

    - `path`: the `run-*.wandb` file.

    **Returns:**

    A generator of records (none while even the header is missing).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if len(data) < 7:  # not even the header yet
        return
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    if (ident, magic) != (b":W&B", 0xBEE1):
        raise ValueError(f"{path} is not a W&B transaction log")
    block, full, first, last = 32 * 1024, 1, 2, 4
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (full, first) else pending + chunk
        if kind in (full, last):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
