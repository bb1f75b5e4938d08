"""Checkpoints of the whole train state: safetensors for the arrays plus a JSON manifest.

A checkpoint is written into a temporary directory, flushed to disk, then renamed into place
(`step_00000010/`): a crash mid-write leaves the previous checkpoints whole and at most a
`.tmp-*` directory, which the next save removes. The last `keep` checkpoints are kept.
Restoring fills a template state (same structure, e.g. a fresh `init_state`) leaf by leaf, by
key path, with each leaf's sharding.

With several processes every process calls `save_checkpoint` (arrays spread over processes are
gathered with `process_allgather`, a collective) and process 0 alone writes; a write error on
process 0 is raised on every process.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

STATE_FILE = "state.safetensors"
MANIFEST_FILE = "manifest.json"
PREFIX = "step_"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the previous checkpoints are intact)."""


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flatten(state) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def to_host(leaf) -> np.ndarray:
    """One array as a whole numpy array on this host (PRNG keys as their key data).

    An array spread over several processes is gathered with `process_allgather`: a collective
    that every process must call.

    **Arguments:**

    - `leaf`: a `jax.Array` (or anything `np.asarray` takes).

    **Returns:**

    The numpy array.
    """
    if _is_key(leaf):
        leaf = jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: "str | Path", state, step: int, metadata: dict[str, Any], *, keep: int = 2
) -> Path:
    """Atomically writes `state` as `directory/step_<step>/` and prunes old checkpoints.

    **Arguments:**

    - `directory`: the checkpoints directory.
    - `state`: the train state pytree.
    - `step`: the number of completed RL steps.
    - `metadata`: JSON-serialisable extras (data position, config, ...).
    - `keep`: how many checkpoints to keep (the newest).

    **Returns:**

    The checkpoint's directory.
    """
    directory = Path(directory)
    final = directory / f"{PREFIX}{step:08d}"
    leaves = _flatten(state)
    tensors = {name: to_host(leaf) for name, leaf in leaves.items()}
    keys = sorted(name for name, leaf in leaves.items() if _is_key(leaf))
    manifest = {"step": step, "prng_keys": keys, "leaves": sorted(tensors), **metadata}
    error = None
    if jax.process_index() == 0:
        try:
            _write(directory, final, tensors, manifest)
        except OSError as failure:
            error = failure.strerror or str(failure)
            if failure.filename:
                error += f" ({failure.filename})"
        else:
            for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    if jax.process_count() > 1:
        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if failed and error is None:
            error = "the write failed on process 0"
    if error is not None:
        raise CheckpointWriteError(
            f"could not write checkpoint {final}: {error}; the previous checkpoints are intact"
        )
    return final


def _write(directory: Path, final: Path, tensors: dict[str, np.ndarray], manifest: dict) -> None:
    """Writes a checkpoint into a temporary directory, then renames it to `final`."""
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        save_file(tensors, str(tmp / STATE_FILE))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        for file in (STATE_FILE, MANIFEST_FILE):
            with open(tmp / file, "rb") as handle:
                os.fsync(handle.fileno())
        aside = None
        if final.exists():  # the same step again (e.g. interrupted right after a resume)
            aside = directory / f".tmp-replaced-{final.name}-{os.getpid()}"
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_dir(directory)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def list_checkpoints(directory: "str | Path") -> list[Path]:
    """The complete checkpoints in `directory`, oldest first.

    **Arguments:**

    - `directory`: the checkpoints directory.

    **Returns:**

    Checkpoint directories sorted by step.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.glob(f"{PREFIX}*")
        if p.is_dir() and (p / MANIFEST_FILE).is_file() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def read_manifest(checkpoint: "str | Path") -> dict[str, Any]:
    """The manifest of a checkpoint.

    **Arguments:**

    - `checkpoint`: a checkpoint directory.

    **Returns:**

    The manifest dictionary.
    """
    return json.loads((Path(checkpoint) / MANIFEST_FILE).read_text())


def restore_checkpoint(checkpoint: "str | Path", template):
    """Fills `template` with a checkpoint's arrays (each placed with the template leaf's sharding,
    on one process or many).

    **Arguments:**

    - `checkpoint`: a checkpoint directory.
    - `template`: a state with the same structure (e.g. a fresh `init_state`).

    **Returns:**

    The restored state.
    """
    checkpoint = Path(checkpoint)
    tensors = load_file(str(checkpoint / STATE_FILE))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    restored = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if name not in tensors:
            raise ValueError(
                f"{checkpoint}: no array {name!r} (the config changed since it was written?)"
            )
        array = tensors[name]
        sharding = getattr(leaf, "sharding", None)
        if _is_key(leaf):
            if isinstance(sharding, NamedSharding):
                sharding = NamedSharding(sharding.mesh, PartitionSpec())
            data = _place(array, sharding)
            restored.append(jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf)))
            continue
        if array.shape != leaf.shape:
            raise ValueError(
                f"{checkpoint}: {name!r} has shape {array.shape}, expected {leaf.shape}"
            )
        restored.append(_place(array.astype(leaf.dtype), sharding))
    return jax.tree_util.tree_unflatten(treedef, restored)


def _place(array: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
