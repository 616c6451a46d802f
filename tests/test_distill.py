"""Knowledge distillation: the loss, a student that follows its teacher, config errors, the CLI, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import COLOURS, make_colour_folder, write_solid_images

import tftransfer
from tftransfer.cli import main
from tftransfer.core.errors import ConfigError, DataError, RunDirError

NAMES = list(COLOURS)  # cyan, magenta, yellow: the folders' (sorted) class order


def _tiny(tmp: Path, **extra) -> dict:
    """A run of the tiny backbone that finishes in seconds (phase 2 only when asked for)."""
    return {"model.weights": "none", "data.image_size": 32, "data.batch_size": 8, "model.dropout": 0.0,
            "phases.head.epochs": 8, "phases.head.learning_rate": 0.05, "phases.finetune.epochs": 0,
            "runs_dir": str(tmp / "runs"), "export.enabled": False, "runtime.cache_dir": str(tmp / "cache"),
            **extra}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The true colour folders, and a permuted copy: the teacher learns cyan images as 'magenta' and so on."""
    root = tmp_path_factory.mktemp("distill")
    true = make_colour_folder(root / "true", per_class=12, splits=True)
    permuted = root / "permuted"
    for index, name in enumerate(NAMES):
        shown = COLOURS[NAMES[(index - 1) % 3]]  # folder i holds colour i-1: the teacher's "labels" are shifted
        write_solid_images(permuted / "train" / name, shown, 12, seed=index)
        write_solid_images(permuted / "val" / name, shown, 4, seed=100 + index)
    unlabeled = root / "unlabeled"
    for index, colour in enumerate(COLOURS.values()):
        write_solid_images(unlabeled / f"batch{index}", colour, 6, seed=200 + index)
    return {"root": root, "true": true, "permuted": permuted, "unlabeled": unlabeled}


@pytest.fixture(scope="module")
def teacher(folders) -> Path:
    """A confident teacher whose predictions on the true data are systematically shifted by one class."""
    result = tftransfer.fit(values={**_tiny(folders["root"]), "data.path": str(folders["permuted"]),
                                    "model.backbone": "tiny", "name": "teacher"})
    assert result.metrics["final"]["val"]["accuracy"] == 1.0
    return result.run_dir


# ---------------------------------------------------------------------------------------------------------------
# The loss


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_distillation_loss_is_hinton_kl_plus_cross_entropy():
    import tensorflow as tf

    from tftransfer.training.distill import distillation_losses

    rng = np.random.default_rng(0)
    s, t = rng.normal(0, 2, (5, 4)).astype(np.float32), rng.normal(0, 2, (5, 4)).astype(np.float32)
    labels = np.array([0, 3, 1, -1, 2])  # the fourth image is unlabeled
    temp, alpha = 3.0, 0.6
    pt, ps = _softmax(t / temp), _softmax(s / temp)
    kl = temp ** 2 * np.sum(pt * (np.log(pt) - np.log(ps)), axis=1)
    ce = -np.log(_softmax(s)[np.arange(5), np.maximum(labels, 0)]) * (labels >= 0)
    total, soft, hard = distillation_losses(labels, s, t, alpha, temp)
    np.testing.assert_allclose(soft.numpy(), kl, rtol=1e-5)
    np.testing.assert_allclose(hard.numpy(), ce, rtol=1e-5)
    np.testing.assert_allclose(total.numpy(), alpha * kl + (1 - alpha) * ce, rtol=1e-5)
    assert hard.numpy()[3] == 0.0 and total.numpy()[3] == pytest.approx(alpha * kl[3], rel=1e-5)
    assert np.all(distillation_losses(labels, t, t, 1.0, temp)[0].numpy() < 1e-5)  # same logits: nothing to learn
    # float16 logits (mixed precision) give the float32 result
    half = distillation_losses(labels, s.astype(np.float16), t.astype(np.float16), alpha, temp)[0]
    assert half.dtype == tf.float32
    np.testing.assert_allclose(half.numpy(), total.numpy(), rtol=2e-3, atol=2e-3)
    # the soft term's gradient is T (softmax(s/T) - softmax(t/T)) (Hinton et al. 2015, eq. 2, times T^2)
    x = tf.constant(s)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = tf.reduce_sum(distillation_losses(labels, x, t, 1.0, temp)[0])
    np.testing.assert_allclose(tape.gradient(out, x).numpy(), temp * (ps - pt), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# A student follows its teacher


def test_distilled_student_follows_the_teacher_and_the_baseline_does_not(folders, teacher):
    """Soft targets only (alpha 1) from a teacher that is wrong by design: the distilled student agrees with the
    teacher, the same student trained without it agrees with the labels. Without the soft loss the student would
    not learn at all (alpha 1 leaves no hard term), so this fails if distillation does nothing."""
    result = tftransfer.distill(teacher, "tiny", values={
        **_tiny(folders["root"]), "data.path": str(folders["true"]), "distill.alpha": 1.0,
        "distill.temperature": 2.0, "distill.views": 2, "name": "student"}, train_baseline=True)
    distill = result.metrics["distill"]
    assert distill["teacher"]["path"] == str(teacher) and distill["teacher"]["backbone"] == "tiny"
    assert distill["teacher"]["val_accuracy"] == 1.0 and distill["teacher"]["here"]["accuracy"] == 0.0
    student, baseline = distill["student"], distill["baseline"]
    assert student["agreement_with_teacher"] >= 0.9 and baseline["agreement_with_teacher"] <= 0.2
    assert student["kl_to_teacher"] < baseline["kl_to_teacher"] / 4
    assert baseline["accuracy"] >= 0.9 and result.baseline.metrics["final"]["val"]["accuracy"] >= 0.9
    assert result.metrics["final"]["val"]["accuracy"] == pytest.approx(student["accuracy"])
    assert distill["views"] == 2 and distill["train_images"] == 36
    summary = (result.run_dir / "summary.md").read_text()
    assert "## Distillation" in summary and "Baseline (same student, no teacher)" in summary
    saved = (result.run_dir / "config.yaml").read_text()
    assert f"teacher: {teacher}" in saved and "baseline: " + str(result.baseline.run_dir) in saved
    saved_baseline = yaml.safe_load((result.baseline.run_dir / "config.yaml").read_text())
    assert saved_baseline["distill"]["teacher"] == ""
    assert saved_baseline["phases"]["head"]["feature_cache_views"] == 2  # as many views as the student saw


def test_unlabeled_images_get_the_teachers_labels(folders, teacher):
    """Four labelled images per class: with the teacher's labels on the unlabeled folder (alpha 1), the student
    learns the teacher's mapping from the unlabeled images too, and the views come from the cache next time."""
    values = {**_tiny(folders["root"]), "data.path": str(folders["true"]), "distill.alpha": 1.0,
              "distill.temperature": 2.0, "distill.views": 1, "distill.unlabeled": str(folders["unlabeled"]),
              "name": "with_unlabeled", "data.augment.flip": False}
    first = tftransfer.distill(teacher, "tiny", values=values)
    assert first.metrics["distill"]["unlabeled_images"] == 18 and not first.metrics["distill"]["views_from_cache"]
    assert first.metrics["distill"]["student"]["agreement_with_teacher"] >= 0.9
    again = tftransfer.distill(teacher, "tiny", values=values, overwrite=True)
    assert again.metrics["distill"]["views_from_cache"]


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_are_one_line_errors_naming_the_key(folders, teacher, tmp_path):
    base = {**_tiny(tmp_path), "data.path": str(folders["true"])}
    with pytest.raises(ConfigError, match="did you mean temperature"):
        tftransfer.distill(teacher, "tiny", values={**base, "distill.temprature": 2})
    with pytest.raises(ConfigError, match="distill.alpha"):
        tftransfer.distill(teacher, "tiny", values={**base, "distill.alpha": 1.5})
    with pytest.raises(RunDirError, match="teacher run not found"):
        tftransfer.distill(tmp_path / "nope", "tiny", values=base)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("name: x\n")
    with pytest.raises(RunDirError, match="metrics.json is missing"):
        tftransfer.distill(unfinished, "tiny", values=base)
    two = make_colour_folder(tmp_path / "two", per_class=4)
    (two / "yellow").rename(two / "zebra")
    with pytest.raises(ConfigError, match=r"distill.teacher: the classes of .*labels.txt"):
        tftransfer.distill(teacher, "tiny", values={**base, "data.path": str(two)})
    with pytest.raises(ConfigError, match=r"distill.teacher: the classes of .*labels.txt"):
        tftransfer.distill(teacher, "tiny", values={**base, "data.path": str(two)}, train_baseline=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="distill.unlabeled: .*empty has no readable images"):
        tftransfer.distill(teacher, "tiny", values={**base, "distill.unlabeled": str(empty)})
    with pytest.raises(ConfigError, match="adapt.method: not supported together with distill.teacher"):
        tftransfer.distill(teacher, "tiny", values={**base, "adapt.method": "coral", "adapt.target": str(empty)})
    with pytest.raises(ConfigError, match="distill.unlabeled and distill.baseline need distill.teacher"):
        tftransfer.fit(values={**base, "model.backbone": "tiny", "distill.unlabeled": str(empty)})
    assert not (tmp_path / "runs").exists()  # every error came before a run folder was made


def test_cli_errors_are_one_line(folders, teacher, tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["distill", str(teacher), "--student", "tiny", "--data", str(folders["true"]),
                               "--set", "distill.views=0"])
    assert out.exit_code == 1 and out.output.strip().splitlines()[-1].startswith("Error: distill.views: must be")
    out = runner.invoke(main, ["distill", str(teacher), "--student", "tiny", "--baseline", str(teacher),
                               "--train-baseline"])
    assert out.exit_code == 2 and "not both" in out.output


# ---------------------------------------------------------------------------------------------------------------
# The CLI end to end, interrupted in phase 2 and resumed with `fit --resume`


def test_cli_distill_interrupted_in_phase_two_then_resumed(folders, teacher, tmp_path, monkeypatch):
    from tftransfer.training import callbacks

    real = callbacks.EpochCheckpoint.on_epoch_end
    calls = []

    def interrupt_after_two(self, epoch, logs=None):
        real(self, epoch, logs)
        calls.append(epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.EpochCheckpoint, "on_epoch_end", interrupt_after_two)
    runs = tmp_path / "runs"
    args = ["distill", str(teacher), "--student", "tiny", "--data", str(folders["true"]), "--weights", "none",
            "--image-size", "32", "--batch-size", "8", "--name", "cli_student", "--alpha", "0.5",
            "--temperature", "2", "--views", "2", "--set", f"runs_dir={runs}", "--set", "export.enabled=false",
            "--set", f"runtime.cache_dir={tmp_path / 'cache'}", "--set", "phases.head.epochs=4",
            "--set", "phases.head.learning_rate=0.05", "--set", "phases.finetune.epochs=4",
            "--set", "phases.finetune.unfreeze_blocks=1", "--set", "phases.finetune.learning_rate=0.001"]
    runner = CliRunner()
    out = runner.invoke(main, args)
    assert out.exit_code == 1 and "tftransfer fit --resume" in out.output, out.output
    run = runs / "cli_student"
    assert not (run / "metrics.json").exists()
    monkeypatch.setattr(callbacks.EpochCheckpoint, "on_epoch_end", real)
    out = runner.invoke(main, ["fit", "--resume", str(run)])
    assert out.exit_code == 0, out.output
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, 9))
    assert [row["phase"] for row in history] == ["head"] * 4 + ["finetune"] * 4
    assert all("soft_loss" in row and "hard_loss" in row for row in history)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"]["val"]["accuracy"] >= 0.0 and metrics["distill"]["views_from_cache"]
    assert metrics["distill"]["alpha"] == 0.5 and metrics["distill"]["teacher"]["path"] == str(teacher)
    # every other command takes the run
    out = runner.invoke(main, ["evaluate", str(run)])
    assert out.exit_code == 0, out.output
