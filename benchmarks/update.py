"""The update phase of one GRPO step, packed with shared prompts (the default: each group's
prompt once), packed without (`algorithm.share_prompts = false`) and padded
(`algorithm.packing = false`), side by side in the same run, with the same gradients.

The rollout stage hands back fixed completions whose lengths are spread uniformly over
`--min-fraction … 100 %` of `--new-tokens` (EOS-terminated), so the compiled step is the update
phase alone (reward, advantages, reference log-probs, the epochs × minibatches × micro-batches
scan); the reward is a cheap jittable function of the tokens. The policy optimizer is plain SGD
with learning rate 1, so each side's parameter change is its gradient: the run prints the
largest difference to the padded one relative to the largest gradient entry. The token count
of each layout is the positions its forward pass holds real tokens in (padded: every slot).

    python benchmarks/update.py --config benchmarks/qwen2_small.config.json --prompt-len 150 \\
        --new-tokens 96 --group 4 --prompts 8 --micro-batches 1   # prompts: most of the tokens

Packed rows hold `--pack-tokens` slots; rows with shared prompts `--shared-pack-tokens`, by
default `prompt_len + group × new_tokens`, so that every group fits a row and shares its prompt.

    python benchmarks/update.py                 # the CPU comparison of BENCHMARKS.md
    python benchmarks/update.py --config src/gradflow/assets/qwen2/qwen2-1.5b-instruct.config.json \\
        --compute-dtype bfloat16 --remat dots --prompts 64 --prompt-len 160 --new-tokens 512 \\
        --min-fraction 0.1 --micro-batches 8        # GSM8K-like spreads at the 1.5B shape (GPU)
"""

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tiny_qwen2 import hf_config_dict

from gradflow.algorithms import make
from gradflow.batch import Prompts
from gradflow.models import init_from_config
from gradflow.optim import Optimizer
from gradflow.packing import Packing, pack
from gradflow.rollout import Completions
from gradflow.stages import AbstractReward, AbstractRollout, RewardOutput
from gradflow.state import init_state
from gradflow.step import step


class FixedRollout(AbstractRollout):
    """Returns the benchmark's completions; everything else is the wrapped rollout stage's."""

    completions: Completions
    inner: AbstractRollout
    filtered: bool = False

    @property
    def group_size(self) -> int:
        return self.inner.group_size

    @property
    def max_new_tokens(self) -> int:
        return self.inner.max_new_tokens

    @property
    def temperature(self) -> float:
        return self.inner.temperature

    def prompts_to_sample(self, prompts_per_step):
        return self.inner.prompts_to_sample(prompts_per_step)

    def __call__(self, policy, prompts, key):
        return self.completions

    def select(self, rewards, prompts_per_step):
        return self.inner.select(rewards, prompts_per_step)


class EvenTokens(AbstractReward):
    """The fraction of even token ids in the completion (varies within a group)."""

    def __call__(self, prompts, completions):
        m = completions.mask.astype(jnp.float32)
        even = jnp.sum(jnp.where(completions.tokens % 2 == 0, m, 0.0), axis=1)
        score = even / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        return RewardOutput(total=score, parts={"even": score}, applicable={})


class SGD(Optimizer):
    """`new = old - grad` (the parameter change is the gradient)."""

    def transform(self):
        return optax.sgd(self.learning_rate)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="an HF config.json (default: small Qwen2)")
    parser.add_argument("--vocab", type=int, default=8192, help="override the vocab_size")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--min-fraction", type=float, default=0.1)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--pack-tokens", type=int, help="slots per packed row (default derived)")
    parser.add_argument(
        "--shared-pack-tokens",
        type=int,
        help="slots per row with shared prompts (default: prompt_len + group × new_tokens, a "
        "row every group fits)",
    )
    parser.add_argument("--logprob-chunk", type=int, default=32)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per side")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def machine() -> str:
    """The CPU model, AVX-512 or not, the device and the load."""
    model = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
        avx512 = "avx512f" in lscpu
    except OSError:
        avx512 = False
    load = os.getloadavg()
    return (
        f"{model} ({os.cpu_count()} cores, AVX-512 {'yes' if avx512 else 'no'}), "
        f"device {jax.devices()[0].device_kind}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def workload(args, vocab: int):
    rng = np.random.default_rng(args.seed)
    rows = args.prompts * args.group
    prompt_ids = rng.integers(2, vocab, (args.prompts, args.prompt_len), dtype=np.int32)
    low = max(1, int(round(args.min_fraction * args.new_tokens)))
    lengths = rng.integers(low, args.new_tokens + 1, rows)
    tokens = rng.integers(2, vocab, (rows, args.new_tokens), dtype=np.int32)
    tokens[np.arange(rows), lengths - 1] = 1  # EOS
    mask = np.arange(args.new_tokens)[None, :] < lengths[:, None]
    completions = Completions(
        tokens=jnp.asarray(np.where(mask, tokens, 0)),
        mask=jnp.asarray(mask),
        logprobs=jnp.zeros((rows, args.new_tokens), jnp.float32),
        sampling_logprobs=jnp.zeros((rows, args.new_tokens), jnp.float32),
        lengths=jnp.asarray(lengths, jnp.int32),
        finished=jnp.ones((rows,), bool),
    )
    prompts = Prompts(
        ids=jnp.asarray(prompt_ids),
        mask=jnp.ones(prompt_ids.shape, bool),
        index=jnp.arange(args.prompts, dtype=jnp.int32),
    )
    return prompts, completions


def flat(model) -> np.ndarray:
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in leaves])


LAYOUTS = {
    "padded": dict(packing=False),
    "packed": dict(share_prompts=False),
    "shared prompts": dict(),
}


def row_tokens(args, layout: str) -> int | None:
    """The slots per packed row of `layout`."""
    if layout != "shared prompts":
        return args.pack_tokens
    return args.shared_pack_tokens or args.prompt_len + args.group * args.new_tokens


def tokens_per_update(args, prompts, completions, layout: str) -> int:
    """The positions of one update's forward pass (over all its micro-batches) that hold a real
    token: every slot padded; the packed tokens otherwise."""
    ids = jnp.concatenate([jnp.repeat(prompts.ids, args.group, 0), completions.tokens], 1)
    mask = jnp.concatenate([jnp.repeat(prompts.mask, args.group, 0), completions.mask], 1)
    if layout == "padded":
        return int(ids.size)
    packing = Packing(tokens=row_tokens(args, layout), share_prompts=layout == "shared prompts")
    count = 0
    for part_ids, part_mask in zip(
        jnp.split(ids, args.micro_batches), jnp.split(mask, args.micro_batches), strict=True
    ):
        packed = pack(part_ids, part_mask, args.prompt_len, packing)
        count += int(jnp.sum(packed.segments > 0))
    return count


def run(args, policy, prompts, completions, layout: str) -> dict:
    algorithm = make(
        "grpo",
        reward=EvenTokens(),
        eos_token_ids=(1,),
        group_size=args.group,
        max_new_tokens=args.new_tokens,
        micro_batches=args.micro_batches,
        logprob_chunk=args.logprob_chunk,
        pack_tokens=row_tokens(args, layout),
        **LAYOUTS[layout],
    )
    algorithm = eqx.tree_at(
        lambda a: a.rollout, algorithm, FixedRollout(completions, algorithm.rollout)
    )
    algorithm = eqx.tree_at(lambda a: a.optimizer, algorithm, SGD(learning_rate=1.0))
    times, first, change = [], None, None
    for i in range(args.repeats + 1):
        state = init_state(algorithm, jax.tree.map(jnp.copy, policy), key=jax.random.key(1))
        start = time.perf_counter()
        state, metrics = step(algorithm, state, prompts, jax.random.key(2))
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - start
        if first is None:
            first = elapsed
            change = flat(policy) - flat(state.policy)
        else:
            times.append(elapsed)
        print(f"  {layout} step {i}: {elapsed:.3f} s", file=sys.stderr)
    return {
        "first_s": first,
        "median_s": statistics.median(times),
        "grad": change,
        "tokens": tokens_per_update(args, prompts, completions, layout),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    config = hf_config_dict(args)
    policy = init_from_config(config, key=jax.random.key(args.seed), dtype=jnp.dtype(args.dtype))
    policy = dataclasses.replace(
        policy, compute_dtype=args.compute_dtype or args.dtype, remat=args.remat
    )
    prompts, completions = workload(args, config["vocab_size"])
    lengths = np.asarray(completions.lengths)
    total = args.prompt_len + args.new_tokens
    real = args.prompt_len + lengths.mean()
    print(f"machine: {machine()}")
    print(
        f"model: {config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}, "
        f"vocab {config['vocab_size']}; {args.prompts} prompts × {args.group}, prompt "
        f"{args.prompt_len} + completions {lengths.min()}–{lengths.max()} (mean "
        f"{lengths.mean():.0f}) of {args.new_tokens}: real tokens {real / total:.0%} of the "
        f"padded {total}/row; {args.micro_batches} micro-batches, {args.dtype} params, "
        f"{args.compute_dtype or args.dtype} compute"
    )
    results = {layout: run(args, policy, prompts, completions, layout) for layout in LAYOUTS}
    padded = results["padded"]
    scale = np.max(np.abs(padded["grad"]))
    print()
    print("| update | tokens | first step (compile) s | median s | speed-up | grad gap |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        gap = np.max(np.abs(r["grad"] - padded["grad"])) / scale
        print(
            f"| {name} | {r['tokens']} | {r['first_s']:.2f} | {r['median_s']:.3f} | "
            f"{padded['median_s'] / r['median_s']:.2f}× | {gap:.1e} |"
        )
    print(
        "\ngrad gap: max |grad − grad padded| / max |grad padded|; tokens: the positions an "
        f"update's forward pass holds real tokens in; load {machine()}"
    )


if __name__ == "__main__":
    main()
