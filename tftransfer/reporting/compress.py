"""The compression report: a Markdown table of accuracy, parameters, size and latency, and the Pareto plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tftransfer.reporting.markdown import escape_cell, table
from tftransfer.reporting.pareto import plot_accuracy_latency


def pareto_flags(rows: list[dict[str, Any]], accuracy: str = "accuracy", latency: str = "latency_batch1_ms") -> None:
    """Sets each row's `pareto`: no other row is at least as accurate and at least as fast, and better in one."""
    for row in rows:
        acc, lat = row.get(accuracy), row.get(latency)
        row["pareto"] = acc is not None and lat is not None and not any(
            other is not row and other.get(accuracy) is not None and other.get(latency) is not None
            and other[accuracy] >= acc and other[latency] <= lat and (other[accuracy] > acc or other[latency] < lat)
            for other in rows)


def _ms(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def _kib(value: Any) -> str:
    return f"{value / 1024:,.0f}" if isinstance(value, (int, float)) else "-"


def format_compress_markdown(report: dict[str, Any]) -> str:
    """compress_report.md: one row per model, the Pareto front in bold."""
    batch = report["batch_size"]
    rows = []
    for row in report["models"]:
        name = escape_cell(row["name"])
        rows.append([f"**{name}**" if row.get("pareto") else name, escape_cell(row["kind"]),
                     f"{row['accuracy']:.2%}", f"{row['parameters']:,}", f"{row['nonzero_parameters']:,}",
                     _kib(row["size_bytes"]), _kib(row["gzip_bytes"]), _ms(row["latency_batch1_ms"]),
                     _ms(row.get(f"latency_batch{batch}_ms"))])
    header = ["Model", "Kind", "Accuracy", "Parameters", "Nonzero", "Size KiB", "gzip KiB", "Batch 1 ms",
              f"Batch {batch} ms"]
    lines = ["# Compression report", "",
             f"{report['examples']} images of `{escape_cell(report['data'])}` ({report['split']} split), the same "
             f"for every model. Latency: median of {report['latency_runs']} calls after a warm-up, on this machine "
             f"({report['cpu_count']} CPUs, load average {report['load_average'][0]:.2f}); TFLite through the "
             f"interpreter's default XNNPACK delegate on {report['tflite_threads']} threads. Nonzero: parameters "
             "that are not exactly zero (pruning's zeros show here and in the gzip size, not in the plain size). "
             "Bold: on the accuracy / batch-1 latency Pareto front.", "",
             *table(header, rows, "--- --- ---: ---: ---: ---: ---: ---: ---:", escape=False), ""]
    if report.get("plot"):
        lines += [f"![accuracy against latency]({report['plot']})", ""]
    return "\n".join(lines)


def plot_compress_pareto(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy against batch-1 latency, one point per model, the Pareto front joined; None with nothing to draw."""
    points = [r for r in rows if r.get("latency_batch1_ms")]
    if not points:
        return None
    return plot_accuracy_latency(points, path, "accuracy", lambda row: row["name"], "accuracy",
                                 "Accuracy against latency")
