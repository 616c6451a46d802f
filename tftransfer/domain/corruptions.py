"""ImageNet-C-style corruptions as TensorFlow ops, usable eagerly and inside tf.data, in a registry.

Every corruption maps a float32 [H, W, 3] image in [0, 255] to one in [0, 255], at severity 1 to 5 (0 is the
identity), and is deterministic given its seed (stateless random ops: same seed, same output, in eager and graph
mode alike). Parameters follow Hendrycks & Dietterich (ICLR 2019, the ImageNet-C code) where an op exists in
TensorFlow; the spatial ones (blur radii, kernel sizes) are ImageNet-C's at 224 px scaled by sqrt(size / 224),
which lands near CIFAR-10-C's at 32 px (e.g. gaussian blur sigma 1 -> 0.38 there, CIFAR-10-C uses 0.4). Where
ImageNet-C's parameters are not monotone in severity (saturate, fog) or too close together to be (pixelate 0.6
vs 0.5), ours are spread so that severity always means "more".

Randomness is shared across severities (one seed draws the same noise field, whose strength the severity sets),
so an image moves further from the clean one at every step of severity, which the tests check.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tftransfer.core.errors import ConfigError

SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIZE = 224


@dataclass(frozen=True)
class Corruption:
    """One corruption: `fn(image01, param, seed, scale)` on a [0, 1] image, and its five severity parameters."""

    name: str
    family: str
    fn: Callable[[tf.Tensor, object, tf.Tensor, float], tf.Tensor]
    params: tuple
    description: str


CORRUPTIONS: dict[str, Corruption] = {}


def register_corruption(corruption: Corruption) -> Corruption:
    """Adds a corruption to the registry (a name may be registered once)."""
    if corruption.name in CORRUPTIONS:
        raise ValueError(f"corruption {corruption.name!r} is already registered")
    if len(corruption.params) != len(SEVERITIES):
        raise ValueError(f"corruption {corruption.name!r} needs {len(SEVERITIES)} severity parameters")
    CORRUPTIONS[corruption.name] = corruption
    return corruption


def list_corruptions() -> list[str]:
    """Registered corruption names, in registration order (noise, blur, weather, digital)."""
    return list(CORRUPTIONS)


def get_corruption(name: str) -> Corruption:
    """The registered corruption, or a ConfigError naming it and the closest names."""
    if name not in CORRUPTIONS:
        close = difflib.get_close_matches(name, CORRUPTIONS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown corruption {name!r}{hint} (available: {', '.join(CORRUPTIONS)})")
    return CORRUPTIONS[name]


def resolve_corruptions(names: str | Sequence[str]) -> list[str]:
    """'all', a comma-separated string or a list of names -> validated names (order kept, duplicates dropped)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["all"]:
        return list_corruptions()
    out: list[str] = []
    for name in names:
        get_corruption(name)
        if name not in out:
            out.append(name)
    return out


def _seed(seed: int | tf.Tensor | Sequence[int]) -> tf.Tensor:
    if isinstance(seed, (int, np.integer)):
        return tf.constant([int(seed), 0], tf.int64)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if seed.shape.rank != 1 or seed.shape[0] != 2:
        raise ValueError(f"seed must be an int or a shape-[2] integer tensor; got shape {seed.shape}")
    return seed


def corrupt(image: tf.Tensor, name: str, severity: int, seed: int | tf.Tensor = 0) -> tf.Tensor:
    """Corrupts one float [H, W, 3] image in [0, 255] (static H and W); severity 0 returns the image itself."""
    if not isinstance(severity, (int, np.integer)) or not 0 <= severity <= len(SEVERITIES):
        raise ValueError(f"severity must be an integer from 0 to {len(SEVERITIES)}; got {severity!r}")
    corruption = get_corruption(name)
    if severity == 0:
        return image
    image = tf.convert_to_tensor(image)
    if image.shape.rank != 3 or image.shape[-1] != 3 or image.shape[0] is None or image.shape[1] is None:
        raise ValueError(f"corrupt() takes one [H, W, 3] image with a static size; got shape {image.shape}")
    scale = math.sqrt(min(image.shape[0], image.shape[1]) / REFERENCE_SIZE)
    x = tf.cast(image, tf.float32) / 255.0
    out = corruption.fn(x, corruption.params[int(severity) - 1], _seed(seed), scale)
    return tf.clip_by_value(tf.cast(out, tf.float32), 0.0, 1.0) * 255.0


def corrupt_dataset(examples: tf.data.Dataset, name: str, severity: int, seed: int = 0) -> tf.data.Dataset:
    """Maps `corrupt` over an unbatched dataset of (image, label); example i gets the seed (seed, i)."""
    get_corruption(name)

    def apply(index: tf.Tensor, element: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = element
        return corrupt(image, name, severity, tf.stack([tf.constant(seed, tf.int64), index])), label

    return examples.enumerate().map(apply, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# --- building blocks -----------------------------------------------------------------------------------------


def _convolve(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Same-size 2-D convolution of each channel with `kernel` [kh, kw], mirror-padded at the borders."""
    kh, kw = int(kernel.shape[0]), int(kernel.shape[1])
    ph, pw = kh // 2, kw // 2
    padded = tf.pad(x[None], [[0, 0], [ph, kh - 1 - ph], [pw, kw - 1 - pw], [0, 0]], mode="SYMMETRIC")
    filters = tf.tile(tf.cast(kernel, tf.float32)[:, :, None, None], [1, 1, 3, 1])
    return tf.nn.depthwise_conv2d(padded, filters, strides=[1, 1, 1, 1], padding="VALID")[0]


def _max_radius(x: tf.Tensor) -> int:
    # SYMMETRIC padding allows at most the image size; keep kernels well inside it.
    return max(1, min(int(x.shape[0]), int(x.shape[1])) // 2)


def _gaussian_blur(x: tf.Tensor, sigma: float) -> tf.Tensor:
    if sigma <= 0:
        return x
    radius = min(max(1, math.ceil(3 * sigma)), _max_radius(x))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(t**2) / (2 * sigma**2))
    k /= k.sum()
    x = _convolve(x, tf.constant(k[:, None], tf.float32))
    return _convolve(x, tf.constant(k[None, :], tf.float32))


def _smooth_field(x: tf.Tensor, seed: tf.Tensor, octaves: int = 4) -> tf.Tensor:
    """A smooth random [H, W, 1] field in [0, 1]: octaves of upsampled uniform noise (a plasma-fractal stand-in)."""
    h, w = int(x.shape[0]), int(x.shape[1])
    field = tf.zeros([h, w, 1], tf.float32)
    for octave in range(octaves):
        grid = 2 ** (octave + 2)
        noise = tf.random.stateless_uniform([grid, grid, 1], tf.random.experimental.stateless_fold_in(seed, octave))
        field += 0.5**octave * tf.image.resize(noise, [h, w], method="bicubic")
    low, high = tf.reduce_min(field), tf.reduce_max(field)
    return (field - low) / tf.maximum(high - low, 1e-6)


# --- the corruptions -------------------------------------------------------------------------------------------


def _gaussian_noise(x: tf.Tensor, sigma: float, seed: tf.Tensor, scale: float) -> tf.Tensor:
    return x + sigma * tf.random.stateless_normal(tf.shape(x), seed)


def _shot_noise(x: tf.Tensor, photons: float, seed: tf.Tensor, scale: float) -> tf.Tensor:
    # Poisson photon counts: fewer photons per unit of intensity, more noise. A shared uniform draw pushed
    # through the Poisson quantiles would couple severities, but TF has no Poisson quantile op; the expected
    # distance still grows steeply with severity (variance x / photons).
    return tf.random.stateless_poisson(tf.shape(x), seed, lam=x * photons, dtype=tf.float32) / photons


def _impulse_noise(x: tf.Tensor, amount: float, seed: tf.Tensor, scale: float) -> tf.Tensor:
    # Salt and pepper per value; one uniform draw shared by all severities makes the hit sets nested.
    u = tf.random.stateless_uniform(tf.shape(x), seed)
    x = tf.where(u < amount / 2, 0.0, x)
    return tf.where((u >= amount / 2) & (u < amount), 1.0, x)


def _gaussian_blur_op(x: tf.Tensor, sigma: float, seed: tf.Tensor, scale: float) -> tf.Tensor:
    return _gaussian_blur(x, sigma * scale)


def _defocus_blur(x: tf.Tensor, param: tuple[float, float], seed: tf.Tensor, scale: float) -> tf.Tensor:
    radius, alias = param
    r = radius * scale
    size = min(math.ceil(r), _max_radius(x))
    t = np.arange(-size, size + 1, dtype=np.float64)
    dist = np.sqrt(t[:, None] ** 2 + t[None, :] ** 2)
    disk = np.clip(r + 0.5 - dist, 0.0, 1.0)  # soft edge: a disk of fractional radius, anti-aliased
    disk /= disk.sum()
    return _gaussian_blur(_convolve(x, tf.constant(disk, tf.float32)), alias)


def _motion_blur(x: tf.Tensor, param: tuple[float, float], seed: tf.Tensor, scale: float) -> tf.Tensor:
    radius, sigma = param
    r = min(max(1, round(radius * scale)), _max_radius(x))
    sigma = max(sigma * scale, 0.5)
    angle = tf.random.stateless_uniform([], seed, -math.pi / 4, math.pi / 4)
    t = tf.range(-r, r + 1, dtype=tf.float32)
    dy, dx = t[:, None], t[None, :]
    along = dx * tf.cos(angle) + dy * tf.sin(angle)
    across = tf.abs(-dx * tf.sin(angle) + dy * tf.cos(angle))
    # A one-sided streak (the camera moved one way), Gaussian-weighted along it, one pixel wide.
    weight = tf.exp(-(along**2) / (2 * sigma**2)) * tf.clip_by_value(1.0 - across, 0.0, 1.0)
    weight *= tf.cast((along >= -0.5) & (along <= r), tf.float32)
    kernel = weight / tf.reduce_sum(weight)
    kernel = tf.ensure_shape(kernel, [2 * r + 1, 2 * r + 1])
    return _convolve(x, kernel)


def _brightness(x: tf.Tensor, amount: float, seed: tf.Tensor, scale: float) -> tf.Tensor:
    hsv = tf.image.rgb_to_hsv(x)
    hsv = tf.concat([hsv[..., :2], tf.clip_by_value(hsv[..., 2:] + amount, 0.0, 1.0)], axis=-1)
    return tf.image.hsv_to_rgb(hsv)


def _contrast(x: tf.Tensor, factor: float, seed: tf.Tensor, scale: float) -> tf.Tensor:
    mean = tf.reduce_mean(x, axis=[0, 1], keepdims=True)
    return (x - mean) * factor + mean


def _saturation(x: tf.Tensor, factor: float, seed: tf.Tensor, scale: float) -> tf.Tensor:
    return tf.image.adjust_saturation(x, factor)


def _fog(x: tf.Tensor, strength: float, seed: tf.Tensor, scale: float) -> tf.Tensor:
    # Haze: each pixel mixed with a bright airlight by a smooth random amount (atmospheric scattering model).
    airlight = 0.85
    mix = tf.clip_by_value(strength * (0.75 + 0.5 * _smooth_field(x, seed)), 0.0, 1.0)
    return x * (1.0 - mix) + airlight * mix


def _pixelate(x: tf.Tensor, factor: float, seed: tf.Tensor, scale: float) -> tf.Tensor:
    h, w = int(x.shape[0]), int(x.shape[1])
    # Antialiased bilinear down rather than box: with fractional block sizes, box averaging makes the distance
    # jump with how the blocks happen to align (0.5 can beat 0.6); bilinear+antialias is smoother in the factor.
    # Below about 48 px the cell grid still snaps to whole pixels: on 64 real photos at 40 px, 5 saw a severity
    # land closer to the clean image than the one before (none at 64 or 128 px).
    small = tf.image.resize(x, [max(1, round(h * factor)), max(1, round(w * factor))], method="bilinear",
                            antialias=True)
    return tf.image.resize(small, [h, w], method="nearest")


def _jpeg(x: tf.Tensor, quality: int, seed: tf.Tensor, scale: float) -> tf.Tensor:
    return tf.image.adjust_jpeg_quality(tf.clip_by_value(x, 0.0, 1.0), quality)


for _c in (
    Corruption("gaussian_noise", "noise", _gaussian_noise, (0.08, 0.12, 0.18, 0.26, 0.38),
               "additive Gaussian noise, sigma in [0, 1] units"),
    Corruption("shot_noise", "noise", _shot_noise, (60, 25, 12, 5, 3), "Poisson photon noise, photons per unit"),
    Corruption("impulse_noise", "noise", _impulse_noise, (0.03, 0.06, 0.09, 0.17, 0.27),
               "salt-and-pepper noise, fraction of values hit"),
    Corruption("gaussian_blur", "blur", _gaussian_blur_op, (1, 2, 3, 4, 6), "Gaussian blur, sigma in px at 224"),
    Corruption("defocus_blur", "blur", _defocus_blur, ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
               "disk (out-of-focus) blur, (radius px at 224, alias sigma)"),
    Corruption("motion_blur", "blur", _motion_blur, ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
               "one-sided streak at a random angle, (radius, sigma) px at 224"),
    Corruption("brightness", "weather", _brightness, (0.1, 0.2, 0.3, 0.4, 0.5), "HSV value raised by"),
    Corruption("fog", "weather", _fog, (0.2, 0.35, 0.5, 0.65, 0.8),
               "haze: mix with a bright airlight by a smooth random amount around"),
    Corruption("contrast", "digital", _contrast, (0.4, 0.3, 0.2, 0.1, 0.05), "contrast scaled to"),
    Corruption("saturation", "digital", _saturation, (0.7, 0.5, 0.3, 0.15, 0.0), "HSV saturation scaled to"),
    Corruption("jpeg_compression", "digital", _jpeg, (25, 18, 15, 10, 7), "JPEG re-encoding at quality"),
    Corruption("pixelate", "digital", _pixelate, (0.6, 0.45, 0.35, 0.25, 0.2),
               "box-downsampled to this fraction of the size, then nearest-upsampled"),
):
    register_corruption(_c)
