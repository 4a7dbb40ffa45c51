"""root_cause: the one line a user sees when a Ray-wrapped job fails."""

from __future__ import annotations

from imgcls_dist.errors import root_cause


class _TrainingFailed(Exception):
    """Shaped like Ray Train V2's TrainingFailedError: failures per worker rank."""

    def __init__(self, failures: dict):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


def test_follows_worker_failures_and_cause_chain():
    original = ValueError("label 12 out of range in shard-00003.parquet")
    remote = RuntimeError("Traceback (most recent call last):\n  File x\nValueError: label 12 out of range")
    remote.__cause__ = original
    assert root_cause(_TrainingFailed({0: remote})) == "label 12 out of range in shard-00003.parquet"


def test_last_line_without_ansi_and_truncated():
    e = RuntimeError("\x1b[36mray::MapBatches\x1b[0m\nTraceback ...\n\x1b[31mOSError: disk full\x1b[0m\n\n")
    assert root_cause(e) == "OSError: disk full"
    assert len(root_cause(RuntimeError("x" * 1000), limit=50)) == 50
    assert root_cause(KeyError()) == "KeyError"
