"""Data sources and pipelines: folder listing, stable hash splits, bad files, built-in digits, batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import COLOURS, make_colour_folder, write_png_bomb, write_solid_images

from tftransfer.config.experiment import AugmentConfig, DataConfig
from tftransfer.core.errors import DataError
from tftransfer.data.files import collect_images
from tftransfer.data.inspect import inspect_data
from tftransfer.data.pipeline import build_augmenter, make_datasets
from tftransfer.data.sources import hash_fraction, load_image_folder
from tftransfer.data.specs import load_source


def test_folder_with_hash_split(colour_folder):
    src = load_image_folder(colour_folder, val_split=0.3)
    assert src.class_names == sorted(COLOURS)
    assert len(src.train) + len(src.val) == 36
    assert 0 < len(src.val) < 36
    assert set(src.train.keys).isdisjoint(src.val.keys)
    # labels follow the folder of each file
    for key, label in zip(src.train.keys, src.train.labels):
        assert key.split("/")[0] == src.class_names[label]


def test_split_is_stable_when_data_grows(tmp_path):
    root = make_colour_folder(tmp_path / "d", per_class=10)
    before = load_image_folder(root, val_split=0.3)
    write_solid_images(root / "cyan" / "more", COLOURS["cyan"], 8, seed=7)
    after = load_image_folder(root, val_split=0.3)
    assert set(before.val.keys) <= set(after.val.keys)
    assert set(before.train.keys) <= set(after.train.keys)
    assert before.split_record()["fingerprint"] != after.split_record()["fingerprint"]


def test_hash_fraction_is_uniform_enough():
    values = np.array([hash_fraction(f"class/img_{i}.jpg") for i in range(4000)])
    assert 0.17 < np.mean(values < 0.2) < 0.23


def test_train_val_folders(tmp_path):
    root = make_colour_folder(tmp_path / "d", per_class=6, splits=True)
    src = load_image_folder(root)
    assert len(src.train) == 18 and len(src.val) == 6
    assert src.split_method.startswith("folders")
    assert all(k.startswith("val/") for k in src.val.keys)


def test_bad_files_are_skipped_and_listed(colour_folder):
    (colour_folder / "cyan" / "notes.jpg").write_text("this is text, not a JPEG")
    (colour_folder / "cyan" / "empty.png").write_bytes(b"")
    (colour_folder / "cyan" / "readme.txt").write_text("ignored: not an image extension")
    src = load_image_folder(colour_folder)
    skipped = dict(src.skipped)
    assert set(skipped) == {"cyan/notes.jpg", "cyan/empty.png"}
    assert "0 bytes" in skipped["cyan/empty.png"]
    assert all("notes" not in k for k in src.train.keys + src.val.keys)
    with pytest.raises(DataError, match=r"(?s)2 bad files.*notes.jpg"):
        load_image_folder(colour_folder, strict=True)


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "data folder not found"),
    (lambda root: write_solid_images(root / "only", (0, 0, 0), 3),
     r"at least 2 class subfolders \(one per class\), found 1"),
    (lambda root: (write_solid_images(root / "a", (0, 0, 0), 3), (root / "b").mkdir()),
     "has no readable images"),
])
def test_bad_folders(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        load_image_folder(root)


def test_unknown_sources():
    with pytest.raises(DataError, match="unknown built-in data set"):
        load_source("builtin:nope")
    with pytest.raises(DataError, match="no data given"):
        load_source("")


def test_builtin_digits():
    src = load_source("builtin:digits", val_split=0.2)
    assert src.class_names == [str(i) for i in range(10)]
    assert src.train.images.shape[1:] == (8, 8, 3) and src.train.images.dtype == np.uint8
    assert src.train.images.max() == 255
    assert len(src.train) + len(src.val) == 1797


def test_pipeline_batches(colour_folder):
    src = load_image_folder(colour_folder, val_split=0.25)
    cfg = DataConfig(batch_size=8, augment=AugmentConfig(flip=True, rotation=0.1, zoom=0.1, contrast=0.1))
    data = make_datasets(cfg, src, image_size=24, seed=1)
    x, y = next(iter(data.train))
    assert x.shape == (8, 24, 24, 3) and x.dtype.name == "float32"
    assert 0.0 <= float(x.numpy().min()) and float(x.numpy().max()) <= 255.0
    assert y.dtype.name == "int64"
    total = sum(len(b[1]) for b in data.val)
    assert total == len(src.val) == data.val_examples
    # validation is neither shuffled nor augmented: two passes give identical batches
    first = np.concatenate([b[0].numpy() for b in data.val])
    second = np.concatenate([b[0].numpy() for b in data.val])
    np.testing.assert_array_equal(first, second)
    # the colours survive decode + resize
    cyan = src.class_names.index("cyan")
    xs, ys = zip(*[(b[0].numpy(), b[1].numpy()) for b in data.val])
    xs, ys = np.concatenate(xs), np.concatenate(ys)
    mean = xs[ys == cyan].mean(axis=(0, 1, 2))
    assert mean[0] < 40 and mean[1] > 215 and mean[2] > 215


def test_augmenter_off_is_none():
    assert build_augmenter(AugmentConfig(flip=False), seed=0) is None


def test_tfds_source_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=200):
        src = load_source("tfds:cifar10")
    assert len(src.class_names) == 10  # mock metadata has no names, so they are the label ids
    assert src.train.images.shape == (200, 32, 32, 3) and src.train.images.dtype == np.uint8
    assert src.val is not None and len(src.val) == 200  # CIFAR-10's test split serves as validation
    assert src.split_method == "TFDS splits: train / test"


def test_tfds_offline_error_names_the_dir(tmp_path):
    with pytest.raises(DataError, match=r"tfds:cifar10 is not on disk in .*empty.*tfds build cifar10"):
        load_source("tfds:cifar10", tfds_data_dir=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no such TFDS data set"):
        load_source("tfds:no_such_dataset_xyz")


def test_truncated_jpeg_is_caught_when_listing(colour_folder):
    good = (colour_folder / "cyan" / "img_000.jpg").read_bytes()
    (colour_folder / "cyan" / "cut.jpg").write_bytes(good[: len(good) // 2])
    src = load_image_folder(colour_folder)
    assert "cyan/cut.jpg" in dict(src.skipped)


def test_decompression_bomb_is_a_bad_file_when_listing(colour_folder, tmp_path):
    bomb = write_png_bomb(colour_folder / "cyan" / "bomb.png")
    assert bomb.stat().st_size < 10_000
    src = load_image_folder(colour_folder)  # what fit lists
    skipped = dict(src.skipped)
    assert set(skipped) == {"cyan/bomb.png"} and "decompression bomb" in skipped["cyan/bomb.png"]
    assert "\n" not in skipped["cyan/bomb.png"]
    report = inspect_data(str(colour_folder))  # data inspect
    assert [u["path"] for u in report["files"]["unreadable"]] == ["cyan/bomb.png"]
    files, skipped_files = collect_images([str(colour_folder / "cyan")])  # predict
    assert bomb not in files and len(files) == 12
    assert "decompression bomb" in dict(skipped_files)[str(bomb)]


@pytest.mark.parametrize("bad", ["cy\nan", "tab\tbed", "bell\x07", "sep\u2028arator", " "])
def test_control_characters_in_class_names_are_refused_when_listing(tmp_path, bad):
    root = make_colour_folder(tmp_path / "d", per_class=3)
    (root / "cyan").rename(root / bad)
    with pytest.raises(DataError, match=r"class folder .* in .*: a class name cannot") as folder_error:
        load_image_folder(root)
    assert repr(bad) in str(folder_error.value)
    root = make_colour_folder(tmp_path / "clean", per_class=3)
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    (root / "m.csv").write_text("path,label\n" + "".join(f'{p},"{bad if i == 4 else p.split("/")[0]}"\n'
                                                          for i, p in enumerate(images)))
    (root / "m.jsonl").write_text("".join(json.dumps({"path": p, "label": bad if i == 4 else p.split("/")[0]}) + "\n"
                                          for i, p in enumerate(images)))
    x = np.zeros((6, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(6) % 2, class_names=np.array(["fine", bad]))
    for spec, where in ((root / "m.csv", r"m.csv line \d+: (label|empty label)"),
                        (root / "m.jsonl", r"m.jsonl line 5: (label|empty label)"),
                        (tmp_path / "a.npz", r"a.npz: class name")):
        with pytest.raises(DataError, match=where) as error:
            load_source(str(spec))
        assert "\n" not in str(error.value) and "\n" not in str(folder_error.value)
