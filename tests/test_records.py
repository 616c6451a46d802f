"""runs.records: metrics.json has one shape, written and read through RunMetrics."""

from __future__ import annotations

import json

import pytest

from tftransfer.core.errors import RunDirError
from tftransfer.runs.records import RunMetrics, read_run_metrics
from tftransfer.serving.model_card import ModelCard


def _minimal() -> dict:
    return {"schema_version": 1, "run": {"name": "r", "backbone": "tiny", "image_size": 32, "run_dir": "/x/r"},
            "phases": [{"name": "head"}], "final": {"val": {"accuracy": 0.75}}, "timings": {"total_seconds": 3.5}}


def test_every_key_is_written_even_when_a_part_does_not_apply(tmp_path):
    path = tmp_path / "metrics.json"
    RunMetrics.from_dict(_minimal()).write(path)
    written = json.loads(path.read_text())
    assert list(written) == ["schema_version", "run", "phases", "final", "export", "timings", "adapt", "distill"]
    assert written["adapt"] is None and written["distill"] is None and written["export"] is None


def test_readers_get_typed_figures(tmp_path):
    data = {**_minimal(), "adapt": {"final": {"accuracy": 0.6}}}
    record = RunMetrics.from_dict(data)
    assert (record.val_accuracy, record.target_accuracy, record.total_seconds) == (0.75, 0.6, 3.5)
    assert (record.image_size, record.backbone, str(record.run_dir)) == (32, "tiny", "/x/r")
    assert RunMetrics.from_dict({"run": {"image_size": 0}}).image_size is None
    assert RunMetrics.from_dict({}).val is None
    assert read_run_metrics(tmp_path / "missing.json") is None


def test_a_file_that_is_not_a_run_record_names_itself(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("[1, 2]")
    with pytest.raises(RunDirError, match="metrics.json is not a tftransfer run's metrics"):
        RunMetrics.read(path)
    with pytest.raises(RunDirError, match="has not finished"):
        RunMetrics.read(tmp_path / "nope.json")


def test_a_model_card_has_one_shape_with_or_without_a_run(tmp_path):
    bare = ModelCard.from_dict({"classes": ["a", "b"], "num_classes": 2, "input": {"image_size": 32}, "extra": 1})
    bare.write(tmp_path / "model_card.json")
    written = json.loads((tmp_path / "model_card.json").read_text())
    assert next(iter(written)) == "schema_version" and "extra" not in written
    assert {"gate", "export", "tflite", "backbone", "training_data", "validation_metrics"} <= set(written)
    again = ModelCard.read(tmp_path / "model_card.json")
    assert again == bare and again.image_size == 32 and again.val_accuracy is None
    assert ModelCard.read(tmp_path / "absent.json") is None
