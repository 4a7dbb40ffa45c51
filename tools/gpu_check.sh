#!/usr/bin/env bash
# Run on the lent GPU machine, from the repo root, with `.whl` carried (tools/gpu_wheels.sh makes it):
#   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The device-path tests first (device decode, pinned copies, the predictor; their CUDA-only tests run there), then
# `bench gpu`, which starts no new section after BENCH_SECONDS and has written every row it measured to
# $OUT/gpu_bench.json.
# Arguments go to the bench (a CPU dry run here: PATH=.venv/bin:$PATH bash tools/gpu_check.sh --device cpu
# --batch 2 --size 32 --warmup 0 --iters 1, with .whl moved aside: its wheels are for the machine's Python 3.12).
set -uo pipefail
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c 'import torch, torchvision, PIL; print("torch", torch.__version__, "torchvision", torchvision.__version__, "pillow", PIL.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$OUT/versions.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts= tests/unit/test_device_decode.py \
  tests/unit/test_infer_device_feed.py "tests/unit/test_infer_predictor.py::test_cuda_predictor_gives_the_cpu_predictors_probabilities_within_bf16" 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -30
python3 -m benchmarks.gpu_bench --out "$OUT/gpu_bench.json" --max-seconds "${BENCH_SECONDS:-300}" "$@" 2>&1 \
  | tee "$OUT/gpu_bench.txt"
