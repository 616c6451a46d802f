"""Image decoding and resizing shared by the training pipeline and the exported serving graph.

Both sides must decode and resize the same way, or an exported model sees slightly different pixels than the
model that was validated; keeping one function here is what makes the export parity check meaningful.

What `decode_image` guarantees, for JPEG, PNG, GIF (first frame), BMP and still WebP bytes (TF 2.21 decodes all
of them; an animated WebP is an InvalidArgument error, and the file listing skips such files): 3 channels (grey is
repeated, alpha is dropped without compositing, palettes are expanded), values in [0, 255] (16-bit PNGs are scaled
down to 8 bits), and JPEG EXIF orientation applied. The orientation is read from the bytes with TensorFlow string
ops rather than Pillow, so the same graph runs in tf.data, in the SavedModel and in TF Serving: a phone photo
stored sideways is seen upright in training and in serving alike. PNG/WebP EXIF chunks are rare and not read.

`decode_and_resize` (the training pipeline's and the serving signature's path) decodes a large JPEG at a reduced
scale (libjpeg's DCT scaling: 1/2, 1/4 or 1/8) when the reduced image still has at least JPEG_SCALE_MARGIN times the
target size on its short side; the antialiased resize then starts from far fewer pixels. Measured on hymenoptera
and Office-31 at 224 px, the result differs from a full decode by 0.5 levels of 255 on average (1.6 for the worst
image): less than two JPEG decoders differ. Smaller images, and every other format, are decoded in full.
"""

from __future__ import annotations

import tensorflow as tf

# Bilinear with antialiasing: large real photos (hymenoptera has 2592 px images) alias badly without it.
RESIZE_METHOD = "bilinear"
RESIZE_ANTIALIAS = True

# The EXIF APP1 segment is limited to 64 KiB and sits right after the JPEG start marker.
_EXIF_SCAN_BYTES = 65536
_EXIF_MAX_ENTRIES = 64  # IFD0 entries read; cameras write about 10-20, Orientation among the first
_ORIENTATION_TAG = 0x0112

# Reduced-scale JPEG decoding keeps at least this many times the target size on the short side for the antialiased
# resize (at 1x the difference from a full decode triples: 1.4 levels on average, 4.8 for the worst image).
JPEG_SCALE_MARGIN = 2
# Names what decode_and_resize computes, for cache keys: decoded pixels cached under another version are stale.
DECODE_VERSION = "jpeg-dct-scale-2x"
_JPEG_RATIOS = (2, 4, 8)  # what libjpeg can scale by; tf.io.decode_jpeg's `ratio` is an attribute, hence a switch


def _read_bytes(data: tf.Tensor, pos: tf.Tensor, length: int) -> tf.Tensor:
    """`length` bytes of `data` from `pos` as int32, zero-padded past the end (never an out-of-range error)."""
    pos = tf.clip_by_value(tf.cast(pos, tf.int32), 0, tf.strings.length(data))
    raw = tf.io.decode_raw(tf.strings.substr(data, pos, length), tf.uint8, fixed_length=length)
    return tf.cast(raw, tf.int32)


def exif_orientation(encoded: tf.Tensor) -> tf.Tensor:
    """EXIF orientation (1-8) of JPEG bytes as an int32 scalar; 1 when the bytes are not a JPEG or have none."""
    head = tf.strings.substr(encoded, 0, _EXIF_SCAN_BYTES)
    is_jpeg = tf.equal(tf.strings.substr(head, 0, 2), b"\xff\xd8")
    parts = tf.strings.split(head, sep="Exif\x00\x00", maxsplit=1)
    found = tf.logical_and(is_jpeg, tf.size(parts) == 2)
    # Most files have no EXIF block: skip the ~30 small ops that read one.
    return tf.cond(found, lambda: _read_orientation(head, tf.strings.length(parts[0]) + 6),
                   lambda: tf.constant(1, tf.int32))


def _read_orientation(head: tf.Tensor, tiff: tf.Tensor) -> tf.Tensor:
    """The Orientation entry of IFD0 of the TIFF structure starting at byte `tiff` of `head` (1 when invalid)."""
    header = _read_bytes(head, tiff, 8)
    little = tf.logical_and(tf.equal(header[0], 0x49), tf.equal(header[1], 0x49))  # "II", else "MM"
    big = tf.logical_and(tf.equal(header[0], 0x4D), tf.equal(header[1], 0x4D))

    def u16(lo_first: tf.Tensor, hi_first: tf.Tensor) -> tf.Tensor:
        return tf.where(little, lo_first + 256 * hi_first, 256 * lo_first + hi_first)

    def u32(b: tf.Tensor) -> tf.Tensor:
        return tf.where(little, b[0] + 256 * (b[1] + 256 * (b[2] + 256 * b[3])),
                        b[3] + 256 * (b[2] + 256 * (b[1] + 256 * b[0])))

    magic_ok = tf.equal(u16(header[2], header[3]), 42)
    ifd = tiff + tf.clip_by_value(u32(header[4:8]), 0, _EXIF_SCAN_BYTES)
    count = u16(*tf.unstack(_read_bytes(head, ifd, 2)))
    entries = tf.reshape(_read_bytes(head, ifd + 2, 12 * _EXIF_MAX_ENTRIES), [_EXIF_MAX_ENTRIES, 12])
    tags = u16(entries[:, 0], entries[:, 1])
    values = u16(entries[:, 8], entries[:, 9])  # SHORT values sit left-aligned in the 4-byte value field
    hit = tf.logical_and(tf.equal(tags, _ORIENTATION_TAG), tf.range(_EXIF_MAX_ENTRIES) < count)
    value = tf.reduce_max(tf.where(hit, values, 0))
    valid = tf.reduce_all(tf.stack([tf.logical_or(little, big), magic_ok, value >= 1, value <= 8]))
    return tf.where(valid, value, 1)


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Turns a [H, W, C] image stored with EXIF `orientation` (1-8) upright (what Pillow's exif_transpose does)."""
    transpose = lambda: tf.transpose(image, [1, 0, 2])  # noqa: E731
    branches = [
        lambda: image,                                        # 1: upright
        lambda: tf.reverse(image, [1]),                       # 2: mirrored
        lambda: tf.reverse(image, [0, 1]),                    # 3: upside down
        lambda: tf.reverse(image, [0]),                       # 4: mirrored upside down
        transpose,                                            # 5: transposed
        lambda: tf.reverse(transpose(), [1]),                 # 6: stored 90 deg counter-clockwise
        lambda: tf.reverse(transpose(), [0, 1]),              # 7: transverse
        lambda: tf.reverse(transpose(), [0]),                 # 8: stored 90 deg clockwise
    ]
    return tf.switch_case(tf.clip_by_value(orientation, 1, 8) - 1, branches)


def _is_jpeg(encoded: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(encoded, 0, 3), b"\xff\xd8\xff")  # the magic tf.io.decode_image checks


def _decode_upright(encoded: tf.Tensor, image_size: int | None = None) -> tf.Tensor:
    """uint8 [H, W, 3] upright; with image_size, a large JPEG at the reduced scale the module docstring describes."""
    if image_size is None:
        image = _decode_full(encoded)
    else:
        need = JPEG_SCALE_MARGIN * int(image_size)

        def scale_index() -> tf.Tensor:
            # The JPEG header alone (no decoding): how many of the ratios keep `need` pixels on the short side.
            short = tf.reduce_min(tf.image.extract_jpeg_shape(encoded)[:2])
            return tf.reduce_sum(tf.cast(tf.stack([short // r >= need for r in _JPEG_RATIOS]), tf.int32))

        index = tf.cond(_is_jpeg(encoded), scale_index, lambda: tf.constant(0, tf.int32))
        image = _decode_at_scale(encoded, index)
    image = apply_orientation(image, exif_orientation(encoded))
    image.set_shape([None, None, 3])
    return image


def _decode_full(encoded: tf.Tensor) -> tf.Tensor:
    return tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)


def _decode_at_scale(encoded: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 3] as stored: in full at index 0, else a JPEG at 1 / _JPEG_RATIOS[index - 1]."""
    reduced = [lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r) for r in _JPEG_RATIOS]
    return tf.switch_case(index, [lambda: _decode_full(encoded), *reduced])


def jpeg_scale_index(width: int, height: int, is_jpeg: bool, image_size: int) -> int:
    """The reduced-scale choice `decode_and_resize` makes in the graph, made from a known header (0 = full)."""
    if not is_jpeg:
        return 0
    need, short = JPEG_SCALE_MARGIN * int(image_size), min(int(width), int(height))
    return sum(1 for r in _JPEG_RATIOS if short // r >= need)


def decode_and_resize_known(encoded: tf.Tensor, image_size: int, scale_index: tf.Tensor | None,
                            orientation: tf.Tensor | None) -> tf.Tensor:
    """`decode_and_resize` for a file whose header was read when it was listed: the same pixels, less work.

    `scale_index` (from `jpeg_scale_index`) and the EXIF `orientation` are per-file tensors, or None when they are
    0 and 1 for every file of the data set, which leaves out the JPEG header read, the EXIF parse (about 0.7 ms of
    CPU per photo in tf.data, mostly per-op overhead) and the branches the in-graph path needs.
    """
    image = _decode_full(encoded) if scale_index is None else _decode_at_scale(encoded, scale_index)
    if orientation is not None:
        image = tf.cond(tf.equal(orientation, 1), lambda: image, lambda: apply_orientation(image, orientation))
    image.set_shape([None, None, 3])
    return _resize(image, image_size)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF (first frame)/BMP/WebP bytes to an upright float32 [H, W, 3] tensor in [0, 255].

    Grey, RGBA and palette images come out as 3 channels; 16-bit PNGs are scaled down to the 8-bit range.
    """
    return tf.cast(_decode_upright(encoded), tf.float32)


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    # uint8 input gives the same float32 values as casting first (the resize computes in float) and costs less.
    resized = tf.image.resize(
        image, [image_size, image_size], method=RESIZE_METHOD, antialias=RESIZE_ANTIALIAS
    )
    return tf.clip_by_value(resized, 0.0, 255.0)


def resize_image(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resizes a [H, W, 3] or [N, H, W, 3] float image to image_size x image_size, values kept in [0, 255]."""
    return _resize(image, image_size)


def decode_and_resize(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decodes encoded image bytes and resizes them to a square float32 [S, S, 3] tensor in [0, 255].

    The one decode path of training and serving: a large JPEG is decoded at a reduced scale first (see the module
    docstring), so this is not exactly `resize_image(decode_image(...))` for such files.
    """
    return _resize(_decode_upright(encoded, image_size), image_size)


# Header fields read before decoding (the serving signature's pixel limit). A JPEG's size sits in a SOF segment at
# no fixed place (extract_jpeg_shape reads it); the others are at fixed offsets of the first _HEADER_BYTES.
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_HEADER_BYTES = 30
FORMAT_UNKNOWN, FORMAT_JPEG, FORMAT_PNG, FORMAT_GIF, FORMAT_BMP, FORMAT_WEBP = 0, 1, 2, 3, 4, 5


def image_format(encoded: tf.Tensor) -> tf.Tensor:
    """int32 scalar FORMAT_* of encoded bytes from their magic number (string ops only: never an error)."""
    checks = tf.stack([
        _is_jpeg(encoded),
        tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_MAGIC),
        tf.logical_or(tf.equal(tf.strings.substr(encoded, 0, 6), b"GIF87a"),
                      tf.equal(tf.strings.substr(encoded, 0, 6), b"GIF89a")),
        tf.equal(tf.strings.substr(encoded, 0, 2), b"BM"),
        # _read_bytes, not substr: a position past the end of a short input would be an error
        tf.logical_and(tf.equal(tf.strings.substr(encoded, 0, 4), b"RIFF"),
                       tf.reduce_all(tf.equal(_read_bytes(encoded, 8, 4), list(b"WEBP")))),
    ])
    first = tf.argmax(tf.cast(checks, tf.int32), output_type=tf.int32) + 1
    return tf.where(tf.reduce_any(checks), first, FORMAT_UNKNOWN)


def header_size(encoded: tf.Tensor, kind: tf.Tensor) -> tf.Tensor:
    """int64 [height, width] a PNG, GIF, BMP or WebP header declares (string ops only: never an error); [-1, -1]
    for another format. A BMP stores a negative height for a top-down image; its absolute value is the row count."""
    b = tf.cast(_read_bytes(encoded, 0, _HEADER_BYTES), tf.int64)

    def big32(at: int) -> tf.Tensor:
        return ((b[at] * 256 + b[at + 1]) * 256 + b[at + 2]) * 256 + b[at + 3]

    def little(at: int, count: int) -> tf.Tensor:
        value = tf.constant(0, tf.int64)
        for i in reversed(range(count)):
            value = value * 256 + b[at + i]
        return value

    def signed32(at: int) -> tf.Tensor:
        unsigned = little(at, 4)
        return tf.where(unsigned >= 2**31, unsigned - 2**32, unsigned)  # BMP fields are signed

    png = tf.stack([big32(20), big32(16)])  # IHDR: width at 16, height at 20
    gif = tf.stack([little(8, 2), little(6, 2)])  # logical screen width at 6, height at 8
    bmp = tf.abs(tf.stack([signed32(22), signed32(18)]))  # BITMAPINFOHEADER: width at 18, height at 22
    unknown = tf.constant([-1, -1], tf.int64)
    return tf.switch_case(tf.clip_by_value(kind, 0, FORMAT_WEBP), [
        lambda: unknown, lambda: unknown, lambda: png, lambda: gif, lambda: bmp, lambda: _webp_size(b)])


def _webp_size(b: tf.Tensor) -> tf.Tensor:
    """[height, width] of a WebP from the first chunk: VP8X (the canvas), VP8L (lossless) or VP8 (lossy)."""
    chunk = b[12:16]
    vp8x = tf.reduce_all(tf.equal(chunk, tf.constant(list(b"VP8X"), tf.int64)))
    vp8l = tf.reduce_all(tf.equal(chunk, tf.constant(list(b"VP8L"), tf.int64)))
    vp8 = tf.reduce_all(tf.equal(chunk, tf.constant(list(b"VP8 "), tf.int64)))
    canvas = tf.stack([b[27] + 256 * (b[28] + 256 * b[29]) + 1, b[24] + 256 * (b[25] + 256 * b[26]) + 1])
    # VP8L: 14 bits of width - 1, then 14 bits of height - 1, little-endian from byte 21.
    bits = b[21] + 256 * (b[22] + 256 * (b[23] + 256 * b[24]))
    lossless = tf.stack([tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 14), 0x3FFF) + 1,
                         tf.bitwise.bitwise_and(bits, 0x3FFF) + 1])
    lossy = tf.stack([tf.bitwise.bitwise_and(b[28] + 256 * b[29], 0x3FFF),
                      tf.bitwise.bitwise_and(b[26] + 256 * b[27], 0x3FFF)])
    return tf.where(vp8x, canvas, tf.where(vp8l, lossless, tf.where(vp8, lossy, tf.constant([-1, -1], tf.int64))))


def jpeg_size(encoded: tf.Tensor) -> tf.Tensor:
    """int64 [height, width] of a JPEG from its header alone (an error when the header is corrupt)."""
    return tf.cast(tf.io.extract_jpeg_shape(encoded)[:2], tf.int64)
