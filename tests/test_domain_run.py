"""The domain report end to end through the CLI on a tiny fitted run, and its bad-input messages."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import COLOURS, make_colour_folder, write_solid_images

from tftransfer.cli import main
from tftransfer.config.experiment import load_config
from tftransfer.core.errors import DataError, RunDirError
from tftransfer.jobs.domain import run_domain
from tftransfer.reporting.domain import render_markdown

FAST = {"model.backbone": "tiny", "model.weights": "none", "data.image_size": 32, "data.batch_size": 8,
        "phases.head.epochs": 8, "phases.head.learning_rate": 0.05, "phases.finetune.epochs": 2,
        "phases.finetune.learning_rate": 0.001, "phases.finetune.warmup_epochs": 0,
        "runtime.deterministic": True, "export.enabled": False}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny run fitted on solid-colour folders (train/ and val/), and its data folder."""
    from tftransfer.jobs.fit import run_fit

    root = tmp_path_factory.mktemp("domain")
    data = make_colour_folder(root / "colours", per_class=12, splits=True)
    cfg = load_config(values={**FAST, "data.path": str(data), "name": "colours", "runs_dir": str(root / "runs"),
                              "runtime.cache_dir": str(root / "cache")})
    result = run_fit(cfg)
    return result.run_dir, data


def dim_target(root: Path, factor: float = 0.45, per_class: int = 8, size: int = 32, flat: bool = False) -> Path:
    """The same three colours, darker (another camera's exposure): a labeled (or flat, unlabeled) folder."""
    for index, (name, colour) in enumerate(COLOURS.items()):
        dark = tuple(int(c * factor) for c in colour)
        folder = root if flat else root / name
        paths = write_solid_images(folder, dark, per_class, size, seed=50 + index)
        if flat:
            for p in paths:
                p.rename(p.with_name(f"{name}_{p.name}"))
    return root


class _TensorFlowWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, ["domain", *args], catch_exceptions=False)


def test_domain_command_labeled_target_with_adaptation_and_corruptions(fitted, tmp_path, monkeypatch):
    from tensorflow.python.eager.polymorphic_function import polymorphic_function

    run, _ = fitted
    target = dim_target(tmp_path / "dim")
    out = tmp_path / "report"
    # TensorFlow counts traces per function body over the whole process: start from none, so that only this
    # command's traces count, not those of tests run before it in the same worker.
    monkeypatch.setattr(polymorphic_function, "_frequent_tracing_detector_manager",
                        type(polymorphic_function._frequent_tracing_detector_manager)())
    traced = _TensorFlowWarnings()
    logging.getLogger("tensorflow").addHandler(traced)
    try:
        result = invoke(str(run), "--target", str(target), "--adapt", "adabn,adabn-aligned,bn-batch,tent",
                    "--corruptions", "gaussian_noise,contrast", "--severities", "1,3", "--adapt-severities", "3",
                        "--batch-size", "8", "--permutations", "200", "--tsne", "--out", str(out))
    finally:
        logging.getLogger("tensorflow").removeHandler(traced)
    assert result.exit_code == 0, result.output
    # Each model the report runs (the run's, its split, each adapter's working copy) is traced once.
    assert not [m for m in traced.messages if "retracing" in m], traced.messages
    for name in ("domain.json", "domain.md", "feature_map_pca.png", "feature_map_tsne.png",
                 "corruption_accuracy.png", "batchnorm_drift.png", "target_confusion_matrix.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "domain.json").read_text())
    assert report["source"]["split"] == "val" and report["source"]["examples"] == 12
    assert report["target"]["labeled"] and report["target"]["examples"] == 24
    src, tgt = report["source"]["metrics"]["accuracy"], report["target"]["metrics"]["accuracy"]
    assert report["drop"]["accuracy"] == pytest.approx(src - tgt)
    # Darker images are a shift the features show: the permutation test must see it.
    assert report["shift"]["mmd"]["p_value"] < 0.05 and report["shift"]["mmd"]["permutations"] == 200
    assert 0 <= report["shift"]["proxy_a_distance"]["value"] <= 2
    drift = report["batchnorm_drift"]
    assert {row["layer"] for row in drift} == {"stem_bn", "block1_bn", "block2_bn", "block3_bn"}
    assert [row["target"]["kl"] for row in drift] == sorted((row["target"]["kl"] for row in drift), reverse=True)
    adaptation = report["adaptation"]
    assert list(adaptation) == ["source-only", "adabn", "adabn-aligned", "bn-batch", "tent"]
    assert adaptation["source-only"]["accuracy"] == pytest.approx(tgt)
    for entry in list(adaptation.values())[1:]:
        assert entry["hurts"] == (entry["accuracy"] < tgt)
        assert entry["accuracy_change"] == pytest.approx(entry["accuracy"] - tgt)
        assert "source_self_check" in entry and 0 <= entry["changed_predictions"] <= 1
    corr = report["corruptions"]
    assert corr["severities"] == [1, 3] and set(corr["results"]) == {"gaussian_noise", "contrast"}
    assert set(corr["adaptation"]) == {"adabn", "adabn-aligned", "bn-batch", "tent"}
    assert set(corr["adaptation"]["tent"]["contrast"]) == {"3"}
    markdown = (out / "domain.md").read_text()
    for heading in ("## Accuracy: source vs target", "## Shift in feature space", "## Cheap adaptation",
                    "## Corruption suite", "## Where the shift lives"):
        assert heading in markdown
    assert "target" in result.output and "report:" in result.output


def test_same_images_show_no_shift(fitted, tmp_path):
    run, data = fitted
    result = run_domain(run, target=str(data / "val"), batch_size=4, permutations=200, out_dir=tmp_path / "same")
    shift = result.report["shift"]
    assert shift["mmd"]["p_value"] > 0.05 and not shift["mmd"]["shift_detected"]
    assert shift["proxy_a_distance"]["value"] < 0.5
    assert result.report["drop"]["accuracy"] == pytest.approx(0.0)
    assert shift["coral"]["value"] == pytest.approx(0.0, abs=1e-12)


def test_unlabeled_flat_target_of_another_size_and_default_output_folder(fitted, tmp_path):
    run, _ = fitted
    target = dim_target(tmp_path / "flat", size=57, flat=True)  # images at 57 px, the model takes 32
    result = invoke(str(run), "--target", str(target), "--target-unlabeled", "--adapt", "tent",
                    "--batch-size", "8", "--permutations", "100", "--no-self-check")
    assert result.exit_code == 0, result.output
    report = json.loads((run / "domain" / "domain.json").read_text())
    assert not report["target"]["labeled"] and "metrics" not in report["target"] and "drop" not in report
    assert report["target"]["examples"] == 24
    assert "accuracy" not in report["adaptation"]["tent"] and "source_self_check" not in report["adaptation"]["tent"]
    signals = report["adaptation"]["tent"]["signals"]
    assert {"mean_entropy", "mean_confidence", "prediction_diversity", "distribution_tv"} <= set(signals)
    assert "unknown without labels" in (run / "domain" / "domain.md").read_text()
    # Without labels, a method that loses source accuracy when adapted to the source itself is flagged.
    report["adaptation"]["tent"]["source_self_check"] = {"accuracy": 0.5, "accuracy_change": -0.3}
    flagged = render_markdown(report)
    assert "**suspect**: loses source accuracy" in flagged and "-30.0" in flagged
    report["adaptation"]["tent"]["source_self_check"]["accuracy_change"] = -0.01
    assert "**suspect**" not in render_markdown(report)


def test_other_source_is_scored_whole_and_a_second_report_keeps_the_first(fitted, tmp_path):
    run, _ = fitted
    # A folder that is not the run's data has none of its training images: all of it is scored, not a 20%
    # hash split (before: 6 of these 30 images).
    other = dim_target(tmp_path / "other", factor=1.0, per_class=10)
    out = tmp_path / "report"
    first = run_domain(run, source=str(other), target=str(other), batch_size=8, permutations=50, out_dir=out)
    assert first.out_dir == out
    assert first.report["source"]["examples"] == 30 and first.report["source"]["split"] == "all"
    before = (out / "domain.json").read_bytes()

    second = run_domain(run, source=str(other), target=str(other), batch_size=8, permutations=50, out_dir=out)
    assert second.out_dir == tmp_path / "report-2" and (second.out_dir / "domain.json").is_file()
    assert (out / "domain.json").read_bytes() == before
    with pytest.raises(RunDirError, match="is a run directory"):
        run_domain(run, source=str(other), target=str(other), batch_size=8, permutations=50, out_dir=run)


def test_corruptions_alone_need_no_target(fitted, tmp_path):
    run, _ = fitted
    result = run_domain(run, corruptions="all", severities=(5,), out_dir=tmp_path / "c", batch_size=8)
    corr = result.report["corruptions"]
    assert len(corr["results"]) >= 12 and "target" not in result.report
    for entry in corr["results"].values():
        assert entry["error"] == [pytest.approx(1 - a) for a in entry["accuracy"]]
        assert entry["relative_error"] == pytest.approx(entry["mean_error"] - corr["clean"]["error"])


def test_bad_inputs_get_one_line_messages(fitted, tmp_path):
    run, _ = fitted
    # A target with a class the model does not know.
    other = make_colour_folder(tmp_path / "other", per_class=4)
    write_solid_images(other / "purple", (128, 0, 128), 4)
    result = invoke(str(run), "--target", str(other), "--batch-size", "4")
    assert result.exit_code == 1 and "not known to the model: ['purple']" in result.output
    assert "Traceback" not in result.output
    # Fewer than two batches.
    small = make_colour_folder(tmp_path / "small", per_class=2)
    result = invoke(str(run), "--target", str(small), "--batch-size", "8")
    assert result.exit_code == 1 and "fewer than 2 batches of 8" in result.output
    # A target folder whose files are not images.
    broken = tmp_path / "broken"
    for name in COLOURS:
        (broken / name).mkdir(parents=True)
        (broken / name / "a.jpg").write_bytes(b"not a jpeg")
    result = invoke(str(run), "--target", str(broken))
    assert result.exit_code == 1 and "no readable images" in result.output
    result = invoke(str(run), "--target", str(broken), "--target-unlabeled")
    assert result.exit_code == 1 and "no readable images" in result.output
    # Unknown names, and nothing to do.
    result = invoke(str(run), "--corruptions", "snow")
    assert result.exit_code == 1 and "unknown corruption 'snow'" in result.output
    result = invoke(str(run), "--target", str(other), "--adapt", "magic")
    assert result.exit_code == 1 and "unknown adaptation method" in result.output
    result = invoke(str(run))
    assert result.exit_code == 2 and "nothing to measure" in result.output
    with pytest.raises(RunDirError, match="not found"):
        run_domain(tmp_path / "nope", corruptions="fog")
    with pytest.raises(DataError, match="adaptation needs target images"):
        run_domain(run, corruptions="fog", adapt="adabn")


def test_target_subset_of_classes_is_measured(fitted, tmp_path):
    run, _ = fitted
    two = tmp_path / "two"
    for name in ("cyan", "yellow"):
        write_solid_images(two / name, COLOURS[name], 6, seed=7)
    result = run_domain(run, target=str(two), batch_size=4, permutations=50, out_dir=tmp_path / "two-out")
    metrics = result.report["target"]["metrics"]
    assert metrics["per_class"]["magenta"]["support"] == 0 and metrics["num_examples"] == 12
    classes = {row["class"] for row in result.report["drop"]["per_class_recall"]}
    assert classes == {"cyan", "yellow"}
    assert np.isclose(sum(result.report["target"]["signals"]["predicted_distribution"].values()), 1.0)


def test_adapt_writes_a_new_run_that_export_ships(fitted, tmp_path):
    import json

    import keras

    from tftransfer.domain import batchnorm

    run_dir, _ = fitted
    target = dim_target(tmp_path / "dim", flat=True)
    result = CliRunner().invoke(main, ["adapt", str(run_dir), "--target", str(target), "--method", "adabn",
                                       "--name", "colours-dim"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    adapted = run_dir.parent / "colours-dim"
    info = json.loads((adapted / "adaptation.json").read_text())
    assert info["method"] == "adabn" and info["target_images"] == 24
    for name in ("model.keras", "config.yaml", "labels.txt", "split.json"):
        assert (adapted / name).is_file(), name
    # the stored BatchNorm statistics changed (darker images), the original run's did not
    old = batchnorm.batchnorm_layers(batchnorm.get_backbone(keras.models.load_model(run_dir / "model.keras")))
    new = batchnorm.batchnorm_layers(batchnorm.get_backbone(keras.models.load_model(adapted / "model.keras")))
    assert any(not np.allclose(a.moving_mean.numpy(), b.moving_mean.numpy()) for a, b in zip(old, new))
    assert "name: colours-dim" in (adapted / "config.yaml").read_text()
    shipped = CliRunner().invoke(main, ["export", str(adapted), "--to", str(tmp_path / "saved")],
                                 catch_exceptions=False)
    assert shipped.exit_code == 0, shipped.output
    assert (tmp_path / "saved" / "1" / "saved_model.pb").is_file()
    refused = CliRunner().invoke(main, ["adapt", str(run_dir), "--target", str(target), "--method", "tent"])
    assert refused.exit_code != 0 and "tent" in refused.output
