"""The corruption registry: identity at severity 0, more damage per severity, range, determinism, tf.data."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tftransfer.core.errors import ConfigError
from tftransfer.domain import corruptions as C

REQUIRED = {"gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "defocus_blur", "motion_blur",
            "brightness", "contrast", "saturation", "jpeg_compression", "pixelate", "fog"}
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "fog"}


def photo_like(size: int = 64, seed: int = 3) -> np.ndarray:
    """A float32 [size, size, 3] image in [0, 255] with what photos have: smooth shading, edges, texture, colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack([200 * xx + 30, 150 * (1 - yy) + 50, 120 + 60 * np.sin(6 * xx * yy)], axis=-1)
    image[(xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.05] = (230, 40, 60)  # a red disc: a hard colour edge
    image[int(0.7 * size):, : size // 3] = (20, 20, 90)  # a dark block
    image += rng.normal(0, 6, image.shape)  # sensor-like texture
    return np.clip(image, 0, 255).astype(np.float32)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def test_registry_has_the_imagenet_c_style_set():
    assert REQUIRED <= set(C.list_corruptions())
    for name in C.list_corruptions():
        c = C.get_corruption(name)
        assert len(c.params) == 5 and c.family in {"noise", "blur", "weather", "digital"}
    assert C.resolve_corruptions("all") == C.list_corruptions()
    assert C.resolve_corruptions("fog, contrast,fog") == ["fog", "contrast"]
    with pytest.raises(ConfigError, match="gausian_noise.*did you mean gaussian_noise"):
        C.resolve_corruptions("gausian_noise")
    with pytest.raises(ValueError, match="already registered"):
        C.register_corruption(C.get_corruption("fog"))


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_severity_zero_is_identity_and_damage_grows_with_severity(name):
    image = photo_like()
    clean = tf.constant(image)
    assert np.array_equal(C.corrupt(clean, name, 0, seed=5).numpy(), image)
    distances = [rmse(C.corrupt(clean, name, s, seed=5).numpy(), image) for s in C.SEVERITIES]
    assert distances[0] > 0.5, f"severity 1 of {name} barely changes the image: {distances}"
    assert all(b > a for a, b in zip(distances, distances[1:])), f"{name}: {distances}"


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_values_stay_in_range_and_shape_is_kept(name):
    # A saturated image (pure black, pure white, pure colour) pushes every op against the range ends.
    image = photo_like(32)
    image[:8] = 0.0
    image[8:16] = 255.0
    image[16:20] = (255, 0, 0)
    for severity in C.SEVERITIES:
        out = C.corrupt(tf.constant(image), name, severity, seed=1).numpy()
        assert out.shape == image.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 255.0, (name, severity, out.min(), out.max())
        assert np.all(np.isfinite(out))


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_same_seed_same_output_and_random_ones_depend_on_the_seed(name):
    image = tf.constant(photo_like(32))
    first = C.corrupt(image, name, 3, seed=11).numpy()
    assert np.array_equal(first, C.corrupt(image, name, 3, seed=11).numpy())
    assert np.array_equal(first, C.corrupt(image, name, 3, seed=tf.constant([11, 0], tf.int64)).numpy())
    other = C.corrupt(image, name, 3, seed=12).numpy()
    if name in RANDOM:
        assert not np.array_equal(first, other)
    else:
        assert np.array_equal(first, other)


def test_corrupt_dataset_runs_inside_tf_data_and_matches_eager():
    images = np.stack([photo_like(32, seed=s) for s in range(3)])
    examples = tf.data.Dataset.from_tensor_slices((images, np.arange(3)))
    for name in ("gaussian_noise", "motion_blur", "jpeg_compression", "fog"):
        got = [(x.numpy(), int(y)) for x, y in C.corrupt_dataset(examples, name, 4, seed=7)]
        assert [y for _, y in got] == [0, 1, 2]
        for i, (x, _) in enumerate(got):
            # Example i gets seed (7, i): the same draw eagerly as in the graph.
            eager = C.corrupt(tf.constant(images[i]), name, 4, seed=tf.constant([7, i], tf.int64)).numpy()
            np.testing.assert_allclose(x, eager, atol=1e-3)
        # Each example gets its own noise, not one shared draw.
        if name == "gaussian_noise":
            assert not np.allclose(got[0][0] - images[0], got[1][0] - images[1])
        again = np.stack([x.numpy() for x, _ in C.corrupt_dataset(examples, name, 4, seed=7)])
        assert np.array_equal(again, np.stack([x for x, _ in got]))


def test_bad_arguments_are_clear():
    image = tf.constant(photo_like(16))
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(image, "fog", 6)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        C.corrupt(tf.zeros([2, 16, 16, 3]), "fog", 1)
    with pytest.raises(ConfigError, match="unknown corruption"):
        C.corrupt(image, "snow", 1)
