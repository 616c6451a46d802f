"""`tftransfer evaluate` and `tftransfer export` end to end through the CLI, on a run fitted once per module."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tensorflow as tf
import yaml
from click.testing import CliRunner
from conftest import COLOURS, make_colour_folder, write_solid_images

from tftransfer.cli import main

FAST_FIT = ["--backbone", "tiny", "--weights", "none", "--image-size", "32", "--batch-size", "8",
            "--set", "phases.head.epochs=8", "--set", "phases.head.learning_rate=0.05",
            "--set", "phases.finetune.epochs=1", "--set", "phases.finetune.learning_rate=0.001",
            "--set", "phases.finetune.warmup_epochs=0", "--set", "runtime.deterministic=true"]

EVALUATION_KEYS = {"schema_version", "kind", "created", "model", "data", "metrics", "calibration", "timing",
                   "mistakes", "versions"}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate_cli")
    data = make_colour_folder(root / "colours", per_class=12, splits=True)
    args = ["fit", "--data", str(data), "--name", "colours", "--set", f"runs_dir={root / 'runs'}",
            "--set", f"export.dir={root / 'saved_models'}", "--set", f"runtime.cache_dir={root / 'cache'}",
            *FAST_FIT]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"root": root, "data": data, "run": root / "runs" / "colours",
            "export": root / "saved_models" / "colours" / "1", "fit_output": result.output}


def test_piped_fit_and_evaluate_log_progress_with_totals(fitted):
    """stderr is not a terminal under CliRunner: each long step ends with a log line carrying its total (no bar, no
    Keras '1/Unknown'); --no-progress leaves them out, and fit and evaluate agree on the default."""
    fit_output = fitted["fit_output"]
    assert re.search(r"^features train: (\d+)/\1 images \(100%\)", fit_output, re.M), fit_output
    assert re.search(r"^export: SavedModel, parity check: 2/2 steps", fit_output, re.M), fit_output
    assert "Unknown" not in fit_output and "\r" not in fit_output
    shown = _invoke("evaluate", fitted["run"], "--data", fitted["data"], "--output", fitted["root"] / "progress")
    assert shown.exit_code == 0, shown.output
    assert re.search(r"^evaluate val: 12/12 images \(100%\)", shown.output, re.M), shown.output
    hidden = _invoke("evaluate", fitted["run"], "--data", fitted["data"], "--output", fitted["root"] / "quiet",
                     "--no-progress")
    assert hidden.exit_code == 0 and "evaluate val:" not in hidden.output
    defaults = {name: next(p.default for p in main.commands[name].params if p.name == "progress")
                for name in ("fit", "evaluate", "distill")}
    assert defaults == {"fit": True, "evaluate": True, "distill": True}


def _invoke(*args: str) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _event_tags(log_dir: Path) -> set[str]:
    tags = set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_evaluate_a_run_directory_on_its_validation_folder(fitted):
    result = _invoke("evaluate", fitted["run"], "--data", fitted["data"], "--no-progress")
    assert result.exit_code == 0, result.output
    out = fitted["run"] / "eval" / "colours-val"
    metrics = json.loads((out / "metrics.json").read_text())

    assert set(metrics) == EVALUATION_KEYS and metrics["kind"] == "evaluation" and metrics["schema_version"] == 1
    assert metrics["model"]["kind"] == "run" and metrics["data"]["split"] == "val"
    assert metrics["data"]["num_examples"] == 3 * 4
    assert metrics["metrics"]["accuracy"] >= 0.9
    assert len(metrics["metrics"]["confusion_matrix"]) == 3
    calibration = metrics["calibration"]
    assert calibration["in_sample"] is True and calibration["temperature"] > 0  # the run's val split is the data
    assert calibration["before"]["ece"] == pytest.approx(metrics["metrics"]["ece"])
    timing = metrics["timing"]
    assert timing["images_per_second"] > 0 and 0 < timing["latency"]["p50_ms"] <= timing["latency"]["p95_ms"]
    for name in ("summary.md", "confusion_matrix.png", "reliability.png"):
        assert (out / name).is_file(), name
    summary = (out / "summary.md").read_text()
    for heading in ("## Metrics", "## Calibration: temperature scaling", "## Speed", "## Most confident mistakes",
                    "![Confusion matrix](confusion_matrix.png)"):
        assert heading in summary
    # The plots are TensorBoard images in the run's logs, next to its training curves.
    assert {"confusion_matrix", "reliability", "accuracy"} <= _event_tags(fitted["run"] / "logs" / "eval")
    assert "accuracy" in result.output and "summary:" in result.output

    # A second evaluation is written next to the first, which is kept; --overwrite replaces the first.
    first = (out / "metrics.json").read_bytes()
    again = _invoke("evaluate", fitted["run"], "--data", fitted["data"], "--no-progress")
    assert again.exit_code == 0, again.output
    assert (out.with_name("colours-val-2") / "metrics.json").is_file()
    assert (out / "metrics.json").read_bytes() == first
    replaced = _invoke("evaluate", fitted["run"], "--data", fitted["data"], "--no-progress", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert (out / "metrics.json").read_bytes() != first and not out.with_name("colours-val-3").exists()
    # The run's own metrics.json and summary.md are never an evaluation's to replace, --overwrite or not.
    own = (fitted["run"] / "metrics.json").read_bytes()
    refused = _invoke("evaluate", fitted["run"], "--data", fitted["data"], "--no-progress",
                      "--output", fitted["run"], "--overwrite")
    assert refused.exit_code == 1 and "is a run directory" in refused.output
    assert (fitted["run"] / "metrics.json").read_bytes() == own


def test_evaluate_an_export_lists_the_most_confident_mistakes(fitted, tmp_path):
    # Every folder holds the right colour except "cyan", which holds magenta images: 4 confident mistakes.
    data = tmp_path / "target"
    for index, (name, colour) in enumerate(COLOURS.items()):
        write_solid_images(data / name, COLOURS["magenta"] if name == "cyan" else colour, 4, seed=50 + index)
    out = tmp_path / "evaluation"
    result = _invoke("evaluate", fitted["export"], "--data", data, "--output", out, "--mistakes", "3",
                     "--no-progress")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())

    assert metrics["model"]["kind"] == "saved_model" and metrics["data"]["split"] == "all"
    assert metrics["metrics"]["num_examples"] == 12
    assert metrics["metrics"]["per_class"]["cyan"]["recall"] == 0.0
    mistakes = metrics["mistakes"]
    assert len(mistakes) == 3
    assert all(m["true"] == "cyan" and m["predicted"] == "magenta" for m in mistakes)
    assert all(Path(m["file"]).is_file() and Path(m["file"]).parent.name == "cyan" for m in mistakes)
    confidences = [m["confidence"] for m in mistakes]
    assert confidences == sorted(confidences, reverse=True)
    assert Path(mistakes[0]["file"]).name in (out / "summary.md").read_text()
    assert "most confident mistakes" in result.output
    # issue 13 item 10: the mistakes as pictures (fastai's top losses), linked from the summary
    assert (out / "top_losses.png").stat().st_size > 1000 and "(top_losses.png)" in (out / "summary.md").read_text()


def test_evaluate_refuses_data_whose_classes_differ(fitted, tmp_path):
    data = tmp_path / "other"
    for index, name in enumerate(("cyan", "magenta", "purple")):
        write_solid_images(data / name, (128, 0, 128), 2, seed=index)
    result = _invoke("evaluate", fitted["run"], "--data", data, "--output", tmp_path / "out")
    assert result.exit_code == 1
    assert "differ from the model's" in result.output and "purple" in result.output and "yellow" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_evaluate_and_export_refuse_unusable_models(fitted, tmp_path):
    unfinished = tmp_path / "runs" / "unfinished"
    unfinished.mkdir(parents=True)
    for name in ("config.yaml", "labels.txt", "split.json"):
        shutil.copy(fitted["run"] / name, unfinished / name)
    for command in (["evaluate", unfinished, "--data", fitted["data"]], ["export", unfinished]):
        result = _invoke(*command)
        assert result.exit_code == 1 and "no finished model" in result.output, result.output

    # An export whose predict_pixels signature is gone.
    module = tf.Module()
    module.serve = tf.function(lambda images: {"n": tf.size(images)},
                               input_signature=[tf.TensorSpec([None], tf.string)])
    tf.saved_model.save(module, str(tmp_path / "partial" / "1"), signatures={"serving_default": module.serve})
    result = _invoke("evaluate", tmp_path / "partial" / "1", "--data", fitted["data"])
    assert result.exit_code == 1 and "no 'predict_pixels' signature" in result.output
    assert "Traceback" not in result.output


def test_cli_choices_mirror_the_library_registries():
    from tftransfer.config.commands import (
        SPLIT_NAMES,
        TFLITE_MODE_NAMES,
        EvaluateCommandConfig,
        ExportCommandConfig,
        setting_specs,
    )
    from tftransfer.data.selection import SPLIT_CHOICES
    from tftransfer.serving.tflite import TFLITE_MODES

    assert SPLIT_NAMES == SPLIT_CHOICES and setting_specs(EvaluateCommandConfig)["split"].choices == SPLIT_CHOICES
    assert TFLITE_MODE_NAMES == tuple(TFLITE_MODES)
    assert setting_specs(ExportCommandConfig)["tflite"].choices == tuple(TFLITE_MODES)


def test_export_command_writes_next_version_card_and_int8_tflite(fitted):
    model_dir = fitted["export"].parent
    result = _invoke("export", fitted["run"], "--tflite", "int8", "--signatures")
    assert result.exit_code == 0, result.output
    version_dir = model_dir / "2"
    assert f"exported: {version_dir}" in result.output
    assert "parity in a fresh process" in result.output and ": OK" in result.output
    assert "signature_def['serving_default']" in result.output and "inputs['images']" in result.output
    assert "tflite int8" in result.output

    card = json.loads((version_dir / "model_card.json").read_text())
    split = json.loads((fitted["run"] / "split.json").read_text())
    assert card["training_data"]["fingerprint"] == split["fingerprint"]
    assert card["backbone"]["name"] == "tiny" and card["input"]["image_size"] == 32
    assert card["validation_metrics"]["accuracy"] >= 0.9
    parity = card["export"]["parity"]
    assert parity["ok"] and parity["fresh_process"] and parity["max_abs_diff"] <= 1e-4
    assert parity["serving_default"]["images"] == 3 * 4  # real validation JPEGs through the bytes signature
    lite = card["tflite"]
    assert (version_dir / "model_int8.tflite").stat().st_size == lite["size_bytes"]
    comparison = lite["comparison"]
    assert comparison["examples"] == 12 and abs(comparison["accuracy_delta"]) <= 0.1

    # issue 13 item 8: evaluate and predict take the .tflite file itself, run by the TFLite interpreter
    tflite_file = version_dir / "model_int8.tflite"
    out = version_dir.parent.parent / "tflite-eval"
    evaluated = _invoke("evaluate", tflite_file, "--data", fitted["data"], "--split", "val", "--output", out,
                        "--no-progress")
    assert evaluated.exit_code == 0, evaluated.output
    scored = json.loads((out / "metrics.json").read_text())
    assert scored["model"]["kind"] == "tflite" and scored["metrics"]["accuracy"] >= 0.9
    predicted = _invoke("predict", tflite_file, str(fitted["data"] / "val"), "--json", out / "p.json")
    assert predicted.exit_code == 0, predicted.output
    rows = json.loads((out / "p.json").read_text())["predictions"]
    assert len(rows) == 12 and {r["top_k"][0]["class"] for r in rows} <= set(COLOURS)

    # Exports never overwrite: an explicit existing version is refused and nothing changes.
    before = sorted(p.name for p in model_dir.iterdir())
    again = _invoke("export", fitted["run"], "--version", "2")
    assert again.exit_code == 1 and "already exists" in again.output
    assert sorted(p.name for p in model_dir.iterdir()) == before


def _versions(model_dir: Path) -> list[str]:
    """The folders TF Serving would load: integer names."""
    return sorted(p.name for p in model_dir.iterdir() if p.name.isdigit()) if model_dir.is_dir() else []


def test_an_export_that_fails_its_check_is_never_live(fitted, tmp_path):
    """Issue 14, item 1: the parity check runs on a dot-named folder TF Serving ignores; a failed check publishes
    no version, exits non-zero with one line saying where the rejected export is kept."""
    copy = tmp_path / "copy"
    shutil.copytree(fitted["run"], copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["export"]["parity_tolerance"] = 0.0
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    model_dir = tmp_path / "saved_models" / "copy"

    result = _invoke("export", copy, "--to", model_dir)
    assert result.exit_code == 1, result.output
    [error] = [line for line in result.output.splitlines() if "Error" in line]  # one line, the last
    assert result.output.strip().endswith(error) and error.startswith("Error: the export disagrees with")
    assert "nothing was published" in error
    assert _versions(model_dir) == []
    [kept] = [p for p in model_dir.iterdir()]
    assert kept.name.startswith(".rejected-") and str(kept) in error
    card = json.loads((kept / "model_card.json").read_text())
    assert card["export"]["published"] is False and card["export"]["parity"]["ok"] is False


# A process SIGKILLed mid-export, about a minute under load: the slow suite
# (test_an_export_that_fails_its_check_is_never_live is the fast check of the staging).
@pytest.mark.slow
def test_an_export_killed_during_its_check_leaves_nothing_live(fitted, tmp_path):
    """Issue 14, item 1: SIGKILL while the check runs leaves no version; the next export removes the dead
    process's temporary folder and publishes version 1."""
    model_dir = tmp_path / "saved_models" / "colours"
    script = textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        import tftransfer.jobs.export as job
        import tftransfer.serving.publish as publish

        def killed(*args, **kwargs):
            assert not any(p.name.isdigit() for p in Path(sys.argv[2]).iterdir())  # nothing live while checking
            os.kill(os.getpid(), signal.SIGKILL)

        class NoFreshProcess:  # the replaced check never uses it: the real one would import TensorFlow, orphaned
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

        publish.check_parity_fresh_process = killed
        publish.FreshProcess = NoFreshProcess
        job.export_run(sys.argv[1], model_dir=Path(sys.argv[2]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(fitted["run"]), str(model_dir)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _versions(model_dir) == []
    [leftover] = [p for p in model_dir.iterdir()]
    assert leftover.name.startswith(".tmp-")

    result = _invoke("export", fitted["run"], "--to", model_dir)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MOBILENET_WEIGHTS = "weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"


@pytest.mark.slow
def test_real_photos_evaluate_export_int8_and_predict(shared_data, tmp_path):
    """MobileNetV2 with the real ImageNet weights, head only, on the real hymenoptera photos."""
    data = shared_data / "datasets" / "hymenoptera"
    fit = _invoke("fit", "--config", CONFIGS / "mobilenetv2_hymenoptera.yaml", "--name", "ants_bees",
                  "--set", f"model.weights={shared_data / MOBILENET_WEIGHTS}", "--set", f"data.path={data}",
                  "--set", f"runs_dir={tmp_path / 'runs'}", "--set", f"export.dir={tmp_path / 'saved_models'}",
                  "--set", f"runtime.cache_dir={tmp_path / 'cache'}", "--set", "phases.finetune.epochs=0")
    assert fit.exit_code == 0, fit.output
    run = tmp_path / "runs" / "ants_bees"

    evaluated = _invoke("evaluate", run, "--data", data, "--no-progress")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((run / "eval" / "hymenoptera-val" / "metrics.json").read_text())
    assert metrics["data"]["num_examples"] == 153 and metrics["metrics"]["accuracy"] >= 0.9
    assert metrics["mistakes"] and all(Path(m["file"]).is_file() for m in metrics["mistakes"])
    assert metrics["calibration"]["after"]["log_loss"] <= metrics["calibration"]["before"]["log_loss"] + 1e-9

    exported = _invoke("export", run, "--tflite", "int8")
    assert exported.exit_code == 0, exported.output
    card = json.loads((tmp_path / "saved_models" / "ants_bees" / "2" / "model_card.json").read_text())
    assert card["export"]["parity"]["ok"] and card["export"]["parity"]["serving_default"]["images"] == 32
    comparison = card["tflite"]["comparison"]
    # Full-integer MobileNetV2 keeps the float model's accuracy within a few of the 153 images.
    assert comparison["examples"] == 153 and abs(comparison["accuracy_delta"]) <= 0.03
    assert card["tflite"]["size_bytes"] < card["export"]["saved_model_size_bytes"] / 2

    out = tmp_path / "bees.json"
    predicted = _invoke("predict", tmp_path / "saved_models" / "ants_bees", data / "val" / "bees", "--json", out)
    assert predicted.exit_code == 0, predicted.output
    rows = json.loads(out.read_text())["predictions"]
    assert len(rows) == 83 and sum(r["top_k"][0]["class"] == "bees" for r in rows) >= 70
