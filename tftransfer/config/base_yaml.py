"""configs/base.yaml, generated from the experiment dataclasses: every key, its default and its help text.

    python -m tftransfer.config.base_yaml > configs/base.yaml

Values come from `ExperimentConfig()` (so a nested default such as phase 2's learning rate is the one the library
uses), each key's comment from its field's `help` metadata, and each section's comment from its dataclass's
docstring. tests/test_config.py fails when configs/base.yaml differs from this text.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import yaml

from tftransfer.config.experiment import ExperimentConfig

HEADER = """\
# Every tftransfer default, with what it means. Generated from the dataclasses in tftransfer/config/experiment.py
# by `python -m tftransfer.config.base_yaml > configs/base.yaml`; a test fails when this file is stale. Copy the
# keys you change into your own config, or use `tftransfer fit --config configs/base.yaml --set key=value`.
"""

INDENT = "  "


def yaml_scalar(value: Any) -> str:
    """`value` as one line of YAML: '' for an empty string, 1.0e-05, false, {} or {alpha: 0.5}."""
    # A plain scalar comes out as a document: "<scalar>\n...\n"; the end marker is not part of the value.
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def _summary(obj: Any) -> str:
    """The first paragraph of a dataclass's docstring, on one line."""
    doc = (type(obj).__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split())


def _lines(section: Any, depth: int) -> list[str]:
    lines = []
    for f in dataclasses.fields(section):
        value, pad = getattr(section, f.name), INDENT * depth
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:  # {_summary(value)}")
            lines += _lines(value, depth + 1)
        else:
            help_text = f.metadata.get("help")
            comment = f"  # {help_text}" if help_text else ""
            lines.append(f"{pad}{f.name}: {yaml_scalar(value)}{comment}")
    return lines


def base_yaml_text(cfg: ExperimentConfig | None = None) -> str:
    """The text of configs/base.yaml for `cfg` (the library defaults when None)."""
    return HEADER + "\n" + "\n".join(_lines(cfg if cfg is not None else ExperimentConfig(), 0)) + "\n"


def main() -> None:
    """Writes configs/base.yaml's text to stdout."""
    sys.stdout.write(base_yaml_text())


if __name__ == "__main__":
    main()
