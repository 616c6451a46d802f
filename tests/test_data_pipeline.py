"""Pipeline options: file cache, class-balanced sampling, augmentation presets, class weights, shards, test split."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_colour_folder

from tftransfer.config.experiment import AugmentConfig, DataConfig, load_config
from tftransfer.core.errors import ConfigError, DataError
from tftransfer.data import pipeline
from tftransfer.data.balance import class_weight_for, class_weights, imbalance_ratio
from tftransfer.data.pipeline import AUGMENT_PRESETS, build_augmenter, make_datasets, make_split_dataset
from tftransfer.data.sources import load_arrays, load_image_folder


def _labels(ds) -> np.ndarray:
    return np.concatenate([y.numpy() for _, y in ds])


def _pixels(ds) -> np.ndarray:
    return np.concatenate([x.numpy() for x, _ in ds])


def _ids(pixels: np.ndarray) -> list[float]:
    """One number per image (the noisy test images all differ), to compare orders."""
    return [round(float(v), 2) for v in pixels.sum(axis=(1, 2, 3))]


def _imbalanced(n_major: int = 60, n_minor: int = 6):
    """Two classes of flat 8x8 images whose pixel value tells the class (0 = dark, 1 = bright)."""
    images = np.concatenate([np.full((n_major, 8, 8, 3), 20, np.uint8), np.full((n_minor, 8, 8, 3), 220, np.uint8)])
    labels = np.array([0] * n_major + [1] * n_minor)
    return load_arrays(images, labels, ["major", "minor"], "imbalanced", val_split=0.0)


def test_file_cache_is_written_named_by_content_and_reused(tmp_path, colour_folder):
    src = load_image_folder(colour_folder, val_split=0.25)
    cache = tmp_path / "tfcache"
    cfg = DataConfig(batch_size=4, cache=str(cache), augment=AugmentConfig(flip=False))
    data = make_datasets(cfg, src, image_size=16)
    first = np.concatenate([x.numpy() for x, _ in data.val])
    files = sorted(p.name for p in cache.iterdir())
    assert any(f.startswith("val-") and f.endswith(".index") for f in files)
    assert not any(f.startswith("train-") for f in files)  # train was not iterated yet
    again = np.concatenate([x.numpy() for x, _ in make_datasets(cfg, src, image_size=16).val])
    np.testing.assert_array_equal(first, again)
    assert sorted(p.name for p in cache.iterdir()) == files  # reused, not rewritten under a new name
    # another size is another cache, never the stale one
    other = np.concatenate([x.numpy() for x, _ in make_datasets(cfg, src, image_size=12).val])
    assert other.shape[1:] == (12, 12, 3)
    assert len(list(cache.glob("val-*.index"))) == 2
    # a partly read epoch leaves no cache behind (tf.data discards it), so it cannot be read back truncated
    next(iter(make_datasets(cfg, src, image_size=10).val))
    assert len(list(cache.glob("val-*.index"))) == 2


def test_file_cache_path_that_is_a_file_is_an_error(tmp_path, colour_folder):
    src = load_image_folder(colour_folder, val_split=0.25)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="data.cache: .*file is a file"):
        make_datasets(DataConfig(cache=str(blocker)), src, image_size=16)
    with pytest.raises(DataError, match=r"data.cache: 'memroy' is not memory, none, or a folder path"):
        make_datasets(DataConfig(cache="memroy"), src, image_size=16)


def test_balanced_sampling_evens_out_classes_and_varies_by_epoch():
    src = _imbalanced()
    cfg = DataConfig(batch_size=11, balanced_sampling=True, augment=AugmentConfig(flip=False))
    data = make_datasets(cfg, src, image_size=8, seed=3)
    epoch1, epoch2 = _labels(data.train), _labels(data.train)
    assert len(epoch1) == len(epoch2) == 66 and data.steps_per_epoch == 6
    assert 0.3 < epoch1.mean() < 0.7  # about half minor, against 6/66 = 0.09 without balancing
    assert not np.array_equal(epoch1, epoch2)
    # the labels still match the images
    x, y = next(iter(data.train))
    np.testing.assert_array_equal(x.numpy()[:, 0, 0, 0] > 100, y.numpy() == 1)
    # and a rebuilt pipeline with the same seed replays the same epochs
    again = make_datasets(cfg, src, image_size=8, seed=3)
    np.testing.assert_array_equal(_labels(again.train), epoch1)
    plain = make_datasets(dataclasses.replace(cfg, balanced_sampling=False), src, image_size=8, seed=3)
    assert _labels(plain.train).mean() == pytest.approx(6 / 66)


def test_class_weights_inverse_frequency():
    weights = class_weights([0] * 60 + [1] * 6 + [3] * 6, num_classes=4)
    assert weights[0] == pytest.approx(72 / (3 * 60)) and weights[1] == pytest.approx(72 / (3 * 6))
    assert weights[2] == 1.0  # absent class
    labels = np.array([0] * 60 + [1] * 6 + [3] * 6)
    assert np.mean([weights[int(c)] for c in labels]) == pytest.approx(1.0)
    assert class_weight_for(DataConfig(class_weight="none"), labels, 4) is None
    assert class_weight_for(DataConfig(class_weight="auto"), labels, 4) == weights
    assert imbalance_ratio([60, 6, 0, 6]) == pytest.approx(10.0) and imbalance_ratio([0, 0]) is None
    with pytest.raises(ConfigError, match="data.class_weight: 'inverse' is not one of none, auto"):
        load_config(overrides=["data.class_weight=inverse"])


def test_presets_are_the_config_choices_and_build():
    choices = dict((f.name, f) for f in dataclasses.fields(AugmentConfig))["preset"].metadata["choices"]
    assert set(choices) == set(AUGMENT_PRESETS)
    assert build_augmenter(AugmentConfig(preset="none", flip=True, contrast=0.5), seed=0) is None
    names = lambda cfg: [type(layer).__name__ for layer in build_augmenter(cfg, 0).layers]  # noqa: E731
    assert names(AugmentConfig(preset="custom", flip=False, brightness=0.2)) == ["RandomColour"]
    assert names(AugmentConfig(preset="custom", flip=True)) == ["RandomGeometry"]
    assert names(AugmentConfig(preset="light")) == ["RandomGeometry", "RandomColour"]
    assert names(AugmentConfig(preset="randaugment")) == ["RandomFlip", "RandAugment"]


@pytest.mark.parametrize("preset", ["light", "randaugment"])
def test_augmented_batches_stay_in_range_and_change(colour_folder, preset):
    src = load_image_folder(colour_folder, val_split=0.25)
    cfg = DataConfig(batch_size=8, augment=AugmentConfig(preset=preset))
    data = make_datasets(cfg, src, image_size=24, seed=1)
    augmented = next(iter(data.train))[0].numpy()
    assert augmented.shape == (8, 24, 24, 3)
    assert augmented.min() >= 0.0 and augmented.max() <= 255.0
    plain = make_datasets(dataclasses.replace(cfg, augment=AugmentConfig(preset="none")), src, 24, seed=1)
    assert np.abs(next(iter(plain.train))[0].numpy() - augmented).mean() > 1.0
    # validation is never augmented
    np.testing.assert_array_equal(next(iter(data.val))[0].numpy(), next(iter(plain.val))[0].numpy())


def test_brightness_shifts_pixel_values():
    src = load_arrays(np.full((16, 8, 8, 3), 128, np.uint8), np.arange(16) % 2, ["a", "b"], "grey", val_split=0.0)
    cfg = DataConfig(batch_size=16, augment=AugmentConfig(flip=False, brightness=0.3))
    x = next(iter(make_datasets(cfg, src, image_size=8, seed=0).train))[0].numpy()
    means = x.mean(axis=(1, 2, 3))
    assert means.std() > 5 and np.all(np.abs(means - 128) <= 0.3 * 255 + 1)


def test_test_split_gets_its_own_unaugmented_dataset(tmp_path):
    src = load_image_folder(make_colour_folder(tmp_path / "d", per_class=10), val_split=0.2, test_split=0.2)
    data = make_datasets(DataConfig(batch_size=4), src, image_size=16)
    assert data.test is not None and data.test_examples == len(src.test) == len(_labels(data.test))
    np.testing.assert_array_equal(_labels(data.test), src.test.labels)


def test_shards_split_the_training_files(colour_folder):
    src = load_image_folder(colour_folder, val_split=0.0)
    cfg = DataConfig(batch_size=5, augment=AugmentConfig(flip=False))
    shards = [make_datasets(cfg, src, image_size=8, shard=(2, i)) for i in range(2)]
    assert [s.train_examples for s in shards] == [18, 18]
    assert shards[0].steps_per_epoch == 4
    pixels = [np.concatenate([x.numpy() for x, _ in s.train]) for s in shards]
    assert len(pixels[0]) == len(pixels[1]) == 18
    assert not np.array_equal(np.sort(pixels[0].ravel()), np.sort(pixels[1].ravel()))


def test_ordered_dataset_keeps_source_order(colour_folder):
    src = load_image_folder(colour_folder, val_split=0.0)
    ds = make_split_dataset(src.train, 8, 7, shuffle=False, cache="none")
    np.testing.assert_array_equal(_labels(ds), src.train.labels)


def test_first_epoch_streams_instead_of_decoding_the_split_first(colour_folder, monkeypatch):
    src = load_image_folder(colour_folder, val_split=0.0)
    decoded: list[int] = []
    original = pipeline.decode_and_resize

    def slow_counting(encoded, size):
        def note(x):
            time.sleep(0.02)  # a decode that takes time, so nothing races far ahead of the first batch
            decoded.append(1)
            return x

        out = tf.py_function(note, [original(encoded, size)], tf.float32)
        out.set_shape([size, size, 3])
        return out

    monkeypatch.setattr(pipeline, "decode_and_resize", slow_counting)
    ds = make_split_dataset(src.train, 8, 2, shuffle=True, seed=0)
    next(iter(ds))
    assert len(decoded) < len(src.train) // 2  # the whole split (36) before the first batch was the old way


def test_shuffled_epochs_come_from_the_cache_in_new_orders(colour_folder):
    src = load_image_folder(colour_folder, val_split=0.0)
    ds = make_split_dataset(src.train, 8, 5, shuffle=True, seed=2)
    first = _pixels(ds)
    for path in src.train.paths:  # later epochs must not need the files any more
        Path(path).unlink()
    second, third = _pixels(ds), _pixels(ds)
    assert len(first) == len(second) == len(third) == len(src.train)
    assert sorted(_ids(first)) == sorted(_ids(second)) == sorted(_ids(third))
    assert len({tuple(_ids(p)) for p in (first, second, third)}) == 3
    assert _ids(first) != sorted(_ids(first))  # the first epoch is shuffled too, not in file order


def test_seed_replays_orders_and_augmentation_epoch_by_epoch(colour_folder):
    src = load_image_folder(colour_folder, val_split=0.0)
    cfg = DataConfig(batch_size=8, augment=AugmentConfig(flip=True, rotation=0.1, zoom=0.1, contrast=0.2))
    runs = []
    for _ in range(2):
        train = make_datasets(cfg, src, image_size=16, seed=5).train
        runs.append([_pixels(train) for _ in range(3)])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    assert np.abs(runs[0][0] - runs[0][1]).mean() > 1.0  # new views (and order) every epoch
    other = make_datasets(cfg, src, image_size=16, seed=6).train
    assert np.abs(_pixels(other) - runs[0][0]).mean() > 1.0


@pytest.mark.parametrize("cache", ["memory", "none", "folder"])
def test_every_epoch_has_every_example_whatever_the_cache(colour_folder, tmp_path, cache):
    src = load_image_folder(colour_folder, val_split=0.0)
    setting = str(tmp_path / "cache") if cache == "folder" else cache
    ds = make_split_dataset(src.train, 8, 5, shuffle=True, cache=setting, seed=1, name="train")
    next(iter(ds))  # an epoch stopped early (Keras building a model, a peek) leaves no partial cache behind
    epochs = [_pixels(ds) for _ in range(3)]
    assert all(sorted(_ids(e)) == sorted(_ids(epochs[0])) for e in epochs) and len(epochs[0]) == 36
    assert len({tuple(_ids(e)) for e in epochs}) == 3
    if cache == "folder":  # written once, and a rebuilt pipeline reuses it
        written = sorted((tmp_path / "cache").iterdir())
        assert len([p for p in written if p.name.endswith(".index")]) == 1
        again = make_split_dataset(src.train, 8, 5, shuffle=True, cache=setting, seed=1, name="train")
        assert sorted(_ids(_pixels(again))) == sorted(_ids(epochs[0]))
        assert sorted((tmp_path / "cache").iterdir()) == written


def test_array_sources_keep_a_known_epoch_length():
    src = _imbalanced()
    ds = make_split_dataset(src.train, 8, 10, shuffle=True, seed=0)
    assert int(ds.cardinality()) == 7
    assert len(_labels(ds)) == 66


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_a_file_damaged_after_listing_costs_one_example_per_epoch(colour_folder, cache):
    src = load_image_folder(colour_folder, val_split=0.0)
    Path(src.train.paths[3]).write_bytes(b"not an image any more")
    ds = make_split_dataset(src.train, 8, 5, shuffle=True, cache=cache, seed=0)
    assert len(_labels(ds)) == 35
    if cache == "memory":  # once one epoch has ended, the store serves every later one, the bad file skipped
        for path in src.train.paths:
            Path(path).unlink()
    assert [len(_labels(ds)) for _ in range(2)] == [35, 35]
