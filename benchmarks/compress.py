"""Compression on real data: a fine-tuned MobileNetV2-0.5 teacher against a distilled MobileNet-0.25 student in
TFLite (float32 and full-integer int8 with uint8 I/O), and the teacher pruned at 50, 75 and 90% sparsity (by
default from its fine-tuned backbone, distilled from the unpruned teacher while phase 2 prunes the whole backbone),
all scored by `tftransfer compress-report` on the same validation split.

    python benchmarks/compress.py train                                   # the runs (minutes; no timing)
    flock -x /tmp/tftransfer-cpu.lock python benchmarks/compress.py measure   # the report, CPU to itself

Prints a table and writes benchmarks/results/compress_<data>.json. Needs ../shared/data (real weights and images).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = SHARED / "weights"
DATA = {"hymenoptera": SHARED / "datasets" / "hymenoptera"}
TEACHER = ("mobilenetv2", {"alpha": 0.5}, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5")
STUDENT = ("mobilenet", {"alpha": 0.25}, "mobilenet_2_5_224_tf_no_top.h5")


def recipe(args: argparse.Namespace, backbone: tuple[str, dict, str]) -> dict[str, Any]:
    """One recipe for every run: 30 head epochs on cached features, then the whole backbone fine-tuned (so
    pruning reaches every convolution); seed 0."""
    name, kwargs, weights = backbone
    return {"data.path": str(DATA[args.data]), "data.image_size": args.image_size, "data.batch_size": 32,
            "data.augment.flip": True, "data.augment.rotation": 0.05, "data.augment.zoom": 0.15,
            "phases.head.epochs": 30, "phases.head.learning_rate": 0.003,
            "phases.finetune.epochs": args.finetune_epochs, "phases.finetune.learning_rate": args.finetune_lr,
            "phases.finetune.unfreeze_blocks": 1000, "phases.finetune.restore_best": False,
            "export.enabled": False, "runtime.seed": 0, "runs_dir": str(args.work / "runs"),
            "runtime.cache_dir": str(args.work / "cache"), "model.backbone": name, "model.backbone_kwargs": kwargs,
            "model.weights": str(WEIGHTS / weights)}


def _done(run: Path) -> bool:
    return (run / "metrics.json").is_file()


def teacher_backbone_weights(teacher: Path) -> Path:
    """The fine-tuned teacher's backbone weights as a .weights.h5 file (model.weights of the pruned runs, so they
    start from the fine-tuned model, not from ImageNet)."""
    from tftransfer.model.layers import InferenceBackbone
    from tftransfer.runs.finished import load_run_model

    out = teacher / "backbone.weights.h5"
    if not out.is_file():
        wrapped = [layer for layer in load_run_model(teacher).layers if isinstance(layer, InferenceBackbone)]
        wrapped[0].backbone.save_weights(str(out))
    return out


def pruned_values(args: argparse.Namespace, teacher: Path, sparsity: float, name: str) -> dict[str, Any]:
    """The pruning recipe: `short` prunes the teacher's recipe from ImageNet weights; `distill` starts from the
    fine-tuned teacher's backbone, prunes the whole backbone during phase 2 with the unpruned teacher's soft targets,
    for --prune-epochs at --prune-lr."""
    values = {**recipe(args, TEACHER), "name": name, "runtime.seed": args.seed, "prune.target_sparsity": sparsity,
              "prune.end_fraction": args.prune_end, "prune.allocation": args.allocation, "prune.score": args.score,
              "prune.min_weights": args.min_weights}
    if args.prune_recipe == "distill":
        values.update({"model.weights": str(teacher_backbone_weights(teacher)), "distill.alpha": args.prune_alpha,
                       "distill.temperature": 4.0, "phases.finetune.epochs": args.prune_epochs,
                       "phases.finetune.learning_rate": args.prune_lr})
    return values


def pruned_name(args: argparse.Namespace, sparsity: float) -> str:
    """The run name of one pruned model (seed 0 keeps the plain name)."""
    return f"pruned_{round(100 * sparsity)}" + (f"_seed{args.seed}" if args.seed else "") + args.tag


def train(args: argparse.Namespace) -> None:
    """The teacher, the distilled student and the pruned teachers (each skipped when already finished)."""
    import tftransfer

    runs = args.work / "runs"
    teacher = runs / "teacher"
    if not _done(teacher):
        tftransfer.fit(values={**recipe(args, TEACHER), "name": "teacher"}, overwrite=True)
    if args.student and not _done(runs / "student"):
        values = {**recipe(args, STUDENT), "name": "student", "distill.alpha": 0.7, "distill.temperature": 4.0}
        tftransfer.distill(teacher, STUDENT[0], values=values, overwrite=True)
    for sparsity in args.sparsities:
        name = pruned_name(args, sparsity)
        if _done(runs / name):
            continue
        values = pruned_values(args, teacher, sparsity, name)
        if args.prune_recipe == "distill":
            tftransfer.distill(teacher, TEACHER[0], values=values, overwrite=True)
        else:
            tftransfer.fit(values=values, overwrite=True)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """compress-report over every run (Keras, TFLite float32 and int8-uint8), and the figures the issue asks."""
    import tftransfer

    runs = args.work / "runs"
    names = ["teacher", *(["student"] if args.student else []), *(pruned_name(args, s) for s in args.sparsities)]
    load_before = os.getloadavg()
    started = time.perf_counter()
    report = tftransfer.compress_report([runs / n for n in names], tflite=("float32", "int8-uint8"),
                                        output=args.work / "report", latency_runs=args.latency_runs).report
    rows = {row["name"]: row for row in report["models"]}
    teacher_f32 = rows["teacher tflite float32"]
    pruning = [{"sparsity_target": s, "accuracy": rows[f"{pruned_name(args, s)} tflite float32"]["accuracy"],
                "keras_accuracy": rows[pruned_name(args, s)]["accuracy"],
                "nonzero_fraction": rows[f"{pruned_name(args, s)} tflite float32"]["nonzero_parameters"]
                / rows[f"{pruned_name(args, s)} tflite float32"]["parameters"],
                "gzip_bytes": rows[f"{pruned_name(args, s)} tflite float32"]["gzip_bytes"],
                "latency_batch1_ms": rows[f"{pruned_name(args, s)} tflite float32"]["latency_batch1_ms"],
                "int8_accuracy": rows[f"{pruned_name(args, s)} tflite int8-uint8"]["accuracy"]}
               for s in args.sparsities]
    pruning.insert(0, {"sparsity_target": 0.0, "accuracy": teacher_f32["accuracy"],
                       "nonzero_fraction": teacher_f32["nonzero_parameters"] / teacher_f32["parameters"],
                       "gzip_bytes": teacher_f32["gzip_bytes"], "latency_batch1_ms": teacher_f32["latency_batch1_ms"],
                       "int8_accuracy": rows["teacher tflite int8-uint8"]["accuracy"]})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    student: dict[str, Any] = {}
    if args.student:
        student_f32, student_u8 = rows["student tflite float32"], rows["student tflite int8-uint8"]
        student = {"speedup_int8_student_vs_float_teacher_batch1":
                   teacher_f32["latency_batch1_ms"] / student_u8["latency_batch1_ms"],
                   "student_int8_uint8_batch1_ms": student_u8["latency_batch1_ms"],
                   "student_float_accuracy": student_f32["accuracy"],
                   "student_int8_uint8_accuracy": student_u8["accuracy"],
                   "student_int8_accuracy_delta": student_u8["accuracy"] - student_f32["accuracy"]}
    return {"data": args.data, "image_size": args.image_size, "examples": report["examples"], **student,
            "teacher_float_batch1_ms": teacher_f32["latency_batch1_ms"],
            "teacher_float_accuracy": teacher_f32["accuracy"], "pruning": pruning, "report": report,
            "settings": {k: str(v) for k, v in vars(args).items()}, "commit": commit,
            "machine": platform.platform(), "cpus": os.cpu_count(), "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "seconds": time.perf_counter() - started}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("train", "measure"))
    parser.add_argument("--data", choices=list(DATA), default="hymenoptera")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--sparsities", type=lambda text: tuple(float(v) for v in text.split(",")),
                        default=(0.5, 0.75, 0.9))
    parser.add_argument("--student", action=argparse.BooleanOptionalAction, default=True,
                        help="Train and measure the distilled MobileNet-0.25 student.")
    parser.add_argument("--prune-recipe", choices=("distill", "short"), default="distill",
                        help="distill: from the fine-tuned teacher's backbone with its soft targets; short: the "
                             "teacher's recipe from ImageNet weights")
    parser.add_argument("--prune-epochs", type=int, default=12)
    parser.add_argument("--prune-lr", type=float, default=3e-4)
    parser.add_argument("--prune-end", type=float, default=0.6, help="prune.end_fraction")
    parser.add_argument("--prune-alpha", type=float, default=0.7, help="distill.alpha of the distill recipe")
    parser.add_argument("--allocation", default="global", help="prune.allocation (measured best: global)")
    parser.add_argument("--score", default="magnitude", help="prune.score (measured best with global: magnitude)")
    parser.add_argument("--min-weights", type=int, default=4096)
    parser.add_argument("--tag", default="", help="suffix of the pruned runs' names (an ablation beside them)")
    parser.add_argument("--seed", type=int, default=0, help="runtime.seed of the pruned runs")
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tftransfer_compress_bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.step == "train":
        train(args)
        return
    payload = measure(args)
    out = args.out or ROOT / "benchmarks" / "results" / f"compress_{args.data}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"{payload['examples']} val images, load {payload['load_average_before'][0]:.2f}")
    if args.student:
        speedup = payload["speedup_int8_student_vs_float_teacher_batch1"]
        print(f"teacher float TFLite batch 1 {payload['teacher_float_batch1_ms']:.2f} ms, student int8-uint8 "
              f"{payload['student_int8_uint8_batch1_ms']:.2f} ms: {speedup:.2f}x")
        delta = 100 * payload["student_int8_accuracy_delta"]
        print(f"student accuracy float {payload['student_float_accuracy']:.4f}, int8-uint8 "
              f"{payload['student_int8_uint8_accuracy']:.4f} (delta {delta:+.1f} points); teacher float "
              f"{payload['teacher_float_accuracy']:.4f}")
    print(f"{'sparsity':>8} {'accuracy':>9} {'int8 acc':>9} {'nonzero':>8} {'gzip KiB':>9} {'batch 1 ms':>10}")
    for row in payload["pruning"]:
        print(f"{row['sparsity_target']:>8.0%} {row['accuracy']:>9.4f} {row['int8_accuracy']:>9.4f} "
              f"{row['nonzero_fraction']:>8.1%} {row['gzip_bytes'] / 1024:>9,.0f} {row['latency_batch1_ms']:>10.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
