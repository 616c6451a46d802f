"""Tests for tftransfer.serving.savedmodel: versioned TF Serving layout, signatures, parity and reloading elsewhere."""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import zlib
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tftransfer.config.commands import ExportCommandConfig
from tftransfer.config.experiment import ExportConfig
from tftransfer.core.errors import RunDirError, StorageError
from tftransfer.data.images import decode_and_resize
from tftransfer.model.layers import Preprocess
from tftransfer.serving import parity as parity_module
from tftransfer.serving import publish
from tftransfer.serving.contract import SIGNATURES
from tftransfer.serving.parity import FreshProcess, check_parity, check_parity_fresh_process
from tftransfer.serving.savedmodel import (
    export_saved_model,
    load_exported,
    next_version,
    predict_exported_bytes,
    predict_exported_pixels,
    publish_export,
    reject_export,
    signature_defs_text,
    signature_summary,
    stage_export,
)

IMAGE_SIZE = 32
# A non-ASCII name checks that labels survive the graph constant and labels.txt as UTF-8.
CLASS_NAMES = ("ants", "bees", "café")


def _tiny_model(num_classes: int = len(CLASS_NAMES)) -> keras.Model:
    """A model following tftransfer's contract: raw [0, 255] pixels of any size in, float32 logits out."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Resizing(IMAGE_SIZE, IMAGE_SIZE)(inputs)
    x = Preprocess("unit")(x)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, dtype="float32")(x)
    return keras.Model(inputs, outputs)


def _random_image(height: int, width: int, channels: int = 3, seed: int = 0) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    return tf.constant(rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8))


def _keras_probabilities(model: keras.Model, encoded: list[bytes]) -> np.ndarray:
    """What the Keras model says about images decoded and resized like the training pipeline does."""
    pixels = tf.stack([decode_and_resize(tf.constant(data), IMAGE_SIZE) for data in encoded])
    return tf.nn.softmax(model(pixels, training=False)).numpy()


def _archive_class() -> type:
    """The class whose write_out actually runs: keras.export.ExportArchive() returns a backend class."""
    return type(keras.export.ExportArchive())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return _tiny_model()


@pytest.fixture(scope="module")
def version_dir(model: keras.Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_saved_model(model, tmp_path_factory.mktemp("saved_models") / "tiny", CLASS_NAMES, IMAGE_SIZE)


@pytest.fixture(scope="module")
def loaded(version_dir: Path):
    return load_exported(version_dir)


@pytest.fixture(scope="module")
def encoded_images() -> list[bytes]:
    """A PNG, a JPEG and a greyscale PNG of different sizes, all in one batch."""
    return [
        tf.io.encode_png(_random_image(40, 48, seed=1)).numpy(),
        tf.io.encode_jpeg(_random_image(20, 24, seed=2), quality=90).numpy(),
        tf.io.encode_png(_random_image(17, 33, channels=1, seed=3)).numpy(),
    ]


# --- versions ---------------------------------------------------------------------------------------------


def test_versions_count_up_and_never_overwrite(model: keras.Model, tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    first = export_saved_model(model, model_dir, CLASS_NAMES, IMAGE_SIZE)
    first_hash = _sha256(first / "saved_model.pb")
    second = export_saved_model(model, model_dir, CLASS_NAMES, IMAGE_SIZE)

    assert first == model_dir / "1"
    assert second == model_dir / "2"
    assert _sha256(first / "saved_model.pb") == first_hash
    assert (second / "saved_model.pb").is_file()
    # No temp dir is left behind after a successful export.
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]
    # Versions get the same permissions as any new directory (not a temp dir's 0700), so a TF Serving running
    # as another user can read them.
    plain = tmp_path / "plain"
    plain.mkdir()
    assert stat.S_IMODE(first.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_preexisting_version_is_continued(model: keras.Model, tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    (model_dir / "5").mkdir(parents=True)
    (model_dir / "5" / "keep.txt").write_text("older export")

    assert export_saved_model(model, model_dir, CLASS_NAMES, IMAGE_SIZE) == model_dir / "6"
    assert (model_dir / "5" / "keep.txt").read_text() == "older export"


def test_next_version_ignores_non_versions(tmp_path: Path) -> None:
    assert next_version(tmp_path / "missing") == 1
    (tmp_path / "3").mkdir()
    (tmp_path / "9").write_text("a file, not a version")
    (tmp_path / "latest").mkdir()
    (tmp_path / ".tmp-12-999-abc").mkdir()
    assert next_version(tmp_path) == 4


def _dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_leftover_temp_dirs_are_no_versions_and_dead_exporters_ones_are_cleaned(model: keras.Model,
                                                                                tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    dead = model_dir / f".tmp-1-{_dead_pid()}-crashed"  # an exporter killed during its check
    alive = model_dir / f".tmp-1-{os.getppid()}-running"  # one still running: never touched
    for leftover in (dead, alive):
        leftover.mkdir(parents=True)
        (leftover / "saved_model.pb").write_bytes(b"half written")

    assert next_version(model_dir) == 1
    version_dir = export_saved_model(model, model_dir, CLASS_NAMES, IMAGE_SIZE)

    assert version_dir == model_dir / "1"
    assert sorted(p.name for p in model_dir.iterdir()) == sorted([alive.name, "1"])
    load_exported(version_dir)


def test_a_staged_export_is_no_version_until_published_and_a_rejected_one_never(model: keras.Model,
                                                                                 tmp_path: Path) -> None:
    """Issue 14, item 1: TF Serving loads any integer-named folder as soon as it appears, so the check runs on a
    dot-named folder and only a passed check renames it to a version."""
    model_dir = tmp_path / "tiny"
    staged = stage_export(model, model_dir, CLASS_NAMES, IMAGE_SIZE)
    assert staged.path.parent == model_dir and staged.path.name.startswith(".")
    assert [p.name for p in model_dir.iterdir()] == [staged.path.name] and next_version(model_dir) == 1
    load_exported(staged.path)  # complete: what the check loads

    kept = reject_export(staged)
    assert kept.parent == model_dir and kept.name.startswith(".rejected-") and (kept / "saved_model.pb").is_file()
    assert not staged.path.exists() and next_version(model_dir) == 1

    seen = []
    second = stage_export(model, model_dir, CLASS_NAMES, IMAGE_SIZE)
    version_dir = publish_export(second, prepare=lambda final: seen.append((final, final.exists())))
    assert version_dir == model_dir / "1" and seen == [(version_dir, False)]
    assert sorted(p.name for p in model_dir.iterdir()) == sorted([kept.name, "1"])


def test_version_appearing_meanwhile_takes_next_number(
    model: keras.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "tiny"
    archive_class = _archive_class()
    write_out = archive_class.write_out

    def racing_write_out(self, filepath, *args, **kwargs):
        write_out(self, filepath, *args, **kwargs)
        # Another exporter publishes version 1 while this one is still writing.
        (model_dir / "1").mkdir()
        (model_dir / "1" / "other.txt").write_text("theirs")

    monkeypatch.setattr(archive_class, "write_out", racing_write_out)
    version_dir = export_saved_model(model, model_dir, CLASS_NAMES, IMAGE_SIZE)

    assert version_dir == model_dir / "2"
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["other.txt"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]


def test_version_appearing_at_rename_takes_next_number(
    model: keras.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "tiny"
    rename = os.rename
    raced = []

    def racing_rename(src, dst):
        if not raced:
            # Another exporter wins the narrow window between the existence check and the rename.
            raced.append(dst)
            Path(dst).mkdir()
            Path(dst, "other.txt").write_text("theirs")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", racing_rename)
    version_dir = export_saved_model(model, model_dir, CLASS_NAMES, IMAGE_SIZE)

    assert raced == [model_dir / "1"]
    assert version_dir == model_dir / "2"
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["other.txt"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]


def test_failed_export_leaves_nothing(model: keras.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tmp_path / "tiny"

    def failing_write_out(self, filepath, *args, **kwargs):
        Path(filepath, "partial").write_text("half written")
        raise OSError("disk full")

    monkeypatch.setattr(_archive_class(), "write_out", failing_write_out)
    with pytest.raises(OSError, match="disk full"):
        export_saved_model(model, model_dir, CLASS_NAMES, IMAGE_SIZE)
    assert list(model_dir.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_or_read_only_disk_is_one_error_naming_the_path(model: keras.Model, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    model_dir = tmp_path / "tiny"

    def failing_write_out(self, filepath, *args, **kwargs):
        Path(filepath, "partial").write_text("half written")
        raise OSError(code, os.strerror(code), str(Path(filepath, "variables")))

    monkeypatch.setattr(_archive_class(), "write_out", failing_write_out)
    with pytest.raises(StorageError, match=r"^cannot write .*tiny/\.tmp-1-.*/variables: ") as raised:
        export_saved_model(model, model_dir, CLASS_NAMES, IMAGE_SIZE)
    assert "\n" not in str(raised.value)
    assert list(model_dir.iterdir()) == []  # the temporary folder is gone


def test_a_version_is_fsynced_before_the_rename_and_a_failed_rename_publishes_nothing(
        model: keras.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    model_dir = tmp_path / "tiny"
    version = export_saved_model(model, model_dir, CLASS_NAMES, IMAGE_SIZE)
    staged = [p for p in synced if p.endswith("/saved_model.pb")]
    assert staged and Path(staged[0]).parent.name.startswith(".tmp-1-")  # synced under the temporary name
    assert str(Path(staged[0]).parent) in synced and synced[-1] == str(model_dir)
    assert version == model_dir / "1"

    def read_only_rename(src, dst, *args, **kwargs):
        if Path(dst).parent == model_dir:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", read_only_rename)
    with pytest.raises(StorageError, match=r"cannot write .*tiny: the file system is read-only"):
        export_saved_model(model, model_dir, CLASS_NAMES, IMAGE_SIZE)
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]


def test_parity_copies_are_removed_on_failure_and_stale_ones_at_the_next_check(
        model: keras.Model, version_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"tftransfer-parity-{_dead_pid()}-abc"  # left by a check that was killed
    stale.mkdir()
    (stale / "image_000000").write_bytes(b"a copy")
    class FailedProbe:  # the fresh process exits 1 (Popen: the Keras side runs while it starts)
        returncode = 1

        def __init__(self, *args, **kwargs):
            pass

        def communicate(self, input=None, timeout=None):
            return "", "the probe failed"

        def poll(self):
            return 1

    monkeypatch.setattr(parity_module.subprocess, "Popen", FailedProbe)
    with pytest.raises(RunDirError, match="failed in a fresh process"):
        check_parity_fresh_process(model, version_dir, np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32),
                                   [b"bytes"])
    # (TensorFlow's autograph may write its generated sources there too: only the check's own copies count)
    assert list(tmp_path.glob("tftransfer-parity-*")) == []


def test_a_fresh_process_told_nothing_exits_quietly():
    """The parent closes the pipe without a path when its export failed first, or when it was killed."""
    proc = subprocess.run([sys.executable, "-m", "tftransfer.serving.probe", "--wait"], input="", text=True,
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_process_started_before_the_export_checks_it(model, version_dir):
    """The publish path starts the process first, so TensorFlow's import overlaps the SavedModel's writing."""
    fresh = FreshProcess()
    pixels = np.random.default_rng(0).uniform(0, 255, (3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    parity = check_parity_fresh_process(model, version_dir, pixels, tolerance=1e-4, process=fresh)
    assert parity["ok"] and parity["predict_pixels"]["images"] == 3 and not parity["tftransfer_layers_imported"]
    fresh.close()  # closing a finished one is harmless


def test_publish_starts_the_fresh_process_before_writing_the_savedmodel(tmp_path, monkeypatch):
    events = []
    real_init = FreshProcess.__init__

    def init(self):
        events.append("process")
        real_init(self)

    def stage(*args, **kwargs):
        events.append("stage")
        raise RunDirError("stop here")

    monkeypatch.setattr(FreshProcess, "__init__", init)
    monkeypatch.setattr(publish, "stage_export", stage)
    monkeypatch.setattr(publish, "build_model_card", lambda *a, **k: {})
    monkeypatch.setattr(publish, "gate_export", lambda *a, **k: {})
    started = []
    real_close = FreshProcess.close
    monkeypatch.setattr(FreshProcess, "close", lambda self: started.append(self._proc.poll()) or real_close(self))
    with pytest.raises(RunDirError, match="stop here"):
        publish.publish_model(None, SimpleNamespace(path=tmp_path), tmp_path, ["a", "b"], IMAGE_SIZE, None,
                              ExportCommandConfig(), ExportConfig(), None)
    assert events == ["process", "stage"]
    assert started == [None]  # still running (importing TensorFlow) when the export failed: then stopped


# --- signatures -------------------------------------------------------------------------------------------


def test_signature_summary(version_dir: Path) -> None:
    k = len(CLASS_NAMES)  # top_k=5 is capped at the class count
    outputs = {
        "class_names": ["string", [None, k]],
        "classes": ["int32", [None, k]],
        "probabilities": ["float32", [None, len(CLASS_NAMES)]],
        "scores": ["float32", [None, k]],
    }
    assert signature_summary(version_dir) == {
        "predict_pixels": {"inputs": {"pixels": ["float32", [None, None, None, 3]]}, "outputs": outputs},
        "serving_default": {"inputs": {"images": ["string", [None]]},
                            "outputs": {**outputs, "valid": ["bool", [None]], "message": ["string", [None]]}},
    }


def test_top_k_is_configurable(model: keras.Model, tmp_path: Path, encoded_images: list[bytes]) -> None:
    version_dir = export_saved_model(model, tmp_path / "tiny", CLASS_NAMES, IMAGE_SIZE, top_k=2)
    result = predict_exported_bytes(load_exported(version_dir), encoded_images)

    assert result["classes"].shape == (len(encoded_images), 2)
    assert result["scores"].shape == (len(encoded_images), 2)
    assert result["class_names"].shape == (len(encoded_images), 2)
    assert result["probabilities"].shape == (len(encoded_images), len(CLASS_NAMES))


# --- numbers ----------------------------------------------------------------------------------------------


def test_parity_on_pixels_of_another_size(model: keras.Model, version_dir: Path) -> None:
    pixels = np.random.default_rng(0).uniform(0, 255, size=(5, 40, 48, 3)).astype(np.float32)
    # batch_size=2 makes the last batch ragged.
    assert check_parity(model, version_dir, pixels, batch_size=2) <= 1e-5


def test_predict_pixels_empty_batch(loaded) -> None:
    probabilities = predict_exported_pixels(loaded, np.zeros((0, 40, 48, 3), np.float32))
    assert probabilities.shape == (0, len(CLASS_NAMES))


def test_serving_default_on_png_and_jpeg(model: keras.Model, loaded, encoded_images: list[bytes]) -> None:
    result = predict_exported_bytes(loaded, encoded_images)
    expected = _keras_probabilities(model, encoded_images)
    probabilities = result["probabilities"]

    assert probabilities.dtype == np.float32
    assert result["classes"].dtype == np.int32
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result["classes"][:, 0], expected.argmax(axis=1))
    np.testing.assert_allclose(result["scores"], np.take_along_axis(probabilities, result["classes"], 1), atol=1e-7)
    assert np.all(np.diff(result["scores"], axis=1) <= 0)
    expected_names = np.array(CLASS_NAMES)[result["classes"]]
    np.testing.assert_array_equal(result["class_names"], expected_names)


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims width x height pixels: its IHDR chunk, one empty IDAT, IEND (a decompression bomb's
    header without the bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_serving_default_flags_bad_images_and_scores_the_others(model: keras.Model, loaded,
                                                                encoded_images: list[bytes]) -> None:
    # One request: a 20000 x 20000 "bomb", a garbage string, an empty string, a valid JPEG. Before per-image
    # checks the whole batch failed ("Input is empty."), and the bomb alone cost 1.2 GB to decode.
    batch = [_png_header(20000, 20000), b"not an image at all", b"", encoded_images[1]]
    result = predict_exported_bytes(loaded, batch)

    np.testing.assert_array_equal(result["valid"], [False, False, False, True])
    assert "20000x20000 pixels is above the serving limit" in result["message"][0]
    assert result["message"][1] == "not a JPEG, PNG, GIF, BMP or WebP image"
    assert result["message"][2].startswith("empty input")
    assert result["message"][3] == ""
    np.testing.assert_array_equal(result["probabilities"][:3], 0.0)
    np.testing.assert_array_equal(result["scores"][:3], 0.0)
    np.testing.assert_array_equal(result["classes"][:3], -1)
    np.testing.assert_allclose(result["probabilities"][3:], _keras_probabilities(model, batch[3:]), atol=1e-5)
    # Inputs cut inside each format's magic number or header are flagged too (a short read is never an error).
    stubs = [b"\xff\xd8\xff", b"\x89PNG", _png_header(8, 8)[:20], b"GIF89a", b"BM", b"RIFF", b"RIFF\0\0\0\0WEBP"]
    stubbed = predict_exported_bytes(loaded, [*stubs, encoded_images[0]])
    np.testing.assert_array_equal(stubbed["valid"], [False] * len(stubs) + [True])


def test_pixel_limit_is_configurable_and_read_from_each_header(model: keras.Model, tmp_path: Path) -> None:
    formats = [("JPEG", {}), ("PNG", {}), ("GIF", {}), ("BMP", {}), ("WEBP", {}), ("WEBP", {"lossless": True})]

    def encoded(fmt: str, options: dict, height: int, width: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(_random_image(height, width).numpy()).save(buffer, format=fmt, **options)
        return buffer.getvalue()

    version = export_saved_model(model, tmp_path / "tiny", CLASS_NAMES, IMAGE_SIZE, max_pixels=1000)
    # Each format under (20 x 24 = 480) and over (40 x 30 = 1200) the limit; a PNG cut short is undecodable.
    small = [encoded(fmt, options, 20, 24) for fmt, options in formats]
    large = [encoded(fmt, options, 30, 40) for fmt, options in formats]
    truncated = small[1][: len(small[1]) // 2]
    result = predict_exported_bytes(load_exported(version), [*small, *large, truncated, small[0][:40]])

    n = len(formats)
    np.testing.assert_array_equal(result["valid"], [True] * n + [False] * (n + 2))
    assert all("40x30 pixels is above the serving limit of 1000 pixels" in m for m in result["message"][n:2 * n])
    assert result["message"][2 * n].startswith("cannot decode")
    assert result["message"][2 * n + 1].startswith("cannot decode")  # a JPEG cut inside its header
    np.testing.assert_allclose(result["probabilities"][:n], _keras_probabilities(model, small), atol=1e-5)
    card = json.loads((version / "model_card.json").read_text())
    assert card["input"]["max_pixels"] == 1000


def test_rest_b64_round_trip(model: keras.Model, loaded, encoded_images: list[bytes]) -> None:
    jpeg = encoded_images[1]
    body = json.dumps({"instances": [{"b64": base64.b64encode(jpeg).decode("ascii")}]})

    # TF Serving's REST front end turns each {"b64": ...} into the raw bytes of a DT_STRING element.
    request = json.loads(body)
    images = [base64.b64decode(instance["b64"]) for instance in request["instances"]]
    assert images == [jpeg]
    result = predict_exported_bytes(loaded, images)

    np.testing.assert_allclose(result["probabilities"], _keras_probabilities(model, [jpeg]), atol=1e-5)
    # The response TF Serving would build ({"predictions": [...]}) must be JSON-serializable.
    predictions = [{key: value[i].tolist() for key, value in result.items()} for i in range(len(images))]
    response = json.loads(json.dumps({"predictions": predictions}))
    assert response["predictions"][0]["class_names"][0] == CLASS_NAMES[int(result["classes"][0, 0])]


def test_fresh_process_serves_a_jpeg_file(loaded, version_dir: Path, tmp_path: Path, encoded_images) -> None:
    jpeg_path = tmp_path / "photo.jpg"
    jpeg_path.write_bytes(encoded_images[1])
    # Only TensorFlow is imported: the export must not need tftransfer's custom layers to run.
    script = textwrap.dedent(
        """
        import json, sys
        import tensorflow as tf
        loaded = tf.saved_model.load(sys.argv[1])
        with open(sys.argv[2], "rb") as f:
            images = tf.constant([f.read()])
        out = loaded.signatures["serving_default"](images=images)
        print(json.dumps({
            "probabilities": out["probabilities"].numpy().tolist(),
            "classes": out["classes"].numpy().tolist(),
            "class_names": [[n.decode("utf-8") for n in row] for row in out["class_names"].numpy()],
        }))
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    completed = subprocess.run(
        [sys.executable, "-c", script, str(version_dir), str(jpeg_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    output = json.loads(completed.stdout.strip().splitlines()[-1])

    expected = predict_exported_bytes(loaded, [encoded_images[1]])
    np.testing.assert_allclose(output["probabilities"], expected["probabilities"], atol=1e-6)
    assert output["classes"] == expected["classes"].tolist()
    assert output["class_names"] == expected["class_names"].tolist()


# --- labels -----------------------------------------------------------------------------------------------


def _string_constants(graph_def) -> list[list[str]]:
    nodes = list(graph_def.node) + [node for function in graph_def.library.function for node in function.node_def]
    return [
        # errors="replace": the decode graph also holds binary constants (the JPEG marker b"\xff\xd8").
        [value.decode("utf-8", errors="replace") for value in tf.make_ndarray(node.attr["value"].tensor).reshape(-1)]
        for node in nodes
        if node.op == "Const" and node.attr["dtype"].type == tf.string.as_datatype_enum
    ]


def test_labels_files_and_graph_constant(version_dir: Path, loaded) -> None:
    expected_text = "".join(f"{name}\n" for name in CLASS_NAMES)
    assert (version_dir / "labels.txt").read_text(encoding="utf-8") == expected_text
    assert (version_dir / "assets" / "labels.txt").read_text(encoding="utf-8") == expected_text

    for name in SIGNATURES:
        constants = _string_constants(loaded.signatures[name].graph.as_graph_def())
        assert list(CLASS_NAMES) in constants, name


# --- bad input --------------------------------------------------------------------------------------------


def test_class_count_mismatch_is_rejected(model: keras.Model, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outputs 3 classes but 2 class names"):
        export_saved_model(model, tmp_path / "tiny", ["ants", "bees"], IMAGE_SIZE)
    with pytest.raises(ValueError, match="class_names is empty"):
        export_saved_model(model, tmp_path / "tiny", [], IMAGE_SIZE)
    with pytest.raises(ValueError, match="duplicates"):
        export_saved_model(model, tmp_path / "tiny", ["ants", "bees", "ants"], IMAGE_SIZE)
    assert not (tmp_path / "tiny").exists()


def test_missing_version_dir_raises_run_dir_error(tmp_path: Path) -> None:
    missing = tmp_path / "tiny" / "7"
    with pytest.raises(RunDirError, match=str(missing)):
        load_exported(missing)
    missing.mkdir(parents=True)
    with pytest.raises(RunDirError, match="saved_model.pb"):
        load_exported(missing)


def test_missing_signature_raises_run_dir_error(tmp_path: Path) -> None:
    module = tf.Module()
    module.serve = tf.function(
        lambda images: {"n": tf.size(images)}, input_signature=[tf.TensorSpec([None], tf.string)]
    )
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.serve})

    with pytest.raises(RunDirError, match="predict_pixels") as raised:
        load_exported(tmp_path / "1")
    assert str(tmp_path / "1") in str(raised.value)


# --- explicit versions, the signature listing, the fresh-process parity check -----------------------------------


def test_explicit_version_never_overwrites_and_a_file_is_no_export_folder(model: keras.Model, tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    assert export_saved_model(model, model_dir, CLASS_NAMES, IMAGE_SIZE, version=3) == model_dir / "3"
    with pytest.raises(RunDirError, match="already exists") as raised:
        export_saved_model(model, model_dir, CLASS_NAMES, IMAGE_SIZE, version=3)
    assert "(4)" in str(raised.value)  # names the version a plain export would write
    assert export_saved_model(model, model_dir, CLASS_NAMES, IMAGE_SIZE) == model_dir / "4"
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    with pytest.raises(RunDirError, match="not a folder"):
        export_saved_model(model, a_file, CLASS_NAMES, IMAGE_SIZE)
    assert sorted(p.name for p in model_dir.iterdir()) == ["3", "4"]


def test_signature_listing_is_what_saved_model_cli_shows(version_dir: Path) -> None:
    cli = Path(sys.executable).with_name("saved_model_cli")
    if not cli.is_file():
        pytest.skip("saved_model_cli is not installed next to this Python")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    shown = subprocess.run([str(cli), "show", "--dir", str(version_dir), "--all"], capture_output=True, text=True,
                           env=env, timeout=300, check=True).stdout
    listing = signature_defs_text(version_dir)
    assert listing in shown
    assert "signature_def['serving_default']" in listing and "signature_def['predict_pixels']" in listing
    assert "dtype: DT_STRING" in listing and "Method name is: tensorflow/serving/predict" in listing


def test_fresh_process_parity_catches_a_model_that_differs(
    model: keras.Model, version_dir: Path, encoded_images: list[bytes]
) -> None:
    other = keras.models.clone_model(model)
    other.set_weights([w + 0.5 for w in model.get_weights()])
    pixels = np.random.default_rng(3).uniform(0, 255, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)

    parity = check_parity_fresh_process(other, version_dir, pixels, encoded_images, tolerance=1e-4)

    assert parity["fresh_process"] and not parity["ok"]
    assert parity["max_abs_diff"] > 1e-3
    assert parity["predict_pixels"]["images"] == 4 and parity["serving_default"]["images"] == len(encoded_images)
    assert parity["serving_default"]["max_abs_diff"] > 1e-3  # the bytes path was compared too
    assert parity["tftransfer_layers_imported"] is False  # the export runs on TensorFlow alone
    assert parity["signatures_text"] == signature_defs_text(version_dir)
    assert set(parity["signatures"]) >= set(SIGNATURES)
