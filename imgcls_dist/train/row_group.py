"""One Parquet row group of the training input, as the driver plans it and ships it to every Train process.

In a module of its own that imports nothing: Train unpickles the loop config, which holds these, in its
controller process too. With the class in train/stream.py every controller imported albumentations and torch
for it: 3.4 s of the controller's 3.9 s `__init__` per run on a 2-CPU machine (py-spy of a 1-epoch run).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowGroup:
    file: str  # URI
    index: int  # row group index within the file
    rows: int
    first_id: int  # global sample id of its first row (row groups numbered in file order)
