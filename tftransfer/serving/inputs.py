"""The serving signature's input checks: each image of a request is judged alone, and none can fail the batch.

Before anything is decoded, the header says the format and the size (a PNG, GIF, BMP or WebP from fixed header
bytes, a JPEG from its SOF segment with tf.io.extract_jpeg_shape), so a 400-megapixel "bomb" of a few hundred
kilobytes is refused without allocating its pixels. Each image that passed is then tried alone in a tf.data
pipeline whose `ignore_errors` drops an image whose decoding fails (a corrupt or truncated file) instead of
failing the request; each image's index travels with it, so what was dropped is known and flagged. Only the images
that passed are decoded for the model, PARALLEL_DECODES at a time. Everything here is TensorFlow ops that TF
Serving runs as they are (no Python at serving time).

Cost (benchmarks/serving_checks.py, hymenoptera photos at 224 px): the trial pipeline is built anew on every
request, about 25-40 ms on 2 CPUs, and a PNG, GIF, BMP or WebP is decoded twice (a JPEG's trial is at 1/8 scale).
"""

from __future__ import annotations

import tensorflow as tf

from tftransfer.data.images import FORMAT_JPEG, FORMAT_UNKNOWN, decode_and_resize, header_size, image_format, jpeg_size

# Per-image status codes of `decode_checked`; MESSAGES[code] is what the `message` output says.
# Images decoded at once for the model (what map_fn ran before the checks): a request holds at most this many
# decoded images, each under max_pixels. One at a time cost about 45% more time at batch 32.
PARALLEL_DECODES = 10
OK, EMPTY, UNKNOWN_FORMAT, TOO_LARGE, UNDECODABLE = 0, 1, 2, 3, 4
MESSAGES = (
    "",
    "empty input: no image bytes",
    "not a JPEG, PNG, GIF, BMP or WebP image",
    "",  # built per image: its size and the limit
    "cannot decode the image: corrupt or truncated",
)


def _trial_options() -> tf.data.Options:
    """No graph rewrites, autotuning or thread pool for a pipeline built anew on every request: its setup was most
    of the cost of a small request."""
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.autotune.enabled = False
    options.threading.private_threadpool_size = 1
    return options


_TRIAL_OPTIONS = _trial_options()


def _header(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(format, [height, width]) from string ops alone (never an error); a JPEG's size is read in the trial."""
    kind = image_format(encoded)
    return kind, header_size(encoded, kind)


def _trial(index: tf.Tensor, encoded: tf.Tensor, is_jpeg: tf.Tensor,
           max_pixels: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(index, [height, width] of a JPEG, decoded) of one image whose header passed: a JPEG's size from its SOF
    segment, then a decode that raises on corrupt bytes (the pipeline's ignore_errors drops the image then).

    A JPEG is tried at 1/8 scale (libjpeg still reads all its data, at a fraction of the cost); a JPEG above the
    limit is not decoded (decoded False). The real decode runs afterwards, outside tf.data, on the images that
    passed: a tf.data map over the full decode_and_resize graph cost about 150 ms per request to set up.
    """

    def jpeg() -> tuple[tf.Tensor, tf.Tensor]:
        size = jpeg_size(encoded)
        fits = size[0] * size[1] <= max_pixels
        decoded = tf.cond(fits, lambda: tf.size(tf.io.decode_jpeg(encoded, channels=3, ratio=8)) > 0,
                          lambda: tf.constant(False))
        return size, decoded

    def other() -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
        return tf.constant([-1, -1], tf.int64), tf.size(image) > 0

    size, decoded = tf.cond(is_jpeg, jpeg, other)
    return index, size, decoded


def _judge(images: tf.Tensor, max_pixels: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(status code [N], [N, 2] sizes) of a batch: header checks in the graph, then one trial decode per image that
    passed them, each alone in a tf.data pipeline whose ignore_errors turns a corrupt image into UNDECODABLE."""
    n = tf.shape(images)[0]
    kinds, sizes = tf.map_fn(_header, images, fn_output_signature=(tf.int32, tf.int64))
    is_jpeg = tf.equal(kinds, FORMAT_JPEG)
    pixels_count = sizes[:, 0] * sizes[:, 1]
    checked = tf.logical_not(is_jpeg)  # a JPEG's size is known only after its trial
    pre = tf.where(tf.equal(tf.strings.length(images), 0), EMPTY,
                   tf.where(tf.equal(kinds, FORMAT_UNKNOWN), UNKNOWN_FORMAT,
                            tf.where(checked & (tf.reduce_min(sizes, axis=1) < 1), UNDECODABLE,
                                     tf.where(checked & (pixels_count > max_pixels), TOO_LARGE, OK))))
    candidates = tf.cast(tf.reshape(tf.where(tf.equal(pre, OK)), [-1]), tf.int32)
    tried = (tf.data.Dataset.from_tensor_slices((candidates, tf.gather(images, candidates),
                                                 tf.gather(is_jpeg, candidates)))
             .map(lambda i, data, jpeg: _trial(i, data, jpeg, max_pixels))
             .ignore_errors()
             .batch(tf.cast(tf.maximum(n, 1), tf.int64))
             .with_options(_TRIAL_OPTIONS))

    def scatter(state: tuple, batch: tuple) -> tuple:
        where = tf.expand_dims(batch[0], 1)
        codes, jpeg_sizes = state
        found = tf.where(batch[2], OK, TOO_LARGE)
        return tf.tensor_scatter_nd_update(codes, where, found), tf.tensor_scatter_nd_update(jpeg_sizes, where,
                                                                                             batch[1])

    # Candidates that the trial dropped (an error) keep UNDECODABLE.
    initial = (tf.where(tf.equal(pre, OK), UNDECODABLE, pre), sizes)
    codes, sizes = tried.reduce(initial, scatter)
    return codes, sizes


def decode_checked(images: tf.Tensor, image_size: int, max_pixels: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Decodes a [N] string batch to (pixels [N, S, S, 3] in [0, 255], valid [N] bool, message [N] string).

    A refused image (empty, unknown format, over `max_pixels`, undecodable) has zero pixels, valid False and a
    message saying why; the others are decoded by the training pipeline's `decode_and_resize`.
    """
    codes, sizes = _judge(images, max_pixels)
    valid = tf.equal(codes, OK)
    # A request's memory is bounded by PARALLEL_DECODES images of max_pixels, however many it holds.
    pixels = tf.map_fn(
        lambda args: tf.cond(args[1], lambda: decode_and_resize(args[0], image_size),
                             lambda: tf.zeros([image_size, image_size, 3], tf.float32)),
        (images, valid), fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        parallel_iterations=PARALLEL_DECODES)
    too_large = tf.strings.join([
        "image of ", tf.strings.as_string(sizes[:, 1]), "x", tf.strings.as_string(sizes[:, 0]),
        f" pixels is above the serving limit of {int(max_pixels)} pixels (export.max_pixels)"])
    messages = tf.where(tf.equal(codes, TOO_LARGE), too_large, tf.gather(tf.constant(MESSAGES), codes))
    return pixels, valid, messages
