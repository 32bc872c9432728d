#!/usr/bin/env bash
# The GPU numbers of benchmarks/README.md ("On a GPU") in one go, sized for a short loan of a GPU:
# each benchmark under its own time limit, its output kept in OUT_DIR/gpu-<name>.txt even when
# the limit cuts it short.
#
#   benchmarks/gpu_numbers.sh [OUT_DIR]        # default: $SKINDIFF_BENCH_DIR or /tmp/skindiff-bench
#
# MODEL, RESOLUTION, PRECISION and CLASSIFIER_IMAGES override the full-size defaults (a dry run
# on a CPU: MODEL=tiny RESOLUTION=0 PRECISION=no CLASSIFIER_IMAGES=64).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${SKINDIFF_BENCH_DIR:-/tmp/skindiff-bench}}
model=${MODEL:-sd21-random}
resolution=${RESOLUTION:-512}
precision=${PRECISION:-bf16}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} | tee "$out/gpu-device.txt"

bench() {  # bench NAME SECONDS ARGS...: one benchmark, cut at SECONDS
  local name=$1 limit=$2
  shift 2
  echo "== benchmarks.$name $* (limit ${limit} s)"
  timeout "$limit" python3 -m "benchmarks.$name" "$@" 2>&1 | grep -v -e "it/s]" -e "Loading" \
    | tee "$out/gpu-$name.txt"
}

# 16 sources make 80 images: batches of 16 only, so the compiled UNet meets one shape; the
# second round shows it compiled from the cache.
# Limits: 590 s in all, inside one 10-minute command. Most important first.
bench generation 300 --base-model "$model" --resolution "$resolution" --sources 16 \
  --mixed-precision "$precision" --repeats 2 --compile
# 24 images, each drawn as often as in the paper's runs (fewer steps would not repay the
# up-front encoding, as the paper's runs do).
bench training_steps 190 --base-model "$model" --resolution "$resolution" --images 24 \
  --mixed-precision "$precision" --repeats 1
bench classifier_epoch 100 --arch vgg16 --images "${CLASSIFIER_IMAGES:-4096}"

# What the benchmarks wrote for the docs (docs/generated/<name>-cuda.md), beside their output.
cp docs/generated/*-cuda.md "$out"/ 2>/dev/null || echo "no docs/generated/*-cuda.md written"
