"""Phase 1 only: tftransfer's feature cache vs the Keras guide's frozen-base `fit`, side by side in one run.

Same job for both: MobileNetV2 alpha 0.5 (real ImageNet weights), hymenoptera at 224 px, 10 head epochs at
Adam 1e-3, frozen backbone. The Keras guide runs the frozen backbone forward on every image every epoch (with its
flip/rotation augmentation in the model); tftransfer computes the pooled features once (cold cache, a fresh cache
folder per run) and trains the head on them. A second tftransfer run then shows the warm-cache time.

    python benchmarks/phase1_feature_cache.py [--epochs 10] [--out benchmarks/results/phase1_feature_cache.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hymenoptera_two_phase import (  # noqa: E402
    CONFIG,
    DEFAULT_DATA,
    DEFAULT_WEIGHTS,
    machine_info,
    missing_inputs,
    run_keras_guide,
    write_json,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "phase1_feature_cache.json"


def run_tftransfer_phase1(data: Path, weights: Path, workdir: Path, cache: Path, epochs: int, seed: int,
                          name: str) -> dict[str, Any]:
    """Phase 1 through tftransfer's run_fit: head only, no export."""
    import keras

    from tftransfer.config import load_config
    from tftransfer.train import run_fit

    keras.mixed_precision.set_global_policy("float32")
    cfg = load_config(CONFIG, overrides=[
        f"model.weights={weights}", f"data.path={data}", f"runs_dir={workdir / 'runs'}", f"name={name}",
        "data.image_size=224", f"phases.head.epochs={epochs}", "phases.head.learning_rate=0.001",
        "phases.finetune.unfreeze_blocks=0", "export.enabled=false", f"runtime.seed={seed}",
        f"runtime.cache_dir={cache}"])
    started = time.perf_counter()
    metrics = run_fit(cfg).metrics
    head = metrics["phases"][0]
    return {"phase1_seconds": head["seconds"], "val_accuracy": head["val"]["accuracy"],
            "total_seconds": time.perf_counter() - started, "epochs": head["epochs_run"]}


def main(argv: list[str] | None = None) -> int:
    """Runs both approaches and prints/saves the comparison."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    missing = missing_inputs(args.data, args.weights)
    if missing:
        print("missing inputs:\n  " + "\n  ".join(missing))
        return 2
    import keras

    results: dict[str, Any] = {}
    keras.utils.set_random_seed(args.seed)
    guide = run_keras_guide(args.data, args.weights, 224, args.epochs, 0, args.seed)
    head = guide["phases"][0]
    results["keras_guide"] = {"phase1_seconds": head["seconds"], "val_accuracy": head["val_accuracy"],
                              "total_seconds": guide["total_seconds"], "epochs": args.epochs}
    with tempfile.TemporaryDirectory(prefix="tftransfer-phase1-") as tmp:
        work = Path(tmp)
        results["tftransfer_cold_cache"] = run_tftransfer_phase1(args.data, args.weights, work, work / "cache",
                                                                 args.epochs, args.seed, "cold")
        results["tftransfer_warm_cache"] = run_tftransfer_phase1(args.data, args.weights, work, work / "cache",
                                                                 args.epochs, args.seed, "warm")
    base = results["keras_guide"]["phase1_seconds"]
    for entry in results.values():
        entry["speedup_vs_keras"] = base / entry["phase1_seconds"] if entry["phase1_seconds"] else None
    payload = {"benchmark": "phase1_feature_cache", "machine": machine_info(),
               "settings": {"image_size": 224, "epochs": args.epochs, "learning_rate": 1e-3, "seed": args.seed,
                            "weights": str(args.weights), "data": str(args.data)},
               "results": results}
    write_json(args.out, payload)
    print(f"\n{'approach':<24}{'phase 1 s':>10}{'speed-up':>10}{'val acc':>9}")
    for name, r in results.items():
        print(f"{name:<24}{r['phase1_seconds']:>10.1f}{r['speedup_vs_keras']:>9.1f}x{r['val_accuracy']:>9.4f}")
    print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
