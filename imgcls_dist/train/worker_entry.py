"""The function Ray Train runs in each worker, kept in a module that imports nothing.

Train pickles the train function by reference and unpickles it in its controller process as well as in the
workers; the controller never calls it. With the loop's module as the reference, every controller imported
torchvision, albumentations and accelerate for nothing: its `__init__` took 3.9 s of a 2-CPU machine per run
(measured with a process watcher on a 1-epoch lenet5 run). The workers import the loop when they run it.
"""

from __future__ import annotations


def train_loop_per_worker(loop_config: dict) -> None:
    from imgcls_dist.train.loop import train_loop_per_worker as loop  # the worker's import, see above

    loop(loop_config)
