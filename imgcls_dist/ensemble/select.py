"""Choosing members and TTA views on validation data: greedy forward selection with replacement
(Caruana, Niculescu-Mizil, Crew & Ksikes, 2004, "Ensemble Selection from Libraries of Models").

Members: start from the single member with the lowest validation log-loss; at each step add (again, if
it helps most) the member whose inclusion lowers the ensemble's log-loss most; a member added k times has
weight k / steps. Views: start from `identity`; add the view whose inclusion lowers log-loss most.

A step is taken only if it lowers log-loss AND does not lower accuracy (Caruana et al. run a fixed
number of steps and keep the best prefix; stopping at the first step that does not help gives the same
guarantee with fewer forwards): the result is never worse on validation than its starting member, which is
the best single member by log-loss, in either metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_STEPS = 50
_TOL = 1e-9


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    p = probs[np.arange(len(labels)), labels].astype(np.float64)
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean())


@dataclass(frozen=True)
class Step:
    added: str
    nll: float
    acc: float


def _better(nll: float, acc: float, cur_nll: float, cur_acc: float) -> bool:
    return nll < cur_nll - _TOL and acc >= cur_acc - _TOL


def select_members(probs: np.ndarray, labels: np.ndarray, names: list[str],
                   max_steps: int = MAX_STEPS) -> tuple[list[int], list[Step]]:
    """probs [M, N, C] (calibrated, one view each) -> (times each member was picked, the steps)."""
    losses = [log_loss(p, labels) for p in probs]
    accs = [accuracy(p, labels) for p in probs]
    first = min(range(len(probs)), key=lambda i: (losses[i], -accs[i], i))
    counts = [0] * len(probs)
    counts[first] = 1
    total = probs[first].astype(np.float64)
    steps = [Step(names[first], losses[first], accs[first])]
    for _ in range(max_steps - 1):
        k = sum(counts)
        best = None
        for i, p in enumerate(probs):
            cand = (total + p) / (k + 1)
            nll, acc = log_loss(cand, labels), accuracy(cand, labels)
            if _better(nll, acc, steps[-1].nll, steps[-1].acc) and (best is None or nll < best[1] - _TOL):
                best = (i, nll, acc)
        if best is None:
            break
        i, nll, acc = best
        counts[i] += 1
        total = total + probs[i]
        steps.append(Step(names[i], nll, acc))
    return counts, steps


def select_views(view_probs: dict[str, np.ndarray], labels: np.ndarray,
                 candidates: list[str]) -> tuple[list[str], list[Step]]:
    """view_probs {view: ensemble probs [N, C] with that view alone} -> (chosen views, identity first; the
    steps). The probabilities of a view set are the mean over its views (what the predictor computes)."""
    chosen = ["identity"]
    total = view_probs["identity"].astype(np.float64)
    steps = [Step("identity", log_loss(total, labels), accuracy(total, labels))]
    while True:
        best = None
        for v in candidates:
            if v in chosen:
                continue
            cand = (total + view_probs[v]) / (len(chosen) + 1)
            nll, acc = log_loss(cand, labels), accuracy(cand, labels)
            if _better(nll, acc, steps[-1].nll, steps[-1].acc) and (best is None or nll < best[1] - _TOL):
                best = (v, nll, acc)
        if best is None:
            return chosen, steps
        v, nll, acc = best
        chosen.append(v)
        total = total + view_probs[v]
        steps.append(Step(v, nll, acc))
