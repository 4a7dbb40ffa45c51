"""The weights' moving average (train/ema.py): timm's update with our settings, against a hand computation."""

import pytest
import torch
from torch import nn

from imgcls_dist.config import TrainConfig
from imgcls_dist.train.ema import WARMUP_POWER, build_ema


def _one_weight(value: float) -> nn.Linear:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def _run(cfg: TrainConfig, values: list[float]) -> float:
    model = _one_weight(values[0])
    ema = build_ema(model, cfg)
    for step, v in enumerate(values, start=1):
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model, step=step)
    return ema.module.weight.item()


def _by_hand(values: list[float], decay: float, warmup: bool) -> float:
    avg = values[0]  # the copy made at construction
    for k, v in enumerate(values, start=1):
        # update k: decay 0 (a copy) first, then min(decay, 1 - k^-power) with warm-up, else decay
        d = 0.0 if k == 1 else (min(decay, 1 - k ** -WARMUP_POWER) if warmup else decay)
        avg = d * avg + (1 - d) * v
    return avg


@pytest.mark.parametrize("warmup", [True, False])
def test_the_average_follows_the_decay_and_its_warm_up(warmup):
    values = [0.0, 1.0, 2.0, 4.0, -3.0, 5.0, 5.0, 7.5] * 4
    cfg = TrainConfig(ema_decay=0.8, ema_warmup=warmup)
    assert _run(cfg, values) == pytest.approx(_by_hand(values, 0.8, warmup), rel=1e-6)


def test_warm_up_changes_the_average_and_off_means_no_copy():
    values = [0.0, 10.0, 0.0, 10.0, 0.0]
    on, off = (_run(TrainConfig(ema_decay=0.99, ema_warmup=w), values) for w in (True, False))
    assert on != pytest.approx(off)  # early steps weigh more with the warm-up (decay 0.41 at step 2, not 0.99)
    assert build_ema(_one_weight(1.0), TrainConfig()) is None


def test_a_saved_average_is_continued_exactly():
    cfg = TrainConfig(ema_decay=0.9)
    model = _one_weight(3.0)
    ema = build_ema(model, cfg)
    ema.update(_one_weight(5.0), step=3)
    resumed = build_ema(_one_weight(0.0), cfg, state=ema.module.state_dict())
    assert torch.equal(resumed.module.weight, ema.module.weight)
    for e in (ema, resumed):
        e.update(_one_weight(1.0), step=4)
    assert torch.equal(resumed.module.weight, ema.module.weight)


def test_decay_must_be_a_fraction():
    with pytest.raises(ValueError):
        TrainConfig(ema_decay=1.0)
