"""Names that become one line of a file (class names in labels.txt) or one path component (run and export names).

A newline in a class name gives labels.txt one line too many (the model then has fewer outputs than the file has
names); a run name such as `.`, `..` or `../../X` is a path, not a name. Both are refused where they first appear,
with a message that shows the name escaped (`repr`), so the error itself stays on one line.
"""

from __future__ import annotations

import unicodedata

# Unicode categories that break a line or cannot be typed: C0/C1 controls (newline, tab, NUL, DEL, NEL) and the
# line and paragraph separators (str.splitlines splits at all of them).
LINE_BREAKING_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})
MAX_COMPONENT_BYTES = 255  # the longest file name of ext4, APFS, NTFS (in UTF-8 bytes on Linux)


def control_characters(text: str) -> list[str]:
    """The distinct control characters (and line or paragraph separators) in `text`, in order of appearance."""
    found: list[str] = []
    for char in text:
        if unicodedata.category(char) in LINE_BREAKING_CATEGORIES and char not in found:
            found.append(char)
    return found


def _describe(chars: list[str]) -> str:
    return ", ".join(repr(c) for c in chars)


def class_name_problem(name: str) -> str | None:
    """Why `name` cannot be one line of labels.txt (None when it can): blank, or a control character in it."""
    if not name.strip():
        return "a class name cannot be blank"
    bad = control_characters(name)
    if bad:
        return f"a class name cannot hold control characters ({_describe(bad)})"
    return None


def path_component_problem(name: str) -> str | None:
    """Why `name` cannot be one folder name under another (None when it can).

    Refused: empty, `.` and `..`, a `/` or `\\` (a path, not a name), a leading `.` (hidden, and tftransfer's own
    temporary folders start with one), control characters, and more than MAX_COMPONENT_BYTES bytes.
    """
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} is not a name but a folder reference"
    if "/" in name or "\\" in name:
        return "it holds a path separator ('/' or '\\'): it must be one folder name, not a path"
    bad = control_characters(name)
    if bad:
        return f"it holds control characters ({_describe(bad)})"
    if name.startswith("."):
        return "it starts with '.' (a hidden folder; tftransfer's temporary folders start with one)"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
        return f"it is longer than {MAX_COMPONENT_BYTES} bytes"
    return None
