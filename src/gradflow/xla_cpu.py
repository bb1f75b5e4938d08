"""XLA:CPU settings gradflow runs with, set in `XLA_FLAGS` when `gradflow` is imported.

XLA:CPU (jaxlib 0.10) hands reductions to YNNPACK fusions, and those are several times slower
than XLA's own loop fusions on the LM head's reductions over the vocabulary: the entropy of
1,024 positions over Qwen's 151,646 tokens (`logsumexp`, then `sum(p * logits)`) takes 4.1 s
as a YNNPACK fusion of a `[1, 1024, vocab]` array and 1.4 s of a `[1024, vocab]` one, against
0.41–0.46 s with reductions left to XLA (`BENCHMARKS.md`, "YNNPACK reductions"); matmuls stay
with YNNPACK. A `xla_cpu_experimental_ynn_fusion_type` the user set is left as it is, and the
flags only take effect if `gradflow` is imported before JAX starts its CPU backend.
"""

import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_WITHOUT_REDUCTIONS = f"{YNN_FLAG}=-reduce"


def set_cpu_flags() -> None:
    """Adds `YNN_WITHOUT_REDUCTIONS` to `XLA_FLAGS` unless a YNN fusion type is already set."""
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_WITHOUT_REDUCTIONS}".strip()
