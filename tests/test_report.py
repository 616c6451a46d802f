"""summary.md rendering on full and partial metrics, and the PNG plots."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tftransfer.reporting.run_summary import (
    plot_confusion_matrix,
    plot_history,
    plot_reliability_diagram,
    render_evaluation_markdown,
    render_summary_markdown,
    write_evaluation_summary,
    write_summary,
    write_tensorboard_images,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _val(accuracy: float, macro_f1: float) -> dict:
    return {
        "num_examples": 153,
        "accuracy": accuracy,
        "balanced_accuracy": 0.9312,
        "macro_f1": macro_f1,
        "top_k_accuracy": {"k": 2, "value": 1.0},
        "log_loss": 0.21345,
        "ece": 0.04213,
        "mean_confidence": 0.8876,
        "per_class": {
            "ants": {"precision": 0.9459, "recall": 0.9333, "f1": 0.9396, "support": 75},
            "bees": {"precision": 0.9231, "recall": 0.9487, "f1": 0.9357, "support": 78},
        },
        "confusion_matrix": [[70, 5], [4, 74]],
        "class_names": ["ants", "bees"],
    }


FULL = {
    "schema_version": 1,
    "run": {
        "name": "ants_bees",
        "backbone": "mobilenetv2",
        "weights": "imagenet",
        "image_size": 224,
        "num_classes": 2,
        "class_names": ["ants", "bees"],
        "train_examples": 245,
        "val_examples": 153,
        "run_dir": "runs/ants_bees",
        "created": "2026-11-24T03:00:00Z",
        "tftransfer_version": "0.1.0",
        "tensorflow_version": "2.21.0",
        "keras_version": "3.15.1",
    },
    "phases": [
        {
            "name": "head",
            "epochs_run": 5,
            "best_epoch": 4,
            "trainable_params": 2562,
            "non_trainable_params": 706224,
            "unfrozen_blocks": [],
            "learning_rate": 0.001,
            "seconds": 12.34,
            "train_images_per_second": 99.52,
            "val": _val(0.9085, 0.9071),
        },
        {
            "name": "finetune",
            "epochs_run": 3,
            "best_epoch": 3,
            "trainable_params": 1234567,
            "non_trainable_params": 1000,
            "unfrozen_blocks": ["block_15", "block_16", "top"],
            "learning_rate": 1e-05,
            "seconds": 20.06,
            "train_images_per_second": 60.04,
            "val": _val(0.9412, 0.9376),
        },
    ],
    "final": {"val": _val(0.9412, 0.9376), "eval_images_per_second": 120.0},
    "export": {
        "path": "saved_models/ants_bees/1",
        "version": 1,
        "parity_max_abs_diff": 2.1e-07,
        "parity_ok": True,
        "parity_tolerance": 0.0001,
    },
    "timings": {"total_seconds": 40.123},
}


def test_render_full_example():
    md = render_summary_markdown(FULL)
    assert md.startswith("# Run summary: ants_bees\n")
    for text in [
        "mobilenetv2",
        "imagenet",
        "224 x 224",
        "2: ants, bees",
        "| Train examples | 245 |",
        "| Validation examples | 153 |",
        "tftransfer 0.1.0, TensorFlow 2.21.0, Keras 3.15.1",
        "40.1 s",
        # Phases: params with separators, LR, seconds and throughput to 1 decimal, val accuracy as percent.
        "| head | 5 | 4 | 2,562 | none | 0.001 | 12.3 | 99.5 | 90.8% | 0.907 |",
        "| finetune | 3 | 3 | 1,234,567 | block_15, block_16, top | 1e-05 | 20.1 | 60.0 | 94.1% | 0.938 |",
        # Final validation.
        "| Accuracy | 94.1% |",
        "| Balanced accuracy | 93.1% |",
        "| Macro-F1 | 0.938 |",
        "| Top-2 accuracy | 100.0% |",
        "| Log loss | 0.2135 |",
        "| ECE (expected calibration error) | 0.0421 |",
        "| Evaluation images/s | 120.0 |",
        "| ants | 0.946 | 0.933 | 0.940 | 75 |",
        "| bees | 0.923 | 0.949 | 0.936 | 78 |",
        # Confusion matrix: header of predicted class names, one row per true class.
        "| true \\ predicted | ants | bees |",
        "| **ants** | **70** | 5 |",
        "| **bees** | 4 | **74** |",
        # Export.
        "saved_models/ants_bees/1",
        "| Parity max abs diff | 2.1e-07 |",
        "| Parity tolerance | 0.0001 |",
        "| Parity | OK |",
    ]:
        assert text in md, text
    assert "FAILED" not in md
    assert "## Plots" not in md  # no run_dir given, so nothing to link


def test_render_partial_example():
    metrics = copy.deepcopy(FULL)
    metrics["export"] = None
    metrics["phases"] = metrics["phases"][:1]  # finetune skipped
    metrics["final"]["val"] = None
    md = render_summary_markdown(metrics)
    assert "Export disabled" in md
    assert "| head |" in md and "finetune" not in md
    assert "No validation data" in md
    assert "### Confusion matrix" not in md


@pytest.mark.parametrize(
    "metrics",
    [
        {},
        {"run": None, "phases": None, "final": None, "export": None, "timings": None},
        {"run": {"name": "x"}, "phases": [{"name": "head", "val": None}], "final": {"val": {"accuracy": 0.5}}},
        {"schema_version": 99, "final": {"val": {"confusion_matrix": [[1, 0], [0, 1]], "class_names": ["a"]}}},
    ],
)
def test_render_survives_missing_parts(metrics):
    md = render_summary_markdown(metrics)
    assert md.startswith("# Run summary")
    assert "n/a" in md or "No " in md


def test_render_flags_parity_failure_and_escapes_pipes():
    metrics = copy.deepcopy(FULL)
    metrics["export"]["parity_ok"] = False
    metrics["export"]["parity_max_abs_diff"] = 0.5
    metrics["final"]["val"]["class_names"] = ["a|b", "bees"]
    md = render_summary_markdown(metrics)
    assert "| Parity | **FAILED** |" in md
    assert "| true \\ predicted | a\\|b | bees |" in md


def test_write_summary_links_existing_plots(tmp_path: Path):
    plot_confusion_matrix([[70, 5], [4, 74]], ["ants", "bees"], tmp_path / "confusion_matrix.png")
    path = write_summary(FULL, tmp_path / "run")  # plots live elsewhere: nothing linked
    assert path == tmp_path / "run" / "summary.md"
    assert "## Plots" not in path.read_text(encoding="utf-8")

    path = write_summary(FULL, tmp_path)
    md = path.read_text(encoding="utf-8")
    assert "![Confusion matrix](confusion_matrix.png)" in md
    assert "reliability.png" not in md
    assert "94.1%" in md


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000  # a real rendered figure, not an empty canvas
    # IHDR is the first chunk: width and height are big-endian uint32 at bytes 16..24.
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_confusion_matrix_small_and_31_classes(tmp_path: Path):
    small = _png_size(plot_confusion_matrix([[70, 5], [4, 74]], ["ants", "bees"], tmp_path / "cm2.png"))
    names = [f"class_with_long_name_{i:02d}" for i in range(31)]
    cm = [[(20 if i == j else (i * j) % 3) for j in range(31)] for i in range(31)]
    cm[5] = [0] * 31  # a class with no validation examples must not divide by zero
    big = _png_size(plot_confusion_matrix(cm, names, tmp_path / "nested" / "cm31.png"))
    counts = _png_size(plot_confusion_matrix(cm, names, tmp_path / "cm31_counts.png", normalize=False))
    assert big[0] > 2 * small[0] and big[1] > 2 * small[1]  # figure grows with the class count
    assert counts[0] > 1000


def test_plot_confusion_matrix_rejects_mismatch(tmp_path: Path):
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="square"):
        plot_confusion_matrix([[1, 0, 0], [0, 1, 0]], ["a", "b"], tmp_path / "x.png")


def test_plot_reliability_diagram(tmp_path: Path):
    # Hand-made reliability_curve output with empty bins (None), as JSON would carry it.
    curve = {
        "bins": 5,
        "edges": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
        "confidence": [None, None, 0.56, 0.75, 0.9],
        "accuracy": [None, None, 0.4, 1.0, 1.0],
        "count": [0, 0, 5, 2, 1],
        "num_examples": 8,
        "ece": 0.175,
    }
    _png_size(plot_reliability_diagram(curve, tmp_path / "reliability.png"))
    del curve["ece"]  # recomputed from the bins when absent
    _png_size(plot_reliability_diagram(curve, tmp_path / "reliability2.png"))
    with pytest.raises(ValueError, match="inconsistent"):
        plot_reliability_diagram({**curve, "count": [1, 2]}, tmp_path / "bad.png")


def test_plot_history_with_phase_boundary(tmp_path: Path):
    history = {
        "loss": [1.0, 0.7, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2],
        "accuracy": [0.5, 0.7, 0.8, 0.85, 0.87, 0.9, 0.92, 0.94],
        "val_loss": [0.9, 0.6, 0.5, 0.45, 0.44, 0.4, 0.38, 0.37],
        "val_accuracy": [0.6, 0.75, 0.8, 0.84, 0.85, 0.9, 0.91, 0.93],
        "learning_rate": [1e-3] * 5 + [1e-5] * 3,
    }
    _png_size(plot_history(history, tmp_path / "history.png", phase_boundaries=[5]))
    _png_size(plot_history({"loss": [1.0, 0.5]}, tmp_path / "history_min.png"))
    with pytest.raises(ValueError, match="empty"):
        plot_history({}, tmp_path / "none.png")


# --- evaluation summaries and TensorBoard images ---------------------------------------------------------------

EVALUATION = {
    "schema_version": 1,
    "kind": "evaluation",
    "created": "2026-11-24T04:00:00Z",
    "model": {"path": "runs/ants_bees", "kind": "run", "name": "ants_bees", "class_names": ["ants", "bees"],
              "image_size": 224},
    "data": {"spec": "photos/", "name": "photos", "split": "val", "split_method": "folders", "num_examples": 153,
             "skipped_files": [{"file": "val/ants/x.gif", "reason": "not an image | really"}]},
    "metrics": _val(0.9412, 0.9376),
    "calibration": {"temperature": 1.734, "fitted_on": "validation split of run runs/ants_bees", "fit_examples": 153,
                    "in_sample": True, "before": {"ece": 0.0812, "log_loss": 0.3011, "mean_confidence": 0.97},
                    "after": {"ece": 0.0213, "log_loss": 0.2104, "mean_confidence": 0.91}},
    "timing": {"batch_size": 32, "seconds": 2.0, "images_per_second": 76.5,
               "latency": {"batch_size": 1, "runs": 20, "p50_ms": 12.34, "p95_ms": 15.67, "mean_ms": 12.9}},
    "mistakes": [{"file": "val/bees/b1.jpg", "true": "bees", "predicted": "ants", "confidence": 0.987,
                  "true_class_probability": 0.013}],
}


def test_render_evaluation_markdown():
    md = render_evaluation_markdown(EVALUATION)
    assert md.startswith("# Evaluation: ants_bees on photos (val)\n")
    for text in ["| Accuracy | 94.1% |", "| ECE | 0.0812 | 0.0213 |",
                 "Temperature **1.734**", "optimistic", "| Log loss (NLL) | 0.3011 | 0.2104 |",
                 "76.5 images/s", "12.34 ms", "15.67 ms",
                 "| 1 | val/bees/b1.jpg | bees | ants | 98.7% | 1.3% |",
                 "not an image \\| really",  # a '|' in a reason must not split the table cell
                 "**ants** | **70** | 5"]:
        assert text in md, text


def test_render_evaluation_markdown_survives_missing_parts():
    md = render_evaluation_markdown({"model": {"path": "m"}, "mistakes": [], "calibration": None})
    assert "No metrics." in md and "Temperature scaling was not run." in md and "No mistakes." in md
    assert render_evaluation_markdown({}).startswith("# Evaluation:")


def test_evaluation_summary_links_plots_and_tensorboard_images(tmp_path: Path):
    import tensorflow as tf

    png = plot_confusion_matrix([[3, 1], [0, 4]], ["a", "b"], tmp_path / "confusion_matrix.png")
    summary = write_evaluation_summary(EVALUATION, tmp_path).read_text()
    assert "![Confusion matrix](confusion_matrix.png)" in summary
    assert "reliability.png" not in summary  # only plots that exist are linked

    log_dir = write_tensorboard_images(tmp_path / "logs", {"confusion_matrix.png": png}, scalars={"ece": 0.05})
    values = [value for events in log_dir.glob("events.out.tfevents.*")
              for event in tf.compat.v1.train.summary_iterator(str(events)) for value in event.summary.value]
    assert {value.tag for value in values} == {"confusion_matrix", "ece"}
    image = next(value for value in values if value.tag == "confusion_matrix")
    assert tf.make_ndarray(image.tensor)[2].startswith(PNG_SIGNATURE)  # [width, height, encoded PNG]
