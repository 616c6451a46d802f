"""Sources beyond the basics: test splits, stratification, split folders, nested folders, .npz, arrays, specs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import COLOURS, make_colour_folder, write_solid_images
from PIL import Image

from tftransfer.config.experiment import DataConfig
from tftransfer.core.errors import ConfigError, DataError
from tftransfer.data.sources import (
    TEST,
    TRAIN,
    VAL,
    assign_splits,
    load_arrays,
    load_image_folder,
    load_npz,
    shard_split,
)
from tftransfer.data.specs import load_source, source_from_config


def _keys(n: int, prefix: str = "c") -> list[str]:
    return [f"{prefix}/img_{i}.jpg" for i in range(n)]


def test_three_way_hash_split_fractions_and_val_unchanged_by_test_split():
    keys = _keys(4000)
    labels = np.zeros(4000, np.int64)
    codes = assign_splits(labels, keys, 0.2, 0.1)
    assert 0.17 < np.mean(codes == VAL) < 0.23 and 0.08 < np.mean(codes == TEST) < 0.12
    # adding a test split only takes files from train: every val file stays val
    without_test = assign_splits(labels, keys, 0.2, 0.0)
    np.testing.assert_array_equal(codes == VAL, without_test == VAL)
    assert set(np.flatnonzero(codes == TEST)) <= set(np.flatnonzero(without_test == TRAIN))


def test_stratified_split_gives_every_class_its_share():
    labels = np.array([0] * 50 + [1] * 10 + [2] * 3)
    keys = _keys(len(labels))
    codes = assign_splits(labels, keys, 0.2, 0.2, stratify=True)
    for label, n in ((0, 50), (1, 10), (2, 3)):
        mine = codes[labels == label]
        assert np.sum(mine == VAL) == int(np.floor(n * 0.2 + 0.5))
        assert np.sum(mine == TRAIN) >= 1
    assert np.sum(codes[labels == 0] == TEST) == 10
    # a plain hash split of the same keys does not hit the shares exactly for every class
    plain = assign_splits(labels, keys, 0.2, 0.2)
    assert any(np.sum(plain[labels == c] == VAL) != int(np.floor(n * 0.2 + 0.5))
               for c, n in ((0, 50), (1, 10), (2, 3)))


def test_stratified_split_is_stable_far_from_the_boundary():
    labels = np.zeros(100, np.int64)
    before = assign_splits(labels, _keys(100), 0.2, stratify=True)
    after = assign_splits(np.zeros(110, np.int64), _keys(110), 0.2, stratify=True)
    moved = np.sum(before != after[:100])
    assert moved <= 3  # 10 % more data shifts the class boundary by about two files


def test_test_split_from_folder_hash_and_record(tmp_path):
    root = make_colour_folder(tmp_path / "d", per_class=20)
    src = load_image_folder(root, val_split=0.2, test_split=0.2)
    sizes = len(src.train), len(src.val), len(src.test)
    assert sum(sizes) == 60 and all(s > 0 for s in sizes)
    assert set(src.test.keys).isdisjoint(src.train.keys) and set(src.test.keys).isdisjoint(src.val.keys)
    record = src.split_record()
    assert record["test"] == sorted(src.test.keys)
    assert "test_split=0.2" in record["method"]
    # without a test split the record keeps the fingerprint earlier versions wrote
    plain = load_image_folder(root, val_split=0.2)
    assert plain.test is None and plain.split_record()["test"] == []
    import hashlib
    rec = plain.split_record()
    assert rec["fingerprint"] == hashlib.sha256("\n".join(rec["train"] + ["--"] + rec["val"]).encode()).hexdigest()


def test_train_val_test_folders(tmp_path):
    root = make_colour_folder(tmp_path / "d", per_class=6, splits=True)
    for name, colour in COLOURS.items():
        write_solid_images(root / "test" / name, colour, 3, seed=50)
    src = load_image_folder(root, test_split=0.3)  # test/ exists, so test_split draws nothing
    assert (len(src.train), len(src.val), len(src.test)) == (18, 6, 9)
    assert all(k.startswith("test/") for k in src.test.keys)
    assert src.split_method == "folders: train/ and val/ and test/"


def test_train_and_test_folders_draw_val_from_train(tmp_path):
    root = tmp_path / "d"
    for i, (name, colour) in enumerate(COLOURS.items()):
        write_solid_images(root / "train" / name, colour, 10, seed=i)
        write_solid_images(root / "test" / name, colour, 2, seed=10 + i)
    src = load_image_folder(root, val_split=0.3)
    assert len(src.test) == 6 and 0 < len(src.val) < 30 and len(src.train) + len(src.val) == 30
    assert all(k.startswith("train/") for k in src.val.keys)
    assert "val_split=0.3" in src.split_method and "test" not in src.split_method.split(";")[-1]


def test_nested_folders_belong_to_their_class_and_other_files_are_counted(tmp_path):
    root = make_colour_folder(tmp_path / "d", per_class=4)
    write_solid_images(root / "cyan" / "deeper" / "still", COLOURS["cyan"], 3, seed=9, fmt="PNG")
    (root / "cyan" / "notes.txt").write_text("x")
    (root / "cyan" / ".DS_Store").write_bytes(b"x")
    (root / "magenta" / "scan.tif").write_bytes(b"x")
    src = load_image_folder(root, val_split=0.0)
    cyan = src.class_names.index("cyan")
    nested = [k for k in src.train.keys if "/deeper/still/" in k]
    assert len(nested) == 3
    assert all(src.train.labels[src.train.keys.index(k)] == cyan for k in nested)
    assert src.ignored == 3


def test_one_level_too_high_gets_a_hint(tmp_path):
    make_colour_folder(tmp_path / "webcam" / "images")
    with pytest.raises(DataError, match=r"found 1: \['images'\].*pass .*webcam/images"):
        load_source(str(tmp_path / "webcam"))


def test_split_fractions_must_leave_training_data(colour_folder):
    with pytest.raises(ConfigError, match=r"val_split \+ data.test_split must be below 1"):
        load_source(str(colour_folder), val_split=0.6, test_split=0.5)


def test_npz_source_with_class_names_and_string_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 10, 12, 3), dtype=np.uint8)
    y = np.arange(40) % 2
    path = tmp_path / "arrays.npz"
    np.savez(path, x=x, y=y, class_names=np.array(["cat", "dog"]))
    src = load_source(str(path), val_split=0.25, test_split=0.25)
    assert src.class_names == ["cat", "dog"]
    assert len(src.train) + len(src.val) + len(src.test) == 40
    first = src.train.keys[0]
    np.testing.assert_array_equal(src.train.images[0], x[int(first.rsplit("/", 1)[1])])
    strings = tmp_path / "strings.npz"
    np.savez(strings, x=x[..., 0], y=np.where(y == 0, "zebra", "ant"))
    src = load_npz(strings, val_split=0.0)
    assert src.class_names == ["ant", "zebra"] and src.train.images.shape[1:] == (10, 12, 3)
    assert src.train.labels[0] == (1 if y[0] == 0 else 0)


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 4, 4, 3))}, r"needs arrays 'x' .*missing \['x', 'y'\]"),
    ({"x": np.zeros((4, 4, 4, 3)), "y": np.array([0, 1, 1])}, "4 images but 3 labels"),
    ({"x": np.zeros((4, 4, 4, 2)), "y": np.array([0, 1, 1, 0])}, r"\[N, H, W, 1\|3\|4\]"),
    ({"x": np.zeros((2, 4, 4, 3)), "y": np.array([0, 5]), "class_names": np.array(["a", "b"])},
     r"labels must be in \[0, 2\)"),
])
def test_npz_errors_name_the_problem(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_source(str(path))
    with pytest.raises(DataError, match="npz file not found"):
        load_source(str(tmp_path / "missing.npz"))


def test_arrays_are_converted_to_uint8_rgb():
    x01 = np.full((6, 4, 4), 0.5, np.float32)
    src = load_arrays(x01, np.array([0, 1] * 3), ["a", "b"], "floats", val_split=0.0)
    assert src.train.images.dtype == np.uint8 and src.train.images.shape == (6, 4, 4, 3)
    assert np.all(src.train.images == 128)
    x16 = np.full((6, 4, 4, 4), 65535, np.uint16)
    src = load_arrays(x16, np.array([0, 1] * 3), ["a", "b"], "uint16", val_split=0.0)
    assert src.train.images.shape[-1] == 3 and np.all(src.train.images == 255)


def test_source_from_config_passes_every_split_key(tmp_path):
    root = make_colour_folder(tmp_path / "d", per_class=10)
    cfg = DataConfig(path=str(root), val_split=0.2, test_split=0.2, stratify=True)
    src = source_from_config(cfg)
    assert [len(src.train.subset(np.flatnonzero(src.train.labels == c))) for c in range(3)] == [6, 6, 6]
    assert len(src.val) == 6 and len(src.test) == 6
    assert src.split_method.startswith("stratified")


def test_shard_split_partitions_the_examples(colour_folder):
    src = load_image_folder(colour_folder, val_split=0.0)
    shards = [shard_split(src.train, 3, i) for i in range(3)]
    keys = [k for s in shards for k in s.keys]
    assert sorted(keys) == sorted(src.train.keys) and len(set(keys)) == len(keys)
    assert abs(len(shards[0]) - len(shards[2])) <= 1
    with pytest.raises(ValueError, match="shard index 3"):
        shard_split(src.train, 3, 3)


def test_unknown_spec_filters_are_errors(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, x=np.zeros((4, 4, 4, 3), np.uint8), y=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match="take no #filters"):
        load_source(f"{path}#domain=x")


def test_tfds_with_images_of_different_sizes_is_extracted_to_files(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from tftransfer.data.pipeline import make_split_dataset

    monkeypatch.setenv("TFTRANSFER_CACHE", str(tmp_path / "cache"))
    with tfds.testing.mock_data(num_examples=12):
        src = load_source("tfds:tf_flowers", val_split=0.2)
    assert len(src.class_names) == 5 and src.train.images is None
    sizes = {Image.open(p).size for p in src.train.paths}
    assert len(sizes) > 1  # the reason they cannot be one array
    assert all(p.startswith(str(tmp_path / "cache" / "tfds")) for p in src.train.paths)
    assert src.train.keys[0].startswith("tfds:tf_flowers/train/")
    x, _ = next(iter(make_split_dataset(src.train, 16, 4, shuffle=False, cache="none")))
    assert x.shape == (4, 16, 16, 3)
    with tfds.testing.mock_data(num_examples=12):  # a second load reuses the extracted files
        again = load_source("tfds:tf_flowers", val_split=0.2)
    assert again.train.paths == src.train.paths
