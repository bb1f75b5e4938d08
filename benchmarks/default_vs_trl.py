"""gradflow's default job against TRL's `GRPOTrainer` on the same toy task, side by side.

    python benchmarks/default_vs_trl.py [--steps 60] [--eval-every 10] [--out runs/default_vs_trl]

Runs, one after the other on this machine, each in a fresh process:

1. TRL 1.16's `GRPOTrainer` (`benchmarks/trl_toy.py`: the shipped toy model and tokenizer, the
   same train/test problems and per-step prompts, strict reward, 32 prompts × 8 samples × 32 new
   tokens, lr 1e-4, clip 1, β = 0, token-mean loss, float32, no gradient checkpointing; what
   cannot be aligned: the RNG streams and TRL's std epsilon 1e-4);
2. `python pipelines/run.py configs/grpo.toml` untouched (a fresh run directory, the progress bar
   off) with an empty compilation cache: the first run on a machine;
3. the same again with the cache the first run filled: every later run.

and prints the machine (`lscpu` model, AVX-512 or not, the load average before and after) and one
table: held-out accuracy before → after, the whole process's wall time, the steady step (median
of the steps after the first), the first step (gradflow: its compilation) and the speed-ups.
Needs the `bench` extra (`pip install -e '.[bench]'`).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    """The CPU model, whether it has AVX-512, its core count and the load average."""
    model = "unknown CPU"
    flags = ""
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("Flags:"):
            flags = line
    avx = "AVX-512" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {avx}, {os.cpu_count()} cores, load average {load}"


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    return time.perf_counter() - start


def trl(steps: int, eval_every: int, out: Path) -> dict:
    """TRL's run: its own JSON record plus the process's wall time."""
    record = out / "trl.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "trl_toy.py"), "--steps", str(steps)]
    command += ["--eval-every", str(eval_every)]
    wall = timed([*command, "--out", str(record)], dict(os.environ))
    result = json.loads(record.read_text())
    steps_s = result["step_s"]
    return {
        "name": f"TRL {result['implementation'].split(' (')[0].removeprefix('TRL ')}",
        "before": result["accuracy"]["0"],
        "after": result["accuracy"][str(steps)],
        "wall_s": wall,
        "step_s": statistics.median(steps_s[1:]),
        "first_step_s": steps_s[0],
    }


def gradflow(steps: int, eval_every: int, out: Path, name: str, cache: Path) -> dict:
    """One run of the default config with `cache` as its compilation cache."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, GRADFLOW_COMPILATION_CACHE=str(cache))
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "run.py"),
        str(ROOT / "configs" / "grpo.toml"),
        f"train.steps={steps}",
        f"eval.every={eval_every}",
        f"run.output_dir={run_dir}",
        "logging.progress=false",
    ]
    wall = timed(command, env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/accuracy"] for r in records if "eval/accuracy" in r]
    step_s = [r["time/step_s"] for r in records if "time/step_s" in r]
    return {
        "name": name,
        "before": evals[0],
        "after": evals[-1],
        "wall_s": wall,
        "step_s": statistics.median(step_s[1:]),
        "first_step_s": step_s[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "default_vs_trl")
    parser.add_argument("--skip-trl", action="store_true", help="gradflow's two runs only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}", flush=True)
    rows = [] if args.skip_trl else [trl(args.steps, args.eval_every, args.out)]
    cache = Path(tempfile.mkdtemp(prefix="gradflow-jax-cache-"))
    try:
        rows.append(
            gradflow(
                args.steps, args.eval_every, args.out, "gradflow, first run (empty cache)", cache
            )
        )
        rows.append(
            gradflow(
                args.steps, args.eval_every, args.out, "gradflow, second run (cache filled)", cache
            )
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"machine after: {machine()}")
    base = rows[0]
    lines = [
        f"| {args.steps} steps | held-out accuracy | whole process (s) | steady step (s) | "
        f"first step (s) | step speed-up vs {base['name']} | wall-time ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['before']:.3f} → {row['after']:.3f} | {row['wall_s']:.1f} | "
            f"{row['step_s']:.3f} | {row['first_step_s']:.2f} | "
            f"{base['step_s'] / row['step_s']:.2f}× | {row['wall_s'] / base['wall_s']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(f"machine: {machine()}\n\n{table}\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
