"""The per-worker training loop: Ray Train runs it in each worker, accelerate does the device work.

Shaped like torchvision's references/classification/train.py: `setup` (model, optimizer, schedule, data,
restored from the latest checkpoint when there is one), then per epoch `train_one_epoch`, `evaluate`,
`epoch_metrics` (the cross-worker totals) and `report_epoch` (console, TensorBoard, checkpoint).

`ray.train.torch.prepare_model/prepare_data_loader` are deliberately not used: accelerate owns DDP
wrapping, mixed precision and gradient accumulation (Ray only starts the workers and the process group).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imgcls_dist.config import ExperimentConfig
from imgcls_dist.data.augment import build_batch_mix, build_train_transform, derive_seed
from imgcls_dist.data.shards import read_rows
from imgcls_dist.models.preprocess import normalize
from imgcls_dist.models.registry import get_model, get_spec, replace_head
from imgcls_dist.models.transfer import apply_transfer, count_trainable, freeze_bn_stats, param_groups
from imgcls_dist.models.weights import CheckpointWeights, initial_weights
from imgcls_dist.train.data import make_eval_loader, make_train_loader
from imgcls_dist.train.distributed import all_agree, all_gather_list
from imgcls_dist.train.optim import build_optimizer
from imgcls_dist.train.schedulers import EpochSchedule
from imgcls_dist.train.state import ResumeState, restore, save_training_checkpoint
from imgcls_dist.train.tensorboard import TensorBoardLog

# Metrics that go to TensorBoard every epoch.
TB_METRICS = ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s")


class NonFiniteLossError(RuntimeError):
    pass


def resolve_mixed_precision(setting: str, cuda: bool) -> str:
    if not cuda:
        return "no"  # CPU autocast to bf16 is slower than fp32 on most CPUs and changes numerics
    if setting == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return setting


def size_for_epoch(phases: list[tuple[int, int]] | list[list[int]], epoch: int, default: int) -> int:
    size = default
    for start, s in phases:
        if epoch >= start:
            size = s
    return size


@dataclass
class WorkerRun:
    """What one worker trains with, built once by `setup`."""

    cfg: ExperimentConfig
    dataset: dict[str, Any]  # train.job.resolve_dataset: classes, files, image size, hflip
    rank: int
    world: int
    accelerator: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: EpochSchedule
    train_loader: Any
    train_dataset: Any
    sampler: Any
    val_loader: Any
    mix: Any
    mean: list[float]
    std: list[float]
    channels_last: bool
    trainable_params: int
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    nonfinite_total: int = 0
    consecutive_bad: int = 0
    tensorboard: TensorBoardLog | None = None
    experiment: dict = field(default_factory=dict)  # the config as the checkpoint stores it
    transform_size: int | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class EpochStats:
    """One worker's share of an epoch."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    skipped_rows: int = 0
    seen_idx: list[int] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------- set-up


def build_model(cfg: ExperimentConfig, classes: list[str], resume: ResumeState | None) -> torch.nn.Module:
    """The network with its initial weights (read once), transfer strategy applied, resumed weights loaded."""
    model_cfg = cfg.model
    spec = get_spec(model_cfg.arch)
    torch.manual_seed(derive_seed(cfg.train.seed, 0x1D17))  # same init on every run and rank: reruns are comparable
    weights = None if resume else initial_weights(model_cfg.weights)
    model = get_model(model_cfg.arch, num_classes=len(classes), in_channels=cfg.data.in_channels, weights=weights)
    if isinstance(weights, CheckpointWeights) and weights.classes is not None and weights.classes != list(classes):
        # A head trained on other classes is meaningless here even when its shape fits (0-4 -> 5-9).
        replace_head(model, spec.family, len(classes))
    apply_transfer(model, model_cfg.arch, model_cfg.transfer)
    if resume:
        model.load_state_dict(resume.model_state)
    return model


def setup(loop_config: dict) -> WorkerRun:
    import ray.train
    from accelerate import Accelerator

    cfg = ExperimentConfig.model_validate(loop_config["experiment"])
    ds: dict = loop_config["dataset"]
    train_cfg, data_cfg, aug_cfg = cfg.train, cfg.data, cfg.augment
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cuda = bool(loop_config.get("use_gpu")) and torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision=resolve_mixed_precision(train_cfg.mixed_precision, cuda),
                              gradient_accumulation_steps=train_cfg.grad_accum_steps)
    mean, std = (list(v) for v in get_spec(cfg.model.arch).normalization(data_cfg.in_channels))

    resume = restore(ray.train.get_checkpoint())
    model = build_model(cfg, ds["classes"], resume)
    trainable = count_trainable(model)
    groups = param_groups(model, cfg.model.arch, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                          layer_decay=cfg.model.layer_decay)
    optimizer = build_optimizer(groups, train_cfg)
    schedule = EpochSchedule(optimizer, train_cfg)
    if resume:
        optimizer.load_state_dict(resume.optimizer)
        schedule.load_state_dict(resume.schedule)
    if cuda:
        model = model.to(memory_format=torch.channels_last)

    train_rows = read_rows(ds["train_files"], limit=data_cfg.max_train_samples)
    val_rows = read_rows(ds["val_files"], limit=data_cfg.max_val_samples)
    train_loader, train_dataset, sampler = make_train_loader(
        train_rows, channels=data_cfg.in_channels, preset=aug_cfg.preset, strength=aug_cfg.strength,
        image_size=ds["image_size"], hflip=ds["hflip"], batch_size=data_cfg.batch_size, rank=rank, world=world,
        seed=train_cfg.seed, loader_workers=data_cfg.loader_workers)
    val_loader = make_eval_loader(val_rows, channels=data_cfg.in_channels, image_size=ds["image_size"],
                                  batch_size=data_cfg.batch_size, loader_workers=data_cfg.loader_workers)

    # The LR schedule is not passed to prepare(): AcceleratedScheduler steps once per process per call,
    # which is right for per-iteration schedules but would advance our per-epoch one `world` times.
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    if accelerator.scaler is not None and resume and resume.scaler:
        accelerator.scaler.load_state_dict(resume.scaler)
    tb_dir = loop_config.get("tensorboard_dir")
    return WorkerRun(
        cfg=cfg, dataset=ds, rank=rank, world=world, accelerator=accelerator, model=model, optimizer=optimizer,
        schedule=schedule, train_loader=train_loader, train_dataset=train_dataset, sampler=sampler,
        val_loader=val_loader, mix=build_batch_mix(aug_cfg.mixup_alpha, aug_cfg.cutmix_alpha, aug_cfg.mix_prob,
                                                   len(ds["classes"])),
        mean=mean, std=std, channels_last=cuda, trainable_params=trainable,
        start_epoch=resume.epoch + 1 if resume else 0, history=resume.history if resume else [],
        nonfinite_total=resume.nonfinite_total if resume else 0,
        tensorboard=TensorBoardLog(tb_dir) if rank == 0 and tb_dir else None, experiment=loop_config["experiment"])


# ---------------------------------------------------------------- one epoch


def start_epoch(run: WorkerRun, epoch: int) -> int:
    """Seed every random stream from (seed, epoch, rank) and switch the input size when a phase starts."""
    aug_cfg, seed = run.cfg.augment, run.cfg.train.seed
    size = size_for_epoch(run.cfg.train.progressive_resizing, epoch, run.dataset["image_size"])
    transform = None
    if size != run.transform_size:
        # Same model, new input size: only the CPU-side transform changes (the nets are fully conv +
        # adaptive pooling), so phases switch without rebuilding or re-wrapping anything.
        transform = build_train_transform(aug_cfg.preset, aug_cfg.strength, size, hflip=run.dataset["hflip"], seed=seed)
        run.transform_size = size
    run.train_dataset.set_epoch(epoch, transform, size if transform is not None else None)
    run.sampler.set_epoch(epoch)
    torch.manual_seed(derive_seed(seed, epoch, run.rank, 1))  # MixUp/CutMix draws, dropout
    return size


def _training_step(run: WorkerRun, x: torch.Tensor, targets: torch.Tensor, empty: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Forward, backward, optimizer step; (loss, logits, finite). Every worker takes the same branch."""
    accelerator, model = run.accelerator, run.model
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=run.cfg.train.label_smoothing)
        finite = bool(torch.isfinite(loss))
        ok = all_agree(empty or not finite, run.device, run.world)
        if not ok:
            # A zero-valued graph over the parameters keeps DDP's gradient all-reduce in step on
            # every worker; the optimizer step is skipped so the NaN never reaches the weights.
            loss = sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
        accelerator.backward(loss)
        if ok and run.cfg.train.grad_clip and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), run.cfg.train.grad_clip)
        if ok:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, logits, finite


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


def train_one_epoch(run: WorkerRun, epoch: int) -> EpochStats:
    run.model.train()
    freeze_bn_stats(run.accelerator.unwrap_model(run.model))
    stats = EpochStats()
    t0 = time.perf_counter()
    for images, labels, idx, nbad in run.train_loader:
        stats.skipped_rows += nbad
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        empty = bool((labels < 0).all())
        x = normalize(images, run.mean, run.std, channels_last=run.channels_last)
        targets = labels.clamp(min=0)
        if run.mix is not None and not empty:
            x, targets = run.mix(x, targets)
        loss, logits, finite = _training_step(run, x, targets, empty)
        _count_nonfinite(run, finite, epoch)
        if not finite or empty:
            continue
        valid = labels >= 0
        n = int(valid.sum())
        stats.loss_sum += float(loss.detach()) * n
        stats.correct += int((logits.argmax(1) == labels)[valid].sum())
        stats.seen += n
        stats.seen_idx.extend(idx[valid.cpu()].tolist())
    stats.seconds = time.perf_counter() - t0
    return stats


def evaluate(run: WorkerRun) -> tuple[float, float]:
    """(val_loss, val_acc), exact over the whole split on every worker (gather_for_metrics drops
    accelerate's padding)."""
    run.model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.inference_mode():
        for images, labels, _ in run.val_loader:
            x = normalize(images, run.mean, run.std, channels_last=run.channels_last)
            with run.accelerator.autocast():
                logits = run.model(x)
            per_row = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
            preds, labels, per_row = run.accelerator.gather_for_metrics((logits.argmax(1), labels, per_row))
            ok_rows = labels >= 0
            loss_sum += float(per_row[ok_rows].sum())
            correct += int((preds == labels)[ok_rows].sum())
            n += int(ok_rows.sum())
    return loss_sum / max(n, 1), correct / max(n, 1)


def epoch_metrics(run: WorkerRun, epoch: int, size: int, stats: EpochStats, val_loss: float,
                  val_acc: float) -> dict[str, Any]:
    """Totals over all workers, and proof that no sample was trained twice (unique_samples)."""
    shares = all_gather_list({"loss_sum": stats.loss_sum, "correct": stats.correct, "seen": stats.seen,
                              "idx": stats.seen_idx, "time": stats.seconds, "skipped": stats.skipped_rows}, run.world)
    n_seen = sum(s["seen"] for s in shares)
    return {
        "epoch": epoch,
        "lr": run.schedule.lrs[-1],  # the head group's LR (highest with layer decay)
        "train_loss": sum(s["loss_sum"] for s in shares) / max(n_seen, 1),
        "train_acc": sum(s["correct"] for s in shares) / max(n_seen, 1),
        "val_loss": val_loss,
        "val_acc": val_acc,
        "images_per_s": n_seen / max(max(s["time"] for s in shares), 1e-9),
        "image_size": size,
        "train_samples": n_seen,
        "unique_samples": len({i for s in shares for i in s["idx"]}),
        "worker_samples": [s["seen"] for s in shares],
        "skipped_rows": sum(s["skipped"] for s in shares),
        "nonfinite_steps": run.nonfinite_total,
        "trainable_params": run.trainable_params,
        "world_size": run.world,
    }


# ---------------------------------------------------------------- reporting and checkpoints


def _print_epoch(run: WorkerRun, m: dict[str, Any]) -> None:
    print(f"epoch {m['epoch'] + 1}/{run.cfg.train.epochs}  loss {m['train_loss']:.4f}  acc {m['train_acc']:.4f}  "
          f"val_loss {m['val_loss']:.4f}  val_acc {m['val_acc']:.4f}  lr {m['lr']:.3g}  size {m['image_size']}  "
          f"{m['images_per_s']:.0f} img/s", flush=True)


def save_checkpoint(run: WorkerRun, metrics: dict[str, Any], directory: Path) -> None:
    """Rank 0's checkpoint of the epoch just finished: model file + resume state + history."""
    state = run.accelerator.unwrap_model(run.model).state_dict()
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise NonFiniteLossError(f"model weights became non-finite at epoch {metrics['epoch']}; no checkpoint written")
    ds = run.dataset
    meta = dict(arch=run.cfg.model.arch, classes=ds["classes"], in_channels=run.cfg.data.in_channels,
                image_size=ds["image_size"], mean=run.mean, std=run.std, config=run.experiment, hflip=ds["hflip"],
                metrics={"val_acc": metrics["val_acc"], "val_loss": metrics["val_loss"], "epoch": metrics["epoch"]})
    scaler = run.accelerator.scaler
    train_state = {"epoch": metrics["epoch"], "optimizer": run.optimizer.state_dict(),
                   "schedule": run.schedule.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                   "nonfinite_total": run.nonfinite_total}
    save_training_checkpoint(directory, model_state=state, model_meta=meta, train_state=train_state,
                             history=run.history)


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
        save_checkpoint(run, metrics, Path(tmp))
        ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop_per_worker(loop_config: dict) -> None:
    # Train logs every report at INFO through a root-level logger of this worker process; our epoch line
    # says the same in one line. Warnings still show.
    logging.getLogger().setLevel(logging.WARNING)
    run = setup(loop_config)
    try:
        for epoch in range(run.start_epoch, run.cfg.train.epochs):
            size = start_epoch(run, epoch)
            stats = train_one_epoch(run, epoch)
            val_loss, val_acc = evaluate(run)
            metrics = epoch_metrics(run, epoch, size, stats, val_loss, val_acc)
            run.schedule.step(val_loss)
            run.history.append(metrics)
            report_epoch(run, metrics)
    finally:
        if run.tensorboard is not None:
            run.tensorboard.close()
