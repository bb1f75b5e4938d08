"""Helpers for the tests that run `pipelines/run.py` as a user would (in a subprocess).

As a module: `tiny_config(...)` writes a small, fast config (arithmetic task, character tokenizer,
a 2-layer model), `run_child(...)` starts this file as a subprocess, `read_metrics(...)` reads a
run's `metrics.jsonl` without its timing keys.

As a script, `python tests/child_run.py CONFIG [overrides...]` runs `pipelines/run.py`'s `main`
with test hooks chosen by environment variables:

- `CHILD_REWARD=digits`: the task's reward becomes a deterministic numpy scorer (the fraction of
  digit tokens in a completion), so that advantages, gradients and updates are not all zero.
- `CHILD_PAUSE_STEP=k`: after dispatching the `k`-th step of this process (0-based), print
  `MARKER step` and sleep (the test kills the process there, mid-step).
- `CHILD_PAUSE_SAVE=s`: while writing the checkpoint of step `s`, after `state.safetensors` is
  written into the temporary directory, print `MARKER save` and sleep.
- `CHILD_FAIL_SAVE=s`: the checkpoint write of step `s` fails with `ENOSPC` (a full disk).
"""

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TIMING_PREFIXES = ("time/", "throughput/")
MODEL_OVERRIDES = {
    "vocab_size": 48,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 4,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def tokenizer_dir(root: Path) -> Path:
    """The arithmetic task's character tokenizer, saved under `root` (once)."""
    from gradflow.tasks import save_tokenizer

    path = root / "char_tokenizer"
    if not (path / "tokenizer.json").is_file():
        save_tokenizer(path)
    return path


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def tiny_config(root: Path, output_dir: Path, name: str = "config", **sections) -> Path:
    """Writes a small config into `root/<name>.toml`; `sections` override whole keys, e.g.
    `train={"steps": 4}`.

    **Returns:**

    The config path.
    """
    config = {
        "run": {"seed": 0, "output_dir": str(output_dir)},
        "model": {
            "init": "random",
            "config": "gradflow:qwen2/qwen2-1.5b-instruct.config.json",
            "tokenizer": str(tokenizer_dir(root)),
            "overrides": MODEL_OVERRIDES,
        },
        "task": {"name": "arithmetic", "train_size": 32, "test_size": 4},
        "algorithm": {
            "name": "grpo",
            "group_size": 4,
            "max_new_tokens": 6,
            "learning_rate": 0.01,
        },
        "train": {"steps": 3, "prompts_per_step": 2},
        "eval": {"every": 0, "size": 4, "batch_size": 4},
        "checkpoint": {"every": 1, "keep": 2},
        "logging": {"wandb": "disabled", "progress": False, "samples_every": 1},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def child_env(devices: int = 1, cache: Path | None = None, **hooks: str) -> dict[str, str]:
    """The environment of a child run: `devices` CPU devices, quick (unoptimised) XLA
    compilation, an optional persistent compilation cache, W&B off, the given hooks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHILD_", "JAX_", "XLA_"))}
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    if cache is not None:
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
        )
    env.update(
        XLA_FLAGS=flags,
        JAX_PLATFORMS="cpu",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(hooks)
    return env


def run_child(config: Path, *overrides: str, env: dict[str, str] | None = None, **kwargs):
    """Starts `python tests/child_run.py config overrides...`; returns the `Popen`."""
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(config), *overrides],
        cwd=ROOT,
        env=child_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def wait_for(process: subprocess.Popen, marker: str, timeout: float = 120.0) -> str:
    """Reads the child's output until a line contains `marker`; returns what was read."""
    seen = []
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise AssertionError(f"no {marker!r} from the child; its output:\n{''.join(seen)}")


def read_metrics(run_dir: Path) -> list[dict]:
    """`metrics.jsonl` without the timing keys (`time/*`, `throughput/*`)."""
    records = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.append({k: v for k, v in record.items() if not k.startswith(TIMING_PREFIXES)})
    return records


def _digits_reward():
    from gradflow.stages import HostReward

    def scorer(tokens: np.ndarray, mask: np.ndarray, index: np.ndarray) -> np.ndarray:
        digits = (tokens >= 3) & (tokens <= 12) & mask  # character tokenizer: ids 3..12
        return np.stack([digits.mean(axis=1)]).astype(np.float32)

    return HostReward(scorer=scorer, parts=("digits",), weights=(1.0,))


def _install_hooks() -> None:
    import gradflow.checkpoint
    import gradflow.tasks.task
    import gradflow.train

    if os.environ.get("CHILD_REWARD") == "digits":
        gradflow.tasks.task.Task.reward = lambda self: _digits_reward()
    if "CHILD_PAUSE_STEP" in os.environ:
        pause_at = int(os.environ["CHILD_PAUSE_STEP"])
        real_step = gradflow.train.rl_step
        calls = []

        def paused_step(*args, **kwargs):
            out = real_step(*args, **kwargs)
            calls.append(1)
            if len(calls) - 1 == pause_at:
                print("MARKER step", flush=True)
                time.sleep(600)
            return out

        gradflow.train.rl_step = paused_step
    if "CHILD_PAUSE_SAVE" in os.environ or "CHILD_FAIL_SAVE" in os.environ:
        pause = int(os.environ.get("CHILD_PAUSE_SAVE", -1))
        fail = int(os.environ.get("CHILD_FAIL_SAVE", -1))
        real_save = gradflow.checkpoint.save_file

        def hooked_save(tensors, filename, *args, **kwargs):
            step = int(re.search(r"step_(\d+)", str(filename)).group(1))
            if step == fail:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
            real_save(tensors, filename, *args, **kwargs)
            if step == pause:
                print("MARKER save", flush=True)
                time.sleep(600)

        gradflow.checkpoint.save_file = hooked_save


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "pipelines"))
    from run import main

    _install_hooks()
    sys.exit(main(sys.argv[1:]))
