"""Phase 1 only: tftransfer's feature cache vs the Keras guide's frozen-base `fit`, over several seeds in one run.

Same job for both: MobileNetV2 alpha 0.5 (real ImageNet weights), hymenoptera at 224 px, 10 head epochs at
Adam 1e-3, frozen backbone. The Keras guide (kept exactly as `hymenoptera_two_phase.run_keras_guide` writes it)
runs the frozen backbone forward on every image every epoch, with its flip/rotation augmentation in the model;
tftransfer computes the pooled features once and trains the head on them.

For each seed (`--seeds N`, default 3: seeds `--seed`, `--seed`+1, ...) it runs, in one process:

- the Keras guide's phase 1;
- tftransfer **cold**: the seed's feature-cache folder (a temporary folder) is emptied first, so phase 1 includes
  decoding every image and computing the features;
- tftransfer **warm**: the same run again, features read from that cache;
- each `--variant` (and, with `--investigate`, a built-in list of head settings), on the seed's cache: variants
  whose features are already cached run warm, others (e.g. `feature_cache_views=2`) compute their train features.

The order of the Keras guide and tftransfer alternates between seeds (Keras first on even seeds), and every image
file is read once before the first run, so neither side pays the disk. It reports per seed the phase-1 seconds,
the speed-up (Keras phase-1 seconds / tftransfer phase-1 seconds, cold and warm) and the validation accuracy
(153 images: one image is 0.65 points), then mean +- sample std over the seeds.

    python benchmarks/phase1_feature_cache.py [--seeds 3] [--epochs 10] [--investigate]
        [--set phases.head.learning_rate=0.003] [--variant "lr3e-3:phases.head.learning_rate=0.003"]
        [--out benchmarks/results/phase1_feature_cache.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hymenoptera_two_phase import (  # noqa: E402
    CONFIG,
    DEFAULT_DATA,
    DEFAULT_WEIGHTS,
    load_average,
    machine_info,
    missing_inputs,
    run_keras_guide,
    show_progress_logs,
    write_json,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "phase1_feature_cache.json"
IMAGE_SIZE = 224
LEARNING_RATE = 1e-3  # the guide's head rate; tftransfer's baseline uses the same

# Head settings tftransfer exposes through its config, tried by --investigate at the same epochs. Each is a name
# and config overrides on top of the baseline (224 px, --epochs, Adam 1e-3, dropout 0.2, best-val_loss restore).
INVESTIGATE: list[tuple[str, list[str]]] = [
    ("lr 3e-3", ["phases.head.learning_rate=0.003"]),
    ("lr 1e-2", ["phases.head.learning_rate=0.01"]),
    ("no best-epoch restore", ["phases.head.restore_best=false"]),
    ("dropout 0", ["model.dropout=0.0"]),
    ("dropout 0.5", ["model.dropout=0.5"]),
    ("label smoothing 0.1", ["phases.head.label_smoothing=0.1"]),
    ("adamw wd 1e-2", ["phases.head.optimizer=adamw", "phases.head.weight_decay=0.01"]),
    ("2 views", ["phases.head.feature_cache_views=2"]),
    ("2 views, lr 3e-3", ["phases.head.feature_cache_views=2", "phases.head.learning_rate=0.003"]),
    # Not at equal epochs: the shipped hymenoptera config's head recipe, for reference.
    ("ref: 30 epochs, lr 3e-3", ["phases.head.epochs=30", "phases.head.learning_rate=0.003"]),
]


def tftransfer_config(data: Path, weights: Path, work: Path, cache: Path, epochs: int, seed: int, name: str,
                      extra: list[str]):
    """The baseline phase-1 config (the guide's size, epochs and rate) plus `extra` overrides."""
    from tftransfer.config.experiment import load_config

    return load_config(CONFIG, overrides=[
        f"model.weights={weights}", f"data.path={data}", f"runs_dir={work / 'runs'}", f"name={name}",
        f"data.image_size={IMAGE_SIZE}", f"phases.head.epochs={epochs}", f"phases.head.learning_rate={LEARNING_RATE}",
        "phases.finetune.unfreeze_blocks=0", "export.enabled=false", f"runtime.seed={seed}",
        f"runtime.cache_dir={cache}", *extra])


def run_tftransfer_phase1(data: Path, weights: Path, work: Path, cache: Path, epochs: int, seed: int, name: str,
                          extra: list[str]) -> dict[str, Any]:
    """Phase 1 through tftransfer's run_fit: head only, no export; run folder deleted afterwards."""
    from tftransfer.jobs.fit import run_fit

    cfg = tftransfer_config(data, weights, work, cache, epochs, seed, name, extra)
    started = time.perf_counter()
    result = run_fit(cfg, overwrite=True)
    total = time.perf_counter() - started
    head = result.metrics["phases"][0]
    shutil.rmtree(result.run_dir, ignore_errors=True)
    return {"phase1_seconds": head["seconds"], "val_accuracy": head["val"]["accuracy"],
            "val_log_loss": head["val"].get("log_loss"), "best_epoch": head["best_epoch"],
            "total_seconds": total, "epochs": head["epochs_run"], "overrides": extra}


def run_guide_phase1(data: Path, weights: Path, epochs: int, seed: int) -> dict[str, Any]:
    """The Keras guide's phase 1, unchanged (its 0-epoch phase 2 only adds an evaluation after the timing)."""
    guide = run_keras_guide(data, weights, IMAGE_SIZE, epochs, 0, seed)
    head = guide["phases"][0]
    return {"phase1_seconds": head["seconds"], "val_accuracy": head["val_accuracy"],
            "val_loss": head["val_loss"], "total_seconds": guide["total_seconds"], "epochs": epochs}


def _fresh_process_state(seed: int) -> None:
    import keras

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(seed)


def _attempt(fn, *args) -> dict[str, Any]:
    load = load_average()
    try:
        res = fn(*args)
    except Exception:  # noqa: BLE001 - keep the other runs' figures if one fails
        res = {"error": traceback.format_exc()}
        print(res["error"], file=sys.stderr)
    res["load_average_before"] = load
    return res


def _read_all_files(data: Path) -> int:
    """Reads every file once so the page cache holds them before anything is timed."""
    total = 0
    for path in sorted(data.rglob("*")):
        if path.is_file():
            total += len(path.read_bytes())
    return total


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _fmt(stat: dict[str, Any], spec: str) -> str:
    if stat["mean"] is None:
        return "-"
    return format(stat["mean"], spec) + ("" if stat["std"] is None else " +- " + format(stat["std"], spec))


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`name:key=value,key=value` -> (name, overrides)."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip() or not rest.strip():
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:key=value[,key=value...]")
    return name.strip(), [item.strip() for item in rest.split(",") if item.strip()]


def summarise(per_seed: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """Mean +- std over seeds of accuracy, seconds and speed-ups, for the baseline runs and every variant."""
    def ok(seed_entry: dict[str, Any], key: str) -> dict[str, Any] | None:
        res = seed_entry["runs"].get(key)
        return res if res and "error" not in res else None

    summary: dict[str, Any] = {}
    for key in ["keras_guide", "tftransfer_cold", "tftransfer_warm", *variants]:
        rows = [(s, r) for s in per_seed if (r := ok(s, key))]
        keras_rows = {s["seed"]: r for s in per_seed if (r := ok(s, "keras_guide"))}
        speedups = [keras_rows[s["seed"]]["phase1_seconds"] / r["phase1_seconds"] for s, r in rows
                    if s["seed"] in keras_rows and r["phase1_seconds"]]
        acc_diff = [r["val_accuracy"] - keras_rows[s["seed"]]["val_accuracy"] for s, r in rows
                    if s["seed"] in keras_rows]
        summary[key] = {"val_accuracy": mean_std([r["val_accuracy"] for _, r in rows]),
                        "phase1_seconds": mean_std([r["phase1_seconds"] for _, r in rows]),
                        "speedup_vs_keras": mean_std(speedups),
                        "val_accuracy_minus_keras": mean_std(acc_diff)}
    return summary


def main(argv: list[str] | None = None) -> int:
    """Runs every seed (Keras guide, tftransfer cold and warm, variants) and prints/saves the comparison."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--epochs", type=int, default=10, help="head epochs, both approaches")
    p.add_argument("--seed", type=int, default=42, help="first seed")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (seed, seed+1, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra tftransfer config override for the cold/warm runs (repeatable)")
    p.add_argument("--variant", dest="variants", action="append", default=[], type=parse_variant,
                   metavar="NAME:KEY=VALUE[,KEY=VALUE]", help="extra tftransfer run per seed (repeatable)")
    p.add_argument("--investigate", action="store_true",
                   help="add the built-in head-setting variants (learning rate, views, dropout, ...)")
    p.add_argument("--no-keras", action="store_true", help="skip the Keras guide (variants only; no speed-ups)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.seeds < 1 or args.epochs < 1:
        p.error("--seeds and --epochs must be >= 1")
    data, weights = args.data.resolve(), args.weights.resolve()
    missing = missing_inputs(data, weights)
    if missing:
        print("phase1_feature_cache: shared data not found, nothing run:\n  " + "\n  ".join(missing),
              file=sys.stderr)
        return 2
    variants = list(args.variants) + (INVESTIGATE if args.investigate else [])
    names = [name for name, _ in variants]
    if len(set(names)) != len(names) or set(names) & {"keras_guide", "tftransfer_cold", "tftransfer_warm"}:
        p.error("variant names must be unique and differ from the baseline runs")

    show_progress_logs()

    read_bytes = _read_all_files(data)
    print(f"read {read_bytes / 1e6:.1f} MB of {data} into the page cache", flush=True)
    seeds = [args.seed + i for i in range(args.seeds)]
    per_seed: list[dict[str, Any]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="tftransfer-phase1-") as tmp:
        work = Path(tmp)
        for i, seed in enumerate(seeds):
            cache = work / f"cache-seed{seed}"
            runs: dict[str, Any] = {}
            order = ["keras", "tftransfer"] if i % 2 == 0 else ["tftransfer", "keras"]
            if args.no_keras:
                order = ["tftransfer"]
            for approach in order:
                if approach == "keras":
                    print(f"\n=== seed {seed}: keras guide ===", flush=True)
                    _fresh_process_state(seed)
                    runs["keras_guide"] = _attempt(run_guide_phase1, data, weights, args.epochs, seed)
                    continue
                for kind in ("cold", "warm"):
                    print(f"\n=== seed {seed}: tftransfer {kind} cache ===", flush=True)
                    if kind == "cold":
                        shutil.rmtree(cache, ignore_errors=True)
                    _fresh_process_state(seed)
                    runs[f"tftransfer_{kind}"] = _attempt(run_tftransfer_phase1, data, weights, work, cache,
                                                          args.epochs, seed, kind, list(args.overrides))
            for name, extra in variants:
                print(f"\n=== seed {seed}: variant {name} ({', '.join(extra)}) ===", flush=True)
                _fresh_process_state(seed)
                runs[name] = _attempt(run_tftransfer_phase1, data, weights, work, cache, args.epochs, seed,
                                      "variant", list(args.overrides) + extra)
            failed = failed or any("error" in r for r in runs.values())
            per_seed.append({"seed": seed, "order": order, "runs": runs})

    summary = summarise(per_seed, names)
    payload = {"benchmark": "phase1_feature_cache", "machine": machine_info(),
               "load_average_after": load_average(),
               "settings": {"image_size": IMAGE_SIZE, "epochs": args.epochs, "learning_rate": LEARNING_RATE,
                            "seeds": seeds, "tftransfer_overrides": args.overrides,
                            "variants": {name: extra for name, extra in variants},
                            "config": str(CONFIG), "weights": str(weights), "data": str(data),
                            "pid": os.getpid()},
               "per_seed": per_seed, "summary": summary}
    write_json(args.out, payload)

    print("\nper seed (phase-1 seconds, speed-up = keras s / tftransfer s, val accuracy)")
    for entry in per_seed:
        cells = []
        for key, res in entry["runs"].items():
            if "error" in res:
                cells.append(f"{key}: error")
                continue
            keras_res = entry["runs"].get("keras_guide", {})
            speed = (f" {keras_res['phase1_seconds'] / res['phase1_seconds']:.1f}x"
                     if key != "keras_guide" and "phase1_seconds" in keras_res else "")
            cells.append(f"{key}: {res['phase1_seconds']:.1f} s{speed} acc {res['val_accuracy']:.4f}")
        print(f"seed {entry['seed']}: " + "; ".join(cells))
    print(f"\n{'run':<26}{'phase 1 s':>16}{'speed-up':>16}{'val acc':>20}{'acc - keras':>20}")
    for name, s in summary.items():
        print(f"{name:<26}{_fmt(s['phase1_seconds'], '.1f'):>16}{_fmt(s['speedup_vs_keras'], '.1f'):>16}"
              f"{_fmt(s['val_accuracy'], '.4f'):>20}{_fmt(s['val_accuracy_minus_keras'], '.4f'):>20}")
    print(f"\nresults written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
