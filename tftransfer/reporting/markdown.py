"""Markdown tables for every report (run summary, evaluation, domain, select): one way to escape and align."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def escape_cell(value: Any) -> str:
    """A value as one table cell: backslashes and pipes escaped, newlines flattened."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | str | None = None,
          escape: bool = True) -> list[str]:
    """Lines of a Markdown table. `align` per column ("---", "---:", ...) as a list or one space-separated string;
    `escape=False` for cells the caller has already made safe (escape_cell or deliberate Markdown)."""
    if isinstance(align, str):
        align = align.split()
    align = list(align) if align else ["---"] * len(header)
    cell = escape_cell if escape else str
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)]
