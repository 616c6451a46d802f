"""Serving speed: the exported serving_default signature on JPEG bytes vs the Keras model on decoded arrays.

Builds MobileNetV2 (alpha 0.5, the real ImageNet weights) with a 2-class head as `fit` does, exports it with
tftransfer, and times three ways of classifying the hymenoptera validation photos, in one process:

- `serving_default`: the SavedModel signature TF Serving runs, fed encoded JPEG bytes (decode, resize, model, top-k);
- `predict_pixels`: the SavedModel on already decoded and resized arrays (the export without the decoding);
- `keras`: `model.predict_on_batch` on the same decoded arrays (what a Python user without an export does).

Each at batch 1 and 32: per call p50/p95 latency and images/s, after warm-up calls. Training does not change
speed, so the head is left untrained.

    python benchmarks/serving.py                 # 30 timed calls per case
    python benchmarks/serving.py --runs 5        # quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_DATA = SHARED / "datasets" / "hymenoptera" / "val"
DEFAULT_WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "serving.json"
WARMUP_CALLS = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of JPEGs (searched recursively)")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="MobileNetV2 alpha 0.5 no-top .h5 file")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--runs", type=int, default=30, help="timed calls per case")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def machine() -> dict[str, Any]:
    """Where the figures were taken."""
    import keras
    import tensorflow as tf

    import tftransfer

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "devices": [d.name for d in tf.config.list_physical_devices()],
            "tensorflow": tf.__version__, "keras": keras.__version__, "tftransfer": tftransfer.__version__,
            "load_average": list(os.getloadavg()), "date": dt.datetime.now(dt.timezone.utc).isoformat()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [str(p) for p in (args.data, args.weights) if not p.exists()]
    if missing:
        print(f"missing: {', '.join(missing)} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from tftransfer.config.experiment import ModelConfig
    from tftransfer.data.images import decode_and_resize
    from tftransfer.evaluation.metrics import latency_summary, time_calls
    from tftransfer.model import backbones
    from tftransfer.model.classifier import build_model
    from tftransfer.serving.savedmodel import export_saved_model, load_exported

    files = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    encoded = [p.read_bytes() for p in files]
    size = args.image_size
    pixels = np.stack([decode_and_resize(tf.constant(data), size).numpy() for data in encoded])
    spec = backbones.get_backbone_spec("mobilenetv2")
    model = build_model(ModelConfig(backbone="mobilenetv2", weights=str(args.weights),
                                    backbone_kwargs={"alpha": 0.5}), spec, 2, size)
    results: dict[str, Any] = {"machine": machine(), "images": len(files), "data": str(args.data),
                               "image_size": size, "runs": args.runs, "warmup_calls": WARMUP_CALLS, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_exported(export_saved_model(model, Path(tmp) / "m", ["ants", "bees"], size))
        serving = loaded.signatures["serving_default"]
        by_pixels = loaded.signatures["predict_pixels"]
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            starts = range(0, len(files) - batch + 1, batch)
            byte_batches = [tf.constant(encoded[s:s + batch]) for s in starts]
            pixel_batches = [pixels[s:s + batch] for s in starts]
            tensor_batches = [tf.constant(b) for b in pixel_batches]
            cases = {
                "serving_default (JPEG bytes)": (lambda b: serving(images=b)["probabilities"].numpy(), byte_batches),
                "predict_pixels (decoded arrays)": (lambda b: by_pixels(pixels=b)["probabilities"].numpy(),
                                                    tensor_batches),
                "keras predict_on_batch (decoded arrays)": (model.predict_on_batch, pixel_batches),
            }
            for name, (call, batches) in cases.items():
                figures = latency_summary(time_calls(call, batches, args.runs, WARMUP_CALLS), batch)
                results["cases"].append({"case": name, "batch_size": batch, **figures})
                print(f"batch {batch:>3}  {name:<42} p50 {figures['p50_ms']:8.1f} ms  p95 {figures['p95_ms']:8.1f} ms"
                      f"  {figures['images_per_second']:8.1f} images/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
