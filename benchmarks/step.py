"""Seconds per whole RL step (rollout + reward + update): gradflow against TRL's `GRPOTrainer`.

Both sides train the same GRPO step, measured in the same run: identical initial weights (an HF
model of the config is built, written with `save_pretrained` and read back with
`gradflow.models.load_hf`), the same GSM8K train prompts (chat template, in order: step `i` takes
problems `i·P … i·P+P-1`), `G` samples per prompt at temperature 1 (no top-k/top-p), exactly
`--new-tokens` tokens per completion (gradflow gets no EOS ids, TRL gets
`min_new_tokens = max_completion_length`), GSM8K correctness (strict `####`) as the reward,
group-normalised advantages, token-mean PPO-clip loss, one optimizer step per step (AdamW,
learning rate 1e-6, gradient clip 1.0) and no KL term (TRL's default `beta = 0`). TRL runs in
float32 without gradient checkpointing (its fastest setting here), on `--threads` torch threads.

A step's time is the median over the steps after the first; the first step (gradflow: compile
included) is reported separately. gradflow's rollout is also timed alone, so that the rest of the
step (reward + update) gives update tokens/s and, with `--peak-tflops`, the update's MFU by
6·N·tokens.

`--synthetic` replaces GSM8K by random prompts of `--prompt-len` tokens and a token-level reward,
and builds the model with `init_from_config` (no TRL): that path imports neither `datasets` nor
`transformers`, so it runs in a minimal GPU image (see `benchmarks/gpu.sh`).

    python benchmarks/step.py --steps 4
    python benchmarks/step.py --synthetic --skip-trl --config CONFIG.json --compute-dtype bfloat16 \\
        --prompts 64 --new-tokens 256 --prompt-len 128 --peak-tflops 784
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tiny_qwen2 import hf_config_dict

from gradflow.algorithms import make
from gradflow.batch import Prompts
from gradflow.models import ModelConfig, init_from_config, load_hf
from gradflow.stages import HostReward
from gradflow.state import init_state
from gradflow.step import step

LEARNING_RATE = 1e-6


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per side (first one separate)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-trl", action="store_true", help="time gradflow only")
    parser.add_argument("--config", type=Path, help="an HF config.json (default: small Qwen2)")
    parser.add_argument("--vocab", type=int, help="override the config's vocab_size")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="random prompts and a token-level reward (no GSM8K, tokenizer or TRL)",
    )
    parser.add_argument("--prompt-len", type=int, default=128, help="with --synthetic")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), help="default: --dtype")
    parser.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    parser.add_argument(
        "--attention", choices=("xla", "cudnn"), help="attention implementation (default: JAX's)"
    )
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation")
    parser.add_argument(
        "--logprob-chunk",
        type=int,
        default=16,
        help="gradflow's LM-head chunk (completion positions); 16 is fastest on the 2-core CPU",
    )
    parser.add_argument(
        "--breakdown",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time gradflow's rollout alone (update = step - rollout)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="CPU threads (process affinity + torch threads); 0 leaves them as is",
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's peak: print update MFU")
    parser.add_argument("--out", type=Path, help="also write the table (and JSON) to this folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is reported separately)")
    if args.synthetic:
        args.skip_trl = True
    return args


# --- the workload: prompts and reward -------------------------------------------------------


@dataclasses.dataclass
class Workload:
    """Prompt ids for every step (left-padded to one length), the reward, and TRL's inputs."""

    ids: np.ndarray  # [steps * prompts, prompt_len]
    mask: np.ndarray
    reward: HostReward
    texts: list[str] | None = None  # TRL: prompt texts, answers, reward function, tokenizer
    answers: list[str] | None = None
    tokenizer: object = None

    def prompts(self, step_index: int, count: int) -> Prompts:
        rows = np.arange(step_index * count, (step_index + 1) * count)
        return Prompts(
            ids=jnp.asarray(self.ids[rows]),
            mask=jnp.asarray(self.mask[rows]),
            index=jnp.asarray(rows, jnp.int32),
        )


def gsm8k_workload(args: argparse.Namespace) -> Workload:
    """The first `steps × prompts` GSM8K train problems as chat prompts; strict correctness."""
    from gradflow.config import build_config
    from gradflow.tasks.task import build_task

    size = args.steps * args.prompts
    raw = {
        "model": {"init": "random", "config": "gradflow:qwen2/qwen2-1.5b-instruct.config.json"},
        "task": {"name": "gsm8k", "prompt_template": "chat", "train_size": size, "test_size": 1},
        "algorithm": {"name": "grpo"},
    }
    task = build_task(build_config(raw))
    bank, tokenizer = task.train_prompts, task.tokenizer
    answers = task.train.columns["answer"]
    texts = [tokenizer.decode(ids[keep]) for ids, keep in zip(bank.ids, bank.mask, strict=True)]
    reward = task.reward()
    return Workload(
        ids=bank.ids,
        mask=bank.mask,
        reward=reward,
        texts=texts,
        answers=answers,
        tokenizer=tokenizer,
    )


def synthetic_workload(args: argparse.Namespace, vocab: int) -> Workload:
    """Random prompts; reward = the fraction of even token ids (cheap, varies within a group)."""

    def scorer(tokens: np.ndarray, mask: np.ndarray, index: np.ndarray) -> np.ndarray:
        even = ((tokens % 2 == 0) & mask).sum(axis=1)
        return (even / np.maximum(mask.sum(axis=1), 1)).astype(np.float32)[None]

    rng = np.random.default_rng(args.seed)
    shape = (args.steps * args.prompts, args.prompt_len)
    ids = rng.integers(0, vocab, shape, dtype=np.int32)
    reward = HostReward(scorer=scorer, parts=("even",), weights=(1.0,))
    return Workload(ids=ids, mask=np.ones(shape, bool), reward=reward)


# --- models ---------------------------------------------------------------------------------


def build_models(args: argparse.Namespace, config_dict: dict, workdir: Path):
    """gradflow's policy and (unless --skip-trl) the HF model, with identical random weights."""
    dtype = jnp.dtype(args.dtype)
    if args.skip_trl:
        policy = init_from_config(config_dict, key=jax.random.key(args.seed), dtype=dtype)
        hf_model = None
    else:
        import torch
        import transformers

        torch.manual_seed(args.seed)
        config = transformers.AutoConfig.for_model(**config_dict)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        hf_model.save_pretrained(workdir)
        policy = load_hf(workdir, dtype=dtype)
    policy = dataclasses.replace(
        policy,
        compute_dtype=args.compute_dtype or args.dtype,
        remat=args.remat,
        attention_impl=args.attention,
    )
    return policy, hf_model


# --- gradflow -------------------------------------------------------------------------------


def bench_gradflow(policy, workload: Workload, args: argparse.Namespace) -> dict:
    algorithm = make(
        "grpo",
        reward=workload.reward,
        group_size=args.group,
        max_new_tokens=args.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        kl_coef=0.0,
        learning_rate=LEARNING_RATE,
        micro_batches=args.micro_batches,
        logprob_chunk=args.logprob_chunk,
    )
    state = init_state(algorithm, policy, key=jax.random.key(args.seed))
    times, lengths, rewards = [], [], []
    first = None
    for i in range(args.steps):
        prompts = workload.prompts(i, args.prompts)
        start = time.perf_counter()
        state, metrics = step(algorithm, state, prompts, jax.random.key(args.seed + 1 + i))
        metrics = jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
        if first is None:
            first = elapsed
        else:
            times.append(elapsed)
        lengths.append(float(metrics["completion/length_mean"]))
        rewards.append(float(metrics["reward/mean"]))
        print(
            f"  gradflow step {i}: {elapsed:.3f} s, completion length {lengths[-1]:.1f}, "
            f"reward {rewards[-1]:.3f}, loss {float(metrics['loss/total']):.4f}",
            file=sys.stderr,
            flush=True,
        )
    result = {
        "first_s": first,
        "times_s": times,
        "completion_length": statistics.mean(lengths),
        "reward": statistics.mean(rewards),
        "prompt_len": int(workload.ids.shape[1]),
        "load_avg": os.getloadavg()[0],
    }
    if args.breakdown:
        rollout = eqx.filter_jit(lambda stage, *inputs: stage(*inputs))
        rollout_times = []
        for i in range(args.steps):
            prompts = workload.prompts(i, args.prompts)
            key = jax.random.key(args.seed + 1000 + i)
            start = time.perf_counter()
            jax.block_until_ready(rollout(algorithm.rollout, state.policy, prompts, key))
            if i:
                rollout_times.append(time.perf_counter() - start)
        result["rollout_times_s"] = rollout_times
    return result


# --- TRL ------------------------------------------------------------------------------------


def bench_trl(hf_model, workload: Workload, args: argparse.Namespace, workdir: Path) -> dict:
    import datasets
    import torch
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gradflow.rewards.gsm8k import is_correct

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    def correct(prompts, completions, answer, **kwargs) -> list[float]:
        return [
            float(is_correct(c, a, mode="strict")) for c, a in zip(completions, answer, strict=True)
        ]

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks, self.lengths, self.rewards = [], [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())
            print(
                f"  TRL step {len(self.marks) - 2}: {self.marks[-1] - self.marks[-2]:.3f} s",
                file=sys.stderr,
                flush=True,
            )

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])
                self.rewards.append(logs.get("reward", float("nan")))

    count = args.steps * args.prompts
    dataset = datasets.Dataset.from_dict(
        {"prompt": workload.texts[:count], "answer": workload.answers[:count]}
    )
    config = GRPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        learning_rate=LEARNING_RATE,
        max_grad_norm=1.0,
        max_steps=args.steps,
        shuffle_dataset=False,
        use_cpu=True,
        lr_scheduler_type="constant",
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
    )
    timer = Timer()
    trainer = GRPOTrainer(
        model=hf_model,
        reward_funcs=[correct],
        args=config,
        train_dataset=dataset,
        processing_class=workload.tokenizer,
        callbacks=[timer],
    )
    trainer.remove_callback(PrinterCallback)  # the table below is the output
    trainer.train()
    durations = np.diff(timer.marks).tolist()
    return {
        "first_s": durations[0],
        "times_s": durations[1:],
        "completion_length": statistics.mean(timer.lengths) if timer.lengths else float("nan"),
        "reward": statistics.mean(timer.rewards) if timer.rewards else float("nan"),
        "load_avg": os.getloadavg()[0],
    }


# --- report ---------------------------------------------------------------------------------


def table(results: dict, args: argparse.Namespace, config: ModelConfig) -> str:
    rows_per_step = args.prompts * args.group
    gf = results["gradflow"]
    source = "synthetic" if args.synthetic else "GSM8K train, chat template"
    lines = [
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {args.dtype}, "
        f"compute {args.compute_dtype or args.dtype}, threads {args.threads or 'default'}",
        f"model: {config.model_type} layers={config.num_layers} hidden={config.hidden_size} "
        f"heads={config.num_heads}/{config.num_kv_heads} vocab={config.vocab_size} "
        f"params={config.num_parameters / 1e6:.1f}M",
        f"step: {args.prompts} prompts ({source}, padded to {gf['prompt_len']} tokens) x "
        f"{args.group} samples x {args.new_tokens} new tokens; GRPO, beta=0, 1 optimizer step; "
        f"median of {args.steps - 1} steps after the first",
        "",
        "| implementation | first step s | median step s | min s | completion length "
        "| generated tokens/s | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    medians = {name: statistics.median(r["times_s"]) for name, r in results.items()}
    for name, result in results.items():
        generated = rows_per_step * result["completion_length"]
        speedup = f"{medians['trl'] / medians[name]:.1f}x" if "trl" in medians else "-"
        lines.append(
            f"| {name} | {result['first_s']:.2f} | {medians[name]:.3f} | "
            f"{min(result['times_s']):.3f} | {result['completion_length']:.1f} | "
            f"{generated / medians[name]:,.0f} | {speedup} |"
        )
    loads = ", ".join(f"{name} {r['load_avg']:.1f}" for name, r in results.items())
    lines.append(f"\n1-minute load average after each side's steps: {loads}")
    if "trl" in medians:
        lines.append(f"gradflow / TRL: {medians['trl'] / medians['gradflow']:.1f}x per step")
    lines.append(
        f"gradflow compile (first step - median): {gf['first_s'] - medians['gradflow']:.1f} s"
    )
    if "rollout_times_s" in gf:
        rollout = statistics.median(gf["rollout_times_s"])
        rest = medians["gradflow"] - rollout
        generated = rows_per_step * gf["completion_length"]
        update_tokens = rows_per_step * (gf["prompt_len"] + args.new_tokens)
        lines.append(
            f"gradflow rollout alone: {rollout:.3f} s ({generated / rollout:,.0f} generated "
            f"tokens/s); rest of the step (reward + update): {rest:.3f} s"
        )
        if rest > 0:
            lines.append(
                f"gradflow update: {update_tokens:,} tokens, {update_tokens / rest:,.0f} tokens/s"
            )
            if args.peak_tflops:
                flops = 6 * config.num_parameters * update_tokens
                lines.append(
                    f"gradflow update MFU (6·N·tokens): {flops / rest / 1e12:.1f} TFLOP/s of "
                    f"{args.peak_tflops:.0f} = {flops / rest / 1e12 / args.peak_tflops:.1%}"
                )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0 and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[: args.threads]
        os.sched_setaffinity(0, cpus)
    config_dict = hf_config_dict(args)
    config = ModelConfig.from_hf(config_dict)
    if args.synthetic:
        workload = synthetic_workload(args, config.vocab_size)
    else:
        workload = gsm8k_workload(args)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        policy, hf_model = build_models(args, config_dict, Path(tmp))
        print("timing gradflow ...", file=sys.stderr, flush=True)
        results["gradflow"] = bench_gradflow(policy, workload, args)
        del policy
        if hf_model is not None:
            print("timing TRL ...", file=sys.stderr, flush=True)
            results["trl"] = bench_trl(hf_model, workload, args, Path(tmp))

    text = table(results, args, config)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"step_{jax.default_backend()}_{args.compute_dtype or args.dtype}_p{args.prompts}"
        (args.out / f"{stem}.md").write_text(text + "\n")
        record = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}
        (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
