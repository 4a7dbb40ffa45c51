"""Epoch-level LR schedules built from torch.optim.lr_scheduler, with optional linear warmup.

All schedules step once per epoch (after validation): the LR of epoch e is a pure function of e
(and of val losses for `plateau`), which keeps the trajectory exact across a resume — the checkpoint
stores this object's state_dict, and the epoch count tells nothing else has to be replayed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import lr_scheduler as S

from imgcls_dist.config import TrainConfig


def _main_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, epochs_after_warmup: int):
    if cfg.scheduler == "step":
        return S.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return S.CosineAnnealingLR(opt, T_max=max(1, epochs_after_warmup), eta_min=cfg.min_lr)
    if cfg.scheduler == "cosine_warm_restarts":
        return S.CosineAnnealingWarmRestarts(opt, T_0=cfg.t0, T_mult=cfg.t_mult, eta_min=cfg.min_lr)
    if cfg.scheduler == "plateau":
        return S.ReduceLROnPlateau(opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience,
                                   min_lr=cfg.min_lr)
    return S.LambdaLR(opt, lambda _: 1.0)  # "none": constant


class EpochSchedule:
    """Warmup (LinearLR) then the main schedule. SequentialLR can't chain ReduceLROnPlateau (its step
    needs the metric), so the hand-over is done here; everything else is torch's own schedulers."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.optimizer = optimizer
        self.warmup_epochs = cfg.warmup_epochs if cfg.scheduler != "none" or cfg.warmup_epochs else 0
        self.epoch = 0  # epochs completed
        self.warmup = (
            S.LinearLR(optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=self.warmup_epochs)
            if self.warmup_epochs
            else None
        )
        # Built after LinearLR so its base LRs are the targets (initial_lr), not the warmed-down values.
        self._cfg = cfg
        self.main = None if self.warmup else _main_scheduler(optimizer, cfg, cfg.epochs)

    @property
    def lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def step(self, val_loss: float | None = None) -> None:
        """Call once at the end of each epoch."""
        self.epoch += 1
        if self.warmup is not None and self.epoch <= self.warmup_epochs:
            self.warmup.step()
            if self.epoch == self.warmup_epochs:
                for g in self.optimizer.param_groups:
                    g["lr"] = g["initial_lr"]
                self.main = _main_scheduler(self.optimizer, self._cfg, self._cfg.epochs - self.warmup_epochs)
            return
        assert self.main is not None
        if isinstance(self.main, S.ReduceLROnPlateau):
            self.main.step(float("inf") if val_loss is None else val_loss)
        else:
            self.main.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "warmup": self.warmup.state_dict() if self.warmup else None,
            "main": self.main.state_dict() if self.main else None,
            "lrs": self.lrs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        if self.warmup is not None and state["warmup"] is not None:
            self.warmup.load_state_dict(state["warmup"])
        if state["main"] is not None:
            if self.main is None:
                self.main = _main_scheduler(self.optimizer, self._cfg, self._cfg.epochs - self.warmup_epochs)
            self.main.load_state_dict(state["main"])
        for g, lr in zip(self.optimizer.param_groups, state["lrs"]):
            g["lr"] = lr
