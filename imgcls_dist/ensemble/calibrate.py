"""Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks"): one scalar T per model,
fitted on validation logits by minimising the negative log-likelihood of softmax(logits / T).

T is optimised as log T (so it stays positive) with torch.optim.LBFGS: a one-dimensional smooth convex
problem in log T, solved in a handful of iterations. T does not change any argmax, so a member's accuracy
is the same before and after; its NLL and expected calibration error are what move.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Bounds on T: beyond them the fit is chasing a degenerate validation set (all correct -> T -> 0).
T_MIN, T_MAX = 0.05, 20.0
# Sharpening (T < 1) is estimated from the validation rows a model gets wrong: with none, NLL falls without
# bound as T -> 0. Measured (docs/benchmarks.md, issue 14): digits members with 0-1 errors on a 179-row val
# split fitted T = 0.05-0.29, and test NLL rose from 0.075-0.080 to 0.11-0.23 on the 540-row test split,
# whose few errors then cost ~10 nats each. Below this many validation errors T < 1 is not trusted and T = 1
# is kept; softening (T > 1, the usual correction for over-confident CNNs) is always fitted.
MIN_ERRORS_TO_SHARPEN = 20


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising mean NLL of softmax(logits / T) on (logits [N, C], labels [N])."""
    x = torch.from_numpy(np.asarray(logits, np.float64))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), T_MIN, T_MAX))


def choose_temperature(logits: np.ndarray, labels: np.ndarray) -> tuple[float, str]:
    """(T, how it was chosen): `fit_temperature`, except that a sharpening fitted on fewer than
    MIN_ERRORS_TO_SHARPEN validation errors is replaced by T = 1 (see the constant)."""
    t = fit_temperature(logits, labels)
    errors = int((np.asarray(logits).argmax(axis=1) != np.asarray(labels)).sum())
    if t < 1.0 and errors < MIN_ERRORS_TO_SHARPEN:
        return 1.0, f"fitted T={t:.3g} < 1 on only {errors} validation errors (< {MIN_ERRORS_TO_SHARPEN}): kept T=1"
    return t, f"fitted on {len(labels)} rows ({errors} errors)"
