"""The function Ray Train runs in each worker, kept in a module that imports nothing.

Train pickles the train function by reference and unpickles it in its controller process as well as in the
workers; the controller never calls it. With the loop's module as the reference, every controller would import
torchvision, albumentations and accelerate for nothing (train/row_group.py removed the other such import;
py-spy afterwards: the controller's only heavy import is Ray's own ray.train.torch -> torch). The workers
import the loop when they run it.
"""

from __future__ import annotations


def train_loop_per_worker(loop_config: dict) -> None:
    from imgcls_dist.train.loop import train_loop_per_worker as loop  # the worker's import, see above

    loop(loop_config)
