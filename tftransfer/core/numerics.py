"""numerics: moved from tftransfer.jobs.evaluate."""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def stable_softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, computed in float64 after subtracting the row max, returned as float32."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / np.sum(e, axis=-1, keepdims=True)).astype(np.float32)
