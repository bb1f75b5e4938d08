#!/usr/bin/env bash
# Downloads into .whl/ the wheels the device image lacks for benchmarks/gpu.sh's delivery run
# (Python 3.12, manylinux x86-64): wandb and its needs, datasets and its needs, pebble, beartype,
# tomli-w, math-verify. Run here, from the repository root, before a device call that carries
# ".whl" (`.whl/` is in .gitignore).
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl wandb gitpython gitdb smmap sentry-sdk platformdirs pydantic \
  pydantic-core annotated-types typing-inspection datasets dill multiprocess pebble beartype \
  tomli-w math-verify latex2sympy2_extended antlr4-python3-runtime==4.13.2
du -sh .whl
