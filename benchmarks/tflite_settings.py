"""Batch-1 latency of TFLite files under the interpreter settings that might legitimately speed int8 up: thread
count, XNNPACK on/off (the builtin kernels instead), and XNNPACK's "latest features" flag (its newer optional
features). Same input, same files; only the runtime changes.

    flock -x /tmp/tftransfer-cpu.lock python benchmarks/tflite_settings.py a.tflite b.tflite ...

Prints a table and writes benchmarks/results/tflite_settings.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def interpreter(path: Path, threads: int, xnnpack: bool, latest: bool):
    """A tf.lite interpreter of `path` with these settings, tensors allocated."""
    import tensorflow as tf

    resolver = (tf.lite.experimental.OpResolverType.AUTO if xnnpack
                else tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interp = tf.lite.Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver,
                                     experimental_default_delegate_latest_features=latest)
    interp.allocate_tensors()
    return interp


def batch1_ms(interp, runs: int) -> float:
    """Median milliseconds of one invoke on a fixed random image, after 5 warm-up calls."""
    detail = interp.get_input_details()[0]
    rng = np.random.default_rng(0)
    if np.issubdtype(detail["dtype"], np.integer):
        image = rng.integers(0, 256, detail["shape"]).astype(detail["dtype"])
    else:
        image = rng.uniform(0, 255, detail["shape"]).astype(detail["dtype"])
    interp.set_tensor(detail["index"], image)
    for _ in range(5):
        interp.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interp.invoke()
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tflite_settings.json")
    args = parser.parse_args()
    load_before, rows = os.getloadavg(), []
    for path, threads, xnnpack, latest in itertools.product(args.files, (1, 2), (True, False), (False, True)):
        if not xnnpack and latest:
            continue  # the flag only changes the XNNPACK delegate
        ms = batch1_ms(interpreter(path, threads, xnnpack, latest), args.runs)
        rows.append({"file": path.name, "threads": threads, "xnnpack": xnnpack, "latest_features": latest,
                     "batch1_ms": ms})
        print(f"{path.name:>40} threads {threads} xnnpack {xnnpack!s:>5} latest {latest!s:>5}: {ms:7.3f} ms")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    args.out.write_text(json.dumps({"rows": rows, "runs": args.runs, "commit": commit, "machine": platform.platform(),
                                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
                                   indent=2))
    print(f"load {load_before} -> {os.getloadavg()}; wrote {args.out}")


if __name__ == "__main__":
    main()
