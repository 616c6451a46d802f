"""Image file probes: is a file an image TensorFlow can decode, and what is it (format, size, mode, hashes)?

Every listed file is decoded once with Pillow (JPEGs at up to 1/8 scale, not below 64 px, via draft mode, which
still reads the whole entropy-coded stream), so truncated and mislabelled files are caught when the data is listed
rather than as a TensorFlow op error in the middle of an epoch. Probes run in threads (Pillow releases the GIL while
decoding) and log progress for big folders, or report it to a callback set with `report_progress` (a command line
draws a bar with it; the library itself never prints).

A file whose header claims more pixels than Pillow's decompression-bomb limit (twice `PIL.Image.MAX_IMAGE_PIXELS`)
is a bad file like a truncated one: it is skipped and listed, never decoded.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# Extension -> the Pillow formats a file with it may hold. MPO is a JPEG with extra frames (some cameras write it).
EXTENSION_FORMATS: dict[str, frozenset[str]] = {
    ".jpg": frozenset({"JPEG", "MPO"}),
    ".jpeg": frozenset({"JPEG", "MPO"}),
    ".png": frozenset({"PNG"}),
    ".gif": frozenset({"GIF"}),
    ".bmp": frozenset({"BMP"}),
    ".webp": frozenset({"WEBP"}),
}
IMAGE_EXTENSIONS = frozenset(EXTENSION_FORMATS)
# Formats tf.io.decode_image reads (TF 2.21 sniffs the bytes, so a PNG named .jpg still decodes).
DECODABLE_FORMATS = frozenset().union(*EXTENSION_FORMATS.values())
EXIF_ORIENTATION_TAG = 0x0112
PROGRESS_EVERY = 500  # files between progress log lines when probing big folders
PROGRESS_STEPS = 100  # callback calls per probing pass at most (about every 1%), plus the first and the last

ProgressCallback = Callable[[int, int, str], None]

# A context variable rather than a module global: concurrent callers (threads, tasks) each keep their own display.
_progress: contextvars.ContextVar[ProgressCallback | None] = contextvars.ContextVar("tftransfer_probe_progress",
                                                                                   default=None)


@contextlib.contextmanager
def report_progress(callback: ProgressCallback | None) -> Iterator[None]:
    """Within the block, probe_images reports to `callback` instead of logging progress lines (None: logs again).

    The callback runs in the thread that called probe_images, never in the probing threads.
    """
    token = _progress.set(callback)
    try:
        yield
    finally:
        _progress.reset(token)


@dataclass(frozen=True)
class ImageProbe:
    """What probing one file found; `problem` is None when TensorFlow can decode the file."""

    problem: str | None
    format: str | None = None
    width: int = 0
    height: int = 0
    mode: str = ""
    frames: int = 1
    orientation: int = 1
    num_bytes: int = 0
    sha256: str | None = None
    dhash: bytes | None = None
    colours: int | None = None  # distinct colours in a 64x64 sample, capped at LOW_COLOUR_CAP + 1


LOW_COLOUR_CAP = 256


def count_colours(image: object) -> int:
    """Distinct colours in a 64x64 nearest-neighbour sample (photos have thousands; placeholders and drawings few)."""
    from PIL import Image

    colours = image.convert("RGB").resize((64, 64), Image.Resampling.NEAREST).getcolors(LOW_COLOUR_CAP)
    return LOW_COLOUR_CAP + 1 if colours is None else len(colours)


DHASH_SIDE = 16  # a 16x16 grid of horizontal gradients: 256 bits


MIN_GRADIENT = 1.0  # mean grey-level step below which an image is flat: its dHash would be noise


def dhash(image: object) -> bytes | None:
    """256-bit difference hash of a Pillow image (32 bytes), or None for a flat image with no structure to hash.

    Close hashes mean (near-)identical pictures. 16x16 rather than the classic 8x8: on Office-31's webcam frames
    (similar objects on similar desks) 64 bits put a keyboard within 4 bits of a monitor, while 256 bits separate
    them and still match consecutive frames.
    """
    from PIL import Image

    grey = np.asarray(image.convert("L").resize((DHASH_SIDE + 1, DHASH_SIDE), Image.Resampling.BILINEAR),
                      dtype=np.float32)
    steps = grey[:, 1:] - grey[:, :-1]
    if float(np.abs(steps).mean()) < MIN_GRADIENT:
        return None
    return np.packbits(steps > 0).tobytes()


def _bmp_bits(data: bytes) -> int:
    """Bits per pixel from a BMP's info header (0 when the header is too short to say)."""
    return int.from_bytes(data[28:30], "little") if len(data) >= 30 else 0


def probe_image(path: str | Path, fingerprints: bool = False) -> ImageProbe:
    """Decodes one file with Pillow; with `fingerprints`, also its sha256 and a perceptual dHash."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return ImageProbe(problem=f"cannot read file: {exc.strerror or exc}")
    if not data:
        return ImageProbe(problem="empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest() if fingerprints else None
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, size, mode = im.format, im.size, im.mode
            frames = int(getattr(im, "n_frames", 1))
            orientation = int(im.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1) if fmt in ("JPEG", "MPO") else 1
            base = dict(format=fmt, width=size[0], height=size[1], mode=mode, frames=frames,
                        orientation=orientation, num_bytes=len(data), sha256=digest)
            if fmt not in DECODABLE_FORMATS:
                return ImageProbe(problem=f"format {fmt} cannot be decoded by TensorFlow", **base)
            if fmt == "BMP" and (mode not in ("RGB", "RGBA", "L") or _bmp_bits(data) not in (8, 24, 32)):
                # TF 2.21 fails on 1/4/16-bit BMPs and reads 8-bit palette indices as grey levels (wrong colours)
                return ImageProbe(problem=f"{_bmp_bits(data)}-bit {mode} BMP: TensorFlow decodes only 24/32-bit "
                                          "and 8-bit grey BMPs correctly (convert it to PNG)", **base)
            if fmt == "WEBP" and frames > 1:
                # TF 2.21's decode_image rejects animated WebP as 3 channels and corrupts memory on other paths.
                return ImageProbe(problem="animated WebP: TensorFlow cannot decode it as a still image", **base)
            if fmt == "JPEG":  # decode at up to 1/8 scale, but not below 64 px: the dHash needs some detail
                im.draft("RGB", (min(im.width, max(64, im.width // 8)), min(im.height, max(64, im.height // 8))))
            im.load()
            hashed = dhash(im) if fingerprints else None
            colours = count_colours(im) if fingerprints else None
    except UnidentifiedImageError:
        return ImageProbe(problem="not an image (unrecognised format)", num_bytes=len(data), sha256=digest)
    except Image.DecompressionBombError as exc:  # a small file whose header claims billions of pixels
        return ImageProbe(problem=f"too many pixels to decode safely (a decompression bomb?): {exc}",
                          num_bytes=len(data), sha256=digest)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return ImageProbe(problem=f"unreadable image: {exc}", num_bytes=len(data), sha256=digest)
    return ImageProbe(problem=None, dhash=hashed, colours=colours, **base)


def probe_images(paths: Sequence[str | Path], fingerprints: bool = False, progress_every: int = PROGRESS_EVERY,
                 what: str = "") -> list[ImageProbe]:
    """probe_image over many files in threads, in input order.

    Progress goes to the `report_progress` callback when one is set, else to a log line every `progress_every` files.
    """
    total = len(paths)
    callback = _progress.get()
    # Throttled so that a bar redraws about once per percent rather than once per file on big folders.
    step = max(1, total // PROGRESS_STEPS)
    if callback is not None and total:
        callback(0, total, what)
    probes: list[ImageProbe] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        # pool.map yields in this thread, so the callback sees this thread's context and needs no locking
        for probe in pool.map(lambda p: probe_image(p, fingerprints), paths):
            probes.append(probe)
            done = len(probes)
            if callback is not None:
                if done % step == 0 or done == total:
                    callback(done, total, what)
            elif progress_every and total > progress_every and (done % progress_every == 0 or done == total):
                elapsed = time.perf_counter() - started
                logger.info("checked %d/%d files%s (%.0f files/s)", done, total, f" in {what}" if what else "",
                            done / elapsed if elapsed > 0 else 0.0)
    return probes


def extension_mismatch(path: str | Path, probe: ImageProbe) -> str | None:
    """The real format when a readable file's extension names another one (e.g. a PNG saved as .jpg), else None."""
    expected = EXTENSION_FORMATS.get(Path(path).suffix.lower())
    if probe.format is None or expected is None or probe.format in expected:
        return None
    return probe.format
