"""Name a library function now, import its module when it is first called.

The CLI and the package's public API point at jobs this way, so `tftransfer --help`, config errors and
`import tftransfer` answer without importing TensorFlow (which takes several seconds).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any


def resolve(target: str) -> Any:
    """'tftransfer.jobs.fit:run_fit' -> the object, importing its module."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def lazy(target: str) -> Callable[..., Any]:
    """A stand-in for the function at `target` that imports it on the first call."""

    @functools.wraps(lambda *a, **k: None)
    def call(*args: Any, **kwargs: Any) -> Any:
        return resolve(target)(*args, **kwargs)

    call.__name__ = target.rpartition(":")[2]
    call.__doc__ = f"Calls {target} (imported on first use)."
    return call
