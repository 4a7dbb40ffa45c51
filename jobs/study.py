"""`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/study.py
--config configs/study_architectures.yaml [--set k=v ...] [--resume]`."""

import sys
from pathlib import Path

# Python puts jobs/ on sys.path, not the working dir: add the repo root so an uploaded working_dir
# runs without the package being pip-installed on the cluster.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgcls_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
