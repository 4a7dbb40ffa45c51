"""Checkpoints and reports of a Train worker: at the end of every epoch, and every
`train.checkpoint_every_steps` optimizer steps inside one.

Retention (`run.keep_checkpoints` best by val_acc): a mid-epoch checkpoint has no validation of its own, so it
reports `val_acc = -1`, below every real accuracy. Ray Train keeps the k best epoch checkpoints and, always,
the latest one: so a mid-epoch checkpoint lives exactly until the next checkpoint, never counts as a best
model, and the exported model.pt is always a validated epoch's. Tune's relay skips mid-epoch reports
(`mid_epoch = 1`), so ASHA only ever compares whole epochs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from imgcls_dist.train.distributed import all_gather_list
from imgcls_dist.train.setup import NonFiniteLossError, WorkerRun
from imgcls_dist.train.state import MID_EPOCH, MID_EPOCH_VAL_ACC, EpochStats, save_training_checkpoint

TB_METRICS = ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s")


def save_checkpoint(run: WorkerRun, directory: Path, *, epoch: int, step: int = 0, val: dict | None = None,
                    partial: list[dict] | None = None, ema_exported: bool = False) -> None:
    """Rank 0: model file + resume state + history. `step` > 0: inside epoch `epoch`, after `step` batches,
    with every rank's partial epoch totals. `ema_exported`: the model file holds the EMA weights (they
    validated better), and the raw ones go into the resume state."""
    raw = run.accelerator.unwrap_model(run.model).state_dict()
    state = run.ema.module.state_dict() if ema_exported else raw
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise NonFiniteLossError(f"model weights became non-finite at epoch {epoch}; no checkpoint written")
    ds = run.dataset
    meta = dict(arch=run.cfg.model.arch, classes=ds["classes"], in_channels=run.cfg.data.in_channels,
                image_size=ds["image_size"], mean=run.mean, std=run.std, config=run.experiment, hflip=ds["hflip"],
                metrics={**(val or {}), "epoch": epoch})
    scaler = run.accelerator.scaler
    train_state = {"epoch": epoch, "step": step, "partial": partial or [],
                   "progress": run.sampler.progress(step).to_state() if step else None,
                   "optimizer": run.optimizer.state_dict(),
                   "schedule": run.schedule.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                   "nonfinite_total": run.nonfinite_total, "consecutive_bad": run.consecutive_bad,
                   "raw_model": raw if ema_exported else None,
                   "ema": run.ema.module.state_dict() if run.ema is not None else None, "ema_updates": run.ema_updates}
    save_training_checkpoint(directory, model_state=state, model_meta=meta, train_state=train_state,
                             history=run.history)


def _print_epoch(run: WorkerRun, m: dict[str, Any]) -> None:
    ema = f"  (raw {m['raw_val_acc']:.4f}, ema {m['ema_val_acc']:.4f})" if "ema_val_acc" in m else ""
    print(f"epoch {m['epoch'] + 1}/{run.cfg.train.epochs}  loss {m['train_loss']:.4f}  acc {m['train_acc']:.4f}  "
          f"val_loss {m['val_loss']:.4f}  val_acc {m['val_acc']:.4f}{ema}  lr {m['lr']:.3g}  size {m['image_size']}  "
          f"{m['images_per_s']:.0f} img/s", flush=True)


def report_epoch(run: WorkerRun, metrics: dict[str, Any]) -> None:
    """Console line and TensorBoard (rank 0), then the epoch's report to Train with rank 0's checkpoint."""
    import ray.train

    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if run.rank != 0:
        ray.train.report(scalars, checkpoint=None)
        return
    _print_epoch(run, metrics)
    if run.tensorboard is not None:
        run.tensorboard.scalars({k: metrics[k] for k in TB_METRICS}, metrics["epoch"])
        run.tensorboard.flush()
    with tempfile.TemporaryDirectory() as tmp:
        ema_exported = bool(metrics.get("ema_exported"))
        val = {"val_acc": metrics["val_acc"], "val_loss": metrics["val_loss"]}
        if run.ema is not None:
            val["ema_weights"] = float(ema_exported)  # the model file's metrics are numbers
        save_checkpoint(run, Path(tmp), epoch=metrics["epoch"], val=val, ema_exported=ema_exported)
        ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def checkpoint_mid_epoch(run: WorkerRun, epoch: int, step: int, stats: EpochStats) -> None:
    """Every rank's totals so far go into rank 0's checkpoint; all ranks report (Train needs every one)."""
    import ray.train

    partial = all_gather_list(stats.to_state(), run.world)
    scalars = {"epoch": epoch, "step": step, MID_EPOCH: 1, "val_acc": MID_EPOCH_VAL_ACC}
    if run.rank != 0:
        ray.train.report(scalars, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(run, Path(tmp), epoch=epoch, step=step, partial=partial)
        ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(tmp))
