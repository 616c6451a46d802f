"""The accuracy-against-latency plot `select` and `compress-report` both draw: one point per model or candidate,
the Pareto front joined, a log latency axis where the latencies span a wide range."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def plot_accuracy_latency(points: Sequence[dict[str, Any]], path: Path, accuracy: str, label: Callable[[dict], str],
                          ylabel: str, title: str, error: str | None = None) -> Path:
    """Saves points[i][accuracy] (+- points[i][error]) against points[i]["latency_batch1_ms"]; red points are on
    the Pareto front (`pareto`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for point in points:
        colour = "tab:red" if point.get("pareto") else "tab:blue"
        ax.errorbar(point["latency_batch1_ms"], point[accuracy], yerr=(point.get(error) or 0) if error else 0,
                    fmt="o", color=colour, capsize=3 if error else 0)
        ax.annotate(label(point), (point["latency_batch1_ms"], point[accuracy]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    front = sorted((p for p in points if p.get("pareto")), key=lambda p: p["latency_batch1_ms"])
    if len(front) > 1:
        ax.plot([p["latency_batch1_ms"] for p in front], [p[accuracy] for p in front], color="tab:red",
                linestyle="--", linewidth=1, label="Pareto front")
        ax.legend(loc="lower right")
    latencies = [p["latency_batch1_ms"] for p in points]
    log_x = max(latencies) > 4 * min(latencies)  # a log axis only where the latencies span a wide range
    if log_x:
        ax.set_xscale("log")
    ax.margins(x=0.25, y=0.1)
    ax.set_xlabel(f"batch-1 latency (ms{', log scale' if log_x else ''}); red: on the Pareto front")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
