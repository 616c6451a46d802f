"""The public Python API: tftransfer.fit / evaluate / predict from a notebook, without the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import make_colour_folder

import tftransfer
from tftransfer.core.errors import ConfigError
from tftransfer.jobs.evaluate import run_evaluation
from tftransfer.jobs.predict import predict_files


def test_api_names_are_the_library_functions():
    assert tftransfer.evaluate is run_evaluation and tftransfer.predict is predict_files
    assert set(tftransfer.__all__) <= set(dir(tftransfer))
    with pytest.raises(AttributeError):
        tftransfer.no_such_job  # noqa: B018


def test_import_and_config_errors_do_not_import_tensorflow():
    code = ("import sys, tftransfer\n"
            "try:\n    tftransfer.fit(overrides=['phases.head.lr=1'])\nexcept tftransfer.load_config.__globals__"
            "['ConfigError'] as e:\n    print('ConfigError', e)\n"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ConfigError unknown config key 'phases.head.lr'" in out
    assert out.strip().endswith("False False")


def test_fit_then_evaluate_and_predict_from_python(tmp_path):
    data = make_colour_folder(tmp_path / "data", per_class=8)
    result = tftransfer.fit(values={
        "data.path": str(data), "model.backbone": "tiny", "model.weights": "none", "data.image_size": 32,
        "data.batch_size": 8, "phases.head.epochs": 8, "phases.head.learning_rate": 0.05,
        "phases.finetune.epochs": 0, "runs_dir": str(tmp_path / "runs"), "export.enabled": False, "name": "api"})
    assert result.run_dir == tmp_path / "runs" / "api" and (result.run_dir / "metrics.json").is_file()
    report = tftransfer.evaluate(result.run_dir, str(data), split="val")
    assert report.metrics["metrics"]["num_examples"] > 0
    preds = tftransfer.predict(result.run_dir, [str(data)])
    assert len(preds.predictions) == sum(1 for p in data.rglob("*.jpg"))
    with pytest.raises(ConfigError, match="data.batch_size"):
        tftransfer.fit(values={"data.batch_size": 0})
