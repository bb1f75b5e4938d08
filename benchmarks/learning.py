"""Learning benchmark on the embedded task: every algorithm's held-out accuracy before → after.

    python benchmarks/learning.py [--algorithms grpo ppo ...] [--grpo-seeds 0 1] [key=value ...]

Runs `configs/<algorithm>.toml` untouched (plus any overrides) for each algorithm, and GRPO for
several seeds, each in its own process, then writes `benchmarks/learning.md` (a table: accuracy
before → after, wall time, generated tokens/s) and `benchmarks/learning.png` (held-out accuracy
against step for every run).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ("grpo", "ppo", "reinforce", "rloo", "reinforce_pp", "dapo")


def run(algorithm: str, seed: int, out: Path, overrides: list[str]) -> dict:
    """Trains one config in a fresh process (into a fresh run directory) and summarises its
    metrics."""
    run_dir = out / f"{algorithm}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier benchmark's run
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "run.py"),
        str(ROOT / "configs" / f"{algorithm}.toml"),
        f"run.seed={seed}",
        f"run.output_dir={run_dir}",
        "logging.wandb=disabled",
        "logging.progress=false",
        *overrides,
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
    steps = [r for r in records if "throughput/tokens_per_s" in r]
    tokens = sum(r["completion/tokens"] for r in steps)
    step_time = sum(r["time/step_s"] for r in steps)
    return {
        "algorithm": algorithm,
        "seed": seed,
        "before": evals[0][1],
        "after": evals[-1][1],
        "curve": evals,
        "wall_s": wall,
        "tokens_per_s": tokens / step_time,
    }


def main() -> None:
    """Runs the benchmark and writes the table and the plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS))
    parser.add_argument("--grpo-seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--out", default="runs/learning")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    results = []
    for algorithm in args.algorithms:
        seeds = args.grpo_seeds if algorithm == "grpo" else [0]
        for seed in seeds:
            results.append(run(algorithm, seed, out, args.overrides))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "curve"}))
    lines = [
        "| config | seed | held-out accuracy before → after | wall time (s) | generated tokens/s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['algorithm']} | {r['seed']} | {r['before']:.3f} → {r['after']:.3f} "
            f"({100 * (r['after'] - r['before']):+.1f} pts) | {r['wall_s']:.0f} | "
            f"{r['tokens_per_s']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "learning.md").write_text(table)
    print(table)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs, ys = zip(*r["curve"], strict=True)
        ax.plot(xs, ys, marker="o", label=f"{r['algorithm']} (seed {r['seed']})")
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title("Embedded arithmetic task, 2-core CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "benchmarks" / "learning.png", dpi=110)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
