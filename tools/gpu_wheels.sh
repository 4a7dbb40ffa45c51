#!/usr/bin/env bash
# Run here (not on the device): downloads into .whl/ the Python 3.12 wheels of what `tools/gpu_check.sh` needs
# and the lent GPU machine's image lacks (its package list: /work/.library/device/KINDS.md; it has torch,
# torchvision, numpy, pillow, opencv, pyarrow, scipy, pyyaml, scikit-learn, pytest, but not albumentations, which
# the decode arm's CPU path and the device-decode tests import, nor its pydantic). Versions as in our .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
pins=$(.venv/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE \
  '^(albumentations|albucore|simsimd|stringzilla|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions)==')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
ls .whl
