"""Office-31 DSLR -> webcam with training-time adaptation, real MobileNetV2 weights and real photos (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tftransfer.config.experiment import load_config
from tftransfer.jobs.fit import run_fit

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "office31_adapt.yaml"
WEIGHTS = "weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"


@pytest.mark.slow
def test_office31_pseudo_labels_adapt_dslr_to_webcam(shared_data, tmp_path):
    office = shared_data / "datasets" / "office31"
    cfg = load_config(CONFIG, values={
        "runs_dir": str(tmp_path / "runs"), "data.path": str(office / "dslr" / "images"),
        "adapt.target": str(office / "webcam" / "images"), "adapt.method": "pseudo-label",
        "model.weights": str(shared_data / WEIGHTS), "phases.finetune.epochs": 2,
        "runtime.cache_dir": str(tmp_path / "cache")})
    result = run_fit(cfg)
    adapt = result.metrics["adapt"]
    assert adapt["labeled"] and adapt["target_examples"] == 795
    # benchmarks/office31_adapt.py (6 fine-tuning epochs, 3 seeds): 92.9 +- 0.8 on the 795 webcam photos.
    assert adapt["final"]["accuracy"] >= 0.85
    history = json.loads((result.run_dir / "history.json").read_text())
    rounds = [row for row in history if "pseudo_label_accuracy" in row]
    assert rounds and all(row["pseudo_label_accuracy"] >= 0.9 for row in rounds[1:])  # confident = mostly right
    assert len(history) == 32
