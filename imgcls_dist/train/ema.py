"""Exponential moving average of the weights (`train.ema_decay`), through timm's `ModelEmaV3`.

timm's class is used as is: in-place foreach updates of parameters and buffers (BatchNorm statistics too), and
its decay warm-up `min(decay, 1 - (1 + step) ** -power)`, which keeps the average from being dominated by
the random initial weights in a short run (at step 1 the average is a copy of the model). `power` 3/4 is
the value timm's docstring gives for runs of thousands rather than millions of steps, which is what a
fine-tuning run is. The EMA copy lives on every worker: all ranks apply the same update to the same
(all-reduced) weights, so no communication is needed and every rank can validate its share with it.
"""

from __future__ import annotations

from torch import nn

from imgcls_dist.config import TrainConfig

WARMUP_POWER = 0.75


def build_ema(model: nn.Module, train_cfg: TrainConfig, state: dict | None = None):
    """timm's ModelEmaV3 of `model` (already on its device), or None when `train.ema_decay` is unset;
    `state`: a checkpoint's EMA weights to continue from."""
    if train_cfg.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=train_cfg.ema_decay, use_warmup=train_cfg.ema_warmup, warmup_power=WARMUP_POWER)
    if state is not None:
        ema.module.load_state_dict(state)
    return ema

