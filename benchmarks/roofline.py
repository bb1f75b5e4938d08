"""The card's own decode roofline: measures the device's copy bandwidth (a large on-device copy,
bytes read plus written) and divides it by the bytes one decode step must read (the bfloat16
weights plus the KV cache in use, on average over the decode), giving ideal tokens/s.

    python benchmarks/roofline.py --config CONFIG.json --batch 256 --prompt-len 128 --new-tokens 256

Prints one table and, last, the roofline in tokens/s alone on its line (what `gpu.sh` passes to
`benchmarks/rollout.py --roofline`).
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp


def copy_bandwidth(gigabytes: float = 4.0, repeats: int = 10) -> float:
    """Bytes per second of an on-device copy (read + write), the median of `repeats`.

    **Arguments:**

    - `gigabytes`: the size of the array copied.
    - `repeats`: timed copies after one warm-up.

    **Returns:**

    Bytes per second.
    """
    x = jnp.ones((int(gigabytes * 2**30) // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 0.0)
    copy(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / sorted(times)[len(times) // 2]


def step_bytes(config: dict, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """Bytes one decode step reads in bfloat16: the weights, and the KV cache in use (the mean
    context over the decode).

    **Arguments:**

    - `config`: an HF `config.json`.
    - `batch`, `prompt_len`, `new_tokens`: the decode's shape.

    **Returns:**

    `(weight bytes, KV-cache bytes)`.
    """
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim", hidden // heads)
    vocab, inter = config["vocab_size"], config["intermediate_size"]
    attention = hidden * head_dim * (heads * 2 + kv_heads * 2)
    per_layer = attention + 3 * hidden * inter + 2 * hidden
    head = 0 if config.get("tie_word_embeddings", False) else vocab * hidden
    weights = 2 * (layers * per_layer + vocab * hidden + head)
    context = prompt_len + new_tokens / 2
    kv = 2 * layers * 2 * kv_heads * head_dim * batch * context
    return float(weights), float(kv)


def main() -> None:
    """Measures and prints the roofline."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--gigabytes", type=float, default=4.0, help="size of the timed copy")
    args = parser.parse_args()
    bandwidth = copy_bandwidth(args.gigabytes)
    weights, kv = step_bytes(
        json.loads(args.config.read_text()), args.batch, args.prompt_len, args.new_tokens
    )
    roofline = bandwidth / (weights + kv) * args.batch
    print("| device | copy bandwidth | weights | KV cache in use | roofline |")
    print("|---|---|---|---|---|")
    print(
        f"| {jax.devices()[0].device_kind} | {bandwidth / 1e9:,.0f} GB/s | {weights / 1e9:.2f} GB "
        f"| {kv / 1e9:.2f} GB | {roofline:,.0f} tokens/s |"
    )
    print(f"{roofline:.0f}")


if __name__ == "__main__":
    main()
