"""Shared fixtures: tiny solid-colour image folders, the shared real-data folder, quiet TensorFlow."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Solid colours far apart in RGB (the TF Hub make_image_classifier test idea): any working pipeline separates them.
COLOURS = {"cyan": (0, 255, 255), "magenta": (255, 0, 255), "yellow": (255, 255, 0)}


def stop_first_fit_after_one_epoch(monkeypatch: pytest.MonkeyPatch) -> list[keras.Model]:
    """Spies on keras.Model.fit: the models fitted, in order; the first fit stops after one epoch, as a process
    killed there would (its per-epoch checkpoint is written, the phase is not done)."""
    fitted: list[keras.Model] = []
    real_fit = keras.Model.fit

    def spy_fit(self, *args, **kwargs):
        fitted.append(self)
        if len(fitted) == 1:
            kwargs["epochs"] = 1
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy_fit)
    return fitted


def write_solid_images(folder: Path, colour: tuple[int, int, int], count: int, size: int = 32, seed: int = 0,
                       fmt: str = "JPEG") -> list[Path]:
    """Writes `count` noisy solid-colour images (so no two files are identical)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = np.clip(np.array(colour, np.float32) + rng.normal(0, 12, (size, size, 3)), 0, 255)
        path = folder / f"img_{i:03d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        Image.fromarray(pixels.astype(np.uint8)).save(path, format=fmt)
        paths.append(path)
    return paths


def write_png_bomb(path: Path, side: int = 100_000) -> Path:
    """A small PNG whose header claims side x side RGB pixels (a decompression bomb: Pillow refuses to open it)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (3 * 1024 + 1) * 64)  # the first rows only: the header is what matters
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def make_colour_folder(root: Path, per_class: int = 12, size: int = 32, splits: bool = False) -> Path:
    """root/<colour>/img_*.jpg, or root/{train,val}/<colour>/ with splits=True."""
    for index, (name, colour) in enumerate(COLOURS.items()):
        if splits:
            write_solid_images(root / "train" / name, colour, per_class, size, seed=index)
            write_solid_images(root / "val" / name, colour, max(per_class // 3, 2), size, seed=100 + index)
        else:
            write_solid_images(root / name, colour, per_class, size, seed=index)
    return root


@pytest.fixture
def colour_folder(tmp_path: Path) -> Path:
    """Three solid-colour classes, 12 JPEGs each, 32 px."""
    return make_colour_folder(tmp_path / "colours")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data with real weights and images; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from float32, a cleared Keras session and no op determinism (runtime settings are
    process-wide: a test that ran with runtime.deterministic=true would otherwise stop Keras from using XLA in every
    later test)."""
    import keras

    from tftransfer.runtime import set_op_determinism

    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()
    set_op_determinism(False)
    yield
