"""Decoding: every pixel format to 3 channels in [0, 255], WebP, EXIF orientation, eager == tf.data, file probes."""

from __future__ import annotations

import dataclasses
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from tftransfer.data.images import decode_and_resize, decode_image, exif_orientation, resize_image
from tftransfer.data.probe import extension_mismatch, probe_image, probe_images
from tftransfer.data.sources import load_image_folder

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return decode_image(tf.constant(data)).numpy()


def test_lossless_modes_decode_to_the_rgb_pillow_sees():
    for mode in ("L", "LA", "RGBA", "P", "RGB"):
        _check_mode(mode)


def _check_mode(mode: str) -> None:
    image = Image.fromarray(PIXELS).convert(mode)
    for fmt in ("PNG", "WEBP", "BMP") if mode in ("L", "RGB") else ("PNG", "WEBP"):
        kwargs = {"lossless": True} if fmt == "WEBP" else {}
        data = _encode(image, fmt, **kwargs)
        out = _decode(data)
        assert out.shape == (12, 20, 3) and out.dtype == np.float32, fmt
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
        np.testing.assert_array_equal(out, expected, err_msg=f"{mode} {fmt}")


def test_bmp_kinds_tensorflow_gets_wrong_are_refused_by_the_probe(tmp_path):
    for mode, ok in (("1", False), ("P", False), ("L", True), ("RGB", True), ("RGBA", True)):
        _check_bmp(tmp_path / f"{mode}.bmp", mode, ok)


def _check_bmp(path, mode: str, ok: bool) -> None:
    Image.fromarray(PIXELS).convert(mode).save(path, format="BMP")
    probe = probe_image(path)
    assert (probe.problem is None) == ok, probe.problem
    if ok:  # and what the probe lets through, TensorFlow decodes to the colours Pillow sees
        expected = np.asarray(Image.open(path).convert("RGB"), np.float32)
        np.testing.assert_array_equal(_decode(path.read_bytes()), expected)
    else:
        assert "BMP" in probe.problem


def test_sixteen_bit_png_is_scaled_to_8_bits():
    grey16 = (RNG.random((6, 7)) * 65535).astype(np.uint16)
    out = _decode(_encode(Image.fromarray(grey16), "PNG"))
    assert out.shape == (6, 7, 3) and out.max() <= 255
    np.testing.assert_allclose(out[..., 0], grey16 / 257.0, atol=1.0)
    rgb16 = (RNG.random((5, 4, 3)) * 65535).astype(np.uint16)
    out = _decode(tf.io.encode_png(tf.constant(rgb16)).numpy())
    np.testing.assert_allclose(out, rgb16 / 257.0, atol=1.0)


def test_gif_gives_its_first_frame():
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (40, 200)]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = _decode(data)
    assert out.shape == (8, 8, 3) and abs(float(out.mean()) - 40) < 3


def _with_exif(jpeg: bytes, orientation: int, byte_order: str) -> bytes:
    """Inserts a hand-made APP1 EXIF segment (IFD0: Make, Orientation) after the JPEG start marker."""
    e = "<" if byte_order == "II" else ">"
    entries = [(0x010F, 2, 4, b"cam\x00"), (0x0112, 3, 1, struct.pack(e + "HH", orientation, 0))]
    tiff = byte_order.encode() + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", len(entries))
    for tag, kind, count, value in entries:
        tiff += struct.pack(e + "HHI", tag, kind, count) + value
    body = b"Exif\x00\x00" + tiff + struct.pack(e + "I", 0)
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


@pytest.mark.parametrize("byte_order", ["II", "MM"])
def test_exif_orientation_matches_pillow_exif_transpose(byte_order):
    for orientation in range(1, 9):
        _check_orientation(orientation, byte_order)


def _check_orientation(orientation: int, byte_order: str) -> None:
    pixels = np.zeros((16, 24, 3), np.uint8)
    pixels[:4, :8] = 255  # a bright top-left corner shows where the image ended up
    plain = _encode(Image.fromarray(pixels), "JPEG", quality=95)
    data = _with_exif(plain, orientation, byte_order)
    assert int(exif_orientation(tf.constant(data))) == orientation
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"), np.float32)
    out = _decode(data)
    assert out.shape == reference.shape
    assert np.abs(out - reference).mean() < 4.0  # TF's and Pillow's JPEG decoders differ by a few levels
    # exact, with one JPEG decoder on both sides: the TF-decoded plain image turned by Pillow's own rules
    turned = Image.fromarray(_decode(plain).astype(np.uint8))
    turned.getexif()[0x0112] = orientation
    np.testing.assert_array_equal(out, np.asarray(ImageOps.exif_transpose(turned), np.float32))
    corner = np.unravel_index(np.argmax(out.mean(axis=-1)), out.shape[:2])
    ref_corner = np.unravel_index(np.argmax(reference.mean(axis=-1)), reference.shape[:2])
    assert abs(corner[0] - ref_corner[0]) <= 4 and abs(corner[1] - ref_corner[1]) <= 4


def test_exif_orientation_is_1_for_anything_else():
    not_jpeg = _with_exif(b"\x89P", 6, "II")  # a valid EXIF block, but not in a JPEG
    for data in (b"", b"\xff\xd8", b"\xff\xd8Exif\x00\x00MM", b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, not_jpeg,
                 _with_exif(b"\xff\xd8", 9, "II")):  # 9 is not an orientation
        assert int(exif_orientation(tf.constant(data))) == 1, data[:12]


def test_decode_is_the_same_eagerly_and_in_tf_data():
    payloads = [_encode(Image.fromarray(PIXELS), "JPEG", quality=90),
                _with_exif(_encode(Image.fromarray(PIXELS), "JPEG", quality=90), 6, "II"),
                _encode(Image.fromarray(PIXELS).convert("RGBA"), "PNG"),
                _encode(Image.fromarray(PIXELS), "WEBP", lossless=True)]
    eager = [decode_and_resize(tf.constant(p), 10).numpy() for p in payloads]
    ds = tf.data.Dataset.from_tensor_slices(payloads).map(lambda p: decode_and_resize(p, 10))
    for a, b in zip(eager, ds.as_numpy_iterator()):
        np.testing.assert_array_equal(a, b)
    graph = tf.function(lambda p: decode_and_resize(p, 10))
    np.testing.assert_array_equal(graph(tf.constant(payloads[1])).numpy(), eager[1])


def _photo(height: int, width: int) -> np.ndarray:
    """A smooth, photo-like image with some texture (a JPEG of pure noise would not be realistic)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 37.0), 128 + 100 * np.cos(y / 23.0), 128 + 60 * np.sin((x + y) / 51.0)],
                    axis=-1)
    return np.clip(base + RNG.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def test_large_jpegs_are_decoded_at_a_reduced_scale_close_to_a_full_decode():
    data = _encode(Image.fromarray(_photo(800, 1000)), "JPEG", quality=90)
    full = resize_image(decode_image(tf.constant(data)), 100).numpy()
    fast = decode_and_resize(tf.constant(data), 100).numpy()  # short side 800 // 4 >= 2 x 100: decoded at 1/4
    assert fast.shape == (100, 100, 3) and not np.array_equal(fast, full)
    assert np.abs(fast - full).mean() < 1.0
    # the same in a tf.data map (the training pipeline) as eagerly (the export's parity reference)
    (mapped,) = tf.data.Dataset.from_tensors(data).map(lambda p: decode_and_resize(p, 100)).as_numpy_iterator()
    np.testing.assert_array_equal(mapped, fast)
    # where the margin allows no reduction, exactly the full decode
    np.testing.assert_array_equal(decode_and_resize(tf.constant(data), 401).numpy(),
                                  resize_image(decode_image(tf.constant(data)), 401).numpy())
    # EXIF orientation is still applied to a reduced decode
    turned = _with_exif(data, 6, "II")
    out = decode_and_resize(tf.constant(turned), 100).numpy()
    reference = resize_image(decode_image(tf.constant(turned)), 100).numpy()
    assert np.abs(out - reference).mean() < 1.0 and np.abs(out - fast).mean() > 10
    # other formats always decode in full
    png = _encode(Image.fromarray(_photo(800, 1000)), "PNG")
    np.testing.assert_array_equal(decode_and_resize(tf.constant(png), 100).numpy(),
                                  resize_image(decode_image(tf.constant(png)), 100).numpy())


@pytest.mark.parametrize("mix", ["all", "plain"])
def test_pipeline_decodes_listed_files_exactly_like_the_serving_path(tmp_path, mix):
    # The pipeline takes the EXIF orientation and JPEG size from the listing's probe instead of parsing the bytes
    # again; what it makes must still be decode_and_resize's pixels (the export's bytes signature) to the bit.
    from tftransfer.data.pipeline import make_split_dataset

    big = _encode(Image.fromarray(_photo(800, 1000)), "JPEG", quality=90)  # decoded at 1/4 for 100 px
    small = _encode(Image.fromarray(_photo(90, 120)), "JPEG", quality=90)
    files = {"a/big.jpg": big, "a/small.jpg": small,
             "b/png.png": _encode(Image.fromarray(_photo(70, 50)).convert("RGBA"), "PNG")}
    if mix == "all":  # rotated files, one of them large: every branch of the known-header decode
        files.update({"a/big_turned.jpg": _with_exif(big, 6, "MM"), "b/turned.jpg": _with_exif(small, 8, "II"),
                      "b/mirrored.jpg": _with_exif(small, 2, "II")})
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    split = load_image_folder(tmp_path, val_split=0.0).train
    headers = {Path(p).name: tuple(h) for p, h in zip(split.paths, split.headers)}
    assert headers["big.jpg"] == (1000, 800, 1, 1) and headers["png.png"] == (50, 70, 1, 0)
    if mix == "all":
        assert headers["big_turned.jpg"][2] == 6 and headers["turned.jpg"][2] == 8
    got = np.concatenate([x.numpy() for x, _ in make_split_dataset(split, 100, 4, shuffle=False, cache="none")])
    for path, pixels in zip(split.paths, got):
        expected = decode_and_resize(tf.constant(Path(path).read_bytes()), 100).numpy()
        np.testing.assert_array_equal(pixels, expected, err_msg=path)
    # and a split whose headers are unknown (built by hand) takes the in-graph path to the same pixels
    unknown = dataclasses.replace(split, headers=None)
    again = np.concatenate([x.numpy() for x, _ in make_split_dataset(unknown, 100, 4, shuffle=False, cache="none")])
    np.testing.assert_array_equal(again, got)


def test_probe_finds_each_kind_of_bad_file(tmp_path):
    good = _encode(Image.fromarray(PIXELS), "JPEG")
    frames = [Image.fromarray(PIXELS), Image.fromarray(255 - PIXELS)]
    files = {
        "ok.jpg": good,
        "empty.jpg": b"",
        "text.jpg": b"hello, I am text",
        "cut.jpg": good[: len(good) // 2],
        "png_named.jpg": _encode(Image.fromarray(PIXELS), "PNG"),
        "scan.tiff.png": _encode(Image.fromarray(PIXELS), "TIFF"),
        "anim.webp": _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
        "still.webp": _encode(Image.fromarray(PIXELS), "WEBP"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    probes = dict(zip(files, probe_images([tmp_path / n for n in files], fingerprints=True)))
    assert probes["ok.jpg"].problem is None and (probes["ok.jpg"].width, probes["ok.jpg"].height) == (20, 12)
    assert probes["empty.jpg"].problem == "empty file (0 bytes)"
    assert probes["text.jpg"].problem == "not an image (unrecognised format)"
    assert probes["cut.jpg"].problem.startswith("unreadable image")
    assert probes["png_named.jpg"].problem is None
    assert extension_mismatch("png_named.jpg", probes["png_named.jpg"]) == "PNG"
    assert extension_mismatch("ok.jpg", probes["ok.jpg"]) is None
    assert probes["scan.tiff.png"].problem == "format TIFF cannot be decoded by TensorFlow"
    assert probes["anim.webp"].problem.startswith("animated WebP")
    assert probes["still.webp"].problem is None
    assert probes["ok.jpg"].sha256 == __import__("hashlib").sha256(good).hexdigest()
    assert len(probes["ok.jpg"].dhash) == 32
    assert probe_image(tmp_path / "missing.jpg").problem.startswith("cannot read file")
    Image.new("RGB", (40, 40), (90, 90, 90)).save(tmp_path / "flat.png")
    assert probe_image(tmp_path / "flat.png", fingerprints=True).dhash is None  # nothing to hash in a flat image
    # every readable file really decodes in TensorFlow; every other one really does not
    for name, probe in probes.items():
        if probe.problem is None:
            _decode(files[name])
        elif name != "cut.jpg":  # TF decodes a truncated JPEG's top part without complaint
            with pytest.raises(tf.errors.InvalidArgumentError):
                _decode(files[name])


def test_webp_and_png_files_are_listed_from_folders(tmp_path):
    for name, fmt in (("a", "WEBP"), ("b", "PNG")):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(PIXELS).save(tmp_path / name / f"{i}.{fmt.lower()}", format=fmt)
    src = load_image_folder(tmp_path, val_split=0.0)
    assert sorted(k.rsplit(".", 1)[1] for k in src.train.keys) == ["png"] * 3 + ["webp"] * 3


def test_progress_is_logged_for_big_lists(tmp_path, caplog):
    path = tmp_path / "x.png"
    Image.fromarray(PIXELS).save(path)
    with caplog.at_level("INFO", logger="tftransfer.data.probe"):
        probe_images([path] * 7, progress_every=3, what="here")
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" files")[0] for line in lines] == ["checked 3/7", "checked 6/7", "checked 7/7"]
