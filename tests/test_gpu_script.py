"""`benchmarks/gpu.sh`, the one prepared accelerator call, runs end to end on the CPU in its
`TINY=1` mode: every part prints its table, and the delivery run's table reports a clean exit.
A session that is lent a GPU has minutes of it; a script broken by a change made since must
fail here, not there."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_runs_every_part_in_tiny_mode(tmp_path):
    env = {
        **os.environ,
        "TINY": "1",
        "PARTS": "delivery rollout group step update",
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "GRADFLOW_COMPILATION_CACHE": "0",
        "WANDB_MODE": "offline",
    }
    # Not the tests' 8 fake devices: the script runs as on a machine of its own.
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    tables = [line for line in output.splitlines() if line.startswith("| ")]
    # The rollout table (gradflow, with LoRA, HF generate), group, step, update and delivery.
    for name in ("| gradflow |", "| gradflow, LoRA r=32 |", "| hf |", "| packed", "| exit status"):
        assert any(line.startswith(name) for line in tables), (name, output[-4000:])
    assert "| exit status | 0 |" in tables, output[-4000:]
    assert "| tracebacks in the log | 0 |" in tables, output[-4000:]
    assert "| steps in metrics.jsonl | 3 of 3 |" in tables, output[-4000:]
