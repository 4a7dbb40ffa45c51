"""Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks"): one scalar T per model,
fitted on validation logits by minimising the negative log-likelihood of softmax(logits / T).

T is optimised as log T (so it stays positive) with torch.optim.LBFGS: a one-dimensional smooth problem with
one minimum (NLL is convex in 1/T), solved in a handful of iterations. T does not change any argmax, so a
member's accuracy is the same before and after; its NLL and expected calibration error are what move.

When the NLL fit asks for sharpening (T < 1) on a validation split with few errors, it is not identified:
with no errors NLL falls without bound as T -> 0. There T comes from expectation consistency instead
(Clarté, Loureiro, Krzakala & Zdeborová, 2023, "Expectation consistency for calibration of neural networks"):
the T at which the mean confidence equals the validation accuracy, here Laplace's rule-of-succession estimate
(n - k + 1) / (n + 2) of it (k errors in n rows), which stays below 1 when k = 0. scipy/sklearn have no
temperature or EC calibrator (sklearn's CalibratedClassifierCV fits sigmoid/isotonic maps per class, which
change argmaxes and need many errors), hence these few lines.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Bounds on T: beyond them the fit is chasing a degenerate validation set (all correct -> T -> 0).
T_MIN, T_MAX = 0.05, 20.0
# Below this many validation errors a sharpening fitted by NLL is replaced by the expectation-consistent T.
# Measured (docs/benchmarks.md, issue 14): digits members with 0-1 errors on a 179-row val split fitted
# T = 0.05-0.29 by NLL, and test NLL rose from 0.075-0.080 to 0.11-0.23 on the 540-row test split, whose few
# errors then cost ~10 nats each; the expectation-consistent T (0.20-0.66) lowered it to 0.021-0.031.
# Softening (T > 1, the usual correction for over-confident CNNs) is always the NLL fit.
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


def smoothed_accuracy(errors: int, rows: int) -> float:
    """Laplace's rule of succession: the posterior mean accuracy under a uniform prior, (n - k + 1) / (n + 2)."""
    return (rows - errors + 1) / (rows + 2)


def consistent_temperature(logits: np.ndarray, target: float) -> float:
    """The T in [T_MIN, T_MAX] at which the mean max-probability of softmax(logits / T) equals `target`
    (it falls monotonically as T grows), by bisection on log T."""
    lo, hi = np.log(T_MIN), np.log(T_MAX)
    for _ in range(50):  # the bracket shrinks 2^50-fold: far below any T that changes a probability
        mid = (lo + hi) / 2
        if softmax(logits, float(np.exp(mid))).max(axis=-1).mean() > target:
            lo = mid
        else:
            hi = mid
    return float(np.exp((lo + hi) / 2))


def choose_temperature(logits: np.ndarray, labels: np.ndarray) -> tuple[float, str]:
    """(T, how it was chosen): `fit_temperature`, except that a sharpening fitted on fewer than
    MIN_ERRORS_TO_SHARPEN validation errors becomes the expectation-consistent T (see the module docstring),
    kept between the NLL fit and 1: NLL is convex in 1/T with its minimum at the fit, so there validation NLL
    is never above T = 1's."""
    t = fit_temperature(logits, labels)
    n = len(labels)
    errors = int((np.asarray(logits).argmax(axis=1) != np.asarray(labels)).sum())
    if t >= 1.0 or errors >= MIN_ERRORS_TO_SHARPEN:
        return t, f"NLL fit on {n} rows ({errors} errors)"
    target = smoothed_accuracy(errors, n)
    t_ec = consistent_temperature(logits, target)
    return float(np.clip(t_ec, t, 1.0)), (
        f"NLL fit T={t:.3g} < 1 rests on {errors} validation errors (< {MIN_ERRORS_TO_SHARPEN}): expectation "
        f"consistency T={t_ec:.3g} (mean confidence {target:.4f} = (n-k+1)/(n+2)), kept within [NLL fit, 1]")
