"""`fit --seeds N`: the same recipe trained N times with seeds seed, seed+1, ..., reported as mean and std.

Adversarial adaptation in particular varies from seed to seed (the Transfer-Learning-Library averages three
runs), so a single run says little about a method. Runs go to <runs_dir>/<name>/<name>-seed<S>/; the summary to
<runs_dir>/<name>/seeds.json and seeds.md.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tftransfer.config.experiment import ExperimentConfig
from tftransfer.core.io import write_json
from tftransfer.jobs.fit import default_run_name, run_fit
from tftransfer.runs.layout import check_run_name
from tftransfer.runs.records import RunMetrics

logger = logging.getLogger(__name__)

# What the summary aggregates: name -> how to read it from a run's metrics.json (None when absent).
SEED_METRICS: dict[str, Callable[[RunMetrics], float | None]] = {
    "val_accuracy": lambda m: m.val_accuracy,
    "target_accuracy": lambda m: m.target_accuracy,
    "total_seconds": lambda m: m.total_seconds,
}


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one run), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "runs": len(values)}


def run_seeds(cfg: ExperimentConfig, seeds: int, overwrite: bool = False, verbose: int = 0) -> dict[str, Any]:
    """Fits `cfg` once per seed and writes the mean +- std summary; returns it."""
    import keras


    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    name = check_run_name(cfg.name or default_run_name(cfg))
    root = Path(cfg.runs_dir) / name
    runs = []
    for offset in range(seeds):
        seed = cfg.runtime.seed + offset
        run_cfg = replace(cfg, name=f"{name}-seed{seed}", runs_dir=str(root),
                          runtime=replace(cfg.runtime, seed=seed))
        logger.info("seed %d (%d of %d)", seed, offset + 1, seeds)
        keras.backend.clear_session()
        result = run_fit(run_cfg, overwrite=overwrite, verbose=verbose)
        entry = {"seed": seed, "run_dir": str(result.run_dir)}
        record = RunMetrics.from_dict(result.metrics)
        entry.update({key: read(record) for key, read in SEED_METRICS.items()})
        runs.append(entry)
    summary: dict[str, Any] = {"name": name, "seeds": [r["seed"] for r in runs], "adapt_method": cfg.adapt.method,
                               "target": cfg.adapt.target or None, "runs": runs}
    for key in SEED_METRICS:
        values = [r[key] for r in runs if r[key] is not None]
        if values:
            summary[key] = summarize(values)
    write_json(root / "seeds.json", summary)
    (root / "seeds.md").write_text(render_seeds(summary))
    return summary


def render_seeds(summary: dict[str, Any]) -> str:
    """A Markdown table of every seed's figures and their mean +- std."""
    keys = [k for k in SEED_METRICS if k in summary]
    lines = [f"# {summary['name']}: {len(summary['runs'])} seeds", ""]
    if summary.get("target"):
        lines += [f"Adaptation: `{summary['adapt_method']}` to `{summary['target']}` (target labels only evaluate).",
                  ""]
    lines += ["| seed | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for run in summary["runs"]:
        cells = ["" if run[k] is None else f"{run[k]:.4f}" if k != "total_seconds" else f"{run[k]:.1f}"
                 for k in keys]
        lines.append(f"| {run['seed']} | " + " | ".join(cells) + " |")
    cells = [f"{summary[k]['mean']:.4f} +- {summary[k]['std']:.4f}" if k != "total_seconds"
             else f"{summary[k]['mean']:.1f} +- {summary[k]['std']:.1f}" for k in keys]
    lines.append("| **mean +- std** | " + " | ".join(cells) + " |")
    lines += ["", "std is the sample standard deviation over seeds."]
    return "\n".join(lines) + "\n"
