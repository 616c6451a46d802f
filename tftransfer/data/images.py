"""Image decoding and resizing shared by the training pipeline and the exported serving graph.

Both sides must resize the same way, or an exported model sees slightly different pixels than the model that
was validated; keeping one function here is what makes the export parity check meaningful.
"""

from __future__ import annotations

import tensorflow as tf

# Bilinear with antialiasing: large real photos (hymenoptera has 2592 px images) alias badly without it.
RESIZE_METHOD = "bilinear"
RESIZE_ANTIALIAS = True


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF (first frame)/BMP bytes to a float32 [H, W, 3] tensor in [0, 255].

    Grey and RGBA images come out as 3 channels; 16-bit PNGs are scaled down to the 8-bit range.
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return tf.cast(image, tf.float32)


def resize_image(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resizes a [H, W, 3] or [N, H, W, 3] float image to image_size x image_size, values kept in [0, 255]."""
    resized = tf.image.resize(
        image, [image_size, image_size], method=RESIZE_METHOD, antialias=RESIZE_ANTIALIAS
    )
    return tf.clip_by_value(resized, 0.0, 255.0)


def decode_and_resize(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decodes encoded image bytes and resizes them to a square float32 [S, S, 3] tensor in [0, 255]."""
    return resize_image(decode_image(encoded), image_size)
