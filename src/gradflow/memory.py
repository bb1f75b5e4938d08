"""Memory planning: `model.remat = "auto"` and an unset `algorithm.micro_batches` are sized from
the memory a device has free, so that a real model's first step fits.

The plan tries, in order, no activation checkpointing in one micro-batch, then `remat = "full"`
in 1, 2, 4, ... micro-batches (only what the user left open varies). A candidate fits when the
compiled step's own buffers (XLA's `memory_analysis`: temporaries and outputs not aliased to
the donated state) take at most `BUDGET_SHARE` of the memory free on each device now (a GPU's
`bytes_limit` less what it holds; on the CPU the host's available memory shared among its
devices). Small models skip the compilations: when an estimate of the update's activations
without checkpointing (`activation_estimate`, everything in float32) is under `QUICK_SHARE` of
the budget, the first candidate is taken as it is. When nothing fits, `MemoryPlanError` names the keys.
"""

import dataclasses
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from .config import ConfigError

BUDGET_SHARE = 0.8
"""The share of the free memory the step's own buffers may take."""
QUICK_SHARE = 0.1
"""Below this share of the budget, the activation estimate is trusted without compiling."""


class MemoryPlanError(ConfigError):
    """No candidate fits the memory free: the message names the keys that lower it."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What the plan chose, and what it measured.

    **Arguments:**

    - `remat`: the activation checkpointing chosen (`"none"` or `"full"`, or the user's).
    - `micro_batches`: the micro-batches chosen (or the user's).
    - `step_bytes`: the compiled step's own buffers per device (`None`: not compiled, the
      activation bound was far under the budget).
    - `budget_bytes`: the budget per device.
    """

    remat: str
    micro_batches: int
    step_bytes: int | None
    budget_bytes: int

    def describe(self) -> str:
        """One line for the run's log."""
        measured = (
            "a small model" if self.step_bytes is None else f"{self.step_bytes / 2**30:.2f} GiB"
        )
        return (
            f"memory: model.remat = {self.remat!r}, algorithm.micro_batches = "
            f"{self.micro_batches} ({measured} of a {self.budget_bytes / 2**30:.2f} GiB budget "
            "per device; set either key to choose yourself)"
        )


def free_bytes_per_device() -> int:
    """The memory free on each local device now.

    **Returns:**

    For accelerators, the smallest of `bytes_limit - bytes_in_use` over the local devices; on
    the CPU, the host's available memory divided by the number of local devices; with several
    processes, the smallest over all of them.
    """
    devices = jax.local_devices()
    stats = [d.memory_stats() for d in devices]
    if all(s and "bytes_limit" in s for s in stats):
        free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // len(devices)
    if jax.process_count() > 1:  # every process must make the same plan
        # In MiB as float32: without jax_enable_x64 an int64 would be gathered as int32.
        mib = multihost_utils.process_allgather(np.float32(free / 2**20))
        free = int(np.min(mib)) * 2**20
    return free


def activation_estimate(config, rows: int, length: int) -> int:
    """An estimate of the update's saved activations without checkpointing, in bytes.

    **Arguments:**

    - `config`: the policy's `gradflow.models.ModelConfig`.
    - `rows`: the sequences in one micro-batch.
    - `length`: the tokens of each (prompt + new tokens, or a packed row).

    **Returns:**

    Per token and layer: the projections' and MLP's inputs and outputs and the attention
    scores and probabilities, in float32; plus the logits of every position.
    """
    heads, kv, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    per_token_layer = (
        10 * config.hidden_size
        + 3 * (heads + 2 * kv) * head_dim
        + 4 * config.intermediate_size
        + 2 * heads * length
    )
    tokens = rows * length
    return 4 * tokens * (config.num_layers * per_token_layer + 2 * config.vocab_size)


def _step_bytes(compiled) -> int:
    analysis = compiled.memory_analysis()
    return (
        analysis.temp_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
    )


def _candidates(remat: str, micro_batches: int | None, rows: int) -> list[tuple[str, int]]:
    """No checkpointing in the fewest micro-batches first; then checkpointing in more and more
    micro-batches (recomputing costs a third more compute, micro-batches cost parallelism)."""
    if micro_batches is not None:
        counts = [micro_batches]
    else:
        counts = [m for m in (1, 2, 4, 8, 16, 32, 64, 128, 256) if m <= rows and rows % m == 0]
    if remat != "auto":
        return [(remat, m) for m in counts]
    return [("none", counts[0])] + [("full", m) for m in counts]


def plan_memory(
    lower, policy_config, *, remat: str, micro_batches: int | None, rows: int, length: int
) -> MemoryPlan:
    """Chooses activation checkpointing and micro-batches that fit the memory free.

    **Arguments:**

    - `lower`: `lower(remat, micro_batches)` lowers the step with those settings (a
      `jax.stages.Lowered`-like object with `compile()`).
    - `policy_config`: the policy's `gradflow.models.ModelConfig`.
    - `remat`: `model.remat` (`"auto"` lets the plan choose).
    - `micro_batches`: `algorithm.micro_batches`, or `None` to let the plan choose.
    - `rows`: the sequences in one minibatch of the update.
    - `length`: the tokens of each sequence (prompt + new tokens).

    **Returns:**

    The `MemoryPlan`.

    **Raises:**

    `MemoryPlanError` when no candidate fits.
    """
    budget = int(BUDGET_SHARE * free_bytes_per_device())
    candidates = _candidates(remat, micro_batches, rows)
    first_remat, first_count = candidates[0]
    bound = activation_estimate(policy_config, rows // first_count, length)
    if first_remat == "none" and bound < QUICK_SHARE * budget or len(candidates) == 1:
        return MemoryPlan(first_remat, first_count, None, budget)
    needed = None
    for candidate_remat, count in candidates:
        needed = _step_bytes(lower(candidate_remat, count).compile())
        if needed <= budget:
            return MemoryPlan(candidate_remat, count, needed, budget)
    raise MemoryPlanError(
        f"out of memory: the step needs {needed / 2**30:.2f} GiB per device even with "
        f'model.remat = "full" and algorithm.micro_batches = {candidates[-1][1]}, and '
        f"{budget / 2**30:.2f} GiB are free; lower train.prompts_per_step, algorithm.group_size "
        'or algorithm.max_new_tokens, or set model.compute_dtype = "bfloat16"'
    )


def as_remat(remat: str) -> str:
    """The checkpointing a policy is built with before the plan runs (`"auto"` → `"none"`)."""
    return "none" if remat == "auto" else remat


def out_of_memory_message(error: BaseException) -> str | None:
    """The one line a run prints for an out-of-memory error, or `None` for another error.

    **Arguments:**

    - `error`: what the run raised.

    **Returns:**

    `"out of memory (...): ..."` naming XLA's figure and the keys that lower memory, when
    `error` is XLA's `RESOURCE_EXHAUSTED`.
    """
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    detail = next((line for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line), text)
    detail = detail.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()
    return (
        f'out of memory ({detail[:160]}): set model.remat = "full", raise '
        "algorithm.micro_batches, lower train.prompts_per_step, algorithm.group_size or "
        'algorithm.max_new_tokens, or set model.compute_dtype = "bfloat16" '
        "(GRADFLOW_DEBUG=1 shows the traceback)"
    )
