"""reporting.grids: the training-batch and top-losses pictures."""

from __future__ import annotations

import numpy as np
import pytest

from tftransfer.reporting import grids


def test_top_losses_skips_mistakes_without_a_readable_file(tmp_path):
    mistakes = [{"file": f"f{i}", "true": "a", "predicted": "b", "confidence": 0.9, "true_class_probability": 0.1}
                for i in range(3)]
    loaded = []

    def load(file):
        loaded.append(file)
        return np.full((8, 8, 3), 200.0) if file != "f1" else None

    path = grids.plot_top_losses(mistakes, load, tmp_path / "top.png", count=2)
    assert path is not None and path.stat().st_size > 500 and loaded == ["f0", "f1"]
    assert grids.plot_top_losses(mistakes, lambda f: None, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_train_batch_captions_each_image_with_its_class(tmp_path):
    pixels = np.random.default_rng(0).uniform(0, 255, (5, 16, 16, 3))
    path = grids.plot_train_batch(pixels, np.array([0, 1, 1, 0, 1]), ["ant", "bee"], tmp_path / "b.png", count=4)
    assert path.stat().st_size > 500
    with pytest.raises(ValueError, match="no images"):
        grids.plot_image_grid([], [], tmp_path / "empty.png")
