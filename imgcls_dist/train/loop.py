"""The per-worker training loop: Ray Train runs it in each worker, accelerate does the device work.

`ray.train.torch.prepare_model/prepare_data_loader` are deliberately not used: accelerate owns DDP
wrapping, mixed precision and gradient accumulation (Ray only starts the workers and the process group).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imgcls_dist.config import ExperimentConfig
from imgcls_dist.data.augment import build_batch_mix, build_train_transform, derive_seed
from imgcls_dist.data.shards import read_rows
from imgcls_dist.models.preprocess import normalize
from imgcls_dist.models.registry import get_model, get_spec
from imgcls_dist.models.transfer import apply_transfer, count_trainable, freeze_bn_stats, param_groups
from imgcls_dist.train.data import make_eval_loader, make_train_loader
from imgcls_dist.train.optim import build_optimizer
from imgcls_dist.train.schedulers import EpochSchedule
from imgcls_dist.train.state import load_history, load_train_state, save_training_checkpoint


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


def _maybe_fault(fault: dict | None, epoch: int, rank: int) -> None:
    """Test-only: kill this worker process once at `epoch` (a marker file makes it fire only once)."""
    if fault and rank == fault.get("rank", 0) and epoch == fault["epoch"]:
        marker = Path(fault["marker"])
        if not marker.exists():
            marker.write_text(f"killed rank {rank} at epoch {epoch}\n")
            os._exit(1)


def _all_agree(flag_bad: bool, device: torch.device, world: int) -> bool:
    """True when no worker saw a bad step; every worker must take the same branch or DDP deadlocks."""
    if world == 1:
        return not flag_bad
    t = torch.tensor([1.0 if flag_bad else 0.0], device=device)
    torch.distributed.all_reduce(t)
    return t.item() == 0


def _all_gather_list(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _fresh_head_if_new_classes(model: torch.nn.Module, weights: str, classes: list[str], family: str) -> None:
    """A head trained on other classes is meaningless here even when its shape fits (0-4 -> 5-9): re-init it."""
    from imgcls_dist.models.checkpoint import load_model_file
    from imgcls_dist.models.registry import replace_head
    from imgcls_dist.models.weights import classify

    kind, path = classify(weights)
    if kind != "path":
        return
    try:
        source_classes = load_model_file(path).get("classes")
    except Exception:  # noqa: BLE001 - a raw state_dict has no class list: nothing to compare
        return
    if source_classes is not None and list(source_classes) != list(classes):
        replace_head(model, family, len(classes))


def _quiet_train_logs() -> None:
    """Train logs every report at INFO on the console; our epoch line says the same in one line.
    Ray 2.60's report logger is named by file path (`getLogger(__file__)`), so it's not under ray.train."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # other Ray versions: only the named logger exists
        pass


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    _quiet_train_logs()
    cfg = ExperimentConfig.model_validate(loop_config["experiment"])
    ds_info: dict = loop_config["dataset"]
    fault = loop_config.get("fault")
    tc, dc, ac, mc = cfg.train, cfg.data, cfg.augment, cfg.model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cuda = bool(loop_config.get("use_gpu")) and torch.cuda.is_available()
    AcceleratorState._reset_state(True)  # a process that trained before (bench, tests) must not reuse it
    accelerator = Accelerator(cpu=not cuda, mixed_precision=resolve_mixed_precision(tc.mixed_precision, cuda),
                              gradient_accumulation_steps=tc.grad_accum_steps)
    device = accelerator.device
    channels_last = cuda

    classes: list[str] = ds_info["classes"]
    image_size: int = ds_info["image_size"]
    spec = get_spec(mc.arch)
    mean, std = (list(v) for v in spec.normalization(dc.in_channels))

    # --- model / optimizer / schedule, restored before accelerate wraps them ---
    checkpoint = ray.train.get_checkpoint()
    resume_state, history = None, []
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            from imgcls_dist.models.checkpoint import load_model_file

            resume_state = load_train_state(d)
            resume_state["model"] = load_model_file(d)["state_dict"]
            history = load_history(d)
    torch.manual_seed(derive_seed(tc.seed, 0x1D17))  # same init on every run and rank: reruns are comparable
    model = get_model(mc.arch, num_classes=len(classes), in_channels=dc.in_channels,
                      weights=None if resume_state else mc.weights)
    if mc.weights and not resume_state:
        _fresh_head_if_new_classes(model, mc.weights, classes, spec.family)
    apply_transfer(model, mc.arch, mc.transfer)
    if resume_state:
        model.load_state_dict(resume_state["model"])
    trainable = count_trainable(model)
    groups = param_groups(model, mc.arch, lr=tc.lr, weight_decay=tc.weight_decay, layer_decay=mc.layer_decay)
    optimizer = build_optimizer(groups, tc)
    schedule = EpochSchedule(optimizer, tc)
    if resume_state:
        optimizer.load_state_dict(resume_state["optimizer"])
        schedule.load_state_dict(resume_state["schedule"])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    start_epoch = resume_state["epoch"] + 1 if resume_state else 0

    # --- data ---
    train_rows = read_rows([Path(f) for f in ds_info["train_files"]], limit=dc.max_train_samples)
    val_rows = read_rows([Path(f) for f in ds_info["val_files"]], limit=dc.max_val_samples)
    train_loader, train_ds, sampler = make_train_loader(
        train_rows, channels=dc.in_channels, preset=ac.preset, strength=ac.strength, image_size=image_size,
        hflip=ds_info["hflip"], batch_size=dc.batch_size, rank=rank, world=world, seed=tc.seed,
        loader_workers=dc.loader_workers)
    val_loader = make_eval_loader(val_rows, channels=dc.in_channels, image_size=image_size,
                                  batch_size=dc.batch_size, loader_workers=dc.loader_workers)
    mix = build_batch_mix(ac.mixup_alpha, ac.cutmix_alpha, ac.mix_prob, len(classes))

    # The LR schedule is not passed to prepare(): AcceleratedScheduler steps once per process per call,
    # which is right for per-iteration schedules but would advance our per-epoch one `world` times.
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    if accelerator.scaler is not None and resume_state and resume_state.get("scaler"):
        accelerator.scaler.load_state_dict(resume_state["scaler"])

    tb = None
    if rank == 0 and loop_config.get("tensorboard_dir"):
        from tensorboardX import SummaryWriter

        tb = SummaryWriter(loop_config["tensorboard_dir"])

    nonfinite_total = resume_state.get("nonfinite_total", 0) if resume_state else 0
    consecutive_bad = 0
    current_size = None
    model_meta = dict(arch=mc.arch, classes=classes, in_channels=dc.in_channels, image_size=image_size, mean=mean,
                      std=std, config=loop_config["experiment"], hflip=ds_info["hflip"])

    for epoch in range(start_epoch, tc.epochs):
        _maybe_fault(fault, epoch, rank)
        size = size_for_epoch(tc.progressive_resizing, epoch, image_size)
        if size != current_size:
            # Same model, new input size: only the CPU-side transform changes (the nets are fully conv +
            # adaptive pooling), so phases switch without rebuilding or re-wrapping anything.
            tf = build_train_transform(ac.preset, ac.strength, size, hflip=ds_info["hflip"], seed=tc.seed)
            current_size = size
        train_ds.set_epoch(epoch, tf, size)
        sampler.set_epoch(epoch)
        torch.manual_seed(derive_seed(tc.seed, epoch, rank, 1))  # MixUp/CutMix draws, dropout

        model.train()
        freeze_bn_stats(accelerator.unwrap_model(model))
        t0 = time.perf_counter()
        loss_sum, correct, seen, skipped_rows = 0.0, 0, 0, 0
        seen_idx: list[int] = []
        for images, labels, idx, nbad in train_loader:
            skipped_rows += nbad
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            empty = bool((labels < 0).all())
            x = normalize(images, mean, std, channels_last=channels_last)
            targets = labels.clamp(min=0)
            if mix is not None and not empty:
                x, targets = mix(x, targets)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), targets, label_smoothing=tc.label_smoothing)
                if fault and fault.get("nan_loss"):  # test-only: a diverged run
                    loss = loss * float("nan")
                finite = bool(torch.isfinite(loss))
                ok = _all_agree(empty or not finite, device, world)
                if not ok:
                    # A zero-valued graph over the parameters keeps DDP's gradient all-reduce in step on
                    # every worker; the optimizer step is skipped so the NaN never reaches the weights.
                    loss = sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
                accelerator.backward(loss)
                if ok and tc.grad_clip and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                if ok:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not finite:
                nonfinite_total += 1
                consecutive_bad += 1
                if consecutive_bad >= tc.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"loss was non-finite for {consecutive_bad} consecutive steps at epoch {epoch} "
                        f"(lr={schedule.lrs[-1]:.3g}); stopping - lower train.lr or enable train.grad_clip")
                continue
            consecutive_bad = 0
            if empty:
                continue
            valid = labels >= 0
            n = int(valid.sum())
            loss_sum += float(loss.detach()) * n
            correct += int((logits.argmax(1) == labels)[valid].sum())
            seen += n
            seen_idx.extend(idx[valid.cpu()].tolist())
        train_time = time.perf_counter() - t0

        # --- validation: exact over the whole split (gather_for_metrics drops accelerate's padding) ---
        model.eval()
        v_loss, v_correct, v_n = 0.0, 0, 0
        with torch.inference_mode():
            for images, labels, _ in val_loader:
                x = normalize(images, mean, std, channels_last=channels_last)
                with accelerator.autocast():
                    logits = model(x)
                per = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
                preds, labels, per = accelerator.gather_for_metrics((logits.argmax(1), labels, per))
                ok_rows = labels >= 0
                v_loss += float(per[ok_rows].sum())
                v_correct += int((preds == labels)[ok_rows].sum())
                v_n += int(ok_rows.sum())
        val_loss, val_acc = v_loss / max(v_n, 1), v_correct / max(v_n, 1)

        # --- cross-worker bookkeeping: totals, and proof that no sample was trained twice ---
        stats = _all_gather_list({"loss_sum": loss_sum, "correct": correct, "seen": seen, "idx": seen_idx,
                                  "time": train_time, "skipped": skipped_rows}, world)
        all_idx = [i for s in stats for i in s["idx"]]
        n_seen = sum(s["seen"] for s in stats)
        lr_now = schedule.lrs[-1]  # the head group's LR (highest with layer decay)
        schedule.step(val_loss)
        metrics = {
            "epoch": epoch,
            "lr": lr_now,
            "train_loss": sum(s["loss_sum"] for s in stats) / max(n_seen, 1),
            "train_acc": sum(s["correct"] for s in stats) / max(n_seen, 1),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "images_per_s": n_seen / max(max(s["time"] for s in stats), 1e-9),
            "image_size": size,
            "train_samples": n_seen,
            "unique_samples": len(set(all_idx)),
            "worker_samples": [s["seen"] for s in stats],
            "skipped_rows": sum(s["skipped"] for s in stats),
            "nonfinite_steps": nonfinite_total,
            "trainable_params": trainable,
            "world_size": world,
        }
        history.append(metrics)
        if rank == 0:
            print(f"epoch {epoch + 1}/{tc.epochs}  loss {metrics['train_loss']:.4f}  acc {metrics['train_acc']:.4f}  "
                  f"val_loss {val_loss:.4f}  val_acc {val_acc:.4f}  lr {lr_now:.3g}  size {size}  "
                  f"{metrics['images_per_s']:.0f} img/s", flush=True)
            if tb is not None:
                for k in ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s"):
                    tb.add_scalar(k, metrics[k], epoch)
                tb.flush()

        if rank == 0:
            state = accelerator.unwrap_model(model).state_dict()
            if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
                raise NonFiniteLossError(f"model weights became non-finite at epoch {epoch}; no checkpoint written")
            train_state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                           "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                           "nonfinite_total": nonfinite_total}
            with tempfile.TemporaryDirectory() as tmp:
                save_training_checkpoint(Path(tmp), model_state=state,
                                         model_meta={**model_meta, "metrics": {"val_acc": val_acc, "val_loss": val_loss,
                                                                               "epoch": epoch}},
                                         train_state=train_state, history=history)
                ray.train.report(_scalar_metrics(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(_scalar_metrics(metrics), checkpoint=None)
    if tb is not None:
        tb.close()


def _scalar_metrics(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, (int, float))}
