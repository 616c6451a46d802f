"""Small numerically careful helpers on probability arrays (NumPy, no TensorFlow)."""

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


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats (probabilities clipped at 1e-12, so a zero contributes nothing)."""
    p = np.asarray(p, np.float64)
    return -np.sum(p * np.log(np.clip(p, 1e-12, 1.0)), axis=axis)


def marginal_entropy(probs: np.ndarray) -> float:
    """Entropy of the mean prediction as a fraction of log(classes): 1 = spread evenly, 0 = one class."""
    mean = np.asarray(probs, np.float64).mean(axis=0)
    return float(entropy(mean) / np.log(max(len(mean), 2)))
