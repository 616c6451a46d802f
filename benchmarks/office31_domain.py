"""Office-31 D->W and W->D: fit on one domain, then the whole `tftransfer domain` report on the other.

MobileNetV2 alpha 0.5 (real ImageNet weights), 128 px, 30 head epochs on cached features + 2 fine-tuning epochs;
the report adapts with every registered method (source-only, AdaBN, aligned AdaBN, batch statistics, TENT), runs
all 12 corruptions at 5 severities, and is timed (the issue's goal: under 3 minutes on this machine).

    python benchmarks/office31_domain.py [--out benchmarks/results/office31_domain.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OFFICE = SHARED / "datasets" / "office31"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "office31_domain.json"


def one_task(source: str, target: str, work: Path) -> dict[str, Any]:
    """Fit on `source`, report on `target`; the figures the docs record."""
    from tftransfer.config.experiment import load_config
    from tftransfer.jobs.domain import run_domain
    from tftransfer.jobs.fit import run_fit

    cfg = load_config(values={
        "name": source, "runs_dir": str(work / "runs"), "export.enabled": False,
        "data.path": str(OFFICE / source / "images"), "data.image_size": 128, "model.backbone": "mobilenetv2",
        "model.weights": str(WEIGHTS), "model.backbone_kwargs": {"alpha": 0.5}, "phases.head.epochs": 30,
        "phases.head.learning_rate": 0.003, "phases.finetune.epochs": 2, "phases.finetune.learning_rate": 3e-5,
        "runtime.cache_dir": str(work / "cache")})
    started = time.perf_counter()
    run_dir = run_fit(cfg).run_dir
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    report = run_domain(run_dir, target=str(OFFICE / target / "images"), adapt="all", corruptions="all",
                        batch_size=64).report
    shift = report["shift"]
    return {
        "fit_seconds": fit_seconds, "report_seconds": time.perf_counter() - started,
        "source_accuracy": report["source"]["metrics"]["accuracy"], "source_examples": report["source"]["examples"],
        "target_accuracy": report["target"]["metrics"]["accuracy"], "target_examples": report["target"]["examples"],
        "proxy_a_distance": [shift["proxy_a_distance"]["value"], shift["proxy_a_distance"]["std"]],
        "mmd2": shift["mmd"]["mmd2"], "mmd_p_value": shift["mmd"]["p_value"], "coral": shift["coral"]["value"],
        "methods": {name: {"target_accuracy": entry.get("accuracy"),
                           "source_self_check": (entry.get("source_self_check") or {}).get("accuracy_change")}
                    for name, entry in report["adaptation"].items()},
        "corruption_mean_accuracy": report["corruptions"]["mean"]["accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    """Both tasks, printed and saved."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    missing = [str(p) for p in (OFFICE / "dslr" / "images", OFFICE / "webcam" / "images", WEIGHTS) if not p.exists()]
    if missing:
        print("missing inputs:\n  " + "\n  ".join(missing))
        return 2
    results = {}
    with tempfile.TemporaryDirectory(prefix="tftransfer-office31-") as tmp:
        for source, target in (("dslr", "webcam"), ("webcam", "dslr")):
            results[f"{source}->{target}"] = one_task(source, target, Path(tmp))
            print(json.dumps({f"{source}->{target}": results[f"{source}->{target}"]}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "office31_domain", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "results": results}, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
