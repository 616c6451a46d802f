"""Cost of serving_default's per-image checks: the checked decode vs the plain one, decoding only (no model).

Times, in one process and on the same JPEG bytes (hymenoptera validation photos, up to 2592 px):

- `plain`: what serving_default did before the checks, `tf.map_fn(decode_and_resize)` over the batch in a
  tf.function (one bad image fails the whole batch);
- `checked`: `serving.inputs.decode_checked` (header size read before decoding, pixel limit, one image at a time in a
  tf.data pipeline whose `ignore_errors` flags an undecodable image instead of failing the batch).

Both at batch 1 and 32: per call p50/p95 and images/s, after warm-up calls; the outputs are checked to be equal.

    python benchmarks/serving_checks.py             # 20 timed calls per case
    python benchmarks/serving_checks.py --runs 3    # quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from tftransfer.config.experiment import ExportConfig
from tftransfer.data.images import decode_and_resize
from tftransfer.evaluation.metrics import latency_summary, time_calls
from tftransfer.serving.inputs import decode_checked

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "datasets" / "hymenoptera" / "val"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "serving_checks.json"
WARMUP_CALLS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of JPEGs (searched recursively)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--runs", type=int, default=20, help="timed calls per case")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the comparison, prints a table and writes the JSON."""
    args = parse_args(argv)
    files = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    encoded = [p.read_bytes() for p in files]
    size = args.image_size
    spec = [tf.TensorSpec([None], tf.string)]
    plain = tf.function(lambda images: tf.map_fn(lambda e: decode_and_resize(e, size), images,
                                                 fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32)),
                        input_signature=spec)
    checked = tf.function(lambda images: decode_checked(images, size, ExportConfig.max_pixels)[0],
                          input_signature=spec)
    results: dict[str, Any] = {"cases": {}}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        batches = [tf.constant(encoded[i:i + batch]) for i in range(0, len(encoded) - batch + 1, batch)]
        np.testing.assert_array_equal(plain(batches[0]).numpy(), checked(batches[0]).numpy())
        for name, fn in (("plain", plain), ("checked", checked)):
            times = time_calls(fn, batches, args.runs, WARMUP_CALLS)
            results["cases"][f"{name}_batch{batch}"] = latency_summary(times, batch)
    results.update(
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), images=len(encoded),
        image_size=size, machine={"cpus": os.cpu_count(), "processor": platform.processor(),
                                  "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]},
        tensorflow=tf.__version__)
    for key, value in results["cases"].items():
        print(f"{key:18s} p50 {value['p50_ms']:8.1f} ms  p95 {value['p95_ms']:8.1f} ms  "
              f"{value['images_per_second']:7.1f} images/s")
    results["machine"]["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
