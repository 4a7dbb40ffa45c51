import pytest
import torch

from imgcls_dist.config import TrainConfig
from imgcls_dist.train.schedulers import EpochSchedule


def trajectory(cfg: TrainConfig, val_losses=None, resume_at=None):
    """LR at the start of each epoch; optionally rebuild from state_dict at `resume_at` (as a resume does)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = EpochSchedule(opt, cfg)
    out = []
    for e in range(cfg.epochs):
        if resume_at is not None and e == resume_at:
            state, opt_state = sched.state_dict(), opt.state_dict()
            p = torch.nn.Parameter(torch.zeros(1))
            opt = torch.optim.SGD([p], lr=cfg.lr)
            sched = EpochSchedule(opt, cfg)
            opt.load_state_dict(opt_state)
            sched.load_state_dict(state)
        out.append(sched.lrs[0])
        opt.step()
        sched.step(None if val_losses is None else val_losses[e])
    return out


CASES = [
    (dict(scheduler="none", epochs=3, lr=0.1), None, [0.1, 0.1, 0.1]),
    (dict(scheduler="step", epochs=5, lr=1.0, step_size=2, gamma=0.5), None, [1.0, 1.0, 0.5, 0.5, 0.25]),
    (dict(scheduler="step", epochs=5, lr=1.0, step_size=2, gamma=0.5, warmup_epochs=2, warmup_start_factor=0.1), None,
     [0.1, 0.55, 1.0, 1.0, 0.5]),
    (dict(scheduler="cosine", epochs=5, lr=1.0), None, [1.0, 0.9045, 0.6545, 0.3455, 0.0955]),
    (dict(scheduler="cosine", epochs=5, lr=1.0, warmup_epochs=1, warmup_start_factor=0.5), None,
     [0.5, 1.0, 0.8536, 0.5, 0.1464]),
    (dict(scheduler="cosine_warm_restarts", epochs=6, lr=1.0, t0=2), None, [1.0, 0.5, 1.0, 0.5, 1.0, 0.5]),
    (dict(scheduler="cosine_warm_restarts", epochs=7, lr=1.0, t0=2, t_mult=2), None, [1.0, 0.5, 1.0, 0.8536, 0.5, 0.1464, 1.0]),
    # plateau: loss improves twice, then stalls; patience 1 -> reduce after two bad epochs
    (dict(scheduler="plateau", epochs=6, lr=1.0, plateau_patience=1, plateau_factor=0.5), [3, 2, 2, 2, 2, 2],
     [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]),
    (dict(scheduler="plateau", epochs=6, lr=1.0, plateau_patience=0, plateau_factor=0.5, warmup_epochs=1,
          warmup_start_factor=0.2), [9, 3, 3, 3, 1, 1], [0.2, 1.0, 1.0, 0.5, 0.25, 0.25]),
]


@pytest.mark.parametrize("kw, losses, expected", CASES, ids=[f"{c[0]['scheduler']}-w{c[0].get('warmup_epochs', 0)}" for c in CASES])
def test_lr_trajectory(kw, losses, expected):
    assert trajectory(TrainConfig(**kw), losses) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("kw, losses, expected", CASES, ids=[f"{c[0]['scheduler']}-w{c[0].get('warmup_epochs', 0)}" for c in CASES])
@pytest.mark.parametrize("resume_at", [1, 2])
def test_lr_trajectory_survives_resume(kw, losses, expected, resume_at):
    cfg = TrainConfig(**kw)
    assert trajectory(cfg, losses, resume_at=resume_at) == pytest.approx(expected, abs=1e-4)
