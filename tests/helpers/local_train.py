"""Test helper (no tests here): the real training loop in Ray Train V2's local mode, in the test's process."""

from __future__ import annotations

import shutil
from pathlib import Path

from imgcls_dist.models.checkpoint import load_model_file
from imgcls_dist.train.job import build_trainer, resolve_dataset, resolve_epochs


def fit_in_process(cfg, monkeypatch, keep: Path) -> tuple[list[dict], dict]:
    """The real train_loop_per_worker in Ray Train V2's local mode (num_workers=0: in this process, a fraction
    of the set-up time of Train's controller and worker start-up; docs/benchmarks.md, "Test suite"), for tests
    of what the loop does; Train's worker machinery has the tests that run real Train workers (test_train_e2e.py).
    -> (history, model file of the last checkpoint).
    Local mode keeps only the last reported Checkpoint object, whose directory the loop deletes after the report,
    so each reported checkpoint is copied into `keep` on its way to Train's real `report`."""
    import ray.train

    from imgcls_dist.train.state import load_history

    real = ray.train.report

    def report(metrics, checkpoint=None, **kw):
        if checkpoint is not None:
            shutil.copytree(checkpoint.path, keep, dirs_exist_ok=True)
        return real(metrics, checkpoint=checkpoint, **kw)

    monkeypatch.setattr(ray.train, "report", report)
    ds = resolve_dataset(cfg)
    cfg = resolve_epochs(cfg, ds["train_rows"], num_workers=1)  # as every driver does before it builds the trainer
    build_trainer(cfg, ds, num_workers=0, use_gpu=False).fit()
    return load_history(keep), load_model_file(keep / "model.pt")
