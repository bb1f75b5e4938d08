"""Test-wide settings: 8 fake CPU devices, strict dtype promotion, float32 matmuls, no persistent
compilation cache, and compiled programs freed after each test module.

Runtime shape checks (jaxtyping + beartype) on `gradflow` are switched on by
`--jaxtyping-packages=gradflow,beartype.beartype` in pyproject.toml.
"""

import gc
import os

# Appended, so that a user's XLA_FLAGS (e.g. `--xla_cpu_max_isa=AVX2`, README "Tests") keep the
# 8 fake devices.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Runs started by tests (in this process and in child processes) never write into the user's
# JAX compilation cache (gradflow.compilation_cache).
os.environ["GRADFLOW_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops JAX's compiled programs after each module. XLA:CPU maps its JIT-compiled code into
    three memory mappings per kernel; one process running the whole suite would pass the kernel's
    limit (`vm.max_map_count`, 65530) and die of a segmentation fault inside a compilation."""
    yield
    jax.clear_caches()
    gc.collect()
