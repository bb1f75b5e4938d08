"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

import os
from collections.abc import Callable
from pathlib import Path


def write_replacing(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then renames it over `path`.

    **Arguments:**

    - `path`: the file to (re)write.
    - `write`: writes the whole content to the path it is given.

    **Returns:**

    Nothing.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
