"""Two-phase fine-tuning of MobileNetV2 (alpha 0.5) on hymenoptera: the plain Keras guide recipe vs tftransfer.

Runs the variants in one process, one after the other (`--variants`, in that order), for each seed (`--seeds`),
and reports per-phase wall time, validation accuracy after each phase, total wall time and final validation
accuracy, as a table and as JSON. The variants: the Keras guide recipe, tftransfer with phase 2's activation cache
off, and tftransfer with it on.

    python benchmarks/hymenoptera_two_phase.py            # full run: 10 + 10 epochs each (minutes of CPU)
    python benchmarks/hymenoptera_two_phase.py --seeds 1,2,3 --out benchmarks/results/hymenoptera_two_phase_3seeds.json
    python benchmarks/hymenoptera_two_phase.py --quick    # smoke check: 1 + 1 epochs at 96 px
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_DATA = SHARED / "datasets" / "hymenoptera"
DEFAULT_WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
CONFIG = REPO / "configs" / "mobilenetv2_hymenoptera.yaml"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "hymenoptera_two_phase.json"
# Each variant: the approach that runs it, and (tftransfer) the config overrides that make it that variant.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "keras": ("keras", ()),
    "tftransfer-cache-off": ("tftransfer", ("phases.finetune.activation_cache=off",)),
    "tftransfer-cache-on": ("tftransfer", ("phases.finetune.activation_cache=on",)),
    # half the trunk passes (view compute is most of phase 2 on the cache); accuracy to be checked over seeds
    "tftransfer-cache-on-2views": ("tftransfer", ("phases.finetune.activation_cache=on",
                                                  "phases.finetune.activation_cache_views=2")),
    # the default (auto), as a user gets it
    "tftransfer": ("tftransfer", ()),
}
DEFAULT_VARIANTS = "keras,tftransfer-cache-off,tftransfer-cache-on"

# The guide's recipe, fixed here rather than exposed: the baseline is only useful if it stays the guide's.
GUIDE = {"image_size": 224, "batch_size": 32, "head_learning_rate": 1e-3, "finetune_learning_rate": 1e-5,
         "dropout": 0.2, "augment": {"flip": "horizontal", "rotation": 0.1}, "unfreeze": "whole base",
         "alpha": 0.5, "default_epochs": 10}
QUICK_IMAGE_SIZE = 96


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; epochs default to None so an explicit value can be told from the default."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="hymenoptera folder with train/ and val/")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="MobileNetV2 alpha 0.5 no-top .h5 file")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON results are written")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated variants, in run order; of {', '.join(VARIANTS)}")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra tftransfer config override for every tftransfer variant (repeatable)")
    p.add_argument("--head-epochs", type=int, default=None,
                   help="phase 1 epochs (keras default 10; tftransfer keeps its config's value unless given)")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="phase 2 epochs (keras default 10; tftransfer keeps its config's value unless given)")
    p.add_argument("--seeds", default="42", help="comma-separated seeds; every variant runs once per seed "
                                                 "(keras.utils.set_random_seed before each run)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke mode: 1 epoch per phase, {QUICK_IMAGE_SIZE} px images (not a benchmark)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep tftransfer's run and export folders here (default: a temporary folder, deleted)")
    args = p.parse_args(argv)
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown or not args.variants or len(set(args.variants)) != len(args.variants):
        p.error(f"--variants: each of {', '.join(VARIANTS)} at most once (got {', '.join(args.variants)})")
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError:
        p.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    for flag in ("head_epochs", "finetune_epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def missing_inputs(data: Path, weights: Path) -> list[str]:
    """What the benchmark needs but cannot find (checked before TensorFlow is imported: it is slow to load)."""
    missing = [str(data / split) for split in ("train", "val") if not (data / split).is_dir()]
    if not weights.is_file():
        missing.append(str(weights))
    return missing


def machine_info() -> dict[str, Any]:
    """Where the figures were measured; CPU count and load matter because the machine may be shared."""
    import keras
    import tensorflow as tf

    import tftransfer

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        cpu_model = platform.processor()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "devices": [{"name": d.name, "device_type": d.device_type} for d in tf.config.list_physical_devices()],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tftransfer": tftransfer.__version__,
        "commit": _git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _git_commit() -> str | None:
    """The checkout's commit (with "+dirty" for uncommitted changes), so a figure names the code it measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def load_average() -> list[float] | None:
    """1/5/15-minute load average, recorded per approach to spot CPU contention from other processes."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


# ---------------------------------------------------------------------------------------------------------------
# Approach 1: the Keras transfer-learning guide, verbatim in spirit


def run_keras_guide(data: Path, weights: Path, image_size: int, head_epochs: int, finetune_epochs: int,
                    seed: int) -> dict[str, Any]:
    """The keras.io recipe: frozen base + new head, then the whole base unfrozen at Adam(1e-5)."""
    import keras

    started = time.perf_counter()
    batch_size = GUIDE["batch_size"]
    size = (image_size, image_size)
    # The loader lists .gif among its formats, so train/ants/imageNotFound.gif is loaded as an "ant" like any photo.
    train_ds = keras.utils.image_dataset_from_directory(data / "train", image_size=size, batch_size=batch_size,
                                                        label_mode="int", seed=seed)
    # No shuffle for validation: evaluation order does not matter and shuffling costs time.
    val_ds = keras.utils.image_dataset_from_directory(data / "val", image_size=size, batch_size=batch_size,
                                                      label_mode="int", shuffle=False)
    train_examples, val_examples = len(train_ds.file_paths), len(val_ds.file_paths)
    class_names = list(train_ds.class_names)
    train_ds = train_ds.cache().prefetch(buffer_size=16)
    val_ds = val_ds.cache().prefetch(buffer_size=16)

    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)],
                                    name="augmentation")
    base = keras.applications.MobileNetV2(alpha=GUIDE["alpha"], include_top=False, weights=str(weights),
                                          input_shape=(image_size, image_size, 3))
    base.trainable = False
    inputs = keras.Input(shape=(image_size, image_size, 3))
    x = augmentation(inputs)
    # mobilenet_v2.preprocess_input maps [0, 255] to [-1, 1]; as a layer it stays inside the model.
    x = keras.layers.Rescaling(scale=1 / 127.5, offset=-1)(x)
    # The guide's training=False: in Keras 3 this does NOT keep BatchNorm in inference mode once base.trainable
    # is True and the outer model is trained with fit (see benchmarks/README.md); kept as the guide writes it.
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(GUIDE["dropout"])(x)
    outputs = keras.layers.Dense(len(class_names))(x)
    model = keras.Model(inputs, outputs)

    def compile_at(learning_rate: float) -> None:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])

    phases = []
    plan = [("head", GUIDE["head_learning_rate"], head_epochs, False),
            ("finetune", GUIDE["finetune_learning_rate"], finetune_epochs, True)]
    for name, learning_rate, epochs, base_trainable in plan:
        base.trainable = base_trainable
        compile_at(learning_rate)  # recompile: trainable flags are read at compile time
        trainable = sum(int(keras.ops.size(w)) for w in model.trainable_weights)
        print(f"[keras] phase {name}: {epochs} epochs, Adam({learning_rate:g}), {trainable:,} trainable params",
              flush=True)
        t0 = time.perf_counter()
        model.fit(train_ds, epochs=epochs, validation_data=val_ds, verbose=2)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        val = model.evaluate(val_ds, verbose=0, return_dict=True)
        phases.append({"name": name, "epochs_run": epochs, "learning_rate": learning_rate,
                       "trainable_params": trainable, "seconds": seconds,
                       "eval_seconds": time.perf_counter() - t0,
                       "val_accuracy": float(val["accuracy"]), "val_loss": float(val["loss"])})
    total = time.perf_counter() - started
    return {
        "settings": {**GUIDE, "image_size": image_size, "head_epochs": head_epochs,
                     "finetune_epochs": finetune_epochs, "seed": seed, "weights": str(weights),
                     "train_examples": train_examples, "val_examples": val_examples, "class_names": class_names},
        "phases": phases,
        "total_seconds": total,
        "other_seconds": total - sum(p["seconds"] for p in phases),
        "final_val_accuracy": phases[-1]["val_accuracy"],
    }


# ---------------------------------------------------------------------------------------------------------------
# Approach 2: tftransfer's run_fit, called as a library


def run_tftransfer(data: Path, weights: Path, workdir: Path, head_epochs: int | None, finetune_epochs: int | None,
                   seed: int, quick: bool, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """tftransfer's `fit` job on configs/mobilenetv2_hymenoptera.yaml; the config's epochs unless overridden."""
    from tftransfer.config.experiment import config_to_dict, load_config
    from tftransfer.jobs.fit import run_fit

    started = time.perf_counter()
    overrides = [f"model.weights={weights}", f"data.path={data}", f"runs_dir={workdir / 'runs'}",
                 f"export.dir={workdir / 'saved_models'}", "name=bench", f"runtime.seed={seed}",
                 # a cold feature cache: the timing must include computing the features
                 f"runtime.cache_dir={workdir / 'cache'}"]
    if head_epochs is not None:
        overrides.append(f"phases.head.epochs={head_epochs}")
    if finetune_epochs is not None:
        overrides.append(f"phases.finetune.epochs={finetune_epochs}")
    if quick:
        overrides.append(f"data.image_size={QUICK_IMAGE_SIZE}")
    overrides += list(extra)
    cfg = load_config(CONFIG, overrides=overrides)
    print(f"[tftransfer] phases: head {cfg.phases.head.epochs} epochs, finetune {cfg.phases.finetune.epochs} "
          f"epochs (top {cfg.phases.finetune.unfreeze_blocks} blocks)", flush=True)
    result = run_fit(cfg)
    total = time.perf_counter() - started
    metrics = result.metrics
    phases = [{"name": p["name"], "epochs_run": p["epochs_run"], "best_epoch": p["best_epoch"],
               "learning_rate": p["learning_rate"], "trainable_params": p["trainable_params"],
               "unfrozen_blocks": p["unfrozen_blocks"], "seconds": p["seconds"],
               "activation_cache": p.get("activation_cache"),
               "eval_seconds": (p["val"] or {}).get("seconds"),
               "val_accuracy": (p["val"] or {}).get("accuracy"), "val_log_loss": (p["val"] or {}).get("log_loss")}
              for p in metrics["phases"]]
    final_val = metrics["final"]["val"] or {}
    resolved = config_to_dict(cfg)
    return {
        "settings": {"config": str(CONFIG.relative_to(REPO)), "overrides": overrides,
                     "image_size": metrics["run"]["image_size"], "head_epochs": cfg.phases.head.epochs,
                     "finetune_epochs": cfg.phases.finetune.epochs, "seed": seed,
                     "phases": resolved["phases"], "augment": resolved["data"]["augment"],
                     "train_examples": metrics["run"]["train_examples"],
                     "val_examples": metrics["run"]["val_examples"],
                     "skipped_files": metrics["run"]["skipped_files"], "runtime": metrics["run"]["runtime"]},
        "phases": phases,
        "total_seconds": total,
        "library_total_seconds": metrics["timings"]["total_seconds"],
        # Everything that is not a phase's fit: data listing and checking, evaluation, model save, plots, export.
        "other_seconds": total - sum(p["seconds"] for p in phases),
        "final_val_accuracy": final_val.get("accuracy"),
        "export": metrics["export"],
        "run_dir": str(result.run_dir),
    }


# ---------------------------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(runs: list[dict[str, Any]]) -> None:
    """One row per run: seconds and val accuracy per phase, other and total seconds, final val accuracy."""
    header = ["variant", "seed", "head s", "head acc", "finetune s", "finetune acc", "other s", "total s",
              "final acc"]
    rows = []
    for res in runs:
        if "error" in res:
            rows.append([res["variant"], str(res["seed"]), "error: " + res["error"].splitlines()[-1]])
            continue
        by_phase = {p["name"]: p for p in res["phases"]}
        row = [res["variant"], str(res["seed"])]
        for phase in ("head", "finetune"):
            p = by_phase.get(phase, {})
            row += [_fmt(p.get("seconds"), ".1f"), _fmt(p.get("val_accuracy"), ".4f")]
        row += [_fmt(res["other_seconds"], ".1f"), _fmt(res["total_seconds"], ".1f"),
                _fmt(res["final_val_accuracy"], ".4f")]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header] + rows if i < len(r)) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(widths[i]) if i < len(widths) else str(cell) for i, cell in enumerate(row)))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant over its seeds: mean seconds (per phase and total), mean final accuracy, and the speed-ups
    against the Keras guide and against tftransfer with the activation cache off, each over the same seeds."""
    ok = [r for r in runs if "error" not in r]
    summary: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in ok):
        mine = [r for r in ok if r["variant"] == variant]
        phase_seconds = {name: _mean([p["seconds"] for r in mine for p in r["phases"] if p["name"] == name])
                         for name in ("head", "finetune")}
        entry: dict[str, Any] = {
            "seeds": [r["seed"] for r in mine], "total_seconds": _mean([r["total_seconds"] for r in mine]),
            "phase_seconds": phase_seconds, "other_seconds": _mean([r["other_seconds"] for r in mine]),
            "final_val_accuracy": _mean([r["final_val_accuracy"] for r in mine]),
            "final_val_accuracy_min": min(r["final_val_accuracy"] for r in mine)}
        for base in ("keras", "tftransfer-cache-off"):
            pairs = [(b, r) for r in mine for b in ok if b["variant"] == base and b["seed"] == r["seed"]]
            if base != variant and pairs:
                entry[f"speedup_vs_{base}"] = _mean([b["total_seconds"] / r["total_seconds"] for b, r in pairs])
                finetune = [(_phase(b, "finetune"), _phase(r, "finetune")) for b, r in pairs]
                finetune = [(b, r) for b, r in finetune if b and r]
                if finetune:
                    entry[f"finetune_speedup_vs_{base}"] = _mean([b / r for b, r in finetune])
        summary[variant] = entry
    return summary


def _phase(res: dict[str, Any], name: str) -> float | None:
    return next((p["seconds"] for p in res["phases"] if p["name"] == name), None)


def print_summary(summary: dict[str, Any]) -> None:
    """The per-variant means and speed-ups."""
    for variant, entry in summary.items():
        ratios = ", ".join(f"{key.replace('_', ' ')} {value:.2f}x" for key, value in entry.items()
                           if "speedup" in key)
        print(f"{variant}: seeds {entry['seeds']}, total {_fmt(entry['total_seconds'], '.1f')} s, finetune "
              f"{_fmt(entry['phase_seconds']['finetune'], '.1f')} s, final acc mean "
              f"{_fmt(entry['final_val_accuracy'], '.4f')} (min {_fmt(entry['final_val_accuracy_min'], '.4f')})"
              f"{'; ' + ratios if ratios else ''}")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes via a .tmp file and a rename, so an interrupted run never leaves half a JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def show_progress_logs() -> None:
    """Prints tftransfer's progress lines like the CLI does and silences a Keras warning that is noise here."""
    import logging
    import warnings

    # run_fit reports progress through the "tftransfer" logger.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[tftransfer] %(message)s"))
    logging.getLogger("tftransfer").addHandler(handler)
    logging.getLogger("tftransfer").setLevel(logging.INFO)
    # TensorFlow's export code installs a root handler mid-run; without this every line would print twice.
    logging.getLogger("tftransfer").propagate = False
    # Keras 3.15 warns on every fit(tf.data.Dataset) that its default shuffle=True is ignored; the guide's call
    # is right as written (the dataset shuffles itself).
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")


def _run_one(variant: str, seed: int, args: argparse.Namespace, data: Path, weights: Path,
             workdir: Path) -> dict[str, Any]:
    """One variant at one seed, from a cleared Keras session, in its own folder (a cold feature cache)."""
    import keras

    approach, overrides = VARIANTS[variant]
    quick_epochs = 1 if args.quick else None
    keras.backend.clear_session()
    # run_fit may set mixed_float16 on a GPU; the guide's baseline runs in the default float32.
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(seed)
    load = load_average()
    try:
        if approach == "keras":
            res = run_keras_guide(data, weights, QUICK_IMAGE_SIZE if args.quick else GUIDE["image_size"],
                                  args.head_epochs or quick_epochs or GUIDE["default_epochs"],
                                  args.finetune_epochs or quick_epochs or GUIDE["default_epochs"], seed)
        else:
            res = run_tftransfer(data, weights, workdir / f"{variant}-{seed}", args.head_epochs or quick_epochs,
                                 args.finetune_epochs or quick_epochs, seed, args.quick,
                                 (*overrides, *args.extra))
    except Exception:  # noqa: BLE001 - keep the other variants' figures if one fails
        res = {"error": traceback.format_exc()}
        print(res["error"], file=sys.stderr)
    return {"variant": variant, "seed": seed, **res, "load_average_before": load, "load_average_after": load_average()}


def main(argv: list[str] | None = None) -> int:
    """Runs the chosen variants for every seed and writes the JSON; returns the exit status."""
    args = parse_args(argv)
    data, weights = args.data.resolve(), args.weights.resolve()
    missing = missing_inputs(data, weights)
    if missing:
        print("hymenoptera_two_phase: shared data not found, nothing run:\n  " + "\n  ".join(missing),
              file=sys.stderr)
        return 2

    show_progress_logs()
    payload: dict[str, Any] = {
        "benchmark": "hymenoptera_two_phase",
        "machine": machine_info(),
        "settings": {"data": str(data), "weights": str(weights), "variants": args.variants, "seeds": args.seeds,
                     "quick": args.quick, "head_epochs_flag": args.head_epochs,
                     "finetune_epochs_flag": args.finetune_epochs, "extra_overrides": args.extra},
        "runs": [],
    }
    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="tftransfer-bench-"))
    try:
        for seed in args.seeds:
            for variant in args.variants:
                print(f"\n=== {variant}, seed {seed} ===", flush=True)
                payload["runs"].append(_run_one(variant, seed, args, data, weights, workdir))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
            for res in payload["runs"]:
                res.pop("run_dir", None)  # deleted with the temporary folder
                if res.get("export"):
                    res["export"]["path"] = None
    payload["summary"] = summarize(payload["runs"])
    write_json(args.out, payload)
    print()
    if args.quick:
        print("(quick mode: 1 epoch per phase at 96 px; a smoke check, not a benchmark)")
    print_table(payload["runs"])
    print_summary(payload["summary"])
    print(f"\nresults written to {args.out}")
    return 1 if any("error" in res for res in payload["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
