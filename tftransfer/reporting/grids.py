"""Image grids people look at: a training batch as the model sees it (fastai's `show_batch`) and the most confident
mistakes of an evaluation (fastai's top losses), each a PNG beside the run's or the evaluation's summary."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

TRAIN_BATCH_PNG = "train_batch.png"
TOP_LOSSES_PNG = "top_losses.png"


def plot_image_grid(images: Sequence[np.ndarray], titles: Sequence[str], path: Path, columns: int = 6,
                    title: str = "") -> Path:
    """Saves images (H x W x 3, values 0..255) in a grid with a caption each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not images:
        raise ValueError("no images to draw")
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows + (0.4 if title else 0)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption in zip(axes.ravel(), images, titles):
        ax.imshow(np.clip(np.asarray(image, np.float32), 0, 255).astype(np.uint8))
        ax.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_train_batch(pixels: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: Path,
                     count: int = 12) -> Path:
    """The first `count` images of a training batch, augmented as in training, captioned with their class."""
    shown = min(count, len(pixels))
    titles = [str(class_names[int(label)]) for label in labels[:shown]]
    return plot_image_grid(list(pixels[:shown]), titles, path, title="a training batch, augmented as in training")


def plot_top_losses(mistakes: Sequence[Mapping[str, Any]], load: Any, path: Path, count: int = 12) -> Path | None:
    """The most confident mistakes (evaluate's `mistakes`), captioned true -> predicted (confidence, P(true)).
    `load(file)` returns the image's pixels or None; None when no mistake has a readable file."""
    images, titles = [], []
    for mistake in mistakes[:count]:
        pixels = load(str(mistake.get("file", "")))
        if pixels is None:
            continue
        images.append(pixels)
        titles.append(f"{mistake['true']} -> {mistake['predicted']}\n"
                      f"{mistake['confidence']:.0%} (P(true) {mistake['true_class_probability']:.0%})")
    if not images:
        return None
    return plot_image_grid(images, titles, path, title="most confident mistakes: true -> predicted")
