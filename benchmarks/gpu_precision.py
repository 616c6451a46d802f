"""GPU training throughput: float32 vs mixed_float16 vs mixed_float16 + XLA, and whether the input pipeline keeps up.

The model is ResNet50 (random weights: weights do not change speed) at 224 px, built and compiled by tftransfer
itself: `configure_runtime` sets the precision policy (Keras then wraps the optimizer in a LossScaleOptimizer under
mixed_float16), `build_model` makes the classifier (resize + preprocess + backbone + float32 head),
`unfreeze_top_blocks` opens the backbone's top blocks (default: all of them; BatchNorm stays frozen, as in
tftransfer's phase 2) and `compile_for_phase` compiles it, with `jit_compile` for the XLA case. Each case trains on
one synthetic in-memory batch already on the device (`train_on_batch`, which waits for the step's result), so it
measures the accelerator, not the input: images/s = batch size / median step time after `--warmup` steps.

Each precision runs on three models (`--models`): `built`, the model exactly as `build_model` returns it;
`no_resize`, the same layers (so the same weights and trainable flags) fed from a fixed-size input that skips the
model's first layer, the resize; and `augment_in_step` (see below). The resize is `SkipSameSizeResizing`, an
identity for batches already at `image_size`; TensorFlow's antialiased resize op (`ScaleAndTranslate`) has a CPU
kernel only (no GPU kernel, so a step holding it copies the batch to the host and back; no XLA kernel, so
`jit_compile=True` could not compile the step), and `no_resize` checks that the skip leaves none of that cost.
`augment_in_step` is the built model wrapped as `data.augment.placement: model` trains it
(`device_augment.AugmentingModel` with the hymenoptera config's augmentation: flip, rotation, zoom, contrast): the
difference from `built` is what augmenting on the GPU inside the step costs. `jit_compile_used` records whether
Keras really compiled with XLA (it drops XLA by itself for layers it marks as not compilable).

The input pipeline is then timed separately on real images: tftransfer's `make_datasets` on the hymenoptera
training photos (245 JPEGs up to 2592 px, the hymenoptera config's augmentation) at the same size and batch,
images/s over full passes, with `data.cache: none` (every image decoded every pass: what a data set larger than
RAM costs), with `data.cache: memory` (decoded once, later passes augment only) and with `data.cache: memory` and
placement model (`memory_augment_in_step`: the pipeline only gathers cached batches; the step augments). Comparing
it with the fastest training case says whether the pipeline keeps the GPU fed.

It refuses to run (exit status 2) when TensorFlow sees no GPU, unless `--allow-cpu` is given;
`--allow-cpu --quick` (32 px, batch 2, 2 timed steps, 1 pipeline pass) checks the script on a CPU machine, and
`--no-xla` skips the XLA case (XLA compiles ResNet50 slowly on CPU). Quick figures mean nothing.

    python benchmarks/gpu_precision.py                        # on a GPU machine; ~2-5 minutes
    python benchmarks/gpu_precision.py --allow-cpu --quick --no-xla --out /tmp/gpu_quick.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hymenoptera_two_phase import (  # noqa: E402
    CONFIG,
    DEFAULT_DATA,
    load_average,
    machine_info,
    write_json,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_precision.json"
CASES = {  # name -> (runtime.precision, XLA)
    "float32": ("float32", False),
    "mixed_float16": ("mixed_float16", False),
    "mixed_float16_xla": ("mixed_float16", True),
}
MODELS = ("built", "no_resize", "augment_in_step")
QUICK = {"image_size": 32, "batch_size": 2, "warmup": 1, "steps": 2, "pipeline_passes": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --quick replaces the sizes and counts with tiny ones."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", default="resnet50", help="a tftransfer backbone name")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128, help="global batch for the training steps")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--unfreeze-blocks", type=int, default=-1,
                   help="top backbone blocks that train (-1 = all; BatchNorm stays frozen either way)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (tracing, XLA compile, autotune)")
    p.add_argument("--steps", type=int, default=50, help="timed steps; the median step time is reported")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--no-xla", action="store_true", help="skip the XLA case (slow to compile on CPU)")
    p.add_argument("--models", default=",".join(MODELS),
                   help="built = build_model's model as is; no_resize = the same layers without the input Resizing")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="hymenoptera folder for the pipeline timing")
    p.add_argument("--pipeline-passes", type=int, default=5, help="timed passes per pipeline mode (after one)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the input-pipeline timing")
    p.add_argument("--allow-cpu", action="store_true", help="run even when no GPU is visible (figures mean little)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: {image_size} px, batch {batch_size}, {steps} steps, {pipeline_passes} pipeline "
                        "pass (not a benchmark)".format(**QUICK))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default {DEFAULT_OUT.relative_to(DEFAULT_OUT.parents[2])}; "
                        "--quick needs --out)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        if args.out is None:
            p.error("--quick needs --out (quick figures must not replace benchmarks/results/gpu_precision.json)")
    args.out = args.out or DEFAULT_OUT
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        p.error(f"--cases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    args.cases = [c for c in cases if not (args.no_xla and CASES[c][1])]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        p.error(f"--models: choose from {', '.join(MODELS)}")
    args.models = models
    for name in ("image_size", "batch_size", "steps", "num_classes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step traces and compiles)")
    return args


def gpu_details() -> list[dict[str, Any]]:
    """Name and compute capability of each visible GPU (empty on a CPU machine)."""
    import tensorflow as tf

    out = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        out.append({"name": gpu.name, "device_name": details.get("device_name"),
                    "compute_capability": list(details.get("compute_capability") or [])})
    return out


def without_resize(model, image_size: int):
    """The same layers as a build_model model, fed from a fixed-size input that skips its first layer (the resize)."""
    import keras

    names = [layer.name for layer in model.layers]  # [pixels, resize, preprocess, backbone, pool, (dropout), logits]
    if "resize" not in names or not isinstance(model.get_layer("resize"), keras.layers.Resizing):
        raise RuntimeError(f"build_model's model has no Resizing layer named 'resize' any more: {names}")
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name="pixels_sized")
    x = inputs
    for layer in model.layers[names.index("resize") + 1:]:
        x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_no_resize")


def time_training(case: str, model_kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Builds and compiles the model tftransfer's way for one precision/XLA case and times train_on_batch."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tftransfer.config.experiment import FinetuneConfig, ModelConfig, RuntimeConfig
    from tftransfer.model.backbones import blocks_for, build_backbone, get_backbone_spec
    from tftransfer.model.classifier import build_model
    from tftransfer.model.freezing import unfreeze_top_blocks
    from tftransfer.runtime import configure_runtime
    from tftransfer.training.schedule import compile_for_phase

    precision, xla = CASES[case]
    keras.backend.clear_session()
    info = configure_runtime(RuntimeConfig(seed=args.seed, precision=precision, jit="on" if xla else "off"))
    spec = get_backbone_spec(args.backbone)
    phase = FinetuneConfig(epochs=1, learning_rate=1e-4, schedule="constant", warmup_epochs=0.0)
    with info.scope():
        backbone = build_backbone(spec, args.image_size, None)
        blocks = blocks_for(spec, backbone)
        model = build_model(ModelConfig(backbone=spec.name, weights="none"), spec, args.num_classes,
                            args.image_size, backbone=backbone)
        n = len(blocks) if args.unfreeze_blocks < 0 else args.unfreeze_blocks
        report = unfreeze_top_blocks(model, blocks, n)
        if model_kind == "no_resize":
            model = without_resize(model, args.image_size)
        if model_kind == "augment_in_step":
            model = augmenting(model, args.seed)
        compile_for_phase(model, phase, steps_per_epoch=args.warmup + args.steps, num_classes=args.num_classes,
                          jit_compile=info.jit_compile)
    device = "/GPU:0" if info.gpus else "/CPU:0"
    with tf.device(device):  # one batch, already on the device: the input costs nothing here
        x = tf.random.uniform((args.batch_size, args.image_size, args.image_size, 3), 0.0, 255.0, seed=args.seed)
        y = tf.random.uniform((args.batch_size,), 0, args.num_classes, dtype=tf.int64, seed=args.seed)
    if info.gpus:
        tf.config.experimental.reset_memory_stats("GPU:0")
    step_seconds: list[float] = []
    losses: list[float] = []
    first = None
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        logs = model.train_on_batch(x, y, return_dict=True)  # returns Python floats: waits for the step
        seconds = time.perf_counter() - t0
        losses.append(float(logs["loss"]))
        if i == 0:
            first = seconds
        if i >= args.warmup:
            step_seconds.append(seconds)
    median = statistics.median(step_seconds)
    optimizer = model.optimizer
    plain = getattr(model, "inner", model)  # the AugmentingModel's classifier
    result = {
        "model": model_kind, "precision": info.precision, "jit_compile": info.jit_compile, "device": info.device,
        # what Keras really compiled with: it drops XLA by itself for layers it marks as not compilable
        "jit_compile_used": bool(getattr(model, "jit_compile", False)),
        "compute_dtype": plain.get_layer("backbone").compute_dtype,
        "logits_dtype": str(plain.outputs[0].dtype),
        "optimizer": type(optimizer).__name__,
        "trainable_params": report.trainable_params, "unfrozen_blocks": len(report.unfrozen_blocks),
        "blocks": len(blocks),
        "first_step_seconds": first, "median_step_seconds": median,
        "p10_step_seconds": float(np.percentile(step_seconds, 10)),
        "p90_step_seconds": float(np.percentile(step_seconds, 90)),
        "images_per_second": args.batch_size / median,
        "losses_finite": all(math.isfinite(v) for v in losses),
        "step_seconds": step_seconds,
    }
    if info.gpus:
        result["peak_gpu_memory_gib"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**30
    return result


def augmenting(model, seed: int):
    """`model` as placement model trains it: the hymenoptera config's augmenter inside the training step."""
    from tftransfer.config.experiment import load_config
    from tftransfer.data.pipeline import build_augmenter
    from tftransfer.training.augment_step import AugmentingModel, device_augmenter

    augmenter = build_augmenter(load_config(CONFIG).data.augment, seed)
    return AugmentingModel(model, device_augmenter(augmenter))


PIPELINE_MODES = {"none": ("none", False), "memory": ("memory", False), "memory_augment_in_step": ("memory", True)}


def time_pipeline(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """tftransfer's training pipeline on hymenoptera: images/s over full passes after one untimed pass."""
    from tftransfer.config.experiment import load_config
    from tftransfer.data.pipeline import make_datasets
    from tftransfer.data.specs import source_from_config

    cache, in_step = PIPELINE_MODES[mode]
    cfg = load_config(CONFIG, overrides=[f"data.path={args.data}", f"data.image_size={args.image_size}",
                                         f"data.batch_size={args.batch_size}", f"data.cache={cache}",
                                         f"data.augment.placement={'model' if in_step else 'pipeline'}"])
    source = source_from_config(cfg.data)
    data = make_datasets(cfg.data, source, args.image_size, seed=args.seed)

    def one_pass() -> tuple[int, float]:
        t0, n = time.perf_counter(), 0
        for x, _ in data.train:
            n += int(x.shape[0])
        return n, time.perf_counter() - t0

    first_n, first_s = one_pass()
    passes = [one_pass() for _ in range(args.pipeline_passes)]
    images, seconds = sum(n for n, _ in passes), sum(s for _, s in passes)
    return {"cache": cache, "augment_in_step": in_step, "train_images": first_n, "first_pass_seconds": first_s,
            "first_pass_images_per_second": first_n / first_s if first_s else None,
            "pass_seconds": [s for _, s in passes],
            "images_per_second": images / seconds if seconds else None,
            "augment": dataclasses.asdict(cfg.data.augment)}


def _summary(exc: BaseException) -> str:
    """The informative line of a (possibly very long) TensorFlow error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        found = re.search(r"on (XLA_\w+): (\w+) \(No registered", line)
        if found:
            return f"XLA cannot compile op {found.group(2)} ({found.group(1)} has no kernel for it)"
        if "unsupported operations" in line or "No registered" in line:
            return line[:400]
    return f"{type(exc).__name__}: {(lines or [''])[0][:400]}"


def main(argv: list[str] | None = None) -> int:
    """Checks for a GPU, times each training case and the pipeline, writes the JSON; returns the exit status."""
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # AutoGraph's notes on the pipeline's lambdas are noise here
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.allow_cpu:
        print("gpu_precision: TensorFlow sees no GPU (tf.config.list_physical_devices('GPU') is empty), so there "
              "is nothing to measure; nothing run. Run it on a GPU machine, or pass --allow-cpu (with --quick) "
              "to check the script on a CPU.", file=sys.stderr)
        return 2
    if args.quick:
        print(f"quick mode: {args.image_size} px, batch {args.batch_size}, {args.steps} timed steps; a smoke "
              "check, not a benchmark", flush=True)
    payload: dict[str, Any] = {
        "benchmark": "gpu_precision", "machine": machine_info(), "gpus": gpu_details(),
        "load_average_before": load_average(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "training": {}, "pipeline": {},
    }
    failed = False
    for model_kind in args.models:
        for case in args.cases:
            key = f"{case}:{model_kind}"
            print(f"=== training: {key} ===", flush=True)
            started = time.perf_counter()
            try:
                res = time_training(case, model_kind, args)
                print(f"{key}: {res['images_per_second']:.1f} images/s (median step "
                      f"{res['median_step_seconds']:.4f} s, first step {res['first_step_seconds']:.1f} s, "
                      f"optimizer {res['optimizer']})", flush=True)
            except Exception as exc:  # noqa: BLE001 - XLA may fail to compile a model; keep the other cases
                # XLA may be unable to compile some backbone's ops: recorded, not a failure of the script.
                res = {"error": traceback.format_exc(), "error_summary": _summary(exc)}
                print(f"{key}: error: {res['error_summary']}", flush=True)
            res["wall_seconds"] = time.perf_counter() - started
            payload["training"][key] = res
    base = payload["training"].get(f"float32:{args.models[0]}", {}).get("images_per_second")
    for res in payload["training"].values():
        if base and "images_per_second" in res:
            res["speedup_vs_float32"] = res["images_per_second"] / base

    if not args.no_pipeline:
        if not (args.data / "train").is_dir():
            payload["pipeline"] = {"skipped": f"{args.data / 'train'} not found"}
            print(f"pipeline timing skipped: {args.data / 'train'} not found", flush=True)
        else:
            import keras

            keras.mixed_precision.set_global_policy("float32")
            for cache in PIPELINE_MODES:
                print(f"=== pipeline: {cache} ===", flush=True)
                try:
                    res = time_pipeline(args, cache)
                    print(f"pipeline {cache}: {res['images_per_second']:.1f} images/s "
                          f"(first pass {res['first_pass_images_per_second']:.1f})", flush=True)
                except Exception:  # noqa: BLE001
                    failed = True
                    res = {"error": traceback.format_exc()}
                    print(res["error"], file=sys.stderr)
                payload["pipeline"][cache] = res
            rates = [r["images_per_second"] for r in payload["training"].values() if "images_per_second" in r]
            if rates:
                fastest = max(rates)
                for res in payload["pipeline"].values():
                    if res.get("images_per_second"):
                        res["ratio_to_fastest_training"] = res["images_per_second"] / fastest
                        res["keeps_up"] = res["images_per_second"] >= fastest
    payload["load_average_after"] = load_average()
    write_json(args.out, payload)

    print(f"\n{'case:model':<30}{'images/s':>10}{'vs float32':>12}{'median step s':>15}{'first step s':>14}")
    for case, res in payload["training"].items():
        if "error" in res:
            print(f"{case:<30}error: {res['error_summary'][:100]}")
            continue
        speed = res.get("speedup_vs_float32")
        print(f"{case:<30}{res['images_per_second']:>10.1f}{(f'{speed:.2f}x' if speed else '-'):>12}"
              f"{res['median_step_seconds']:>15.4f}{res['first_step_seconds']:>14.1f}")
    for cache, res in payload["pipeline"].items():
        if isinstance(res, dict) and res.get("images_per_second"):
            ratio = res.get("ratio_to_fastest_training")
            print(f"pipeline {cache:<24}{res['images_per_second']:>9.1f} images/s"
                  + (f"  ({ratio:.2f}x the fastest training case)" if ratio else ""))
    if args.quick:
        print("(quick mode: a smoke check, not a benchmark)")
    print(f"results written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
