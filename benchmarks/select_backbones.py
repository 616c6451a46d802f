"""`tftransfer select` on real data: the offline candidates (MobileNet-0.25, MobileNetV2-0.35, MobileNetV2-0.5 with
their real ImageNet weights from ../shared/data/weights) at several input sizes, plus a random-weights sanity
candidate, on hymenoptera (or any labelled folder: `--data ../shared/data/datasets/office31/dslr/images`, split
as the config's data.val_split says when it has no val/ folder).

It runs select twice with one fresh feature cache: **cold** (every feature computed) and **warm** (every feature
read back), and records both wall times, the ranking and the load average. With `--finetune` it then fits every
candidate with one recipe (configs/mobilenetv2_hymenoptera.yaml with the candidate's backbone, weights and size;
`--head-epochs`, `--finetune-epochs`) as the ground truth, and reports Kendall's tau between each score and the
fine-tuned validation accuracy, and whether each score's top-1 pick is within 1 point of the best fine-tuned one.
Phase 1 of those fits reads the features select cached (select uses the same config's split and seed).

    python benchmarks/select_backbones.py [--sizes 96,128,160,224] [--max-images 0] [--finetune]
        [--head-epochs 10] [--finetune-epochs 2] [--data DIR] [--out benchmarks/results/select_backbones.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hymenoptera_two_phase import (  # noqa: E402
    CONFIG,
    DEFAULT_DATA,
    SHARED,
    load_average,
    machine_info,
    show_progress_logs,
    write_json,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "select_backbones.json"
WEIGHTS = SHARED / "weights"
# backbone, constructor arguments, weights file: the candidates whose real weights are available offline
FAMILIES = [
    ("mobilenet", {"alpha": 0.25}, "mobilenet_2_5_224_tf_no_top.h5"),
    ("mobilenetv2", {"alpha": 0.35}, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"),
    ("mobilenetv2", {"alpha": 0.5}, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"),
]
SCORE_KEYS = ("logme", "h_score", "probe_accuracy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sizes", default="96,128,160,224", help="input sizes, comma-separated")
    parser.add_argument("--max-images", type=int, default=0, help="select's --max-images (0: all)")
    parser.add_argument("--no-random", action="store_true", help="leave out the random-weights sanity candidate")
    parser.add_argument("--finetune", action="store_true", help="also fine-tune every candidate (ground truth)")
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="keep the runs and the cache here (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def candidates(sizes: list[int], random_sanity: bool) -> list[dict[str, Any]]:
    found = [{"backbone": b, "backbone_kwargs": kw, "weights": str(WEIGHTS / f), "image_size": s}
             for b, kw, f in FAMILIES for s in sizes]
    if random_sanity:  # a backbone that knows nothing: every score should put it last
        found.append({"backbone": "mobilenetv2", "backbone_kwargs": {"alpha": 0.35}, "weights": "none",
                      "image_size": min(sizes)})
    return found


def timed_select(work: Path, data: Path, entries: list[dict[str, Any]], name: str, max_images: int) -> dict:
    from tftransfer.jobs.select import run_select

    load = load_average()
    started = time.perf_counter()
    result = run_select(str(data), entries, name=name, runs_dir=work / "runs", fit_config=CONFIG,
                        cache_dir=str(work / "cache"), max_images=max_images)
    return {"seconds": time.perf_counter() - started, "load_average_before": load, "load_average_after":
            load_average(), "run_dir": str(result.run_dir), "recommendation": result.recommendation,
            "candidates": result.candidates}


def finetune(work: Path, data: Path, entry: dict[str, Any], head_epochs: int, finetune_epochs: int) -> dict:
    from tftransfer.config.experiment import load_config
    from tftransfer.jobs.fit import run_fit

    label = (f"{entry['backbone']}-{entry['backbone_kwargs'].get('alpha')}-{entry['image_size']}-"
             f"{'random' if entry['weights'] == 'none' else 'imagenet'}")
    cfg = load_config(CONFIG, values={
        "data.path": str(data), "model.backbone": entry["backbone"], "model.weights": entry["weights"],
        "model.backbone_kwargs": entry["backbone_kwargs"], "data.image_size": entry["image_size"],
        "phases.head.epochs": head_epochs, "phases.finetune.epochs": finetune_epochs, "export.enabled": False,
        "runs_dir": str(work / "runs"), "name": f"ft-{label}", "runtime.cache_dir": str(work / "cache")})
    cached = set((work / "cache" / "features").iterdir())
    started = time.perf_counter()
    metrics = run_fit(cfg).metrics
    return {"label": label, "val_accuracy": metrics["final"]["val"]["accuracy"],
            "seconds": time.perf_counter() - started,
            # phase 1 read select's features when the fit wrote no new feature file
            "head_features_from_select_cache": set((work / "cache" / "features").iterdir()) == cached}


def agreement(scored: list[dict[str, Any]], truth: list[float]) -> dict[str, Any]:
    """Kendall's tau of each score against the fine-tuned accuracy; is each score's pick within 1 point of best."""
    from scipy.stats import kendalltau

    best = max(truth)
    found = {}
    for key in SCORE_KEYS:
        values = [c[key] for c in scored]
        tau = kendalltau(values, truth).statistic
        pick = max(range(len(values)), key=lambda i: values[i])
        found[key] = {"kendall_tau": float(tau), "pick_accuracy": truth[pick], "best_accuracy": best,
                      "pick_within_1_point": bool(best - truth[pick] <= 0.01)}
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    missing = [str(p) for p in [args.data, *(WEIGHTS / f for _, _, f in FAMILIES)] if not p.exists()]
    if missing:
        print("missing: " + ", ".join(missing), file=sys.stderr)
        return 2
    show_progress_logs()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="select-bench-"))
    entries = candidates(sizes, not args.no_random)
    payload: dict[str, Any] = {"machine": machine_info(), "data": str(args.data), "sizes": sizes,
                               "max_images": args.max_images, "candidates": len(entries)}
    try:
        payload["cold"] = timed_select(work, args.data, entries, "select-cold", args.max_images)
        payload["warm"] = timed_select(work, args.data, entries, "select-warm", args.max_images)
        print(f"select over {len(entries)} candidates: cold {payload['cold']['seconds']:.1f} s, warm "
              f"{payload['warm']['seconds']:.1f} s; load {payload['cold']['load_average_before']}")
        write_json(args.out, payload)  # kept if the fine-tuning below is interrupted
        if args.finetune:
            scored = [c for c in payload["cold"]["candidates"] if c.get("rank")]
            runs = [finetune(work, args.data, c, args.head_epochs, args.finetune_epochs) for c in scored]
            for c, r in zip(scored, runs):
                r.update({k: c[k] for k in SCORE_KEYS})
            payload["finetune"] = {"head_epochs": args.head_epochs, "finetune_epochs": args.finetune_epochs,
                                   "runs": runs, "load_average_after": load_average(),
                                   "agreement": agreement(scored, [r["val_accuracy"] for r in runs])}
        write_json(args.out, payload)
        print(f"results: {args.out}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
