"""Temperature scaling: one scalar T per model, fitted on validation logits (`choose_temperature`).

The NLL fit (`fit_temperature`, LBFGS on log T), or, when it asks for sharpening on a split with few errors,
the expectation-consistent T (`consistent_temperature`). Why, and the references: docs/design.md,
"Temperature scaling".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Bounds on T: beyond them the fit is chasing a degenerate validation set (all correct -> T -> 0).
T_MIN, T_MAX = 0.05, 20.0
# Below this many validation errors a sharpening fitted by NLL is replaced by the expectation-consistent T.
# With almost no validation errors the NLL fit sharpens towards T_MIN, and the few errors of unseen data then
# cost many nats each: the digits members' test NLL rose above its value at T = 1, and the expectation-consistent
# T lowered it (docs/benchmarks.md, "Ensembles built on validation data").
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
    MIN_ERRORS_TO_SHARPEN validation errors becomes the expectation-consistent T (docs/design.md,
    "Temperature scaling"), kept between the NLL fit and 1: NLL is convex in 1/T with its minimum at the fit, so there validation NLL
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
