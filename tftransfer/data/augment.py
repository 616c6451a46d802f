"""Training-time augmentation layers for the data.augment keys, built for throughput on the CPU input pipeline.

Keras' own random layers (RandomFlip, RandomRotation, RandomZoom, RandomTranslation, RandomContrast,
RandomBrightness) each run on the whole batch, and every geometric one resamples the images again: with rotation
and zoom on, a batch goes through two bilinear warps of ~2 ms per 224 px image each on a 2-core CPU, which bounded
the pipeline below the training step's own rate. Here the same keys are two layers:

- `RandomGeometry`: flip, rotation, zoom and translation composed into ONE affine matrix per image and applied with a
  single ImageProjectiveTransformV3 (bilinear, reflect fill); without rotation the same sampling is a crop_and_resize
  of a mirror-padded batch (about half the cost), and with flip alone a plain mirror (no resampling);
- `RandomColour`: contrast then brightness, per image, clipped to [0, 255] after each like Keras does.

The random ranges are Keras': rotation r draws an angle in [-r, r] full turns, zoom z a scale in [1 - z, 1 + z]
(above 1 zooms out), translation t a shift in [-t, t] of the size per axis, contrast c a factor in [1 - c, 1 + c]
about each image's per-channel mean, brightness b an offset in [-b, b] * 255; a flip happens with probability 1/2.
Composing the warps samples the source image once (Keras resamples after each layer, blurring a little more, and
reflects an already-reflected border), so the results are not bit-identical to the Keras layers, only alike in
distribution.

Randomness is stateless: `augment(images, seed)` is a pure function of a [2] int seed. The tf.data pipeline feeds it
one seed per batch from `tf.data.Dataset.random(rerandomize_each_iteration=True)`, so every epoch sees new views
and a seed reproduces all of them whatever the parallelism. Calling a layer directly (`layer(x, training=True)`)
draws the seed from the layer's own SeedGenerator instead, like a Keras random layer.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

FILL_MODES = ("reflect", "wrap", "constant", "nearest")


def _as_batch(images: tf.Tensor) -> tuple[tf.Tensor, bool]:
    images = tf.convert_to_tensor(images)
    if images.shape.rank == 3:
        return images[tf.newaxis], True
    return images, False


def _uniform(seed: tf.Tensor, shape: Any, limit: float) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed=seed, minval=-limit, maxval=limit, dtype=tf.float32)


def affine_matrices(height: tf.Tensor, width: tf.Tensor, flip: tf.Tensor, angle: tf.Tensor, zoom: tf.Tensor,
                    shift: tf.Tensor) -> tf.Tensor:
    """[N, 3, 3] matrices taking output pixel coordinates (x, y, 1) to source coordinates.

    The composition of Keras' RandomFlip -> RandomRotation -> RandomZoom -> RandomTranslation, per image:
    `flip` [N] bool, `angle` [N] radians (counter-clockwise as displayed), `zoom` [N] scale (above 1 zooms out),
    `shift` [N, 2] pixels (x, y) the content moves by.
    """
    n = tf.shape(angle)[0]
    w = tf.cast(width, tf.float32) - 1.0
    h = tf.cast(height, tf.float32) - 1.0
    cx, cy = w / 2.0, h / 2.0
    zero, one = tf.zeros([n]), tf.ones([n])

    def mat(a0, a1, a2, b0, b1, b2):
        return tf.reshape(tf.stack([a0, a1, a2, b0, b1, b2, zero, zero, one], axis=1), [n, 3, 3])

    sign = tf.where(flip, -1.0, 1.0)
    flip_m = mat(sign, zero, tf.where(flip, w, 0.0) * one, zero, one, zero)
    cos, sin = tf.cos(angle), tf.sin(angle)
    rotate_m = mat(cos, -sin, cx - cx * cos + cy * sin, sin, cos, cy - cx * sin - cy * cos)
    zoom_m = mat(zoom, zero, cx * (1.0 - zoom), zero, zoom, cy * (1.0 - zoom))
    shift_m = mat(one, zero, -shift[:, 0], zero, one, -shift[:, 1])
    return flip_m @ rotate_m @ zoom_m @ shift_m


def warp(images: tf.Tensor, matrices: tf.Tensor, fill_mode: str = "reflect") -> tf.Tensor:
    """Resamples [N, H, W, C] float images through [N, 3, 3] output-to-source matrices (bilinear, one pass)."""
    transforms = tf.reshape(matrices, [-1, 9])[:, :8] / matrices[:, 2:3, 2]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode=fill_mode.upper())


def _mirror_pad(images: tf.Tensor, pad: tf.Tensor) -> tf.Tensor:
    """[N, H, W, C] padded by `pad` <= min(H, W) pixels per side, mirrored with the edge repeated ("reflect")."""
    images = tf.concat([tf.reverse(images[:, :pad], [1]), images, tf.reverse(images[:, -pad:], [1])], axis=1)
    return tf.concat([tf.reverse(images[:, :, :pad], [2]), images, tf.reverse(images[:, :, -pad:], [2])], axis=2)


def warp_axis_aligned(images: tf.Tensor, matrices: tf.Tensor) -> tf.Tensor:
    """`warp` with reflect fill for matrices without rotation or shear (flip, zoom, shift): the same samples.

    crop_and_resize on a mirror-padded batch (a flipped box flips), about half the cost of the general warp; a
    shift or zoom that reaches further out than the image is wide falls back to `warp`.
    """
    shape = tf.shape(images)
    height, width = tf.cast(shape[1], tf.float32) - 1.0, tf.cast(shape[2], tf.float32) - 1.0
    corners = tf.stack([tf.stack([0.0, 0.0, 1.0]), tf.stack([width, height, 1.0])])
    source = tf.einsum("nij,kj->nki", matrices, corners)  # [N, 2 corners, (x, y, 1)]
    beyond = tf.maximum(tf.maximum(-source[..., 0], source[..., 0] - width),
                        tf.maximum(-source[..., 1], source[..., 1] - height))
    pad = tf.maximum(tf.cast(tf.math.ceil(tf.reduce_max(beyond)), tf.int32) + 1, 1)

    def crop() -> tf.Tensor:
        padded = _mirror_pad(images, pad)
        p = tf.cast(pad, tf.float32)
        y1 = (matrices[:, 1, 2] + p) / (height + 2.0 * p)
        x1 = (matrices[:, 0, 2] + p) / (width + 2.0 * p)
        y2 = y1 + matrices[:, 1, 1] * height / (height + 2.0 * p)
        x2 = x1 + matrices[:, 0, 0] * width / (width + 2.0 * p)
        return tf.image.crop_and_resize(padded, tf.stack([y1, x1, y2, x2], axis=1), tf.range(shape[0]),
                                        shape[1:3])

    fits = pad <= tf.minimum(shape[1], shape[2])
    return tf.cond(fits, crop, lambda: warp(images, matrices, "reflect"))


class _StatelessAugment(keras.layers.Layer):
    """A random layer whose randomness is `augment(images, seed)`; `call` draws the seed from a SeedGenerator."""

    def __init__(self, seed: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")  # pixels stay float32 under a mixed-precision policy
        super().__init__(autocast=False, **kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = False

    def augment(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    @property
    def is_identity(self) -> bool:
        return False

    def call(self, inputs: tf.Tensor, training: bool = True) -> tf.Tensor:
        if not training or self.is_identity:
            return inputs
        return self.augment(inputs, self.seed_generator.next())

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="tftransfer")
class RandomGeometry(_StatelessAugment):
    """Random horizontal flip, rotation, zoom and translation as one affine warp per image (see the module)."""

    def __init__(self, flip: bool = False, rotation: float = 0.0, zoom: float = 0.0, translation: float = 0.0,
                 fill_mode: str = "reflect", seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        if fill_mode not in FILL_MODES:
            raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
        self.flip, self.rotation, self.zoom, self.translation = bool(flip), rotation, zoom, translation
        self.fill_mode = fill_mode

    @property
    def is_identity(self) -> bool:
        return not self.flip and not self.warps

    @property
    def warps(self) -> bool:
        return self.rotation > 0 or self.zoom > 0 or self.translation > 0

    def augment(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        images, single = _as_batch(images)
        if self.is_identity:
            return images[0] if single else images
        shape = tf.shape(images)
        n, height, width = shape[0], shape[1], shape[2]
        # One seed per quantity, so turning one key on or off leaves the others' draws unchanged.
        s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
        flip = (tf.random.stateless_uniform([n], seed=s[0]) < 0.5) if self.flip else tf.zeros([n], tf.bool)
        if not self.warps:  # a mirror only: exact, and no resampling cost
            # Select with a [N] condition picks whole images (tf.where would broadcast it per pixel: 3x slower).
            out = tf.raw_ops.Select(condition=flip, x=tf.reverse(images, axis=[2]), y=images)
        else:
            angle = _uniform(s[1], [n], self.rotation * 2.0 * math.pi) if self.rotation > 0 else tf.zeros([n])
            zoom = 1.0 + _uniform(s[2], [n], self.zoom)
            size = tf.cast(tf.stack([width, height]), tf.float32)
            shift = _uniform(s[3], [n, 2], self.translation) * size
            matrices = affine_matrices(height, width, flip, angle, zoom, shift)
            if self.rotation > 0 or self.fill_mode != "reflect":
                out = warp(images, matrices, self.fill_mode)
            else:
                out = warp_axis_aligned(images, matrices)
        return out[0] if single else out

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "flip": self.flip, "rotation": self.rotation, "zoom": self.zoom,
                "translation": self.translation, "fill_mode": self.fill_mode}


@keras.saving.register_keras_serializable(package="tftransfer")
class RandomColour(_StatelessAugment):
    """Random contrast then brightness per image, on [0, 255] pixels (see the module)."""

    def __init__(self, contrast: float = 0.0, brightness: float = 0.0, seed: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self.contrast, self.brightness = contrast, brightness

    @property
    def is_identity(self) -> bool:
        return not (self.contrast > 0 or self.brightness > 0)

    def augment(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        images, single = _as_batch(images)
        n = tf.shape(images)[0]
        s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
        out = images
        if self.contrast > 0:
            factor = 1.0 + _uniform(s[0], [n, 1, 1, 1], self.contrast)
            mean = tf.reduce_mean(out, axis=[1, 2], keepdims=True)
            # (x - mean) * factor + mean, in two passes over the pixels instead of three
            out = tf.clip_by_value(out * factor + mean * (1.0 - factor), 0.0, 255.0)
        if self.brightness > 0:
            out = tf.clip_by_value(out + _uniform(s[1], [n, 1, 1, 1], self.brightness) * 255.0, 0.0, 255.0)
        return out[0] if single else out

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "contrast": self.contrast, "brightness": self.brightness}


def stateless_layers(augmenter: keras.Sequential) -> list[_StatelessAugment] | None:
    """The augmenter's layers when all of them take explicit seeds (else None: call the Sequential instead)."""
    layers = list(augmenter.layers)
    if layers and all(isinstance(layer, _StatelessAugment) for layer in layers):
        return layers
    return None


def augment_with_seed(layers: list[_StatelessAugment], images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Applies stateless augmentation layers in order, each with its own seed split from `seed`."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), len(layers))
    for i, layer in enumerate(layers):
        images = layer.augment(images, seeds[i])
    return images
