"""The serving signature's input checks: each image of a request is judged alone, and none can fail the batch.

Before anything is decoded, the header says the format and the size (a PNG, GIF, BMP or WebP from fixed header
bytes, a JPEG from its SOF segment with tf.io.extract_jpeg_shape), so a 400-megapixel "bomb" of a few hundred
kilobytes is refused without allocating its pixels. The images are decoded one at a time inside a tf.data pipeline whose
`ignore_errors` drops an image whose decoding fails (a corrupt or truncated file) instead of failing the request;
each image's index travels with it, so what was dropped is known and flagged. Everything here is TensorFlow ops
that TF Serving runs as they are (no Python at serving time).
"""

from __future__ import annotations

import tensorflow as tf

from tftransfer.data.images import FORMAT_JPEG, FORMAT_UNKNOWN, decode_and_resize, header_size, image_format, jpeg_size

# Per-image status codes of `decode_checked`; MESSAGES[code] is what the `message` output says.
OK, EMPTY, UNKNOWN_FORMAT, TOO_LARGE, UNDECODABLE = 0, 1, 2, 3, 4
MESSAGES = (
    "",
    "empty input: no image bytes",
    "not a JPEG, PNG, GIF, BMP or WebP image",
    "",  # built per image: its size and the limit
    "cannot decode the image: corrupt or truncated",
)


def _check_and_decode(index: tf.Tensor, encoded: tf.Tensor, image_size: int,
                      max_pixels: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(index, pixels [S, S, 3], status code, [height, width]) of one image; zeros unless the code is OK."""
    kind = image_format(encoded)
    # extract_jpeg_shape fails on a corrupt header: the pipeline's ignore_errors turns that into UNDECODABLE.
    size = tf.cond(tf.equal(kind, FORMAT_JPEG), lambda: jpeg_size(encoded), lambda: header_size(encoded, kind))
    pixels_count = size[0] * size[1]
    code = tf.case([
        (tf.equal(tf.strings.length(encoded), 0), lambda: tf.constant(EMPTY)),
        (tf.equal(kind, FORMAT_UNKNOWN), lambda: tf.constant(UNKNOWN_FORMAT)),
        (tf.reduce_min(size) < 1, lambda: tf.constant(UNDECODABLE)),
        (pixels_count > max_pixels, lambda: tf.constant(TOO_LARGE)),
    ], default=lambda: tf.constant(OK))
    pixels = tf.cond(tf.equal(code, OK), lambda: decode_and_resize(encoded, image_size),
                     lambda: tf.zeros([image_size, image_size, 3], tf.float32))
    return index, pixels, code, size


def decode_checked(images: tf.Tensor, image_size: int, max_pixels: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Decodes a [N] string batch to (pixels [N, S, S, 3] in [0, 255], valid [N] bool, message [N] string).

    A refused image (empty, unknown format, over `max_pixels`, undecodable) has zero pixels, valid False and a
    message saying why; the others are decoded by the training pipeline's `decode_and_resize`.
    """
    n = tf.shape(images)[0]
    # One image at a time: a request's memory is bounded by one image of max_pixels, however many it holds.
    decoded = (tf.data.Dataset.from_tensor_slices((tf.range(n), images))
               .map(lambda i, data: _check_and_decode(i, data, image_size, max_pixels))
               .ignore_errors()
               .batch(tf.cast(tf.maximum(n, 1), tf.int64)))
    initial = (tf.zeros([n, image_size, image_size, 3], tf.float32), tf.fill([n], UNDECODABLE),
               tf.fill([n, 2], tf.constant(-1, tf.int64)))

    def scatter(state: tuple, batch: tuple) -> tuple:
        where = tf.expand_dims(batch[0], 1)
        return tuple(tf.tensor_scatter_nd_update(old, where, new) for old, new in zip(state, batch[1:]))

    pixels, codes, sizes = decoded.reduce(initial, scatter)
    too_large = tf.strings.join([
        "image of ", tf.strings.as_string(sizes[:, 1]), "x", tf.strings.as_string(sizes[:, 0]),
        f" pixels is above the serving limit of {int(max_pixels)} pixels (export.max_pixels)"])
    messages = tf.where(tf.equal(codes, TOO_LARGE), too_large, tf.gather(tf.constant(MESSAGES), codes))
    return pixels, tf.equal(codes, OK), messages
