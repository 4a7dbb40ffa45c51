"""Optimizer from config over the registry's parameter groups (layer-wise LR, no decay on norm/bias)."""

from __future__ import annotations

import torch

from imgcls_dist.config import TrainConfig


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    # 'name' is our logging label; torch keeps unknown group keys, so it survives state_dict round-trips.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)
