"""TensorBoard events of a run, written by rank 0 into <run>/tensorboard/ on any filesystem.

tensorboardX writes local files only (its own S3 path uses boto3 with other settings than ours), so for an
object store the events go to a local directory first and are uploaded on every flush: the bucket then
holds the events up to the last epoch even if the node dies later.
"""

from __future__ import annotations

import shutil
import tempfile

from imgcls_dist.storage import location


class TensorBoardLog:
    def __init__(self, dest: str):
        from tensorboardX import SummaryWriter

        self.dest = location(dest)
        self._tmp = None if self.dest.is_local else tempfile.mkdtemp(prefix="tb-")
        self.writer = SummaryWriter(self.dest.mkdir().path if self._tmp is None else self._tmp)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        self.writer.flush()
        if self._tmp is not None:
            self.dest.upload(self._tmp)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
