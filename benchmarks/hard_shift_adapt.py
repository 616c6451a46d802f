"""Winning a shift back: every `tftransfer adapt` method, side by side, on hard and near shifts, over seeds.

Source runs: MobileNetV2 alpha 0.5 (real ImageNet weights) at 224 px, head trained on cached features
(`tftransfer fit`, no fine-tuning), one run per seed. Tasks:
- hard: hymenoptera train -> hymenoptera val corrupted at severity 5 (gaussian_noise, defocus_blur, fog, contrast,
  jpeg_compression, pixelate), the labels hidden from adaptation;
- near: Office-31 dslr -> webcam (D->W) and webcam -> dslr (W->D).
For each task and seed, one `adapt_in_memory(method="auto")` gives the target predictions of every candidate
(none = the fitted run unadapted, adabn-aligned, the run's head trained further with source-only / mcc / cdan-e on
aligned features) and the validator's pick; a second call runs SHOT (source-free); ablations: MCC with a new head,
MCC and SHOT without the aligned statistics. Target labels only score the results here, and each
validator's pick is compared with the oracle (the best candidate by target accuracy).

    python benchmarks/hard_shift_adapt.py [--seeds 3] [--tasks hard,near] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"
OFFICE = SHARED / "datasets" / "office31"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "hard_shift_adapt.json"
CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression", "pixelate")
SEVERITY = 5
NEAR = {"D->W": ("dslr", "webcam"), "W->D": ("webcam", "dslr")}


def fit_source(data: Path, name: str, seed: int, work: Path, quick: bool) -> Path:
    """One source run: the head on cached pooled features (30 epochs), 224 px, 256-unit bottleneck."""
    import keras

    from tftransfer.config.experiment import load_config
    from tftransfer.jobs.fit import run_fit

    keras.backend.clear_session()
    values = {"name": f"{name}-s{seed}", "runs_dir": str(work / "runs"), "export.enabled": False,
              "data.path": str(data), "data.image_size": 96 if quick else 224, "data.batch_size": 32,
              "model.backbone": "mobilenetv2", "model.weights": str(WEIGHTS), "model.backbone_kwargs": {"alpha": 0.5},
              "model.bottleneck": 256, "model.dropout": 0.2,
              "phases.head.epochs": 3 if quick else 30, "phases.head.learning_rate": 0.003,
              "phases.finetune.epochs": 0, "runtime.seed": seed, "runtime.cache_dir": str(work / "cache")}
    return run_fit(load_config(values=values)).run_dir


def corrupted(images: np.ndarray, name: str, seed: int) -> np.ndarray:
    """Every image under one corruption at SEVERITY (image i seeded with (seed, i))."""
    from tftransfer.domain.corruptions import corrupt

    return np.stack([corrupt(image, name, SEVERITY, seed=[seed, i]).numpy() for i, image in enumerate(images)])


def score(run: Any, inputs: Any, labels: np.ndarray, seed: int) -> dict[str, Any]:
    """Target accuracy of every candidate, each validator's pick and the oracle's; SHOT separately."""
    from dataclasses import replace

    from tftransfer.evaluation.validators import VALIDATORS, Candidate, choose
    from tftransfer.jobs.adapt import NO_ADAPTATION, adapt_in_memory
    from tftransfer.training.adaptation.feature_head import FeatureRecipe

    recipe = replace(FeatureRecipe(), seed=seed)
    started = time.perf_counter()
    auto = adapt_in_memory(run, inputs, "auto", recipe)
    auto_seconds = time.perf_counter() - started
    started = time.perf_counter()
    source_free = adapt_in_memory(run, inputs, "shot", recipe)
    shot_seconds = time.perf_counter() - started
    probs = {**auto.probs, "shot": source_free.probs["shot"], **ablations(run, inputs, recipe)}
    accuracy = {name: float(np.mean(p.argmax(1) == labels)) for name, p in probs.items()}
    reference = Candidate(NO_ADAPTATION, probs[NO_ADAPTATION])
    pool = [Candidate(n, p) for n, p in auto.probs.items() if n != NO_ADAPTATION]
    picks = {name: choose(pool, reference, name).chosen for name in VALIDATORS if name != "dev"}
    return {"accuracy": accuracy, "auto": auto.method, "auto_accuracy": accuracy[auto.method], "picks": picks,
            "oracle": max(accuracy, key=accuracy.get), "seconds": {"auto": auto_seconds, "shot": shot_seconds}}


def ablations(run: Any, inputs: Any, recipe: Any) -> dict[str, np.ndarray]:
    """Which ingredient matters: MCC with a new head instead of the run's, MCC and SHOT without the aligned
    BatchNorm statistics (target features through the stored, ImageNet, statistics)."""
    from dataclasses import replace

    from tftransfer.domain.adapters import adabn_model
    from tftransfer.evaluation.inference import predict_outputs
    from tftransfer.jobs.adapt import head_of_run
    from tftransfer.model.features import build_feature_extractor
    from tftransfer.training.adaptation.feature_head import shot, train_head

    def features(model: Any, images: np.ndarray) -> np.ndarray:
        return predict_outputs(build_feature_extractor(model), images, 32)

    aligned, _ = adabn_model(run.model, inputs.target, 32, source_moments=inputs.source_moments)
    fs, ft_aligned, ft_plain = (features(run.model, inputs.source_train.images), features(aligned, inputs.target),
                                features(run.model, inputs.target))
    ys, classes = inputs.source_train.labels, len(run.class_names)
    new = train_head("mcc", fs, ys, ft_aligned, classes, replace(recipe, head_init="new")).head
    plain = train_head("mcc", fs, ys, ft_plain, classes, recipe, init=head_of_run(run.model)).head
    plain_shot = head_of_run(run.model)
    shot(plain_shot, ft_plain, recipe)
    return {"mcc (new head)": new.predict(ft_aligned)[1], "mcc (ImageNet BN)": plain.predict(ft_plain)[1],
            "shot (ImageNet BN)": plain_shot.predict(ft_plain)[1]}


def hard_tasks(seed: int, work: Path, quick: bool, max_images: int) -> dict[str, dict[str, Any]]:
    """hymenoptera train -> corrupted val, one entry per corruption."""
    from tftransfer.domain.targets import load_source_split
    from tftransfer.jobs.adapt import Inputs, source_statistics
    from tftransfer.runs.finished import load_run

    run = load_run(fit_source(HYMENOPTERA, "hym", seed, work, quick))
    train = load_source_split(run, "train", batch_size=32, max_images=max_images, seed=seed)
    val = load_source_split(run, "val", batch_size=32, max_images=max_images, seed=seed)
    moments = source_statistics(run, train, 32)
    results = {}
    for name in CORRUPTIONS[:2] if quick else CORRUPTIONS:
        target = corrupted(val.images, name, seed)
        results[f"{name}-{SEVERITY}"] = score(run, Inputs(target, train, None, moments), val.labels, seed)
        print(f"seed {seed} {name}: {json.dumps(results[f'{name}-{SEVERITY}']['accuracy'])}", flush=True)
    return results


def near_tasks(seed: int, work: Path, quick: bool, max_images: int) -> dict[str, dict[str, Any]]:
    """Office-31 D->W and W->D: the source run's training split, every image of the other domain as target."""
    from tftransfer.core.errors import DataError
    from tftransfer.domain.targets import load_labeled_domain, load_source_split
    from tftransfer.jobs.adapt import Inputs, source_statistics
    from tftransfer.runs.finished import load_run

    results = {}
    for task, (source, target) in NEAR.items():
        run = load_run(fit_source(OFFICE / source / "images", f"office-{source}", seed, work, quick))
        train = load_source_split(run, "train", batch_size=32, max_images=max_images, seed=seed)
        try:
            tgt = load_labeled_domain(str(OFFICE / target / "images"), run, held_out=False, batch_size=32,
                                      max_images=max_images, seed=seed, what="target")
        except DataError as exc:
            print(f"{task}: {exc}")
            continue
        moments = source_statistics(run, train, 32)
        results[task] = score(run, Inputs(tgt.images, train, None, moments), tgt.labels, seed)
        print(f"seed {seed} {task}: {json.dumps(results[task]['accuracy'])}", flush=True)
    return results


def summarise(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """mean +- std over seeds of every method's accuracy per task, and of each validator's gap to the oracle."""
    summary: dict[str, Any] = {}
    for task in per_seed[0]:
        runs = [seed[task] for seed in per_seed if task in seed]
        methods = list(runs[0]["accuracy"]) + ["auto"]
        row = {}
        for method in methods:
            values = [r["auto_accuracy"] if method == "auto" else r["accuracy"][method] for r in runs]
            row[method] = {"mean": statistics.mean(values), "std": statistics.pstdev(values) if len(values) > 1
                           else 0.0}
        row["auto_picks"] = [r["auto"] for r in runs]
        row["validator_gap_to_oracle"] = {
            v: statistics.mean(r["accuracy"][r["oracle"]] - r["accuracy"][r["picks"][v]] for r in runs)
            for v in runs[0]["picks"]}
        summary[task] = row
    return summary


TABLE_METHODS = ("none", "adabn-aligned", "source-only", "mcc", "cdan-e", "shot", "auto")
ABLATIONS = ("mcc (new head)", "mcc (ImageNet BN)", "shot (ImageNet BN)")


def markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown tables: accuracy (%) mean +- std per method, ablations, validators' gaps."""
    def cell(row: dict[str, Any], method: str) -> str:
        value = row.get(method)
        return f"{100 * value['mean']:.1f} +- {100 * value['std']:.1f}" if value else "-"

    lines = ["| task | " + " | ".join(TABLE_METHODS) + " | auto picked |",
             "|---|" + "---:|" * len(TABLE_METHODS) + "---|"]
    lines += [f"| {task} | " + " | ".join(cell(row, m) for m in TABLE_METHODS) + f" | {', '.join(row['auto_picks'])} |"
              for task, row in summary.items()]
    lines += ["", "| task | " + " | ".join(ABLATIONS) + " | entropy pick - oracle | SND pick - oracle |",
              "|---|" + "---:|" * (len(ABLATIONS) + 2)]
    lines += [f"| {task} | " + " | ".join(cell(row, m) for m in ABLATIONS) + " | "
              + " | ".join(f"{-100 * row['validator_gap_to_oracle'][v]:.1f}" for v in ("entropy", "snd")) + " |"
              for task, row in summary.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Fit the source runs, adapt with every method, print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default="hard,near")
    parser.add_argument("--quick", action="store_true", help="96 px, few epochs and images: a smoke run")
    parser.add_argument("--max-images", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--table", type=Path, help="only print the Markdown tables of an earlier results file")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(args.table.read_text())["summary"]))
        return 0
    if not WEIGHTS.is_file() or not HYMENOPTERA.is_dir():
        print(f"missing inputs under {SHARED}")
        return 2
    tasks = set(args.tasks.split(","))
    started, load = time.perf_counter(), os.getloadavg()
    per_seed = []
    with tempfile.TemporaryDirectory(prefix="tftransfer-hardshift-") as tmp:
        for seed in range(args.seeds):
            results = {}
            if "hard" in tasks:
                results.update(hard_tasks(seed, Path(tmp), args.quick, 64 if args.quick else args.max_images))
            if "near" in tasks and OFFICE.is_dir():
                results.update(near_tasks(seed, Path(tmp), args.quick, 64 if args.quick else args.max_images))
            per_seed.append(results)
    summary = summarise(per_seed)
    record = {"summary": summary, "per_seed": per_seed, "seeds": args.seeds, "quick": args.quick,
              "seconds": time.perf_counter() - started, "load_average_start": load,
              "load_average_end": os.getloadavg()}
    print(markdown(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
