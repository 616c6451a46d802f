"""Office-31 D->W and W->D with training-time adaptation: source-only vs DANN vs Deep CORAL vs MMD vs pseudo-labels.

Each method is `tftransfer fit --target <other domain> --adapt METHOD` on MobileNetV2 alpha 0.5 (real ImageNet
weights) at 128 px with a 256-unit bottleneck, several seeds each; the target's labels only score the result.
Source-only is the same recipe with the target watched but not used (`--adapt none`), so the comparison isolates
the adaptation loss. Every run's target accuracy and wall time is printed and saved, with mean +- std per method.

    python benchmarks/office31_adapt.py [--seeds 3] [--methods none,dann,coral,mmd,pseudo-label] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OFFICE = SHARED / "datasets" / "office31"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "office31_adapt.json"
TASKS = {"D->W": ("dslr", "webcam"), "W->D": ("webcam", "dslr")}


def recipe(source: str, target: str, method: str, seed: int, work: Path, quick: bool) -> dict[str, Any]:
    """The config values of one run (the same for every method but adapt.method)."""
    return {
        "name": f"{source}-{target}-{method}-s{seed}", "runs_dir": str(work / "runs"), "export.enabled": False,
        "data.path": str(OFFICE / source / "images"), "data.image_size": 96 if quick else 128,
        "data.augment.preset": "light",
        "model.backbone": "mobilenetv2", "model.weights": str(WEIGHTS), "model.backbone_kwargs": {"alpha": 0.5},
        "model.bottleneck": 256,
        "phases.head.epochs": 2 if quick else 30, "phases.head.learning_rate": 0.003,
        "phases.finetune.epochs": 1 if quick else 6, "phases.finetune.learning_rate": 1e-4,
        "phases.finetune.warmup_epochs": 0.5,
        "adapt.target": str(OFFICE / target / "images"), "adapt.method": method,
        "adapt.max_target_images": 64 if quick else 0,
        "runtime.seed": seed, "runtime.cache_dir": str(work / "cache"),
    }


def one_run(values: dict[str, Any]) -> dict[str, Any]:
    """Fits one config; its target accuracy, source val accuracy, per-phase figures and wall time."""
    import keras

    from tftransfer.config.experiment import load_config
    from tftransfer.jobs.fit import run_fit

    keras.backend.clear_session()
    started = time.perf_counter()
    metrics = run_fit(load_config(values=values)).metrics
    adapt = metrics["adapt"]
    return {"target_accuracy": adapt["final"]["accuracy"], "val_accuracy": metrics["final"]["val"]["accuracy"],
            "seconds": time.perf_counter() - started,
            "target_accuracy_after_head": next((r.get("target_accuracy") for r in reversed(
                json.loads((Path(metrics["run"]["run_dir"]) / "history.json").read_text()))
                if r["phase"] == "head"), None),
            "selection": adapt["selection"]}


def summary(values: list[float]) -> dict[str, float]:
    """Mean and sample std."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(argv: list[str] | None = None) -> int:
    """Every task x method x seed, printed as it goes and saved."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42, help="first seed")
    parser.add_argument("--methods", default="none,dann,coral,mmd,pseudo-label")
    parser.add_argument("--tasks", default="D->W,W->D")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and epochs: checks the script runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not (OFFICE.is_dir() and WEIGHTS.is_file()):
        print(f"needs {OFFICE} and {WEIGHTS} (../shared/data)", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    results: dict[str, Any] = {"benchmark": "office31_adapt", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "seeds": list(range(args.seed, args.seed + args.seeds)), "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for task in tasks:
            source, target = TASKS[task]
            results["config"] = recipe(source, target, "METHOD", args.seed, Path("WORK"), args.quick)
            per_method: dict[str, Any] = {}
            for method in methods:
                runs = []
                for seed in results["seeds"]:
                    run = one_run(recipe(source, target, method, seed, work, args.quick))
                    run["seed"] = seed
                    runs.append(run)
                    print(f"{task} {method:<13} seed {seed}: target {run['target_accuracy']:.4f}  "
                          f"source val {run['val_accuracy']:.4f}  {run['seconds']:.0f} s", flush=True)
                per_method[method] = {
                    "runs": runs, "target_accuracy": summary([r["target_accuracy"] for r in runs]),
                    "val_accuracy": summary([r["val_accuracy"] for r in runs]),
                    "seconds": summary([r["seconds"] for r in runs])}
            results["tasks"][task] = per_method
    print("\n| task | method | target accuracy (mean +- std) | source val accuracy | seconds per run |")
    print("|---|---|---|---|---|")
    for task, per_method in results["tasks"].items():
        for method, entry in per_method.items():
            t, v, s = entry["target_accuracy"], entry["val_accuracy"], entry["seconds"]
            print(f"| {task} | {method} | {100 * t['mean']:.1f} +- {100 * t['std']:.1f} | "
                  f"{100 * v['mean']:.1f} +- {100 * v['std']:.1f} | {s['mean']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
