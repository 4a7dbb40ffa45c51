"""`ray job submit --working-dir . -- python jobs/train.py --config configs/x.yaml [--set k=v ...]`."""

import sys

from imgcls_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
