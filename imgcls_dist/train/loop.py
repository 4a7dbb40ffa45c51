"""The per-worker training loop: Ray Train runs it in each worker, accelerate does the device work.

Shaped like torchvision's references/classification/train.py: `setup` (train/setup.py: model, optimizer,
schedule, streamed data, restored from the latest checkpoint when there is one), then per epoch
`train_one_epoch`, `evaluate`, `epoch_metrics` (the cross-worker totals) and `report_epoch`
(train/checkpointing.py: console, TensorBoard, checkpoint).

`ray.train.torch.prepare_model/prepare_data_loader` are deliberately not used: accelerate owns DDP
wrapping, mixed precision and gradient accumulation (Ray only starts the workers and the process group).
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import replace
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from imgcls_dist.data.augment import train_transform_for
from imgcls_dist.data.seeds import derive_seed
from imgcls_dist.models.preprocess import normalize
from imgcls_dist.models.transfer import freeze_bn_stats
from imgcls_dist.train.checkpointing import checkpoint_mid_epoch, report_epoch
from imgcls_dist.train.distill import distillation_loss
from imgcls_dist.train.distributed import all_gather_list
from imgcls_dist.train.early_stop import should_stop
from imgcls_dist.train.precise_bn import recalibrate_bn
from imgcls_dist.train.preempt import StepSignals
from imgcls_dist.train.progress import EpochProgress
from imgcls_dist.train.setup import NonFiniteLossError, WorkerRun, setup
from imgcls_dist.train.state import EpochStats, count_unique


def size_for_epoch(phases: list[tuple[int, int]] | list[list[int]], epoch: int, default: int) -> int:
    size = default
    for start, s in phases:
        if epoch >= start:
            size = s
    return size


def start_epoch(run: WorkerRun, epoch: int, first_step: int = 0) -> int:
    """Input size and transform of the epoch's phase; the stream positioned at batch `first_step`."""
    size = size_for_epoch(run.cfg.train.progressive_resizing, epoch, run.dataset["image_size"])
    transform = None
    if size != run.transform_size:
        # Same model, new input size: only the CPU-side transform changes (the nets are fully conv +
        # adaptive pooling), so phases switch without rebuilding or re-wrapping anything.
        transform = train_transform_for(run.cfg.augment, size, hflip=run.dataset["hflip"], seed=run.cfg.train.seed)
        run.transform_size = size
    run.train_dataset.set_epoch(epoch, transform, size if transform is not None else None)
    run.sampler.set_epoch(epoch, rest=run.rest if epoch == run.start_epoch else None)
    run.sampler.skip = sum(run.sampler.sizes()[:first_step])
    return size


def _loss(run: WorkerRun, logits: torch.Tensor, targets: torch.Tensor, teacher_probs: torch.Tensor | None):
    t = run.cfg.train
    if teacher_probs is None:
        return F.cross_entropy(logits, targets, weight=run.class_weight, label_smoothing=t.label_smoothing)
    return distillation_loss(logits, targets, teacher_probs, temperature=t.distill_temperature,
                             alpha=t.distill_alpha, weight=run.class_weight, label_smoothing=t.label_smoothing)


def _inputs(run: WorkerRun, images: torch.Tensor, labels: torch.Tensor, empty: bool):
    """(normalized input, targets, teacher probabilities or None) of a uint8 batch. MixUp/CutMix mix the
    pixels before normalizing (the same images, as both are linear per channel), so the teacher sees exactly
    the mixed images the student sees."""
    targets = labels.clamp(min=0)
    pixels = images
    if run.mix is not None and not empty:
        mixed, targets = run.mix(images.float(), targets)
        pixels = mixed.round().clamp(0, 255).to(torch.uint8) if run.teacher is not None else mixed
    x = normalize(pixels, run.mean, run.std, channels_last=run.channels_last)
    teacher_probs = run.teacher.probs(pixels) if run.teacher is not None and not empty else None
    return x, targets, teacher_probs


def _training_step(run: WorkerRun, x: torch.Tensor, targets: torch.Tensor, empty: bool,
                   teacher_probs: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, bool, StepSignals]:
    """Forward, backward, optimizer step; (loss, logits, finite, what every worker agreed on). Every worker
    takes the same branch."""
    accelerator, model = run.accelerator, run.model
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(x)
            loss = _loss(run, logits.float(), targets, teacher_probs)
        finite = bool(torch.isfinite(loss))
        signals = run.notices.agree(empty or not finite, run.device, run.world)
        ok = signals.ok
        if not ok:
            # A zero-valued graph over the parameters keeps DDP's gradient all-reduce in step on
            # every worker; the optimizer step is skipped so the NaN never reaches the weights.
            loss = sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
        accelerator.backward(loss)
        if ok and run.cfg.train.grad_clip and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), run.cfg.train.grad_clip)
        if ok:
            run.optimizer.step()
            if run.ema is not None and accelerator.sync_gradients:
                run.ema_updates += 1
                run.ema.update(accelerator.unwrap_model(model), step=run.ema_updates)
        run.optimizer.zero_grad(set_to_none=True)
    return loss, logits, finite, signals


def _count_nonfinite(run: WorkerRun, finite: bool, epoch: int) -> None:
    if finite:
        run.consecutive_bad = 0
        return
    run.nonfinite_total += 1
    run.consecutive_bad += 1
    if run.consecutive_bad >= run.cfg.train.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"loss was non-finite for {run.consecutive_bad} consecutive steps at epoch {epoch} "
            f"(lr={run.schedule.lrs[-1]:.3g}); stopping - lower train.lr or enable train.grad_clip")


def _checkpoint_due(run: WorkerRun, done: int, steps: int) -> bool:
    """Every `checkpoint_every_steps` optimizer steps (never between accumulation micro-batches), and not
    at the epoch's last batch, whose checkpoint is the epoch's own."""
    every = run.cfg.train.checkpoint_every_steps * run.cfg.train.grad_accum_steps
    return bool(every) and done % every == 0 and done < steps


def _act_on_notices(run: WorkerRun, signals: StepSignals, epoch: int, done: int, steps: int,
                    stats: EpochStats) -> bool:
    """After an optimizer step: a checkpoint at this batch on a drain notice (training goes on) or a stop
    request (True: the epoch ends here). At the epoch's last batch the epoch's own checkpoint serves both."""
    if done % run.cfg.train.grad_accum_steps or done >= steps:
        return False
    drain = run.notices.drain_notice() if signals.check_drain else None
    if drain is None and not signals.stop:
        return False
    if run.rank == 0:
        why = "stop requested" if signals.stop else f"node drain notice (ranks {drain.preempted_ranks})"
        print(f"{why}: checkpoint at epoch {epoch + 1}/{run.cfg.train.epochs}, batch {done}/{steps}", flush=True)
    checkpoint_mid_epoch(run, epoch, done, stats)
    return signals.stop


def train_one_epoch(run: WorkerRun, epoch: int, first_step: int = 0, stats: EpochStats | None = None) -> EpochStats:
    """Train from batch `first_step` of the epoch; `stats` carries a resumed epoch's totals so far. Returns
    early, with `run.stopped_mid_epoch` set, when the driver asked the run to stop (train/preempt.py)."""
    run.model.train()
    freeze_bn_stats(run.accelerator.unwrap_model(run.model))
    stats = stats or EpochStats()
    steps = len(run.sampler)
    progress = EpochProgress(epoch=epoch, epochs=run.cfg.train.epochs, steps=steps, first_step=first_step,
                             world=run.world, every_s=run.cfg.train.progress_every_s, tensorboard=run.tensorboard,
                             enabled=run.rank == 0)
    t0 = time.perf_counter()
    for step, (images, labels, ids, nbad) in enumerate(run.train_loader, start=first_step):
        torch.manual_seed(derive_seed(run.cfg.train.seed, epoch, run.rank, step, 1))  # MixUp/CutMix, dropout
        stats.skipped_rows += nbad
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        empty = bool((labels < 0).all())
        x, targets, teacher_probs = _inputs(run, images, labels, empty)
        loss, logits, finite, signals = _training_step(run, x, targets, empty, teacher_probs)
        _count_nonfinite(run, finite, epoch)
        if finite and not empty:
            valid = labels >= 0
            n = int(valid.sum())
            stats.loss_sum += float(loss.detach()) * n
            stats.correct += int((logits.argmax(1) == labels)[valid].sum())
            stats.seen += n
            stats.mark_seen(ids[valid.cpu()].numpy())
        done = step + 1
        so_far = replace(stats, seconds=stats.seconds + time.perf_counter() - t0)
        if (signals.stop or signals.check_drain) and _act_on_notices(run, signals, epoch, done, steps, so_far):
            run.stopped_mid_epoch = True
            break
        if _checkpoint_due(run, done, steps):
            checkpoint_mid_epoch(run, epoch, done, so_far)
        progress.step(done, len(labels), float(loss.detach()) if finite else None, run.schedule.lrs[-1])
    stats.seconds += time.perf_counter() - t0
    return stats


# A worker keeps its decoded validation share in memory when it is at most this big (uint8 pixels): the split
# and its eval transform never change, and on small data decoding it again every epoch was most of an epoch
# (with an EMA, twice). 256 MiB: 85,000 images at 32 px RGB, 1,700 at 224 px.
VAL_CACHE_BYTES = 256 * 2**20


def val_batches(run: WorkerRun) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This worker's validation share as (uint8 images, labels) batches: from memory after the first full pass
    when it fits in VAL_CACHE_BYTES, else decoded again."""
    if run.val_cache is not None:
        yield from run.val_cache
        return
    cache: list | None = []
    size = 0
    for images, labels, _, _ in run.val_loader:
        if cache is not None:
            size += images.numel()
            if size <= VAL_CACHE_BYTES:
                cache.append((images, labels))
            else:
                cache = None
        yield images, labels
    run.val_cache = cache


def evaluate(run: WorkerRun, models: list[torch.nn.Module]) -> list[tuple[float, float]]:
    """(val_loss, val_acc) of each model, exact over the whole split, from one pass over it: each worker scores
    its own contiguous share (no collectives per batch), and the sums are added across workers."""
    for model in models:
        model.eval()
    sums = [[0.0, 0, 0] for _ in models]  # loss_sum, correct, n
    with torch.inference_mode():
        for images, labels in val_batches(run):
            ok_rows = labels >= 0
            if not bool(ok_rows.any()):
                continue
            x = normalize(images.to(run.device), run.mean, run.std, channels_last=run.channels_last)
            labels, ok_rows = labels.to(run.device), ok_rows.to(run.device)
            for model, acc in zip(models, sums):
                with run.accelerator.autocast():
                    logits = model(x)
                per_row = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
                acc[0] += float(per_row[ok_rows].sum())
                acc[1] += int((logits.argmax(1) == labels)[ok_rows].sum())
                acc[2] += int(ok_rows.sum())
    totals = all_gather_list(sums, run.world)
    out = []
    for i in range(len(models)):
        loss_sum, correct, n = (sum(t[i][j] for t in totals) for j in range(3))
        out.append((loss_sum / max(n, 1), correct / max(n, 1)))
    return out


def validate(run: WorkerRun) -> dict[str, Any]:
    """val_loss/val_acc of the weights the epoch's checkpoint exports: with `train.ema_decay`, both the raw and
    the EMA weights are validated and the better (accuracy, then loss) is exported; both are recorded."""
    raw = run.accelerator.unwrap_model(run.model)
    if run.bn_loader is not None:
        for model in (raw, run.ema.module) if run.ema is not None else (raw,):
            recalibrate_bn(model, run.bn_loader, run.cfg.train.precise_bn_batches, run.device, run.mean, run.std,
                           run.channels_last)
    if run.ema is None:
        (val_loss, val_acc), = evaluate(run, [raw])
        return {"val_loss": val_loss, "val_acc": val_acc}
    (val_loss, val_acc), (ema_loss, ema_acc) = evaluate(run, [raw, run.ema.module])
    ema_exported = (ema_acc, -ema_loss) > (val_acc, -val_loss)
    return {"val_loss": ema_loss if ema_exported else val_loss, "val_acc": ema_acc if ema_exported else val_acc,
            "raw_val_loss": val_loss, "raw_val_acc": val_acc, "ema_val_loss": ema_loss, "ema_val_acc": ema_acc,
            "ema_exported": int(ema_exported)}


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This worker's peak memory so far: resident set of the training process plus that of its largest finished
    DataLoader process (getrusage), and on CUDA the peak allocated by torch."""
    rss_kb = sum(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return {"rss": round(rss_kb / 1024, 1), "gpu": round(gpu, 1)}


def epoch_metrics(run: WorkerRun, epoch: int, size: int, stats: EpochStats, val: dict[str, Any]) -> dict[str, Any]:
    """Totals over all workers, and proof that no sample was trained twice (unique_samples)."""
    shares = all_gather_list({"loss_sum": stats.loss_sum, "correct": stats.correct, "seen": stats.seen,
                              "bits": stats.seen_bits, "time": stats.seconds, "skipped": stats.skipped_rows,
                              "peak": peak_memory_mb(run.device)}, run.world)
    n_seen = sum(s["seen"] for s in shares)
    return {
        "epoch": epoch,
        "lr": run.schedule.lrs[-1],  # the head group's LR (highest with layer decay)
        "train_loss": sum(s["loss_sum"] for s in shares) / max(n_seen, 1),
        "train_acc": sum(s["correct"] for s in shares) / max(n_seen, 1),
        **val,
        "images_per_s": n_seen / max(max(s["time"] for s in shares), 1e-9),
        "image_size": size,
        "train_samples": n_seen,
        "unique_samples": count_unique([s["bits"] for s in shares]),
        "worker_samples": [s["seen"] for s in shares],
        "skipped_rows": sum(s["skipped"] for s in shares),
        "nonfinite_steps": run.nonfinite_total,
        "peak_rss_mb": max(s["peak"]["rss"] for s in shares),
        "peak_gpu_mb": max(s["peak"]["gpu"] for s in shares),
        "trainable_params": run.trainable_params,
        "world_size": run.world,
    }


def stopped_early(run: WorkerRun) -> bool:
    """Early stopping (train/early_stop.py), decided from the history every rank holds; said once, by rank 0."""
    t = run.cfg.train
    accs = [h["val_acc"] for h in run.history]
    if not should_stop(accs, t.early_stop_patience, t.early_stop_min_delta):
        return False
    if run.rank == 0:
        best = max(range(len(accs)), key=accs.__getitem__)
        print(f"early stop after epoch {len(accs)}/{t.epochs}: val_acc has not beaten {accs[best]:.4f} (epoch "
              f"{best + 1}) by more than {t.early_stop_min_delta:g} for {t.early_stop_patience} epochs", flush=True)
    return True


def train_loop_per_worker(loop_config: dict) -> None:
    # Train logs every report at INFO through a root-level logger of this worker process; our epoch line
    # says the same in one line. Warnings still show.
    logging.getLogger().setLevel(logging.WARNING)
    run = setup(loop_config)
    try:
        for epoch in range(run.start_epoch, run.cfg.train.epochs):
            if stopped_early(run):
                break
            first_step, partial = (run.start_step, run.partial) if epoch == run.start_epoch else (0, None)
            size = start_epoch(run, epoch, first_step)
            stats = train_one_epoch(run, epoch, first_step, partial)
            if run.stopped_mid_epoch:
                break
            val = validate(run)
            metrics = epoch_metrics(run, epoch, size, stats, val)
            run.schedule.step(val.get("raw_val_loss", val["val_loss"]))  # plateau: the weights being optimized
            run.history.append(metrics)
            report_epoch(run, metrics)
            if run.notices.stop_seen:  # asked in the epoch's last batches: its own checkpoint is the stop's
                break
    finally:
        if run.tensorboard is not None:
            run.tensorboard.close()
