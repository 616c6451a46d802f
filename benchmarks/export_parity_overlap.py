"""The export's fresh-process parity check: its process started after the SavedModel is written (the plain way,
as before) vs started before it, so that TensorFlow's import in the new process overlaps the writing.

Both orders run in this one process on the same fitted run, alternating, `--reps` times each; every rep stages a
SavedModel, checks it in a new process on the same parity images and discards it. Reports the wall time of
staging + check per order, and the check's own agreement (the same strictness in both).

    python benchmarks/export_parity_overlap.py RUN_DIR [--reps 3] [--out benchmarks/results/export_parity_overlap.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "export_parity_overlap.json"


def _one(order: str, finished: Any, pixels: Any, encoded: list[bytes], target: Path) -> dict[str, Any]:
    from tftransfer.serving.parity import FreshProcess, check_parity_fresh_process
    from tftransfer.serving.savedmodel import discard_export, stage_export

    started = time.perf_counter()
    fresh = FreshProcess() if order == "started-before" else None
    try:
        staged = stage_export(finished.model, target, finished.class_names, finished.image_size)
        staged_at = time.perf_counter() - started
        parity = check_parity_fresh_process(finished.model, staged.path, pixels, encoded, process=fresh)
    finally:
        if fresh is not None:
            fresh.close()
    total = time.perf_counter() - started
    discard_export(staged)
    return {"order": order, "total_seconds": total, "stage_seconds": staged_at, "check_seconds": total - staged_at,
            "max_abs_diff": parity["max_abs_diff"], "ok": parity["ok"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a fitted run directory")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--parity-images", type=int, default=32)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    from tftransfer.runs.finished import load_run
    from tftransfer.serving.parity import parity_inputs

    finished = load_run(args.run)
    pixels, encoded, described = parity_inputs(finished.source(), finished.image_size, args.parity_images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for order in ("started-after", "started-before"):
                row = {"rep": rep, **_one(order, finished, pixels, encoded, Path(tmp) / "model")}
                rows.append(row)
                print(f"rep {rep} {order:15s} total {row['total_seconds']:6.2f} s  (stage {row['stage_seconds']:5.2f}"
                      f" s, check {row['check_seconds']:5.2f} s)  max abs diff {row['max_abs_diff']:.1e}", flush=True)
    summary = {order: {"mean_total_seconds": statistics.mean(r["total_seconds"] for r in rows if r["order"] == order),
                       "mean_check_seconds": statistics.mean(r["check_seconds"] for r in rows if r["order"] == order)}
               for order in ("started-after", "started-before")}
    for order, s in summary.items():
        print(f"{order:15s} mean total {s['mean_total_seconds']:6.2f} s, mean check {s['mean_check_seconds']:5.2f} s")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    result = {"run": str(args.run), "parity_data": described, "rows": rows, "summary": summary,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_average": os.getloadavg()},
              "commit": commit, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
