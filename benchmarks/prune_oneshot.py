"""One-shot pruning of a finished run, before any fine-tuning: val accuracy of every prune.score x prune.allocation x
prune.min_weights at each sparsity (the measurement that picks the pruning defaults).

    python benchmarks/prune_oneshot.py /tmp/tftransfer_compress_bench/runs/teacher

Prints a table and writes benchmarks/results/prune_oneshot_<run>.json. The images are the run's data folder's `val`
split (class folders named as the run's labels), resized as training resizes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def val_images(run: Path, data: Path) -> tuple[list[str], np.ndarray]:
    """Paths and labels of data/val, in the run's class order."""
    labels = [line for line in (run / "labels.txt").read_text().splitlines() if line.strip()]
    paths, y = [], []
    for index, name in enumerate(labels):
        files = sorted(p for p in (data / "val" / name).iterdir() if p.is_file())
        paths += [str(p) for p in files]
        y += [index] * len(files)
    return paths, np.asarray(y)


def main() -> None:
    import yaml

    from tftransfer.config.experiment import PruneConfig
    from tftransfer.data.files import make_indexed_dataset
    from tftransfer.runs.finished import load_run_model
    from tftransfer.training.pruning import prune_once

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--sparsities", default="0.5,0.75,0.9")
    parser.add_argument("--min-weights", default="0,4096")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    image_size = int(config["data"]["image_size"])
    paths, y = val_images(args.run, Path(config["data"]["path"]))
    model = load_run_model(args.run)
    batches = list(make_indexed_dataset(image_size, 32, paths=paths))
    original = [w.copy() for w in model.get_weights()]

    def accuracy() -> float:
        predicted = np.zeros(len(y), int)
        for index, images in batches:
            predicted[index.numpy()] = np.argmax(model(images, training=False), axis=-1)
        return float(np.mean(predicted == y))

    started, load_before = time.perf_counter(), os.getloadavg()
    rows = [{"sparsity": 0.0, "accuracy": accuracy()}]
    print(f"dense {rows[0]['accuracy']:.4f} on {len(y)} images")
    for sparsity, score, allocation, min_weights in itertools.product(
            [float(v) for v in args.sparsities.split(",")], ("magnitude", "folded"), ("uniform", "global"),
            [int(v) for v in args.min_weights.split(",")]):
        model.set_weights(original)
        cfg = dataclasses.replace(PruneConfig(), target_sparsity=sparsity, score=score, allocation=allocation,
                                  min_weights=min_weights)
        masks = prune_once(model, cfg)
        pruned = sum(int(m.size - np.count_nonzero(m)) for m in masks.values())
        total = sum(int(np.size(w)) for w in original)
        row = {"sparsity": sparsity, "score": score, "allocation": allocation, "min_weights": min_weights,
               "kernels": len(masks), "pruned_weights": pruned, "model_weights": total, "accuracy": accuracy()}
        rows.append(row)
        print(f"{sparsity:.2f} {score:>9} {allocation:>7} min {min_weights:>5}: {row['accuracy']:.4f} "
              f"({len(masks)} kernels, {pruned / total:.1%} of all weights zeroed)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = args.out or ROOT / "benchmarks" / "results" / f"prune_oneshot_{args.run.name}.json"
    out.write_text(json.dumps({"run": str(args.run), "examples": len(y), "rows": rows, "commit": commit,
                               "machine": platform.platform(), "load_average_before": load_before,
                               "load_average_after": os.getloadavg(),
                               "seconds": time.perf_counter() - started}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
