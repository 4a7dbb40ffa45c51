"""One Parquet row group of the training input, as the driver plans it and ships it to every Train process.

In a module of its own that imports nothing: Train unpickles the loop config, which holds these, in its
controller process too: with the class in train/stream.py every controller imported albumentations and torch
for it, most of the controller's start-up (docs/benchmarks.md, "Process start-up").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowGroup:
    file: str  # URI
    index: int  # row group index within the file
    rows: int  # rows of the group the input takes
    first_id: int  # global sample id of its first row taken (row groups numbered in file order)
    # A subset's rows of the group (`train/subset.py`): their positions in it, as int32 bytes (4 bytes a row
    # shipped to every worker, not a Python int each); None: its first `rows` rows.
    picks: bytes | None = None
