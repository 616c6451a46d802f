"""Import TensorFlow without its C++ start-up chatter on stderr.

TensorFlow 2.21 logs through absl before absl::InitializeLog() is called, and such messages ignore
TF_CPP_MIN_LOG_LEVEL: every import prints "All log messages before absl::InitializeLog() ...", "oneDNN custom
operations are on", "Could not find cuda drivers" (twice: once per shared library), and the first device query
prints "E0000 ... failed call to cuInit" on a machine without a GPU. No environment variable stops them, so the
import and the first device query run with file descriptor 2 pointed at a temporary file; afterwards fd 2 is
restored and every captured line is written back except the log records below TF_CPP_MIN_LOG_LEVEL (the
documented switch, now honoured) and the two known-harmless ones (the absl banner; cuInit failing where no CUDA
driver is installed, which TensorFlow handles by running on the CPU).

TF_ENABLE_ONEDNN_OPTS is left alone: setting it to 0 would silence the oneDNN line by changing the default CPU
kernels, and with them the floating-point results, of every run; filtering the line changes nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

DEFAULT_MIN_LOG_LEVEL = "2"  # 0 all, 1 no INFO, 2 no WARNING, 3 no ERROR: TensorFlow's own scale
_RECORD = re.compile(r"^([IWEF])\d{4} \d+:\d+:\d+\.\d+\s+\d+ \S+:\d+\] ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_HARMLESS = ("All log messages before absl::InitializeLog() is called are written to STDERR",
             "failed call to cuInit")

_state = {"imported": False}


def set_log_defaults() -> None:
    """TF_CPP_MIN_LOG_LEVEL=2 unless the user chose a level (any value they set is kept)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_MIN_LOG_LEVEL)


def min_log_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it (not set or not a number: 0, everything shown)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def keep_line(line: str, level: int) -> bool:
    """Whether one captured stderr line is shown at TF_CPP_MIN_LOG_LEVEL `level` (non-log lines always are)."""
    if level <= 0:
        return True
    if any(text in line for text in _HARMLESS):
        return False
    record = _RECORD.match(line)
    return record is None or _SEVERITY[record.group(1)] >= level


@contextlib.contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """Runs the block with fd 2 captured; then restores it and writes back the lines keep_line() keeps.

    Python's own writes to sys.stderr in the block (warnings, an import error's traceback printed later) are
    captured too and written back in order; fd 2 is restored even when the block raises or is interrupted.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (an embedding host): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            level = min_log_level()
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if keep_line(line, level)]
            if kept:
                os.write(2, "".join(kept).encode("utf-8"))


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and lists its devices (the first CUDA probe) inside filtered_native_stderr(), once."""
    if _state["imported"]:
        return
    set_log_defaults()
    with filtered_native_stderr():
        tf = importlib.import_module("tensorflow")
        tf.config.list_physical_devices()
    _state["imported"] = True
