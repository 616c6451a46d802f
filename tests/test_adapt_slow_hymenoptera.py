"""`tftransfer adapt` on a hard real shift: hymenoptera val photos at contrast severity 5, real MobileNetV2 (slow).

The corrupted photos are written as an unlabeled flat folder, so the job sees no labels; the test scores the
adapted runs against the known classes afterwards.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tftransfer.cli import main
from tftransfer.config.experiment import load_config
from tftransfer.domain.corruptions import corrupt
from tftransfer.domain.targets import load_source_split
from tftransfer.evaluation.inference import predict_probabilities
from tftransfer.jobs.fit import run_fit
from tftransfer.runs.finished import load_run

WEIGHTS = "weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"


@pytest.mark.slow
def test_adapt_wins_back_contrast_severity_5(shared_data, tmp_path):
    cfg = load_config(values={
        "name": "hym", "runs_dir": str(tmp_path / "runs"), "export.enabled": False,
        "data.path": str(shared_data / "datasets" / "hymenoptera"), "data.image_size": 224,
        "model.backbone": "mobilenetv2", "model.weights": str(shared_data / WEIGHTS),
        "model.backbone_kwargs": {"alpha": 0.5}, "model.bottleneck": 256, "model.dropout": 0.2,
        "phases.head.epochs": 30, "phases.head.learning_rate": 0.003, "phases.finetune.epochs": 0,
        "runtime.cache_dir": str(tmp_path / "cache")})
    run = load_run(run_fit(cfg).run_dir)
    val = load_source_split(run, "val", batch_size=32, max_images=2000, seed=0)
    target = tmp_path / "low_contrast"
    target.mkdir()
    for i, image in enumerate(val.images):
        pixels = corrupt(image, "contrast", 5, seed=[0, i]).numpy()
        Image.fromarray(np.round(pixels).astype(np.uint8)).save(target / f"{i:04d}.png")
    before = np.mean(predict_probabilities(run.model, _read(target), 32).argmax(1) == val.labels)

    accuracy = {}
    for method in ("auto", "shot"):
        result = CliRunner().invoke(main, ["adapt", str(run.path), "--target", str(target), "--method", method],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        adapted = load_run(run.path.parent / f"hym-{method}")
        accuracy[method] = np.mean(predict_probabilities(adapted.model, _read(target), 32).argmax(1) == val.labels)
        info = json.loads((adapted.path / "adaptation.json").read_text())
        assert info["target_images"] == len(val.images)
    # benchmarks/hard_shift_adapt.py, 3 seeds: unadapted ~47%, adabn-aligned / mcc / shot ~88%.
    assert before < 0.7
    assert accuracy["auto"] >= before + 0.15, (before, accuracy)
    assert accuracy["shot"] >= before + 0.15, (before, accuracy)


def _read(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in sorted(folder.glob("*.png"))])
