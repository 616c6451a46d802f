"""End to end through the command line (Click's CliRunner): fit, export, serve from a fresh process, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import COLOURS, make_colour_folder, write_solid_images

import tftransfer.serving.publish as publish
from tftransfer.cli import main

ACCURACY_GATE = 0.9

# The tiny backbone has random weights, so both phases train at bold rates; a few seconds on 2 CPU cores.
FAST_FIT = ["--backbone", "tiny", "--weights", "none", "--image-size", "32", "--batch-size", "8",
            "--set", "phases.head.epochs=8", "--set", "phases.head.learning_rate=0.05",
            "--set", "phases.finetune.epochs=2", "--set", "phases.finetune.learning_rate=0.001",
            "--set", "phases.finetune.warmup_epochs=0", "--set", "runtime.deterministic=true"]


def _fit(tmp_path: Path, data: Path, name: str, *extra: str) -> tuple[object, dict | None]:
    args = ["fit", "--data", str(data), "--name", name, "--set", f"runs_dir={tmp_path / 'runs'}",
            "--set", f"export.dir={tmp_path / 'saved_models'}", *FAST_FIT, *extra]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    metrics_path = tmp_path / "runs" / name / "metrics.json"
    return result, json.loads(metrics_path.read_text()) if metrics_path.exists() else None


def _image_tags(log_dir: Path) -> set[str]:
    import tensorflow as tf

    return {value.tag for events in log_dir.glob("events.out.tfevents.*")
            for event in tf.compat.v1.train.summary_iterator(str(events)) for value in event.summary.value
            if value.metadata.plugin_data.plugin_name == "images"}


def test_fit_end_to_end_reaches_gate_and_serves_jpeg_bytes(tmp_path):
    data = make_colour_folder(tmp_path / "colours", per_class=15, splits=True)
    result, metrics = _fit(tmp_path, data, "colours")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "colours"
    for name in ("config.yaml", "history.json", "metrics.json", "summary.md", "model.keras", "split.json",
                 "labels.txt", "confusion_matrix.png", "history.png"):
        assert (run / name).is_file(), name
    assert list((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert {"confusion_matrix", "reliability"} <= _image_tags(run / "logs" / "validation")  # issue 13 item 10
    assert (run / "train_batch.png").stat().st_size > 1000 and "(train_batch.png)" in (run / "summary.md").read_text()
    assert metrics["final"]["val"]["accuracy"] >= ACCURACY_GATE
    assert [p["name"] for p in metrics["phases"]] == ["head", "finetune"]
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, 11))  # one continuous epoch axis
    assert metrics["export"]["parity_ok"] and metrics["export"]["parity_max_abs_diff"] <= 1e-4
    export_dir = Path(metrics["export"]["path"])
    assert export_dir == tmp_path / "saved_models" / "colours" / "1"
    assert "final val accuracy" in result.output
    # issue 12: fit publishes through export's path, so its model card has export's shape: the fresh-process
    # parity check on pixels and encoded bytes, the gate, and the export entry
    card = json.loads((export_dir / "model_card.json").read_text())
    assert card["export"]["published"] is True and card["export"]["version"] == 1
    assert card["export"]["parity"]["fresh_process"] and card["export"]["parity"]["serving_default"]["images"] > 0
    assert card["gate"]["passed"] and "tflite" in card

    # A fresh Python process (no tftransfer import) loads the SavedModel and classifies JPEG bytes.
    probe = write_solid_images(tmp_path / "probe", COLOURS["magenta"], 1, size=57, seed=999)[0]
    script = (
        "import sys, json, tensorflow as tf\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "raw = tf.io.read_file(sys.argv[2])\n"
        "out = m.signatures['serving_default'](images=tf.stack([raw]))\n"
        "print(json.dumps({'names': [n.decode() for n in out['class_names'][0].numpy()],"
        " 'p': out['probabilities'][0].numpy().tolist()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(export_dir), str(probe)], capture_output=True,
                          text=True, timeout=120, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert served["names"][0] == "magenta"
    assert sum(served["p"]) == pytest.approx(1.0, abs=1e-5)


class _NoFreshProcess:
    """Stands in for the parity check's fresh process where the check itself is replaced: the real one would
    import TensorFlow (about 10 s of CPU) only to be stopped unused."""

    def __enter__(self) -> _NoFreshProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass


def test_fit_whose_export_fails_its_check_publishes_no_version(tmp_path, monkeypatch):
    """Issue 14, item 1: fit checks its export in a dot-named folder TF Serving ignores; a failed check publishes
    nothing, keeps the export aside, and fit exits non-zero after writing the run."""
    checked = []

    def failing_check(model, version_dir, pixels, encoded=(), tolerance=1e-4, process=None):
        checked.append((Path(version_dir).name, sorted(p.name for p in Path(version_dir).parent.iterdir())))
        return {"max_abs_diff": 1.0, "tolerance": tolerance, "ok": False}

    monkeypatch.setattr(publish, "check_parity_fresh_process", failing_check)
    monkeypatch.setattr(publish, "FreshProcess", _NoFreshProcess)
    data = make_colour_folder(tmp_path / "colours", per_class=6, splits=True)
    # the quality gate would refuse this chance-level model first: off here, so the parity check is what refuses
    result, metrics = _fit(tmp_path, data, "colours", "--set", "phases.head.epochs=1",
                           "--set", "phases.finetune.epochs=0", "--set", "export.min_gain_over_chance=0")

    assert result.exit_code == 1, result.output
    assert "was not published" in result.output.strip().splitlines()[-1]
    [(checked_name, present)] = checked
    assert checked_name.startswith(".tmp-") and present == [checked_name]  # nothing live while checking
    model_dir = tmp_path / "saved_models" / "colours"
    assert not any(p.name.isdigit() for p in model_dir.iterdir())
    export = metrics["export"]
    assert export["published"] is False and export["version"] is None and not export["parity_ok"]
    kept = Path(export["path"])
    assert kept.parent == model_dir and kept.name.startswith(".rejected-") and (kept / "saved_model.pb").is_file()
    assert "not published" in (tmp_path / "runs" / "colours" / "summary.md").read_text()


def test_accuracy_gate_fails_on_random_labels(tmp_path):
    """Every class folder holds all three colours: nothing to learn, so the gate must not pass."""
    root = tmp_path / "random"
    for index, name in enumerate(("a", "b", "c")):
        for j, colour in enumerate(COLOURS.values()):
            write_solid_images(root / "train" / name / str(j), colour, 5, seed=10 * index + j)
            write_solid_images(root / "val" / name / str(j), colour, 2, seed=100 + 10 * index + j)
    result, metrics = _fit(tmp_path, root, "random")
    assert result.exit_code == 0, result.output
    assert metrics["final"]["val"]["accuracy"] < ACCURACY_GATE
    # issue 13 item 2: the chance-level model is not published as a version, and fit says so
    assert metrics["export"]["published"] is False and "majority-class rate" in metrics["export"]["gate"]
    assert "not exported:" in result.output


def test_existing_run_is_refused_then_kept_aside_with_overwrite(tmp_path):
    data = make_colour_folder(tmp_path / "colours", per_class=6)
    args = ["--set", "phases.head.epochs=1", "--set", "phases.finetune.epochs=0", "--set", "export.enabled=false"]
    first, _ = _fit(tmp_path, data, "again", *args)
    assert first.exit_code == 0, first.output
    second, _ = _fit(tmp_path, data, "again", *args)
    assert second.exit_code == 1
    assert "already exists" in second.output and "--overwrite" in second.output
    third, _ = _fit(tmp_path, data, "again", *args, "--overwrite")
    assert third.exit_code == 0, third.output
    kept = [p.name for p in (tmp_path / "runs").iterdir()]
    assert "again" in kept and any(k.startswith("again.replaced-") for k in kept)


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/nope"], "data folder not found"),
    (["--data", "{one}"], "needs at least 2 class subfolders"),
    (["--data", "{ok}", "--backbone", "resnet5"], "resnet50"),
    (["--data", "{ok}", "--image-size", "4"], "too small"),
    (["--data", "{ok}", "--weights", "{tmp}/missing.h5"], "missing.h5"),
    (["--data", "{ok}", "--set", "phases.head.lr=1"], "unknown config key 'phases.head.lr'"),
    (["--config", "{tmp}/none.yaml"], "none.yaml"),
])
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    one = tmp_path / "one"
    write_solid_images(one / "only", (0, 0, 0), 2)
    ok = make_colour_folder(tmp_path / "ok", per_class=3)
    args = [a.format(tmp=tmp_path, one=one, ok=ok) for a in args]
    base = ["fit", "--name", "bad", "--set", f"runs_dir={tmp_path / 'runs'}", "--weights", "none",
            "--backbone", "tiny"]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs" / "bad").exists()  # nothing half-written


@pytest.mark.parametrize("name", [".", "..", "../../X", "a/b", "line\nbreak", "bell\x07"])
def test_a_run_name_is_one_safe_folder_name(tmp_path, name):
    data = make_colour_folder(tmp_path / "colours", per_class=3)
    (tmp_path / "work" / "runs" / "earlier").mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, ["fit", "--data", str(data), "--name", name, "--overwrite",
                                       "--set", f"runs_dir={tmp_path / 'work' / 'runs'}",
                                       "--set", f"export.dir={tmp_path / 'work' / 'saved_models'}", *FAST_FIT])
    assert result.exit_code == 1, result.output
    assert "is not usable" in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if "is not usable" in line]) == 1
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before  # nothing moved/made


def test_backbones_lists_registry():
    result = CliRunner().invoke(main, ["backbones"])
    assert result.exit_code == 0
    for name in ("resnet50", "mobilenetv2", "efficientnetb0", "convnexttiny", "tiny"):
        assert name in result.output
    detail = CliRunner().invoke(main, ["backbones", "tiny"])
    assert detail.exit_code == 0 and "block3" in detail.output


def test_backbones_list_does_not_import_tensorflow():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom tftransfer.cli import main\n"
            "result = CliRunner().invoke(main, ['backbones'])\n"
            "assert result.exit_code == 0, result.output\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
            "print(result.output)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mobilenetv2" in proc.stdout and "41 backbones." in proc.stdout


def test_python_dash_m_runs():
    proc = subprocess.run([sys.executable, "-m", "tftransfer", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "fit" in proc.stdout
