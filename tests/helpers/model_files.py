"""Shared helpers for the inference tests (no tests here): tiny model files and input shards."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from imgcls_dist.data.schema import split_files
from imgcls_dist.models.preprocess import normalize
from imgcls_dist.predictor.prepare import labelled_batches
from imgcls_dist.data.shards import read_rows, write_shards
from imgcls_dist.models.checkpoint import load_model_file, save_model_file

DIGITS = [str(i) for i in range(10)]


def save_model(path: Path, arch: str = "lenet5", size: int = 16, *, classes: Sequence[str] = DIGITS, seed: int = 0,
               hflip: bool = False, logits: Sequence[float] | None = None, in_channels: int = 3,
               config: dict | None = None) -> Path:
    """A random-init model file; with `logits`, the last Linear layer outputs exactly those logits
    for every input (weights zeroed), so ensemble arithmetic has a known answer."""
    from imgcls_dist.models.registry import get_model, get_spec

    torch.manual_seed(seed)
    model = get_model(arch, num_classes=len(classes), in_channels=in_channels)
    if logits is not None:
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor(list(logits), dtype=torch.float32))
    mean, std = get_spec(arch).normalization(in_channels)
    return save_model_file(path, model=model, arch=arch, classes=list(classes), in_channels=in_channels,
                           image_size=size, mean=list(mean), std=list(std), hflip=hflip, config=config)


def save_nan_model(path: Path, arch: str = "lenet5", size: int = 16) -> Path:
    """A model file whose floating-point weights are all NaN (a corrupt or diverged checkpoint)."""
    payload = load_model_file(save_model(path, arch, size))
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    return save_model_file(path, state_dict=state,
                           **{k: payload[k] for k in ("arch", "classes", "in_channels", "image_size", "mean", "std")})


def digit_rows(dataset_dir: Path, split: str = "test", limit: int | None = None, with_label: bool = True):
    """(id, bytes, label|None) rows of a built-in digits split."""
    rows = read_rows(split_files(dataset_dir, split), limit=limit)
    return [(i, b, int(lbl) if with_label else None) for i, b, lbl in zip(rows.ids, rows.images, rows.labels)]


def write_input(out_dir: Path, rows, rows_per_shard: int = 100) -> list[Path]:
    return write_shards(rows, out_dir, rows_per_shard=rows_per_shard)


def train_digits_model(path: Path, data: Path, epochs: int, seed: int, limit: int | None = None) -> Path:
    """A lenet5 at 16px trained in-process with plain torch (seconds), saved as a model file whose training
    config allows the standard preset's shift and zoom views."""
    torch.manual_seed(seed)
    model_path = save_model(path, "lenet5", 16, seed=seed)
    payload = load_model_file(model_path)
    from imgcls_dist.models.registry import build_model_from_file

    model, meta = build_model_from_file(model_path)
    xs, ys = [], []
    for y, arrays in labelled_batches(split_files(data, "train"), [(16, 3)], 256, max_rows=limit):
        xs.append(torch.from_numpy(arrays[(16, 3)]).permute(0, 3, 1, 2))
        ys.append(torch.from_numpy(y))
    x, y = torch.cat(xs), torch.cat(ys)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(normalize(x[idx], meta["mean"], meta["std"])), y[idx])
            loss.backward()
            opt.step()
    config = {"augment": {"preset": "standard", "strength": 0.5}}
    return save_model_file(path, model=model, arch="lenet5", classes=payload["classes"], in_channels=3, image_size=16,
                           mean=payload["mean"], std=payload["std"], hflip=False, config=config,
                           metrics={"val_acc": 0.0})
