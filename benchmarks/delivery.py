"""The delivery run: `pipelines/run.py` on GSM8K at the Qwen2.5-0.5B shape (random weights: no
hub here) for 100 steps with W&B offline, then a table of what a first user checks: the exit
status, tracebacks in the log, steps in `metrics.jsonl`, the algorithm name read back from the
W&B offline record, the median step time and generated tokens/s.

    python benchmarks/delivery.py [--steps 100] [--tiny] [--out DIR]

`--tiny` swaps in a two-layer model and a short run, to check the script on a CPU. Run by
`PARTS=delivery bash benchmarks/gpu.sh`.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/gsm8k/qwen25_0p5b_grpo.toml"
SHAPE = "gradflow:qwen2/qwen2.5-0.5b-instruct.config.json"


def _overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    common = [
        "model.init=random",
        f"model.config={SHAPE}",
        f"train.steps={args.steps}",
        f"run.output_dir={run_dir}",
        'logging.wandb="offline"',
        "logging.progress=false",
        "checkpoint.every=50",
        "eval.every=0",
    ]
    if args.tiny:
        return [
            *common,
            "model.overrides={num_layers = 2, hidden_size = 64, intermediate_size = 128, "
            "num_heads = 4, num_kv_heads = 2}",
            "model.remat=none",
            'model.compute_dtype="float32"',
            "train.prompts_per_step=2",
            "algorithm.group_size=4",
            "algorithm.max_new_tokens=8",
            "algorithm.micro_batches=1",
            "eval.size=4",
            "eval.batch_size=4",
            "task.train_size=64",
        ]
    return [
        *common,
        "train.prompts_per_step=32",
        "algorithm.group_size=8",
        "algorithm.max_new_tokens=256",
        "algorithm.micro_batches=4",
        "eval.size=256",
        "eval.batch_size=256",
    ]


def _wandb_algorithm(run_dir: Path) -> str:
    """The algorithm name in the W&B offline run's config record."""
    from gradflow.run_log import wandb_records

    logs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    if not logs:
        return "(no offline run)"
    for record in wandb_records(logs[-1]):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update
        if kind in ("run", "config"):
            for item in items:
                if item.key == "algorithm":
                    return str(json.loads(item.value_json).get("name"))
    return "(not in the record)"


def main() -> int:
    """Runs the delivery run and prints its table.

    **Returns:**

    The run's exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="", help="keep the run directory and log here")
    args = parser.parse_args()
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp())
    run_dir = base / "delivery"
    log = base / "delivery.log"
    command = [sys.executable, "pipelines/run.py", str(CONFIG), *_overrides(args, run_dir)]
    print("$", " ".join(command), flush=True)
    with open(log, "w") as handle:
        status = subprocess.run(
            command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT
        ).returncode
    text = log.read_text()
    metrics = run_dir / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    )
    steps = [r for r in rows if "time/step_s" in r]
    times = [r["time/step_s"] for r in steps[1:]] or [float("nan")]  # the first step compiles
    tokens = [r["throughput/tokens_per_s"] for r in steps[1:]] or [float("nan")]
    print("\n| check | value |\n|---|---|")
    print(f"| exit status | {status} |")
    print(f"| tracebacks in the log | {text.count('Traceback (most recent call last)')} |")
    print(f"| steps in metrics.jsonl | {len(steps)} of {args.steps} |")
    print(f"| algorithm in the W&B offline record | {_wandb_algorithm(run_dir)} |")
    print(f"| median step time (s, after the first) | {statistics.median(times):.3f} |")
    print(f"| generated tokens/s (median) | {statistics.median(tokens):.0f} |")
    print(
        f"| first step (s, compile included) | {steps[0]['time/step_s'] if steps else float('nan'):.1f} |"
    )
    if status:
        print("\nlog tail:\n" + "\n".join(text.splitlines()[-20:]))
    return status


if __name__ == "__main__":
    sys.exit(main())
