#!/usr/bin/env bash
# GPU benchmarks (prepared for an H100) on the Qwen2-1.5B-Instruct shape with random weights:
# rollout throughput, gradflow vs HF generate, both in bfloat16, in the same run; then a whole
# GRPO step of gradflow (see the second part below).
#
#   bash benchmarks/gpu.sh            # from the repository root; OUT=dir also keeps the tables
#                                     # (.md, .json) there, and a profiler trace + HLO in OUT/trace
#   PARTS=step bash benchmarks/gpu.sh # only the whole-step benchmark (PARTS=rollout: only rollout;
#                                     # PARTS=flags: only gradflow's rollout under XLA flag variants;
#                                     # PARTS=delivery: the 100-step GSM8K run at the 0.5B shape;
#                                     # PARTS=group: one prefill per prompt against a prefill per
#                                     # row and against HF num_return_sequences;
#                                     # PARTS=update: the update phase, packed vs padded)
#
# Prints the tables and gradflow's fraction of the card's own decode roofline, measured in the
# same run (benchmarks/roofline.py: the copy bandwidth over the bytes a decode step reads). The
# rollout and step benchmarks import only gradflow.models and gradflow.rollout (jax, equinox,
# jaxtyping, safetensors, numpy) plus torch/transformers for the baseline. The delivery run
# needs what the device image lacks (wandb, datasets, pebble, ...): `bash benchmarks/gpu_wheels.sh`
# here puts their wheels in .whl/, which this script installs when it is there (carry ".whl").
set -euo pipefail
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false # share the GPU with torch
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
PARTS="${PARTS:-delivery rollout group step flags update}" # which benchmarks to run
if [[ -d .whl ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__, torch.cuda.is_available())'

# Runs a benchmark command, with `--out "$OUT"` when OUT is set.
keeping_tables() {
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    "$@" --out "$OUT"
  else
    "$@"
  fi
}

# TINY=1 swaps in tiny shapes for both parts (to check the script on a CPU).
if [[ "${TINY:-0}" == 1 ]]; then
  args=(--vocab 1024 --batch 8 --prompt-len 16 --new-tokens 16)
else
  shape=(--config src/gradflow/assets/qwen2/qwen2-1.5b-instruct.config.json
    --batch 256 --prompt-len 128 --new-tokens 256)
  echo
  roofline=$("$PYTHON" benchmarks/roofline.py "${shape[@]}" | tee /dev/stderr | tail -1)
  args=("${shape[@]}" --roofline "$roofline")
fi
args+=(--dtype bfloat16 --repeats 3 --threads 0)
plain_args=("${args[@]}")
# --parts: also prefill, one decode step and one sampling step alone, with achieved bandwidth.
args+=(--parts)
# --lora 32: also the policy with rank-32 adapters on every projection, decoded as trained (the
# adapters a separate term; the plain row is what merged adapters cost).
if [[ " $PARTS " == *" rollout "* ]]; then
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    "$PYTHON" benchmarks/rollout.py "${args[@]}" --lora 32 --out "$OUT" --trace "$OUT/trace"
  else
    "$PYTHON" benchmarks/rollout.py "${args[@]}" --lora 32
  fi
fi

# G completions per prompt (the Qwen2.5-1.5B shape is Qwen2-1.5B's: 28 layers, hidden 1536,
# 12/2 heads, tied 151,936 vocabulary): 32 prompts x 8 samples, 512-token prompts, 64 new
# tokens; gradflow's generate(group_size=8) (one prefill per prompt) against the prompts
# repeated 8 times (a prefill per row, blocked and dense attention) and HF
# generate(num_return_sequences=8), in the same run.
if [[ "${TINY:-0}" == 1 ]]; then
  group_args=(--vocab 1024 --batch 2 --group 4 --prompt-len 32 --new-tokens 8)
else
  group_args=(--config src/gradflow/assets/qwen2/qwen2-1.5b-instruct.config.json
    --batch 32 --group 8 --prompt-len 512 --new-tokens 64)
fi
group_args+=(--dtype bfloat16 --repeats 3 --threads 0 --parts)
if [[ " $PARTS " == *" group "* ]]; then
  keeping_tables "$PYTHON" benchmarks/rollout.py "${group_args[@]}"
fi

# Whole GRPO step (rollout + reward + update, one compiled step) of gradflow alone, on the same
# shape: 64 prompts x 8 samples x 256 new tokens, random 128-token prompts, a cheap host reward,
# float32 parameters with bfloat16 compute, rematerialisation saving matmul outputs ("dots") and 8 micro-batches in the
# update. benchmarks/step.py --synthetic imports neither datasets nor transformers. Prints step
# time, generated tokens/s, update tokens/s (step minus the rollout timed alone) and the update's
# MFU by 6·N·tokens against 784 TFLOP/s.
if [[ "${TINY:-0}" == 1 ]]; then
  step_args=(--vocab 1024 --prompts 4 --group 4 --prompt-len 16 --new-tokens 16 --logprob-chunk 8)
else
  step_args=(--config src/gradflow/assets/qwen2/qwen2-1.5b-instruct.config.json
    --prompts 64 --group 8 --prompt-len 128 --new-tokens 256 --logprob-chunk 64)
fi
step_args+=(--synthetic --dtype float32 --compute-dtype bfloat16 --remat dots --micro-batches 8
  --steps 3 --threads 0 --peak-tflops 784)
if [[ " $PARTS " == *" step "* ]]; then
  keeping_tables "$PYTHON" benchmarks/step.py "${step_args[@]}"
fi

# The delivery run: pipelines/run.py on GSM8K at the Qwen2.5-0.5B shape (random weights), 100
# steps, W&B offline; a table of the exit status, tracebacks, steps logged, the algorithm read
# back from the W&B record, the median step time and generated tokens/s.
if [[ " $PARTS " == *" delivery "* ]]; then
  echo
  delivery=(--steps 100)
  [[ "${TINY:-0}" == 1 ]] && delivery=(--steps 3 --tiny)
  "$PYTHON" benchmarks/delivery.py "${delivery[@]}" ${OUT:+--out "$OUT"} || true
fi

# gradflow's rollout alone under XLA GPU flag variants (each in a fresh process: XLA reads its
# flags once): cuBLAS instead of Triton for every matmul (the q/k/v projection ran as a Triton
# split-K gemm), no CUDA command buffers, cuBLASLt. One table row per variant.
if [[ " $PARTS " == *" flags "* ]]; then
  echo
  echo "| XLA_FLAGS | compile s | median s | tokens/s |"
  echo "|---|---|---|---|"
  for flags in "" "--xla_gpu_enable_triton_gemm=false" "--xla_gpu_enable_command_buffer=" \
    "--xla_gpu_enable_cublaslt=true"; do
    row=$(XLA_FLAGS="$flags" "$PYTHON" benchmarks/rollout.py "${plain_args[@]}" --skip-hf \
      2>/dev/null | grep '^| gradflow ' || echo '| gradflow | - | failed | | | | |')
    IFS='|' read -r _ _ _ compile median _ tokens _ <<<"$row"
    echo "| \`${flags:-(none)}\` | ${compile// /} | ${median// /} | ${tokens// /} |"
  done
fi

# The update phase of one GRPO step (reference log-probs and the micro-batch scan, no rollout),
# packed (algorithm.packing = true) against padded in the same run, with the gradient gap: the
# Qwen2.5-1.5B shape (Qwen2-1.5B's config: the same layers), GSM8K-like spreads (160-token
# prompts, completions uniform over 10-100 % of 512 tokens), 32 prompts x 8 samples in 16
# micro-batches, bfloat16 compute, "dots" rematerialisation.
if [[ "${TINY:-0}" == 1 ]]; then
  update_args=(--vocab 1024 --prompts 4 --group 4 --prompt-len 16 --new-tokens 16
    --micro-batches 2)
else
  update_args=(--config src/gradflow/assets/qwen2/qwen2-1.5b-instruct.config.json --vocab 151936
    --prompts 32 --group 8 --prompt-len 160 --new-tokens 512 --micro-batches 16
    --logprob-chunk 64)
fi
update_args+=(--min-fraction 0.1 --dtype float32 --compute-dtype bfloat16 --remat dots --repeats 3)
if [[ " $PARTS " == *" update "* ]]; then
  "$PYTHON" benchmarks/update.py "${update_args[@]}"
fi
