"""tftransfer.jobs.predict: loading run directories and SavedModels, classifying files, folders and globs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import write_solid_images

from tftransfer.cli import main
from tftransfer.config.experiment import ExperimentConfig, save_config
from tftransfer.core.errors import DataError, RunDirError
from tftransfer.data.files import collect_images
from tftransfer.jobs.predict import format_csv, format_json, format_table, predict_files
from tftransfer.serving.classifier import load_classifier
from tftransfer.serving.savedmodel import export_saved_model

NAMES = ["red", "green", "blue"]
SIZE = 32


def _colour_model() -> keras.Model:
    """Logits = 10 x the mean of each channel / 255: the dominant channel wins, with no training."""
    inputs = keras.Input((None, None, 3), name="pixels")
    x = keras.layers.Resizing(SIZE, SIZE, name="resize")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, kernel_initializer=keras.initializers.Identity(10.0 / 255.0),
                                 bias_initializer="zeros", dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs)


def _fake_run(root: Path, model: keras.Model) -> Path:
    """A finished run's files as `fit` writes them (config.yaml, labels.txt, metrics.json, model.keras)."""
    root.mkdir(parents=True)
    save_config(ExperimentConfig(name=root.name), root / "config.yaml")
    (root / "labels.txt").write_text("\n".join(NAMES) + "\n")
    (root / "metrics.json").write_text(json.dumps({"run": {"image_size": SIZE}}))
    model.save(root / "model.keras")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    model = _colour_model()
    return {"run": _fake_run(base / "runs" / "colour", model),
            "saved_model": export_saved_model(model, base / "saved_models" / "colour", NAMES, SIZE)}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Readable red/green/blue images (one in a subfolder, one PNG) and four files that must be skipped."""
    from PIL import Image

    folder = tmp_path / "images"
    write_solid_images(folder, (250, 10, 10), 1, size=40, seed=1)[0].rename(folder / "red.jpg")
    write_solid_images(folder, (10, 250, 10), 1, size=20, seed=2, fmt="PNG")[0].rename(folder / "green.png")
    write_solid_images(folder / "more", (10, 10, 250), 1, size=33, seed=3)[0].rename(folder / "more" / "blue.jpg")
    good = (folder / "red.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "notes.jpg").write_text("not a picture\n")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "dot.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / ".hidden.jpg").write_bytes(good)  # hidden files are not inputs
    (folder / "readme.txt").write_text("ignored: not an image extension\n")
    return folder


def test_folder_with_corrupt_files_is_classified_and_bad_files_skipped(models, images):
    result = predict_files(models["saved_model"], [str(images)], top_k=2)

    predicted = {Path(p.file).name: p.classes[0] for p in result.predictions}
    assert predicted == {"red.jpg": "red", "green.png": "green", "blue.jpg": "blue"}
    assert all(len(p.classes) == len(p.scores) == 2 and p.scores[0] >= p.scores[1] > 0 for p in result.predictions)
    reasons = {Path(f).name: why for f, why in result.skipped}
    assert set(reasons) == {"truncated.jpg", "notes.jpg", "dot.png", "empty.png"}
    assert "1x1 px" in reasons["dot.png"]
    assert "not an image" in reasons["notes.jpg"]
    assert "empty" in reasons["empty.png"]
    assert result.model_kind == "saved_model"


def test_run_directory_and_its_export_give_the_same_probabilities(models, images):
    files = [str(images / "red.jpg"), str(images / "green.png"), str(images / "more" / "blue.jpg")]
    from_run = predict_files(models["run"], files, top_k=3)
    from_export = predict_files(models["saved_model"], files, top_k=3)

    assert from_run.model_kind == "run"
    assert [p.file for p in from_run.predictions] == files  # input order
    for a, b in zip(from_run.predictions, from_export.predictions):
        assert a.classes == b.classes
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_globs_missing_paths_and_duplicates(models, images):
    files, skipped = collect_images([str(images / "*.png"), str(images / "red.jpg"), str(images / "red.jpg"),
                                     str(images / "nope.jpg"), str(images / "*.webp")])
    assert [f.name for f in files] == ["green.png", "red.jpg"]  # dot.png/empty.png are skipped, red.jpg once
    reasons = dict(skipped)
    assert "no such file" in reasons[str(images / "nope.jpg")]
    assert "matches no files" in reasons[str(images / "*.webp")]


def test_nothing_readable_is_a_data_error(models, images):
    with pytest.raises(DataError, match="no readable images"):
        predict_files(models["saved_model"], [str(images / "notes.jpg"), str(images / "dot.png")])


def test_output_formats(models, images):
    result = predict_files(models["saved_model"], [str(images / "red.jpg"), str(images / "green.png")], top_k=2)

    rows = list(csv.reader(io.StringIO(format_csv(result))))
    assert rows[0] == ["file", "class_1", "score_1", "class_2", "score_2"]
    assert rows[1][0].endswith("red.jpg") and rows[1][1] == "red" and float(rows[1][2]) > 0.9
    data = json.loads(format_json(result))
    assert data["predictions"][1]["top_k"][0]["class"] == "green"
    assert data["skipped"] == []
    table = format_table(result).splitlines()
    assert table[0].split() == ["file", "top", "1", "top", "2"]
    assert "red (" in table[1]


def test_load_classifier_errors(models, tmp_path):
    unfinished = tmp_path / "runs" / "unfinished"
    unfinished.mkdir(parents=True)
    save_config(ExperimentConfig(name="unfinished"), unfinished / "config.yaml")
    with pytest.raises(RunDirError, match="no finished model"):
        load_classifier(unfinished)
    with pytest.raises(RunDirError, match="neither a run directory"):
        load_classifier(tmp_path)
    with pytest.raises(RunDirError, match="does not exist"):
        load_classifier(tmp_path / "missing")

    # A SavedModel lacking the predict_pixels signature.
    module = tf.Module()
    module.serve = tf.function(lambda images: {"n": tf.size(images)},
                               input_signature=[tf.TensorSpec([None], tf.string)])
    tf.saved_model.save(module, str(tmp_path / "other" / "1"), signatures={"serving_default": module.serve})
    with pytest.raises(RunDirError, match="predict_pixels"):
        load_classifier(tmp_path / "other" / "1")

    # A model folder resolves to its newest version; without a model card the input size must be given.
    version = models["saved_model"]
    assert load_classifier(version.parent).path == version
    no_card = export_saved_model(_colour_model(), tmp_path / "nocard", NAMES, SIZE)
    (no_card / "model_card.json").unlink()
    with pytest.raises(RunDirError, match="--image-size"):
        load_classifier(no_card)
    assert load_classifier(no_card, image_size=SIZE).image_size == SIZE


def test_predict_command(models, images, tmp_path):
    runner = CliRunner()
    table = runner.invoke(main, ["predict", str(models["run"]), str(images)])
    assert table.exit_code == 0, table.output
    assert "red (" in table.output and "green (" in table.output
    assert "skipping" in table.output and "notes.jpg" in table.output  # the skip message names the file
    assert "3 images classified, 4 skipped" in table.output

    out = tmp_path / "predictions.json"
    written = runner.invoke(main, ["predict", str(models["saved_model"]), str(images / "red.jpg"), "--json", str(out),
                                   "--csv", "-", "--top-k", "1"])
    assert written.exit_code == 0, written.output
    assert json.loads(out.read_text())["predictions"][0]["top_k"][0]["class"] == "red"
    assert "file,class_1,score_1" in written.output

    bad = runner.invoke(main, ["predict", str(models["run"]), str(images / "notes.jpg")])
    assert bad.exit_code == 1
    assert "no readable images" in bad.output and "Traceback" not in bad.output
    not_model = runner.invoke(main, ["predict", str(images), str(images / "red.jpg")])
    assert not_model.exit_code == 1 and "neither a run directory" in not_model.output
