"""JAX's persistent compilation cache, on by default, in the user's cache directory.

A second run of the same config (same shapes, same JAX, same machine) reads its compiled step,
sampler and evaluation from disk instead of compiling them again. The directory is
`$GRADFLOW_COMPILATION_CACHE`, else `$XDG_CACHE_HOME/gradflow/jax`, else
`~/.cache/gradflow/jax`; `GRADFLOW_COMPILATION_CACHE=0` (or `off`, `false`) or
`run.compilation_cache = false` turns it off. A cache directory JAX was already given
(`JAX_COMPILATION_CACHE_DIR`, `jax.config`) is left as it is.
"""

import os
from pathlib import Path

import jax

ENV = "GRADFLOW_COMPILATION_CACHE"
OFF = ("0", "off", "false", "no")
MIN_COMPILE_SECONDS = 0.2
"""Programs that compile faster than this are not written (JAX's default is 1 s: that would
leave out the many sub-second compilations of a short run's start-up)."""


def cache_directory() -> Path | None:
    """Where the compilation cache lives, or `None` when the environment turns it off.

    **Returns:**

    The directory (not created).
    """
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradflow" / "jax"


def enable_compilation_cache(enabled: bool = True) -> Path | None:
    """Points JAX's persistent compilation cache at `cache_directory()`.

    **Arguments:**

    - `enabled`: `run.compilation_cache` (`False`: leave the cache off).

    **Returns:**

    The cache directory in use, or `None` when the cache is off.
    """
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    directory = cache_directory() if enabled else None
    if directory is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return directory
