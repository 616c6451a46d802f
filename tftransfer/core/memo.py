"""per_object(): values built once per live object (a model) and key, dropped when the object is.

Tracing a model's inference, splitting it or cloning it costs seconds, and a domain report asks the same model
for each dozens of times; rebuilding would also retrace (TensorFlow's "triggered tf.function retracing" warning).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

_STORE: weakref.WeakKeyDictionary[Any, dict[Hashable, Any]] = weakref.WeakKeyDictionary()


def per_object(owner: Any, key: Hashable, build: Callable[[], T]) -> T:
    """build() the first time for this live owner and key, the same value afterwards.

    The value must not hold `owner` strongly (take a weakref.ref in closures): a value that does keeps its key
    alive through the store, so neither is ever freed.
    """
    values = _STORE.setdefault(owner, {})
    if key not in values:
        values[key] = build()
    return values[key]


def cached_count(owner: Any) -> int:
    """How many values are held for owner (for tests and diagnostics)."""
    return len(_STORE.get(owner, {}))
