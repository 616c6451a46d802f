"""float32 vs bf16 (mixed_bfloat16 copy) batch inference on this CPU, with the verdict runtime.precision=auto's
rule gives: MobileNetV2 alpha 0.35 and 0.5 (real ImageNet weights from ../shared/data/weights) and ResNet50
(random weights: speed does not depend on their values), 224 px, batch 32, hymenoptera images.

    flock -x /tmp/tftransfer-cpu.lock python benchmarks/bf16_probe.py     # the CPU to itself

It probes every backbone whether or not the CPU has AMX (fit only probes on AMX CPUs), prints a table and writes
benchmarks/results/bf16_probe.json. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = SHARED / "weights"
IMAGES = SHARED / "datasets" / "hymenoptera" / "val"
BACKBONES = (("mobilenetv2-0.35", "mobilenetv2", {"alpha": 0.35},
              "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"),
             ("mobilenetv2-0.5", "mobilenetv2", {"alpha": 0.5},
              "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"),
             ("resnet50 (random weights)", "resnet50", {}, "none"))


def load_batches(size: int, batch: int, count: int) -> list[np.ndarray]:
    """`count` batches of real images, resized to `size`, as float32 pixels in [0, 255]."""
    from PIL import Image

    paths = sorted(p for p in IMAGES.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:batch * count]
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size)), np.float32) for p in paths])
    return [pixels[i * batch:(i + 1) * batch] for i in range(count)]


def main() -> int:
    """Measures every backbone; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3, help="batches of 32 timed per model")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the batches; the best is kept")
    args = parser.parse_args()
    missing = [p for p in [IMAGES, *(WEIGHTS / w for *_, w in BACKBONES if w != "none")] if not p.exists()]
    if missing:
        print("missing:", ", ".join(map(str, missing)), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tftransfer.config.experiment import ModelConfig
    from tftransfer.model import backbones
    from tftransfer.model.classifier import build_model
    from tftransfer.model.precision import Bf16Probe
    from tftransfer.runtime import cpu_model, has_amx_bf16

    batches = load_batches(224, 32, args.batches)
    rows = []
    for label, name, kwargs, weights in BACKBONES:
        spec = backbones.get_backbone_spec(name)
        path = "none" if weights == "none" else str(WEIGHTS / weights)
        model = build_model(ModelConfig(backbone=name, weights=path, backbone_kwargs=kwargs), spec, 2, 224)
        verdict = Bf16Probe(repeats=args.repeats).measure(model, batches)
        images = sum(len(b) for b in batches)
        rows.append({"backbone": label, "float32_img_s": images / verdict.float32_seconds,
                     "bf16_img_s": images / verdict.bf16_seconds,
                     "speedup": verdict.float32_seconds / verdict.bf16_seconds, **verdict.to_dict()})
    print(f"\n{'backbone':28s} {'float32 img/s':>14s} {'bf16 img/s':>11s} {'bf16/f32':>9s}  verdict")
    for r in rows:
        print(f"{r['backbone']:28s} {r['float32_img_s']:14.1f} {r['bf16_img_s']:11.1f} {r['speedup']:8.2f}x  "
              f"{r['precision']}: {r['reason']}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    out = {"cpu": cpu_model(), "amx_bf16": has_amx_bf16(), "cores": os.cpu_count(), "python": platform.python_version(),
           "commit": commit.stdout.strip(), "batch": 32, "image_size": 224, "batches": args.batches,
           "repeats": args.repeats, "rows": rows}
    target = ROOT / "benchmarks" / "results" / "bf16_probe.json"
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
