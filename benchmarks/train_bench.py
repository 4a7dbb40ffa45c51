"""`python -m benchmarks train`: what Ray Train + accelerate cost over a plain PyTorch loop, measured in one run.

Baseline: a single-process loop over the same rows, the same augmentation, DataLoader settings,
model, optimizer, batch size and number of steps. Ours: the real `imgcls-dist train` job. Epoch time is
the train phase only, measured inside each loop (Ray start-up and validation are reported apart).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine, print_table
from imgcls_dist.config import ExperimentConfig, load_config
from imgcls_dist.data.augment import train_transform_for
from imgcls_dist.data.schema import validate_dataset
from imgcls_dist.models.preprocess import normalize
from imgcls_dist.models.registry import get_model, get_spec
from imgcls_dist.models.transfer import param_groups
from imgcls_dist.train.data import make_train_loader
from imgcls_dist.train.optim import build_optimizer
from imgcls_dist.train.stream import list_row_groups


def plain_epoch_times(cfg: ExperimentConfig, image_size: int, hflip: bool) -> list[float]:
    """The reference loop: no Ray, no accelerate, no DDP; same work per step and the same CPU budget
    as one Ray worker (Ray pins a worker's torch threads to its `cpus_per_worker`)."""
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    meta = validate_dataset(cfg.data.path, ("train",))
    groups = list_row_groups([f.uri for f in meta["files"]["train"]], limit=cfg.data.max_train_samples)
    spec = get_spec(cfg.model.arch)
    model = get_model(cfg.model.arch, num_classes=len(meta["classes"]), in_channels=cfg.data.in_channels)
    opt = build_optimizer(param_groups(model, cfg.model.arch, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay),
                          cfg.train)
    transform = train_transform_for(cfg.augment, image_size, hflip=hflip, seed=cfg.train.seed)
    loader, ds, sampler = make_train_loader(
        groups, channels=cfg.data.in_channels, transform=transform, image_size=image_size,
        batch_size=cfg.data.batch_size, rank=0, world=1, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
        loader_workers=cfg.data.loader_workers)
    times = []
    for epoch in range(cfg.train.epochs):
        ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        for images, labels, _, _ in loader:
            loss = F.cross_entropy(model(normalize(images, *spec.normalization(cfg.data.in_channels))), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return times


def bench_train(config: str | Path = "configs/resnet18_digits.yaml", data: str = "data/digits", epochs: int = 3,
                storage: str = "runs/bench", overrides: tuple[str, ...] = ()) -> dict:
    import shutil

    from imgcls_dist.train.job import resolve_dataset, run_training

    for name in ("bench_w1", "bench_w2"):  # same run.name would resume the last bench run instead of training
        shutil.rmtree(Path(storage) / name, ignore_errors=True)
    base = [f"data.path={data}", f"train.epochs={epochs}", "train.warmup_epochs=0", f"run.storage_path={storage}",
            "run.tensorboard=false", *overrides]
    cfg1 = load_config(config, base + ["scaling.num_workers=1", "run.name=bench_w1"])
    ds = resolve_dataset(cfg1)
    plain = plain_epoch_times(cfg1, ds["image_size"], ds["hflip"])
    t0 = time.perf_counter()
    r1 = run_training(cfg1, report_test=False)
    wall1 = time.perf_counter() - t0
    cfg2 = load_config(config, base + ["scaling.num_workers=2", "run.name=bench_w2"])
    r2 = run_training(cfg2, report_test=False)
    n = r1["history"][0]["train_samples"]
    # First epoch pays one-off costs (allocator warm-up, DataLoader fork) on both sides: compare the rest.
    ours = [n / h["images_per_s"] for h in r1["history"][1:]] or [n / r1["history"][0]["images_per_s"]]
    ref = plain[1:] or plain
    ray_epoch, plain_epoch = sum(ours) / len(ours), sum(ref) / len(ref)
    sps1 = sum(h["images_per_s"] for h in r1["history"][1:]) / max(len(r1["history"]) - 1, 1)
    sps2 = sum(h["images_per_s"] for h in r2["history"][1:]) / max(len(r2["history"]) - 1, 1)
    rows = [
        {"measure": "train epoch s, plain PyTorch", "value": plain_epoch},
        {"measure": "train epoch s, Ray Train + accelerate (1 worker)", "value": ray_epoch},
        {"measure": "overhead ratio ours/plain (goal <= 1.15)", "value": ray_epoch / plain_epoch},
        {"measure": "samples/s 1 worker", "value": sps1},
        {"measure": "samples/s 2 workers", "value": sps2},
        {"measure": "scaling ratio 2w/1w", "value": sps2 / sps1},
        {"measure": "job wall s incl. Ray start-up + validation (1 worker)", "value": wall1},
    ]
    print(f"bench train: {cfg1.model.arch}, {n} samples/epoch, batch {cfg1.data.batch_size}, "
          f"{ds['image_size']}px, {epochs} epochs — {machine()}")
    print_table(rows, ["measure", "value"])
    return {"overhead_ratio": ray_epoch / plain_epoch, "scaling_2w_1w": sps2 / sps1, "plain_epoch_s": plain_epoch,
            "ray_epoch_s": ray_epoch, "samples_per_s_1w": sps1, "samples_per_s_2w": sps2, "wall_1w_s": wall1,
            "machine": machine()}


def bench_checkpoint_cost(config: str | Path = "configs/resnet18_digits.yaml", data: str = "data/digits",
                          epochs: int = 2, every: tuple[int, ...] = (0, 10, 5, 2), storage: str = "runs/bench",
                          overrides: tuple[str, ...] = ()) -> dict:
    """Train images/s with a mid-epoch checkpoint every N optimizer steps, as a ratio to none (N = 0).
    The epoch time includes the checkpoints' saving and upload (they happen inside the epoch)."""
    import shutil

    from imgcls_dist.train.job import run_training

    rows = []
    for n in every:
        name = f"bench_ckpt_{n}"
        shutil.rmtree(Path(storage) / name, ignore_errors=True)
        cfg = load_config(config, [f"data.path={data}", f"train.epochs={epochs}", "train.warmup_epochs=0",
                                   f"run.storage_path={storage}", f"run.name={name}", "run.tensorboard=false",
                                   "scaling.num_workers=1", f"train.checkpoint_every_steps={n}", *overrides])
        res = run_training(cfg, report_test=False)
        rate = sum(h["images_per_s"] for h in res["history"]) / len(res["history"])
        steps = -(-res["history"][0]["train_samples"] // cfg.data.batch_size)
        rows.append({"checkpoint_every_steps": n, "steps_per_epoch": steps,
                     "checkpoints_per_epoch": (steps - 1) // n if n else 0, "images_per_s": rate})
    base = rows[0]["images_per_s"]
    for r in rows:
        r["step_time_ratio_vs_none"] = base / r["images_per_s"]
    print(f"bench checkpoint cost: {cfg.model.arch}, {epochs} epochs — {machine()}")
    print_table(rows, list(rows[0]))
    return {"rows": rows, "machine": machine()}
