"""Progress inside long epochs: a line every `train.progress_every_s` seconds with steps, samples/s and ETA,
and per-step loss/LR in TensorBoard (the real event file, read back)."""

from __future__ import annotations

import re
import time

from imgcls_dist.train.progress import EpochProgress
from imgcls_dist.train.tensorboard import TensorBoardLog


def test_progress_lines_and_per_step_scalars(tmp_path, capsys):
    tb = TensorBoardLog(str(tmp_path / "tb"))
    p = EpochProgress(epoch=2, epochs=5, steps=10, first_step=0, world=2, every_s=0.01, tensorboard=tb)
    for done in range(1, 11):
        time.sleep(0.012)
        p.step(done, samples=8, loss=1.0 / done, lr=0.1)
    tb.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert 5 <= len(lines) <= 9  # one per interval, none at the last batch (the epoch line says it)
    m = re.fullmatch(r"epoch 3/5  step (\d+)/10  (\d+) samples/s  ETA 0m0\ds \(epoch\)", lines[-1])
    assert m and 1 <= int(m.group(1)) < 10 and int(m.group(2)) > 0
    events = b"".join(f.read_bytes() for f in (tmp_path / "tb").glob("events.out.tfevents.*"))
    assert b"step/loss" in events and b"step/lr" in events


def test_only_rank_zero_reports(capsys):
    p = EpochProgress(epoch=0, epochs=1, steps=3, first_step=0, world=1, every_s=0.0, enabled=False)
    for done in (1, 2, 3):
        p.step(done, samples=4, loss=0.5, lr=0.1)
    assert capsys.readouterr().out == ""
