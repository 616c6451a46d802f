"""Phase 2 training throughput: tftransfer's fit_phases vs a minimal hand-written `model.fit`, same model and data.

Both train MobileNetV2 alpha 0.5 (real ImageNet weights) on hymenoptera at 224 px with the top 2 blocks
unfrozen (BatchNorm frozen), on the same tf.data pipeline, for `--epochs` epochs; throughput is train images per
second of the median epoch after the first (the first fills the image cache). Epoch times include the validation
pass in both. The goal is a ratio of at least 0.95: tftransfer's callbacks, checkpoints and logging cost nothing
that matters.

    python benchmarks/phase2_overhead.py [--epochs 4] [--out benchmarks/results/phase2_overhead.json]
"""

from __future__ import annotations

import argparse
import statistics
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
    write_json,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "phase2_overhead.json"


def _config(data: Path, weights: Path, work: Path, epochs: int):
    from tftransfer.config.experiment import load_config

    return load_config(CONFIG, overrides=[
        f"model.weights={weights}", f"data.path={data}", f"runs_dir={work / 'runs'}", "data.image_size=224",
        "phases.head.epochs=0", f"phases.finetune.epochs={epochs}", "phases.finetune.restore_best=false",
        "phases.finetune.warmup_epochs=0", "export.enabled=false", f"runtime.cache_dir={work / 'cache'}"])


def _throughput(epoch_seconds: list[float], examples: int) -> float:
    return examples / statistics.median(epoch_seconds[1:] or epoch_seconds)


def run_tftransfer(data: Path, weights: Path, work: Path, epochs: int) -> dict[str, Any]:
    """fit_phases with a run directory: TensorBoard, per-epoch checkpoints, history, logging all on."""
    from tftransfer.jobs.fit import prepare_experiment
    from tftransfer.runs.layout import create_run_dir
    from tftransfer.training.phases import fit_phases

    exp = prepare_experiment(_config(data, weights, work, epochs))
    run = create_run_dir(exp.cfg.runs_dir, "overhead")
    result = fit_phases(exp.model, exp.cfg, exp.data, exp.blocks, run=run)
    seconds = [row["seconds"] for row in result.history]
    return {"epoch_seconds": seconds, "images_per_second": _throughput(seconds, exp.data.train_examples),
            "val_accuracy": result.history[-1].get("val_accuracy")}


def run_plain(data: Path, weights: Path, work: Path, epochs: int) -> dict[str, Any]:
    """The same model and pipeline, trainable flags set by hand, a bare compile + fit with an epoch timer."""
    import keras

    from tftransfer.jobs.fit import prepare_experiment
    from tftransfer.model.classifier import get_backbone

    exp = prepare_experiment(_config(data, weights, work, epochs))
    model, backbone = exp.model, get_backbone(exp.model)
    top = {name for block in exp.blocks[-2:] for name in block.layer_names}
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = layer.name in top and not isinstance(layer, keras.layers.BatchNormalization)
    model.compile(optimizer=keras.optimizers.Adam(3e-5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

    class Timer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.seconds.append(time.perf_counter() - self._t)

    timer = Timer()
    history = model.fit(exp.data.train, validation_data=exp.data.val, epochs=epochs, callbacks=[timer], verbose=0)
    return {"epoch_seconds": timer.seconds, "images_per_second": _throughput(timer.seconds, exp.data.train_examples),
            "val_accuracy": history.history["val_accuracy"][-1]}


def main(argv: list[str] | None = None) -> int:
    """Runs both (plain first, then tftransfer, then plain again to bracket drift) and saves the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    missing = missing_inputs(args.data, args.weights)
    if missing:
        print("missing inputs:\n  " + "\n  ".join(missing))
        return 2
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tftransfer-phase2-") as tmp:
        work = Path(tmp)
        results["plain_keras_1"] = run_plain(args.data, args.weights, work, args.epochs)
        results["tftransfer"] = run_tftransfer(args.data, args.weights, work, args.epochs)
        results["plain_keras_2"] = run_plain(args.data, args.weights, work, args.epochs)
    plain = statistics.mean([results["plain_keras_1"]["images_per_second"],
                             results["plain_keras_2"]["images_per_second"]])
    ratio = results["tftransfer"]["images_per_second"] / plain
    payload = {"benchmark": "phase2_overhead", "machine": machine_info(),
               "settings": {"image_size": 224, "epochs": args.epochs, "unfrozen_blocks": 2},
               "results": results, "throughput_ratio_tftransfer_vs_plain": ratio}
    write_json(args.out, payload)
    for name, r in results.items():
        print(f"{name:<16}{r['images_per_second']:>8.1f} images/s   epochs {[round(s, 1) for s in r['epoch_seconds']]}")
    print(f"ratio tftransfer / plain (mean of the two plain runs): {ratio:.3f}\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
