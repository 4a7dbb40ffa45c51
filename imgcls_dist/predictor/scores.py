"""Per-row scores derived from class probabilities, shared by the batch job's output and the HTTP answer.
numpy only: the batch job's decode tasks import it without torch."""

from __future__ import annotations

import numpy as np


def entropy_nats(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy (nats) of each row of class probabilities: the `entropy` column, and serve's field."""
    return -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=-1).astype(np.float32)
