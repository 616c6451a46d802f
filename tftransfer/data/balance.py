"""Class imbalance: loss weights by inverse class frequency, and the imbalance ratio reported by `data inspect`.

`class_weight_for(cfg, labels, num_classes)` is what `model.fit(class_weight=...)` takes for `data.class_weight`
(None when it is `none`). Balanced *sampling* is the other remedy; it lives in the pipeline
(`data.balanced_sampling`). Use one or the other: both together over-correct.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tftransfer.config.experiment import DataConfig
from tftransfer.core.errors import ConfigError


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights {class id: n / (k * n_c)} over the k classes present (scikit-learn's "balanced").

    The mean weight over the examples is 1, so the loss keeps its scale; a class without examples gets 1.0.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes})")
    counts = np.bincount(labels, minlength=num_classes)
    present = int(np.sum(counts > 0))
    return {c: float(len(labels) / (present * counts[c])) if counts[c] else 1.0 for c in range(num_classes)}


CLASS_WEIGHTS: dict[str, Callable[[np.ndarray, int], dict[int, float] | None]] = {
    "none": lambda labels, num_classes: None,
    "auto": class_weights,
}


def class_weight_for(cfg: DataConfig, labels: Sequence[int] | np.ndarray, num_classes: int) -> dict[int, float] | None:
    """The `class_weight` argument for model.fit under data.class_weight (None = unweighted)."""
    if cfg.class_weight not in CLASS_WEIGHTS:
        raise ConfigError(f"data.class_weight: {cfg.class_weight!r} is not one of {', '.join(CLASS_WEIGHTS)}")
    return CLASS_WEIGHTS[cfg.class_weight](np.asarray(labels), num_classes)


def imbalance_ratio(counts: Sequence[int] | np.ndarray) -> float | None:
    """Largest over smallest class count among classes with examples; None when no class has any."""
    counts = np.asarray(counts)
    present = counts[counts > 0]
    if present.size == 0:
        return None
    return float(present.max() / present.min())
