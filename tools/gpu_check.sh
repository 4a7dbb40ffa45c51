#!/usr/bin/env bash
# The GPU check: the device-path tests and the GPU benchmark (docs/benchmarks.md, "GPU check").
#
# Needs: an NVIDIA GPU with its driver (nvidia-smi), torch and torchvision built with CUDA, and this project
# installed (`make venv`, or `pip install -e .[dev]`); Ray is not used. Uses .venv/bin/python when there is
# one, else python3. Run from the repository root:
#   bash tools/gpu_check.sh [arguments for python -m benchmarks.gpu_bench ...]
#
# Writes, under $OUT (default ./gpu_check_out):
#   versions.txt     GPU, memory, driver, CPU count, torch / torchvision / Pillow / CUDA versions
#   pytest_cuda.txt  the device-path tests: device decode (nvJPEG vs the CPU decoder), pinned double-buffered
#                    copies, the predictor on CUDA vs CPU (the CUDA-only tests skip where there is no GPU)
#   gpu_bench.json   every row of the bench, written as soon as it is measured
#   gpu_bench.txt    the bench's printed output
# The bench starts no new section after BENCH_SECONDS (default 300). A CPU dry run of the whole script:
#   bash tools/gpu_check.sh --device cpu --batch 2 --size 32 --warmup 0 --iters 1
set -uo pipefail
[ -f tools/gpu_check.sh ] || { echo "run this from the repository root" >&2; exit 2; }
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  "$PY" -c 'import torch, torchvision, PIL; print("torch", torch.__version__, "torchvision", torchvision.__version__, "pillow", PIL.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$OUT/versions.txt"
"$PY" -m pytest -q -p no:cacheprovider -o addopts= tests/unit/test_device_decode.py \
  tests/unit/test_infer_device_feed.py "tests/unit/test_infer_predictor.py::test_cuda_predictor_gives_the_cpu_predictors_probabilities_within_bf16" 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -30
tests=$?
"$PY" -m benchmarks.gpu_bench --out "$OUT/gpu_bench.json" --max-seconds "${BENCH_SECONDS:-300}" "$@" 2>&1 \
  | tee "$OUT/gpu_bench.txt"
bench=$?
echo "wrote $OUT/versions.txt, pytest_cuda.txt, gpu_bench.json, gpu_bench.txt (tests: exit $tests, bench: exit $bench)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
