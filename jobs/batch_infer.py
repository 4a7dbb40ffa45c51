"""`ray job submit --working-dir . -- python jobs/batch_infer.py --models ... --input ... --output ...`.

Same code path as `imgcls-dist infer`. The repository root goes on sys.path because Python puts the
script's directory (jobs/) there, not the working directory: the job then runs from an uploaded
working_dir without the package being pip-installed on the cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgcls_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
