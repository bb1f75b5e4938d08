"""Generated tokens/s of `gradflow.rollout.generate` against HF `generate`, in the same run.

Both sides get identical random weights (an HF model of the config is built, written with
`save_pretrained` and read back with `gradflow.models.load_hf`), the same batch of prompts, sample
at temperature 1 (no top-k/top-p) and generate exactly `--new-tokens` tokens per row (no early EOS:
gradflow gets no EOS ids, HF gets `min_new_tokens=new_tokens`). Timings are the median of
`--repeats` runs (alternating between the two) after one warm-up run each; gradflow's compile
time (first call minus median) is reported separately.

With `--group G` each of the `--batch` prompts gets `G` completions, three ways side by side:
gradflow's `generate(group_size=G)` (each prompt prefilled once, its keys/values copied to its `G`
rows), gradflow on the prompts repeated `G` times (`per-row prefill`, with the prefill's blocked
attention, and with `[rows, heads, T, T]` attention at once as before: `dense attention`), and HF
`generate(num_return_sequences=G)`.

Imports only `gradflow.models` and `gradflow.rollout` from gradflow (plus torch/transformers for
the baseline), so it runs in a minimal GPU image.

    python benchmarks/rollout.py --batch 16 --prompt-len 32 --new-tokens 64
    python benchmarks/rollout.py --batch 4 --group 8 --prompt-len 448 --new-tokens 32
"""

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Share the GPU with torch instead of preallocating most of it for JAX.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tiny_qwen2 import hf_config_dict  # noqa: E402

from gradflow.models import (  # noqa: E402
    DecodingModel,
    ModelConfig,
    init_from_config,
    load_hf,
    save_hf,
)
from gradflow.rollout import generate, sample_token  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="an HF config.json (default: small Qwen2)")
    parser.add_argument("--vocab", type=int, help="override the config's vocab_size")
    parser.add_argument("--batch", type=int, default=16, help="prompts")
    parser.add_argument(
        "--group",
        type=int,
        default=1,
        help="completions per prompt; > 1 also times gradflow with a prefill per row",
    )
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    parser.add_argument("--skip-hf", action="store_true", help="time gradflow only")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="CPU threads for both sides (process affinity + torch threads); 0 leaves them as is",
    )
    parser.add_argument(
        "--roofline", type=float, help="ideal tokens/s: also print gradflow's fraction of it"
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also time gradflow's prefill, one decode step and one logits+sampling step alone",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        help="with --parts: also write a profiler trace of 3 decode + sampling steps and their "
        "compiled HLO to this folder",
    )
    parser.add_argument(
        "--lora",
        type=int,
        default=0,
        help="also time gradflow decoding a policy with LoRA adapters of this rank on every "
        "projection (applied as a separate term, as trained); the plain row is what merged "
        "adapters cost",
    )
    parser.add_argument("--out", type=Path, help="also write the table (and JSON) to this folder")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def measure(runners: dict, repeats: int) -> dict:
    """Wall time of each runner's first (warm-up / compiling) call, then of `repeats` further calls.

    The timed calls alternate between the runners, so that both see the same machine load.
    """
    results = {}
    for name, run in runners.items():
        print(f"warm-up {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        run(0)
        results[name] = {"first_s": time.perf_counter() - start, "times_s": []}
    for i in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run(i + 1)
            results[name]["times_s"].append(time.perf_counter() - start)
    for name, result in results.items():
        result["median_s"] = statistics.median(result["times_s"])
        if name.startswith("gradflow"):
            result["compile_s"] = max(result["first_s"] - result["median_s"], 0.0)
    return results


def machine() -> str:
    """The CPU model, whether it has AVX-512, the core count and the load average."""
    flags, model = set(), "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    avx512 = "AVX-512" if "avx512f" in flags else "no AVX-512"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"machine: {model} ({avx512}), {os.cpu_count()} cores, load average {load}"


def gradflow_runner(model, prompt_ids, args, group_size: int):
    """One call of `gradflow.rollout.generate` (blocking until the tokens are ready):
    `group_size` completions of each row of `prompt_ids`."""
    ids = jnp.asarray(prompt_ids)
    mask = jnp.ones_like(ids)

    def run(seed: int):
        completions = generate(
            model,
            ids,
            mask,
            key=jax.random.key(args.seed + seed),
            max_new_tokens=args.new_tokens,
            temperature=1.0,
            eos_token_ids=(),
            group_size=group_size,
        )
        lengths = np.asarray(jax.block_until_ready(completions.lengths))
        assert (lengths == args.new_tokens).all(), "gradflow generated fewer tokens than asked"

    return run


def hf_runner(hf_model, prompt_ids, args, torch, device):
    """One call of HF `generate` with the same sampling settings (synchronised on GPU)."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)

    def run(seed: int):
        torch.manual_seed(args.seed + seed)
        with torch.inference_mode():
            out = hf_model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                eos_token_id=0,  # masked out by min_new_tokens: no row stops early
                pad_token_id=0,
                num_return_sequences=args.group,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape == (ids.shape[0] * args.group, ids.shape[1] + args.new_tokens), (
            "HF generated a different shape"
        )

    return run


def median_time(fn, repeats: int) -> float:
    """Median wall time of `fn()` (which blocks) over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def record_trace(folder: Path, *steps) -> None:
    """A JAX profiler trace of three rounds of `steps`, copied to `folder/decode_trace.json.gz`."""
    with jax.profiler.trace(str(folder / "profile")):
        for _ in range(3):
            for step in steps:
                step()
    newest = max((folder / "profile").rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    shutil.copy(newest, folder / "decode_trace.json.gz")


def time_parts(model, prompt_ids, args) -> str:
    """Where gradflow's rollout time goes: prefill, one decode step, one logits + sampling step.

    The decode step (at the middle of the completion) is timed with each decode-attention
    implementation that runs natively here (`"pallas"` only on a GPU). Each step is compared with
    the bytes it must read at least, as a bandwidth: every layer weight, plus the whole KV cache
    (XLA attention) or the cache slots in use (Pallas); the sampling step: the LM head. With
    `--group G` the prefill runs once per prompt and includes the copy to the `G` rows.
    """
    ids = jnp.asarray(prompt_ids)
    mask = jnp.ones_like(ids)
    rows = args.batch * args.group
    middle = args.prompt_len + args.new_tokens // 2
    position = jnp.full((rows,), middle, jnp.int32)
    token = jnp.zeros((rows,), jnp.int32)
    decode = eqx.filter_jit(
        lambda d, c: d.decode(token, position, jnp.asarray(middle, jnp.int32), c),
        donate="warn-except-first",
    )
    sample = eqx.filter_jit(
        lambda d, h: sample_token(
            d.logits(h),
            jax.random.uniform(jax.random.key(0), (rows,)),
            temperature=1.0,
            top_k=0,
            top_p=1.0,
        )
    )
    implementations = ("pallas", "xla") if jax.default_backend() == "gpu" else ("xla",)
    table_rows, total_s = [], 0.0
    for attention in implementations:
        decoding = eqx.filter_jit(DecodingModel.from_decoder)(model, attention)
        slots = decoding.cache_slots(args.prompt_len + args.new_tokens)

        prefill = grouped_prefill(slots, args.group)

        hidden, cache = prefill(model, ids, mask)
        state = {"cache": cache}

        def decode_once(decoding=decoding, state=state):
            out, state["cache"] = decode(decoding, state["cache"])
            jax.block_until_ready(out)

        decode_s = median_time(decode_once, 20)
        weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(decoding.layers))
        cache_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state["cache"]))
        if attention == "pallas":
            cache_bytes = cache_bytes * (middle + 1) / slots
        table_rows.append(
            f"| decode step (layers only), {attention} attention | {decode_s * 1e3:.3f} | reads "
            f">= {weight_bytes / 1e9:.2f} GB weights + {cache_bytes / 1e9:.2f} GB cache: "
            f"{(weight_bytes + cache_bytes) / decode_s / 1e9:,.0f} GB/s |"
        )
        if attention == implementations[0]:
            prefill_s = median_time(lambda p=prefill: jax.block_until_ready(p(model, ids, mask)), 3)
            sample_s = median_time(
                lambda d=decoding, h=hidden: jax.block_until_ready(sample(d, h)), 20
            )
            total_s = prefill_s + args.new_tokens * (decode_s + sample_s)
            head_bytes = decoding.head.nbytes
            if args.trace is not None:
                write_trace(args.trace, decode, sample, decoding, state, hidden)
    if jax.default_backend() == "gpu":
        table_rows.insert(0, cudnn_prefill_row(model, ids, mask, args))
    return "\n".join(
        [
            "",
            "| gradflow part | ms | note |",
            "|---|---|---|",
            f"| prefill ({args.batch}x{args.prompt_len}, to {rows} rows) | {prefill_s * 1e3:.2f} | |",
            *table_rows,
            f"| logits + sampling step | {sample_s * 1e3:.3f} | reads >= "
            f"{head_bytes / 1e9:.2f} GB head: {head_bytes / sample_s / 1e9:,.0f} GB/s |",
            f"| prefill + {args.new_tokens} x ({implementations[0]} decode + sampling) | "
            f"{total_s * 1e3:.0f} | |",
        ]
    )


def grouped_prefill(slots: int, group: int):
    """A compiled prefill of `slots` cache slots whose hidden states and cache are copied to
    `group` rows per prompt (what `generate(group_size=group)` does before decoding)."""

    @eqx.filter_jit
    def prefill(model, ids, mask):
        hidden, cache = model.prefill(ids, mask, slots)
        return jnp.repeat(hidden, group, axis=0), cache.repeat(group)

    return prefill


def time_prefills(model, prompt_ids, args) -> str:
    """The prefill alone (filling the cache of the whole completion), the part `--group` changes:
    once per prompt and copied to its `G` rows, against once per row (blocked attention, and
    `[rows, heads, T, T]` attention at once)."""
    slots = args.prompt_len + args.new_tokens
    ids = jnp.asarray(prompt_ids)
    repeated = jnp.asarray(np.repeat(prompt_ids, args.group, axis=0))
    dense = dataclasses.replace(model, attention_impl="xla")
    cases = {
        f"once per prompt ({args.batch} rows), copied to {args.group} rows each": (
            grouped_prefill(slots, args.group),
            model,
            ids,
        ),
        f"once per row ({len(repeated)} rows)": (grouped_prefill(slots, 1), model, repeated),
        f"once per row ({len(repeated)} rows), dense attention": (
            grouped_prefill(slots, 1),
            dense,
            repeated,
        ),
    }
    lines = ["", "| prefill | median ms | time / first row's |", "|---|---|---|"]
    first = None
    for name, (prefill, m, rows) in cases.items():
        seconds = median_time(
            lambda p=prefill, m=m, r=rows: jax.block_until_ready(p(m, r, jnp.ones_like(r))),
            args.repeats,
        )
        first = first or seconds
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / first:.2f}x |")
    return "\n".join(lines)


def cudnn_prefill_row(model, ids, mask, args) -> str:
    """The prefill with cuDNN attention (`attention_impl="cudnn"`): its time, and how far its last
    hidden states and cached keys/values are from the XLA attention's (max |Δ| / max |x|)."""
    slots = args.prompt_len + args.new_tokens
    prefill = eqx.filter_jit(lambda m, i, k: m.prefill(i, k, slots))
    try:
        cudnn = dataclasses.replace(model, attention_impl="cudnn")
        seconds = median_time(lambda: jax.block_until_ready(prefill(cudnn, ids, mask)), 3)
        ours, reference = prefill(cudnn, ids, mask), prefill(model, ids, mask)
    except Exception as error:  # noqa: BLE001 (report any failure in the table)
        return f"| prefill, cuDNN attention | failed | {type(error).__name__}: {str(error)[:200]} |"
    errors = [
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        / float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True)
        if jnp.issubdtype(b.dtype, jnp.floating)
    ]
    return (
        f"| prefill, cuDNN attention | {seconds * 1e3:.2f} | largest relative difference from "
        f"XLA attention over hidden state and cache: {max(errors):.2e} |"
    )


def write_trace(folder: Path, decode, sample, decoding, state: dict, hidden) -> None:
    """A profiler trace of three decode + sampling steps, and both steps' compiled HLO."""

    def decode_once():
        out, state["cache"] = decode(decoding, state["cache"])
        jax.block_until_ready(out)

    record_trace(folder, decode_once, lambda: jax.block_until_ready(sample(decoding, hidden)))
    for name, fn, fn_args in (
        ("decode_step", decode, (decoding, state["cache"])),
        ("sample_step", sample, (decoding, hidden)),
    ):
        text = fn.lower(*fn_args).compile().compiled.as_text()
        (folder / f"{name}.hlo.txt.gz").write_bytes(gzip.compress(text.encode()))


def build_models(args, config_dict: dict, workdir: Path):
    """The gradflow model and (unless --skip-hf) the HF model, with identical random weights."""
    dtype = jnp.dtype(args.dtype)
    if args.skip_hf:
        model = init_from_config(config_dict, key=jax.random.key(args.seed), dtype=dtype)
        save_hf(model, workdir)  # round trip through the same loader as with HF weights
        return load_hf(workdir, dtype=dtype), None, None, None
    import torch
    import transformers

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = transformers.AutoConfig.for_model(**config_dict)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    with device:
        hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    hf_model.eval()
    hf_model.save_pretrained(workdir)
    return load_hf(workdir, dtype=dtype), hf_model, torch, device


def table(results: dict, args, config: ModelConfig, tokens: int) -> str:
    rows = [
        machine(),
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {args.dtype}, "
        f"threads {args.threads or 'default'}",
        f"model: {config.model_type} layers={config.num_layers} hidden={config.hidden_size} "
        f"heads={config.num_heads}/{config.num_kv_heads} vocab={config.vocab_size} "
        f"params={config.num_parameters / 1e6:.1f}M",
        f"batch={args.batch} prompts x group={args.group} prompt_len={args.prompt_len} "
        f"new_tokens={args.new_tokens} repeats={args.repeats} (median after 1 warm-up, runs "
        "interleaved)",
        "",
        "| implementation | first call s | compile s | median s | min s | tokens/s | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    rates = {name: tokens / r["median_s"] for name, r in results.items()}
    for name, result in results.items():
        median = result["median_s"]
        compile_s = f"{result['compile_s']:.2f}" if "compile_s" in result else "-"
        speedup = f"{rates[name] / rates['hf']:.1f}x" if "hf" in rates else "-"
        rows.append(
            f"| {name} | {result['first_s']:.2f} | {compile_s} | {median:.3f} | "
            f"{min(result['times_s']):.3f} | {rates[name]:,.0f} | {speedup} |"
        )
    if "hf" in rates:
        rows.append(f"\ngradflow / HF: {rates['gradflow'] / rates['hf']:.2f}x")
    for name in rates:
        if name.startswith(("gradflow, per-row", "gradflow, LoRA")):
            rows.append(f"gradflow / {name}: {rates['gradflow'] / rates[name]:.2f}x")
    if args.roofline:
        rows.append(
            f"roofline: {rates['gradflow']:,.0f} / {args.roofline:,.0f} tokens/s = "
            f"{rates['gradflow'] / args.roofline:.1%}"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0 and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[: args.threads]
        os.sched_setaffinity(0, cpus)
    config_dict = hf_config_dict(args)
    config = ModelConfig.from_hf(config_dict)
    rng = np.random.default_rng(args.seed)
    prompt_ids = rng.integers(0, config.vocab_size, (args.batch, args.prompt_len), dtype=np.int32)
    tokens = args.batch * args.group * args.new_tokens

    with tempfile.TemporaryDirectory() as tmp:
        model, hf_model, torch, device = build_models(args, config_dict, Path(tmp))

    runners = {"gradflow": gradflow_runner(model, prompt_ids, args, args.group)}
    if args.group > 1:
        repeated = np.repeat(prompt_ids, args.group, axis=0)
        runners["gradflow, per-row prefill"] = gradflow_runner(model, repeated, args, 1)
        dense = dataclasses.replace(model, attention_impl="xla")
        runners["gradflow, per-row prefill, dense attention"] = gradflow_runner(
            dense, repeated, args, 1
        )
    if args.lora:
        policy = model.with_lora(args.lora, 2 * args.lora, key=jax.random.key(args.seed + 1))
        runners[f"gradflow, LoRA r={args.lora}"] = gradflow_runner(
            policy, prompt_ids, args, args.group
        )
    if hf_model is not None:
        runners["hf"] = hf_runner(hf_model, prompt_ids, args, torch, device)
    results = measure(runners, args.repeats)

    text = table(results, args, config, tokens)
    if args.group > 1:
        text += "\n" + time_prefills(model, prompt_ids, args)
    if args.parts:
        text += "\n" + time_parts(model, prompt_ids, args)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"rollout_{jax.default_backend()}_{args.dtype}_b{args.batch}_g{args.group}"
        (args.out / f"{stem}.md").write_text(text + "\n")
        record = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}
        (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
