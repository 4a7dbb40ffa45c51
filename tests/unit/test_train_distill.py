"""Distillation's loss against a hand computation, and the teacher's inputs (train/distill.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imgcls_dist.train.distill import _as_input, distillation_loss


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _by_hand(logits, labels, teacher, T, alpha):
    n = len(labels)
    hard = -np.log(_softmax(logits)[np.arange(n), labels]).mean()
    pt = _softmax(np.log(teacher) / T)  # the teacher's probabilities at temperature T
    ps = _softmax(logits / T)
    kd = (pt * (np.log(pt) - np.log(ps))).sum(axis=1).mean()  # KL(teacher_T || student_T), per image
    return alpha * T * T * kd + (1 - alpha) * hard


@pytest.mark.parametrize("T, alpha", [(1.0, 0.5), (4.0, 0.9), (2.0, 0.0), (3.0, 1.0)])
def test_the_loss_is_hintons_by_hand(T, alpha):
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 5)) * 3, rng.integers(0, 5, 6)
    teacher = _softmax(rng.normal(size=(6, 5)) * 2)
    got = distillation_loss(torch.tensor(logits), torch.tensor(labels), torch.tensor(teacher), temperature=T,
                            alpha=alpha)
    assert float(got) == pytest.approx(_by_hand(logits, labels, teacher, T, alpha), rel=1e-6)


def test_alpha_zero_is_plain_cross_entropy_and_soft_labels_are_taken():
    logits = torch.randn(4, 3)
    mixed = torch.softmax(torch.randn(4, 3), dim=1)  # MixUp/CutMix targets
    teacher = torch.softmax(torch.randn(4, 3), dim=1)
    assert torch.allclose(distillation_loss(logits, mixed, teacher, temperature=2.0, alpha=0.0),
                          F.cross_entropy(logits, mixed))


def test_a_teacher_that_agrees_with_the_student_adds_nothing():
    logits = torch.randn(5, 4)
    teacher = torch.softmax(logits, dim=1)
    labels = torch.zeros(5, dtype=torch.long)
    kd_only = distillation_loss(logits, labels, teacher, temperature=3.0, alpha=1.0)
    assert float(kd_only) == pytest.approx(0.0, abs=1e-6)


def test_teacher_inputs_take_each_members_size_and_channels():
    gray = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    rgb = _as_input(gray, 24, 3)
    assert rgb.shape == (2, 3, 24, 24) and rgb.dtype == torch.uint8
    assert torch.equal(rgb[:, 0], rgb[:, 2])  # a gray image replicated
    back = _as_input(_as_input(gray, 16, 3), 16, 1)
    assert torch.equal(back, gray)  # same size: no resampling; 3 equal channels average to the same gray
