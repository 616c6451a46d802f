"""Knowledge distillation on real data: a fine-tuned MobileNetV2-0.5 teacher, small students trained by one recipe
with the teacher (`tftransfer distill`) and without it (`--train-baseline`: the same config, distill off), per seed.

    python benchmarks/distill.py --data hymenoptera --students mobilenet-0.25 --seeds 3
    python benchmarks/distill.py --data dslr --students mobilenet-0.25,mobilenetv2-0.35
    python benchmarks/distill.py --data dslr --unlabeled webcam --evaluate-on webcam   # unlabeled images the
        # teacher labels (the deployment domain's), and both students scored there too

Prints a table and writes benchmarks/results/distill_<data>.json. Needs ../shared/data (real weights and images).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = SHARED / "weights"
DATA = {"hymenoptera": SHARED / "datasets" / "hymenoptera",
        "dslr": SHARED / "datasets" / "office31" / "dslr" / "images",
        "webcam": SHARED / "datasets" / "office31" / "webcam" / "images"}
BACKBONES = {  # name -> backbone, constructor arguments, weights file
    "mobilenetv2-0.5": ("mobilenetv2", {"alpha": 0.5},
                        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"),
    "mobilenetv2-0.35": ("mobilenetv2", {"alpha": 0.35},
                         "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"),
    "mobilenet-0.25": ("mobilenet", {"alpha": 0.25}, "mobilenet_2_5_224_tf_no_top.h5"),
}


def recipe(args: argparse.Namespace, work: Path, seed: int) -> dict[str, Any]:
    """One recipe for teacher and students: 30 head epochs on cached features, a short phase 2."""
    return {"data.path": str(DATA[args.data]), "data.image_size": args.image_size, "data.batch_size": 32,
            "data.augment.flip": True, "data.augment.rotation": 0.05, "data.augment.zoom": 0.15,
            "data.augment.contrast": 0.1, "phases.head.epochs": 30, "phases.head.learning_rate": 0.003,
            "phases.finetune.epochs": args.finetune_epochs, "phases.finetune.learning_rate": 3e-5,
            "phases.finetune.restore_best": False, "export.enabled": False, "runtime.seed": seed,
            "runs_dir": str(work / "runs"), "runtime.cache_dir": str(work / "cache")}


def backbone_values(name: str) -> dict[str, Any]:
    backbone, kwargs, weights = BACKBONES[name]
    return {"model.backbone": backbone, "model.backbone_kwargs": kwargs, "model.weights": str(WEIGHTS / weights)}


def train_teacher(args: argparse.Namespace, work: Path) -> Path:
    import tftransfer

    run = work / "runs" / f"teacher_{args.data}"
    if (run / "metrics.json").is_file():
        return run
    values = {**recipe(args, work, 0), **backbone_values("mobilenetv2-0.5"), "name": run.name,
              "phases.finetune.epochs": args.teacher_finetune_epochs}
    return tftransfer.fit(values=values, overwrite=True).run_dir


def one_student(args: argparse.Namespace, work: Path, teacher: Path, student: str, seed: int) -> dict[str, Any]:
    import tftransfer

    backbone, _, _ = BACKBONES[student]
    values = {**recipe(args, work, seed), **backbone_values(student), "name": f"{student}_{args.data}_s{seed}",
              "distill.alpha": args.alpha, "distill.temperature": args.temperature, "distill.views": args.views}
    if args.unlabeled:
        values["distill.unlabeled"] = str(DATA[args.unlabeled])
    started = time.perf_counter()
    result = tftransfer.distill(teacher, backbone, values=values, train_baseline=True, overwrite=True)
    distill = result.metrics["distill"]
    elsewhere = {}
    if args.evaluate_on:
        assert result.baseline is not None
        for key, run in (("distilled", result.fit.run_dir), ("baseline", result.baseline.run_dir)):
            elsewhere[f"{key}_on_{args.evaluate_on}"] = evaluate_on(run, args.evaluate_on)
    return {"student": student, "seed": seed, "distilled": distill["student"]["accuracy"],
            "baseline": distill["baseline"]["accuracy"], "teacher": distill["teacher"]["here"]["accuracy"],
            "agreement_distilled": distill["student"]["agreement_with_teacher"],
            "agreement_baseline": distill["baseline"]["agreement_with_teacher"],
            "kl_distilled": distill["student"]["kl_to_teacher"], "kl_baseline": distill["baseline"]["kl_to_teacher"],
            "seconds_both": time.perf_counter() - started, **elsewhere}


def evaluate_on(run: Path, data: str) -> float:
    """Accuracy of a run's model on every image of another labeled folder (its classes must be the run's)."""
    import tftransfer

    report = tftransfer.evaluate(run, str(DATA[data]), split="all", temperature=False, latency_runs=0,
                                 output=run / "eval" / data, overwrite=True)
    return float(report.metrics["metrics"]["accuracy"])


def summarise(rows: list[dict[str, Any]], student: str) -> dict[str, Any]:
    mine = [r for r in rows if r["student"] == student]
    out: dict[str, Any] = {"student": student, "seeds": len(mine)}
    keys = [k for k in ("distilled", "baseline", "teacher") if k in mine[0]]
    keys += [k for k in mine[0] if "_on_" in k]
    for key in keys:
        values = [r[key] for r in mine]
        out[key] = statistics.mean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    gains = [r["distilled"] - r["baseline"] for r in mine]
    out["gain"], out["gain_std"] = statistics.mean(gains), statistics.stdev(gains) if len(gains) > 1 else 0.0
    far = [k for k in mine[0] if k.startswith("distilled_on_")]
    for key in far:  # the gain where the unlabeled images came from
        other = key.replace("distilled_", "baseline_")
        gains = [r[key] - r[other] for r in mine]
        out[f"gain{key[len('distilled'):]}"] = statistics.mean(gains)
        out[f"gain{key[len('distilled'):]}_std"] = statistics.stdev(gains) if len(gains) > 1 else 0.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=list(DATA), default="hymenoptera")
    parser.add_argument("--students", default="mobilenet-0.25")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--teacher-finetune-epochs", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--unlabeled", choices=list(DATA), default=None,
                        help="a folder whose images (labels unused) the teacher labels for the student")
    parser.add_argument("--evaluate-on", choices=list(DATA), default=None,
                        help="also score the teacher and both students on every image of this labeled folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tftransfer_distill_bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    suffix = f"_unlabeled_{args.unlabeled}" if args.unlabeled else ""
    out = args.out or ROOT / "benchmarks" / "results" / f"distill_{args.data}{suffix}.json"
    started = time.perf_counter()
    teacher = train_teacher(args, args.work)
    rows = []
    for student in args.students.split(","):
        for seed in range(args.seeds):
            rows.append(one_student(args, args.work, teacher, student, seed))
            print(json.dumps(rows[-1]), flush=True)
    summary = [summarise(rows, s) for s in args.students.split(",")]
    teacher_elsewhere = {f"teacher_on_{args.evaluate_on}": evaluate_on(teacher, args.evaluate_on)} \
        if args.evaluate_on else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    payload = {"data": args.data, "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
               "summary": summary, "teacher_run": str(teacher), **teacher_elsewhere, "commit": commit,
               "machine": platform.platform(),
               "cpus": os.cpu_count(), "load_average": os.getloadavg(), "seconds": time.perf_counter() - started}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"\n{'student':<18} {'distilled':>16} {'no teacher':>16} {'gain':>14} {'teacher':>8}")
    for s in summary:
        print(f"{s['student']:<18} {s['distilled']:>9.1%} +- {s['distilled_std']:.1%} {s['baseline']:>9.1%} +- "
              f"{s['baseline_std']:.1%} {100 * s['gain']:>+7.1f} +- {100 * s['gain_std']:.1f} {s['teacher']:>8.1%}")
    for s in summary:
        for key in [k for k in s if k.startswith("gain_on_") and not k.endswith("_std")]:
            place = key[len("gain_on_"):]
            print(f"{s['student']:<18} on {place}: distilled {s[f'distilled_on_{place}']:.1%}, no teacher "
                  f"{s[f'baseline_on_{place}']:.1%}, gain {100 * s[key]:+.1f} +- {100 * s[key + '_std']:.1f}, "
                  f"teacher {teacher_elsewhere[f'teacher_on_{place}']:.1%}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
