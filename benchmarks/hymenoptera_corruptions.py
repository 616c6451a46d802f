"""Hymenoptera validation photos under the corruption suite (severity 3 and 5): source-only vs each adapter.

MobileNetV2 alpha 0.5 (real ImageNet weights) fitted with configs/mobilenetv2_hymenoptera.yaml at 224 px (2
fine-tuning epochs), then `tftransfer domain` with all 12 corruptions at severities 3 and 5 and every adapter
adapted to each corrupted set; prints the mean accuracy over corruptions per method and severity.

    python benchmarks/hymenoptera_corruptions.py [--out benchmarks/results/hymenoptera_corruptions.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "hymenoptera_corruptions.json"


def main(argv: list[str] | None = None) -> int:
    """Fit, report, summarise."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    data = SHARED / "datasets" / "hymenoptera"
    if not data.is_dir() or not WEIGHTS.is_file():
        print(f"missing inputs: {data} / {WEIGHTS}")
        return 2
    from tftransfer.config.experiment import load_config
    from tftransfer.jobs.domain import run_domain
    from tftransfer.jobs.fit import run_fit

    with tempfile.TemporaryDirectory(prefix="tftransfer-corruptions-") as tmp:
        cfg = load_config(REPO / "configs" / "mobilenetv2_hymenoptera.yaml", values={
            "name": "hym", "runs_dir": f"{tmp}/runs", "export.enabled": False, "data.path": str(data),
            "data.image_size": 224, "phases.finetune.epochs": 2, "model.weights": str(WEIGHTS),
            "runtime.cache_dir": f"{tmp}/cache"})
        run = run_fit(cfg).run_dir
        started = time.perf_counter()
        report = run_domain(run, corruptions="all", severities=(3, 5), adapt="all", adapt_severities=(3, 5),
                            batch_size=64).report
        seconds = time.perf_counter() - started
    suite = report["corruptions"]
    summary = {}
    for index, severity in enumerate(("3", "5")):
        row = {"source-only": sum(v["accuracy"][index] for v in suite["results"].values()) / len(suite["results"])}
        for method, per in suite["adaptation"].items():
            row[method] = sum(per[c][severity]["accuracy"] for c in per) / len(per)
        summary[severity] = row
    print(json.dumps({"clean": suite["clean"]["accuracy"], "mean_accuracy": summary, "seconds": seconds}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "clean": suite["clean"]["accuracy"], "seconds": seconds,
                                    "corruptions": suite}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
