"""Multi-turn learning benchmark: held-out accuracy by the last turn before → after training
`configs/examples/multi_turn.toml` (a retry turn after a wrong answer), beside the same config
trained single-turn (no `[environment]`, `max_new_tokens` = `max_turn_tokens`, the strict
correctness as its reward), in one run.

    python benchmarks/multi_turn.py [key=value ...]

Prints the machine and the load, then one line per run: eval/accuracy at step 0 and at the
end, the turns used at the end, and the wall time.
"""

import json
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "examples" / "multi_turn.toml"


def machine() -> str:
    """The CPU model and whether it has AVX-512."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in text.splitlines()
            if line.startswith("Model name")
        ),
        "unknown",
    )
    cores = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("CPU(s)")),
        "?",
    )
    avx512 = "avx512f" in text
    return f"{model}, {cores} CPUs, AVX-512 {'yes' if avx512 else 'no'}"


def run(name: str, config: Path, out: Path, overrides: list[str]) -> dict:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "run.py"),
        str(config),
        f"run.output_dir={run_dir}",
        "logging.wandb=disabled",
        "logging.progress=false",
        *overrides,
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/accuracy" in r]
    return {
        "run": name,
        "before": evals[0]["eval/accuracy"],
        "after": evals[-1]["eval/accuracy"],
        "turns_after": evals[-1].get("eval/turns_mean", 1.0),
        "curve": [(r["step"], r["eval/accuracy"]) for r in evals],
        "wall_s": wall,
    }


def main(overrides: list[str]) -> None:
    print(
        f"machine: {machine()}; load {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}",
        flush=True,
    )
    out = ROOT / "runs" / "benchmark-multi-turn"
    out.mkdir(parents=True, exist_ok=True)
    raw = tomllib.loads(CONFIG.read_text())
    single = dict(raw)
    environment = single.pop("environment")
    single["algorithm"] = {**raw["algorithm"], "max_new_tokens": environment["max_turn_tokens"]}
    # The environment's reward (1 once an answer is right) becomes the correctness reward.
    single["task"] = {**raw["task"], "correct_weight": 1.0}
    single_config = out / "single_turn.toml"
    single_config.write_text(tomli_w.dumps(single))
    results = [
        run("multi-turn", CONFIG, out, overrides),
        run("single-turn", single_config, out, overrides),
    ]
    for r in results:
        curve = " ".join(f"{step}:{acc:.3f}" for step, acc in r["curve"])
        print(
            f"{r['run']:>12}: eval/accuracy {r['before']:.3f} -> {r['after']:.3f} "
            f"(turns {r['turns_after']:.2f}), {r['wall_s']:.0f} s; curve {curve}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
