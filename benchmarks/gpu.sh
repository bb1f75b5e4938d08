#!/usr/bin/env bash
# GPU benchmarks (prepared for an H100) on the Qwen2-1.5B-Instruct shape with random weights:
# rollout throughput, gradflow vs HF generate, both in bfloat16, in the same run; then a whole
# GRPO step of gradflow (see the second part below).
#
#   bash benchmarks/gpu.sh            # from the repository root; OUT=dir also keeps the tables
#                                     # (.md, .json) there, and a profiler trace + HLO in OUT/trace
#   PARTS=step bash benchmarks/gpu.sh # only the whole-step benchmark (PARTS=rollout: only rollout;
#                                     # PARTS=flags: only gradflow's rollout under XLA flag variants)
#
# Prints the tables and gradflow's fraction of the 155,000 tokens/s roofline. The benchmark imports
# only gradflow.models and gradflow.rollout (jax, equinox, jaxtyping, safetensors, numpy) plus
# torch/transformers for the baseline, so beartype/wandb/datasets need not be installed.
set -euo pipefail
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false # share the GPU with torch
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
PARTS="${PARTS:-rollout step flags}" # which benchmarks to run

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__, torch.cuda.is_available())'

# TINY=1 swaps in tiny shapes for both parts (to check the script on a CPU).
if [[ "${TINY:-0}" == 1 ]]; then
  args=(--vocab 1024 --batch 8 --prompt-len 16 --new-tokens 16)
else
  args=(--config src/gradflow/assets/qwen2/qwen2-1.5b-instruct.config.json
    --batch 256 --prompt-len 128 --new-tokens 256 --roofline 155000)
fi
args+=(--dtype bfloat16 --repeats 3 --threads 0)
plain_args=("${args[@]}")
# --parts: also prefill, one decode step and one sampling step alone, with achieved bandwidth.
args+=(--parts)
if [[ " $PARTS " == *" rollout "* ]]; then
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    "$PYTHON" benchmarks/rollout.py "${args[@]}" --out "$OUT" --trace "$OUT/trace"
  else
    "$PYTHON" benchmarks/rollout.py "${args[@]}"
  fi
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
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    "$PYTHON" benchmarks/step.py "${step_args[@]}" --out "$OUT"
  else
    "$PYTHON" benchmarks/step.py "${step_args[@]}"
  fi
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
