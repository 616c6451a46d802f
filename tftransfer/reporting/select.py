"""`tftransfer select`'s page: the ranked candidate table (select.md) and the accuracy-latency Pareto plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tftransfer.reporting.pareto import plot_accuracy_latency


def _num(value: Any, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _weights_label(weights: str) -> str:
    return weights if weights in ("imagenet", "none") else Path(weights).name


def candidate_label(entry: dict[str, Any]) -> str:
    """mobilenetv2@160 {alpha: 0.35} (file.h5): one candidate in a line."""
    kwargs = entry.get("backbone_kwargs") or {}
    extra = f" {{{', '.join(f'{k}: {v}' for k, v in kwargs.items())}}}" if kwargs else ""
    return f"{entry['backbone']}@{entry['image_size']}{extra} ({_weights_label(entry['weights'])})"


def _table_row(entry: dict[str, Any]) -> str:
    if entry.get("skipped") or entry.get("error"):
        why = f"skipped: {entry['skipped']}" if entry.get("skipped") else f"error: {entry['error']}"
        return f"| - | {candidate_label(entry)} | {why.replace('|', '/')} |" + " |" * 8
    acc = entry.get("probe_accuracy")
    probe = "-" if acc is None else f"{acc:.1%} +- {entry.get('probe_accuracy_std') or 0:.1%}"
    params = entry.get("params")
    return (f"| {entry.get('rank') or '-'} | {candidate_label(entry)}{' *' if entry.get('pareto') else ''} | "
            f"{_num(entry.get('logme'), '.4f')} | {_num(entry.get('h_score'), '.3f')} | {probe} | "
            f"{_num(params / 1e6 if params is not None else None, '.2f')} | "
            f"{_num(entry['flops'] / 1e6 if entry.get('flops') is not None else None, '.1f')} | "
            f"{_num(entry.get('latency_batch1_ms'), '.1f')} | {_num(entry.get('latency_batch32_ms'), '.1f')} | "
            f"{_num(entry.get('extract_images_per_second'), '.0f', 'cached')} | "
            f"{_num(entry.get('seconds'), '.1f')} |")


def format_select_markdown(report: dict[str, Any]) -> str:
    """select.md: what was compared on which data, the ranked table, the pick and the `tftransfer fit` command."""
    data = report["data"]
    subsampled = f"; a class-stratified subsample of {data['available_images']}" if data["subsampled"] else ""
    lines = [f"# Backbone selection on {data['spec']}", "",
             f"{data['images']} labelled images ({data['train_images']} train + {data['val_images']} val) in "
             f"{data['classes']} classes{subsampled}. Ranked by **{report['rank_by']}** (higher is better); "
             f"{report['device']}.", ""]
    rec = report.get("recommendation")
    if rec:
        lines += [f"**Recommendation:** {rec['text']}", "", "```", rec["fit_command"], "```", ""]
    lines += ["| rank | candidate (* Pareto: accuracy vs batch-1 latency) | LogME | H-score | probe accuracy | "
              "params (M) | MFLOPs | batch-1 ms | batch-32 ms | extract images/s | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_table_row(entry) for entry in report["candidates"]]
    lines += ["", f"Scores on the pooled features of every image: LogME (You et al. 2021, maximised label evidence per "
              f"image), H-score with Ledoit-Wolf shrinkage (Bao et al. 2019; Ibrahim et al. 2022), and a "
              f"{report['folds']}-fold logistic-regression probe (mean +- std over folds). MFLOPs: 2 x the "
              "multiply-accumulates of the convolution and dense layers for one image (element-wise layers left "
              "out). Latency: the backbone with its preprocessing and pooling, median of repeated calls on this "
              "machine; extract images/s: the feature pass over the data (`cached` when the features came from the "
              "feature cache). SavedModel and TFLite sizes are not measured here (`tftransfer export` reports them).",
              "", f"Total {report['seconds']:.1f} s.", ""]
    if report.get("plot"):
        lines += [f"![accuracy against latency]({report['plot']})", ""]
    return "\n".join(lines)


def plot_pareto(candidates: list[dict[str, Any]], path: Path) -> Path | None:
    """Probe accuracy (+- std) against batch-1 latency, the Pareto front joined; None with nothing to draw."""
    points = [c for c in candidates if c.get("probe_accuracy") is not None and c.get("latency_batch1_ms")]
    if not points:
        return None
    return plot_accuracy_latency(points, path, "probe_accuracy", candidate_label, "linear-probe accuracy (k-fold)",
                                 "Expected accuracy against latency", error="probe_accuracy_std")
