"""Augmentation layers: each data.augment key does what it says, seeded, in range, and the fast paths agree."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer.config.experiment import AugmentConfig
from tftransfer.data.augment import (
    RandomColour,
    RandomGeometry,
    affine_matrices,
    augment_with_seed,
    sample_bilinear,
    stateless_layers,
    warp,
    warp_fast,
)
from tftransfer.data.pipeline import build_augmenter

RNG = np.random.default_rng(0)
SEED = tf.constant([3, 4], tf.int64)


def _matrices(n: int, size: int, flip=None, angle=None, zoom=None, shift=None) -> tf.Tensor:
    return affine_matrices(size, size,
                           tf.constant([False] * n if flip is None else flip),
                           tf.zeros([n]) if angle is None else tf.constant(angle, tf.float32),
                           tf.ones([n]) if zoom is None else tf.constant(zoom, tf.float32),
                           tf.zeros([n, 2]) if shift is None else tf.constant(shift, tf.float32))


def _ramp(size: int = 16) -> np.ndarray:
    """One image whose red channel is 10 * x and green channel 10 * y: bilinear sampling of it is exact."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.stack([10 * x, 10 * y, np.full_like(x, 7)], axis=-1)[None]


def test_matrices_do_what_each_parameter_says():
    img = _ramp()
    c = 7.5  # the centre of a 16 px image
    # identity, and a flip, are exact
    np.testing.assert_array_equal(warp(img, _matrices(1, 16)).numpy(), img)
    np.testing.assert_array_equal(warp(img, _matrices(1, 16, flip=[True])).numpy(), img[:, :, ::-1])
    # a quarter turn is np.rot90 (counter-clockwise as displayed)
    square = RNG.uniform(0, 255, (1, 9, 9, 3)).astype(np.float32)
    turned = warp(square, affine_matrices(9, 9, tf.constant([False]), tf.constant([math.pi / 2]), tf.ones([1]),
                                          tf.zeros([1, 2]))).numpy()
    np.testing.assert_allclose(turned[0], np.rot90(square[0], 1, axes=(0, 1)), atol=1e-3)
    # zoom 0.5 magnifies about the centre: the pixel at x shows the source at c + 0.5 (x - c)
    zoomed = warp(img, _matrices(1, 16, zoom=[0.5])).numpy()[0]
    x = np.arange(16)
    np.testing.assert_allclose(zoomed[5, :, 0], 10 * (c + 0.5 * (x - c)), atol=1e-3)
    # a shift of (+3, -2) moves the content right and up: the pixel at x shows the source at x - 3
    shifted = warp(img, _matrices(1, 16, shift=[[3.0, -2.0]])).numpy()[0]
    np.testing.assert_allclose(shifted[5, 3:, 0], 10 * (x[3:] - 3), atol=1e-3)
    np.testing.assert_allclose(shifted[:14, 5, 1], 10 * (np.arange(14) + 2), atol=1e-3)
    # beyond the border the image is mirrored (edge pixel repeated), not black
    np.testing.assert_allclose(shifted[5, :3, 0], 10 * np.array([2, 1, 0]), atol=1e-3)


@pytest.mark.parametrize("fill_mode", ["reflect", "constant", "nearest"])
def test_compiled_sampler_matches_the_op(fill_mode):
    # rotations, zooms both ways, shifts past the border (the fill shows), flips: every fill rule is exercised
    n, size = 8, 20
    images = RNG.uniform(0, 255, (n, size, size + 3, 3)).astype(np.float32)
    m = affine_matrices(size, size + 3, tf.constant([True, False] * 4),
                        tf.constant(RNG.uniform(-0.6, 0.6, n), tf.float32),
                        tf.constant(RNG.uniform(0.5, 1.9, n), tf.float32),
                        tf.constant(RNG.uniform(-15, 15, (n, 2)), tf.float32))
    reference = warp(images, m, fill_mode).numpy()
    np.testing.assert_allclose(warp_fast(images, m, fill_mode).numpy(), reference, atol=0.05)
    np.testing.assert_allclose(sample_bilinear(images, m, fill_mode).numpy(), reference, atol=0.05)
    # and the last (smaller) batch of an epoch goes through the same compiled function
    np.testing.assert_allclose(warp_fast(images[:3], m[:3], fill_mode).numpy(), reference[:3], atol=0.05)


def test_wrap_fill_is_periodic():
    image = RNG.uniform(0, 255, (1, 12, 10, 3)).astype(np.float32)
    shifted = warp_fast(image, _matrices(1, 12, shift=[[4.0, -3.0]])[:, :, :], "wrap").numpy()
    np.testing.assert_allclose(shifted, np.roll(image, (-3, 4), axis=(1, 2)), atol=1e-3)


def test_compiled_sampler_runs_inside_tf_data_and_rejects_unknown_fill():
    images = RNG.uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    m = _matrices(4, 16, zoom=[0.7, 1.0, 1.3, 0.9], shift=[[1, 2], [0, 0], [-3, 1], [2, -2]])
    ds = tf.data.Dataset.from_tensors((images, m)).map(lambda x, mm: warp_fast(x, mm, "reflect"))
    np.testing.assert_allclose(next(iter(ds)).numpy(), warp(images, m, "reflect").numpy(), atol=0.05)
    with pytest.raises(ValueError, match="fill_mode"):
        warp_fast(images, m, "mirror")


def test_flip_alone_mirrors_whole_images_about_half_the_time():
    image = RNG.uniform(0, 255, (1, 8, 12, 3)).astype(np.float32)
    batch = np.repeat(image, 64, axis=0)
    out = RandomGeometry(flip=True).augment(batch, SEED).numpy()
    same = [np.array_equal(o, image[0]) for o in out]
    mirrored = [np.array_equal(o, image[0][:, ::-1]) for o in out]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 16 < sum(mirrored) < 48


def test_geometry_keys_respect_their_ranges():
    img = np.repeat(_ramp(32), 40, axis=0)
    # rotation r: the angle stays within r full turns; read it from the warped ramp's gradient
    out = RandomGeometry(rotation=0.05).augment(img, SEED).numpy()
    gx = out[:, 16, 17, 0] - out[:, 16, 15, 0]
    gy = out[:, 17, 16, 0] - out[:, 15, 16, 0]
    angles = np.degrees(np.arctan2(-gy, gx))
    assert np.all(np.abs(angles) <= 18.0 + 0.5) and angles.std() > 4
    # zoom z: the scale stays within 1 +- z
    out = RandomGeometry(zoom=0.2).augment(img, SEED).numpy()
    scale = (out[:, 16, 17, 0] - out[:, 16, 15, 0]) / 20.0
    assert np.all((scale >= 0.8 - 1e-3) & (scale <= 1.2 + 1e-3)) and scale.std() > 0.05
    # translation t: the shift stays within t of the size on each axis
    out = RandomGeometry(translation=0.1).augment(img, SEED).numpy()
    dx = 16 - out[:, 16, 16, 0] / 10.0
    assert np.all(np.abs(dx) <= 3.2 + 1e-3) and dx.std() > 0.5


def test_colour_keys_respect_their_ranges():
    rng = np.random.default_rng(1)
    images = rng.uniform(80, 170, (40, 8, 8, 3)).astype(np.float32)  # mid-range: the clip does not bite
    out = RandomColour(contrast=0.3).augment(images, SEED).numpy()
    mean = images.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out.mean(axis=(1, 2), keepdims=True), mean, atol=1e-3)
    # out - mean = factor * (image - mean), one factor per image
    factor = ((out - mean) * (images - mean)).sum(axis=(1, 2, 3)) / ((images - mean) ** 2).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(out - mean, factor[:, None, None, None] * (images - mean), atol=1e-3)
    assert np.all((factor >= 0.7 - 1e-4) & (factor <= 1.3 + 1e-4)) and factor.std() > 0.05
    out = RandomColour(brightness=0.1).augment(images, SEED).numpy()
    delta = (out - images).reshape(40, -1)
    assert np.allclose(delta, delta[:, :1], atol=1e-3)
    assert np.all(np.abs(delta) <= 25.5 + 1e-3) and delta[:, 0].std() > 3


@pytest.mark.parametrize("preset", ["custom", "light"])
def test_augmenter_output_keeps_shape_dtype_and_range(preset):
    cfg = AugmentConfig(preset=preset, flip=True, rotation=0.1, zoom=0.3, translation=0.2, contrast=0.9,
                        brightness=0.5)
    augmenter = build_augmenter(cfg, seed=1)
    images = RNG.choice([0.0, 255.0], (8, 24, 20, 3)).astype(np.float32)  # extremes, where overshoot would show
    out = augmenter(images, training=True)
    assert out.shape == images.shape and out.dtype == tf.float32
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0
    for layer in augmenter.layers:  # one unbatched image
        assert layer(images[0], training=True).shape == images.shape[1:]
    np.testing.assert_array_equal(augmenter(images, training=False).numpy(), images)


def test_no_op_keys_are_identities():
    assert RandomGeometry().is_identity and RandomColour().is_identity
    assert RandomGeometry(rotation=0.0, zoom=0.0, translation=0.0, flip=False).is_identity
    images = RNG.uniform(0, 255, (2, 6, 6, 3)).astype(np.float32)
    np.testing.assert_array_equal(RandomGeometry().augment(images, SEED).numpy(), images)
    np.testing.assert_array_equal(RandomGeometry()(images, training=True).numpy(), images)


def test_stateless_augmentation_is_a_function_of_the_seed():
    layers = stateless_layers(build_augmenter(AugmentConfig(flip=True, rotation=0.1, contrast=0.2), seed=0))
    assert [type(layer).__name__ for layer in layers] == ["RandomGeometry", "RandomColour"]
    images = RNG.uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    first = augment_with_seed(layers, images, SEED).numpy()
    np.testing.assert_array_equal(augment_with_seed(layers, images, SEED).numpy(), first)
    assert np.abs(augment_with_seed(layers, images, SEED + 1).numpy() - first).mean() > 1.0
    # Keras' own layers take no explicit seed; the pipeline calls them as they are
    assert stateless_layers(build_augmenter(AugmentConfig(preset="randaugment"), seed=0)) is None


def test_layers_round_trip_through_their_config():
    layer = RandomGeometry(flip=True, rotation=0.1, zoom=0.2, translation=0.05, seed=3)
    again = RandomGeometry.from_config(layer.get_config())
    assert (again.flip, again.rotation, again.zoom, again.translation, again.seed) == (True, 0.1, 0.2, 0.05, 3)
    colour = keras.layers.deserialize(keras.layers.serialize(RandomColour(contrast=0.1, brightness=0.2, seed=5)))
    assert (colour.contrast, colour.brightness, colour.seed) == (0.1, 0.2, 5)
