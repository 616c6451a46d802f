"""Training-time augmentation layers for the data.augment keys, built for throughput on the CPU input pipeline.

Keras' own random layers (RandomFlip, RandomRotation, RandomZoom, RandomTranslation, RandomContrast,
RandomBrightness) each run on the whole batch, and every geometric one resamples the images again: with rotation
and zoom on, a batch goes through two bilinear warps of ~2 ms per 224 px image each on a 2-core CPU, which bounded
the pipeline below the training step's own rate. Here the same keys are two layers:

- `RandomGeometry`: flip, rotation, zoom and translation composed into ONE affine matrix per image and applied in one
  bilinear resampling pass (reflect fill), with flip alone a plain mirror (no resampling). The resampling is written
  as gathers and compiled by XLA (`warp_fast`): on a 2-core CPU that is 0.7 ms of CPU per 224 px image where
  TensorFlow's ImageProjectiveTransformV3 op takes 2.0 ms, and, unlike the op (which has no XLA kernel), it can run
  inside an XLA-compiled training step when augmentation runs on the accelerator;
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

import logging
import math
from typing import Any

import keras
import tensorflow as tf

logger = logging.getLogger(__name__)

FILL_MODES = ("reflect", "wrap", "constant", "nearest")
# Names how the layers compute their views, for cache keys: features of augmented views made by another version
# of this code are stale.
AUGMENT_VERSION = "xla-gather-1"


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
    """Resamples [N, H, W, C] float images through [N, 3, 3] output-to-source matrices (bilinear, one pass).

    TensorFlow's ImageProjectiveTransformV3 op: the reference `warp_fast` is checked against.
    """
    transforms = tf.reshape(matrices, [-1, 9])[:, :8] / matrices[:, 2:3, 2]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode=fill_mode.upper())


def _fold(coord: tf.Tensor, size: tf.Tensor, fill_mode: str) -> tf.Tensor:
    """Source coordinates mapped into the image the way `fill_mode` extends it (constant: left as they are)."""
    if fill_mode == "reflect":  # d c b a | a b c d | d c b a: the edge pixel repeated, period 2 * size
        period = 2.0 * size
        coord = tf.math.floormod(coord, period)
        return tf.clip_by_value(tf.where(coord >= size, period - 1.0 - coord, coord), 0.0, size - 1.0)
    if fill_mode == "nearest":
        return tf.clip_by_value(coord, 0.0, size - 1.0)
    if fill_mode == "wrap":
        return tf.math.floormod(coord, size)
    return coord


def sample_bilinear(images: tf.Tensor, matrices: tf.Tensor, fill_mode: str = "reflect") -> tf.Tensor:
    """`warp` written as gathers: the same samples (within float round-off) from ops XLA can compile.

    Each output pixel's source point is computed once for all channels and its four neighbours are gathered as
    whole pixels. Run eagerly this costs more than the op; compiled by XLA (`warp_fast`) it is one fused loop,
    about 2.7x cheaper than the op on a CPU and able to run inside an XLA-compiled training step on a GPU.
    For `wrap` the neighbours wrap too (a periodic image), where the op reads the fill value across the seam.
    """
    shape = tf.shape(images)
    n, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    ys, xs = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
    grid = tf.stack([tf.reshape(xs, [-1]), tf.reshape(ys, [-1]), tf.ones([height * width])], axis=0)
    source = tf.matmul(tf.cast(matrices, tf.float32), grid[tf.newaxis])  # [N, 3, H*W]
    x = _fold(source[:, 0] / source[:, 2], w, fill_mode)
    y = _fold(source[:, 1] / source[:, 2], h, fill_mode)
    x0, y0 = tf.floor(x), tf.floor(y)
    ax, ay = (x - x0)[..., tf.newaxis], (y - y0)[..., tf.newaxis]
    pixels = tf.reshape(images, [-1, channels])
    first = tf.reshape(tf.range(n) * height * width, [-1, 1])

    def tap(yy: tf.Tensor, xx: tf.Tensor) -> tf.Tensor:
        if fill_mode == "wrap":
            yy, xx = tf.math.floormod(yy, h), tf.math.floormod(xx, w)
        inside = (xx >= 0.0) & (xx <= w - 1.0) & (yy >= 0.0) & (yy <= h - 1.0)
        xi = tf.cast(tf.clip_by_value(xx, 0.0, w - 1.0), tf.int32)
        yi = tf.cast(tf.clip_by_value(yy, 0.0, h - 1.0), tf.int32)
        values = tf.gather(pixels, first + yi * width + xi)
        return values * tf.cast(inside, values.dtype)[..., tf.newaxis]  # outside: the fill value, 0

    top = (1.0 - ax) * tap(y0, x0) + ax * tap(y0, x0 + 1.0)
    bottom = (1.0 - ax) * tap(y0 + 1.0, x0) + ax * tap(y0 + 1.0, x0 + 1.0)
    return tf.reshape((1.0 - ay) * top + ay * bottom, shape)


_COMPILED: dict[str, Any] = {}  # key -> XLA-compiled tf.function
_XLA_OK: dict[str, bool] = {}  # "cpu" -> whether XLA compiles here, once known


def _xla_works() -> bool:
    """Whether this TensorFlow build can XLA-compile the sampler on the CPU (tried once per process)."""
    if "cpu" not in _XLA_OK:
        try:
            probe = tf.function(lambda im, m: sample_bilinear(im, m, "nearest"), jit_compile=True)
            # First asked while a tf.data map or a training step is being traced: run the probe now, eagerly,
            # rather than into that graph (where a failure would only show when the graph runs).
            with tf.init_scope():
                probe(tf.zeros([1, 2, 2, 1]), tf.eye(3)[tf.newaxis])
            _XLA_OK["cpu"] = True
        except (tf.errors.OpError, ValueError, NotImplementedError) as exc:  # a build without XLA
            _XLA_OK["cpu"] = False
            logger.warning("XLA is unavailable (%s); augmentation warps with the slower "
                           "ImageProjectiveTransformV3 op", str(exc).splitlines()[0][:120])
    return _XLA_OK["cpu"]


def _compiled(key: str, fn: Any) -> Any:
    """`fn` compiled by XLA (cached under `key`), or `fn` itself in a build without XLA."""
    if not _xla_works():
        return fn
    if key not in _COMPILED:
        _COMPILED[key] = tf.function(fn, jit_compile=True, reduce_retracing=True)
    return _COMPILED[key]


def warp_fast(images: tf.Tensor, matrices: tf.Tensor, fill_mode: str = "reflect") -> tf.Tensor:
    """`warp` at a third of the CPU cost: `sample_bilinear` compiled by XLA (the op itself when XLA is missing).

    Compiled functions are cached per fill mode; XLA compiles once per batch shape (a few per run: the full
    batches and the last one), in tf.data maps and inside compiled training steps alike.
    """
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
    if not _xla_works():
        return warp(images, matrices, fill_mode)
    return _compiled(f"warp-{fill_mode}", lambda im, m: sample_bilinear(im, m, fill_mode))(images, matrices)


def _contrast_brightness(images: tf.Tensor, factor: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
    """(x - mean) * factor + mean, clipped, then + offset, clipped: per image factors and offsets [N, 1, 1, 1]."""
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
    out = tf.clip_by_value(images * factor + mean * (1.0 - factor), 0.0, 255.0)
    return tf.clip_by_value(out + offset, 0.0, 255.0)


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
            out = warp_fast(images, affine_matrices(height, width, flip, angle, zoom, shift), self.fill_mode)
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
        # A factor of 1 and an offset of 0 change nothing, so one compiled kernel (three passes over the pixels,
        # fused) serves every combination of keys.
        factor = 1.0 + _uniform(s[0], [n, 1, 1, 1], self.contrast) if self.contrast > 0 else tf.ones([n, 1, 1, 1])
        offset = (_uniform(s[1], [n, 1, 1, 1], self.brightness) * 255.0 if self.brightness > 0
                  else tf.zeros([n, 1, 1, 1]))
        out = _compiled("colour", _contrast_brightness)(tf.cast(images, tf.float32), factor, offset)
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
