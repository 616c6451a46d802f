"""fit: moved from tftransfer.training.phases."""

from __future__ import annotations

import logging
import math
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import tftransfer
from tftransfer.config.commands import ExportCommandConfig
from tftransfer.config.experiment import ExperimentConfig, load_config, save_config
from tftransfer.core.cache import arrays_digest, default_cache_dir, file_hash
from tftransfer.core.errors import ConfigError, RunDirError
from tftransfer.core.io import read_json, write_json
from tftransfer.data.images import DECODE_VERSION
from tftransfer.data.pipeline import Datasets, make_datasets, make_split_dataset
from tftransfer.data.sources import DataSource, Split
from tftransfer.data.specs import source_from_config
from tftransfer.evaluation.inference import predict_dataset
from tftransfer.evaluation.metrics import evaluate_model
from tftransfer.model import backbones
from tftransfer.model.classifier import build_model, get_backbone
from tftransfer.model.precision import Bf16Probe, bf16_copy
from tftransfer.reporting import grids
from tftransfer.reporting import run_summary as report
from tftransfer.runs.finished import load_run
from tftransfer.runs.layout import RunDir, check_run_name, create_run_dir
from tftransfer.runs.records import RunMetrics
from tftransfer.runtime import Bf16Verdict, RuntimeInfo, bf16_verdict_path, configure_runtime, inference_precision
from tftransfer.serving.gate import ExportGateError
from tftransfer.serving.parity import ParityError
from tftransfer.serving.publish import publish_model
from tftransfer.training.activation_cache import check_config as check_activation_cache
from tftransfer.training.adaptation.target import TargetDomain, load_target
from tftransfer.training.augment_step import augment_float32, step_augmenter
from tftransfer.training.callbacks import tensorboard_hparams
from tftransfer.training.checkpoint import Checkpoint, load_latest
from tftransfer.training.distill import (
    Distillation,
    Teacher,
    build_distill_views,
    check_distill_config,
    load_teacher,
    load_unlabeled,
)
from tftransfer.training.phases import FeatureCacheSpec, FitPhasesResult, PhaseResult, TrainingError, fit_phases

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# The whole job


@dataclass
class FitResult:
    """Where a fit wrote its outputs, and its metrics."""

    run_dir: Path
    metrics: dict[str, Any]
    export_dir: Path | None
    model: keras.Model


def default_run_name(cfg: ExperimentConfig) -> str:
    """<backbone>_<data name>, e.g. mobilenetv2_hymenoptera."""
    data = cfg.data.path.rstrip("/").split(":")[-1]
    # "office.csv#domain=webcam" -> "office.csv_domain_webcam": a name that is safe as a folder name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cfg.model.backbone}_{Path(data).name or 'data'}")


def resolve_image_size(cfg: ExperimentConfig, spec: backbones.BackboneSpec) -> int:
    """data.image_size, or the backbone's default when 0; checked against the backbone's minimum."""
    size = cfg.data.image_size or spec.default_size
    backbones.validate_image_size(spec, size)
    return size


def _phase_entry(phase: PhaseResult, val_metrics: dict | None) -> dict[str, Any]:
    return {"name": phase.name, "epochs_run": phase.epochs_run, "best_epoch": phase.best_epoch,
            "first_epoch": phase.first_epoch, "trainable_params": phase.freeze.trainable_params,
            "non_trainable_params": phase.freeze.non_trainable_params,
            "unfrozen_blocks": phase.freeze.unfrozen_blocks, "learning_rate": phase.learning_rate,
            "seconds": phase.seconds, "train_images_per_second": phase.train_images_per_second,
            "val": val_metrics, **({"pruning": phase.pruning} if phase.pruning else {}),
            **({"activation_cache": phase.activation_cache} if phase.activation_cache else {})}


def feature_cache_spec(cfg: ExperimentConfig, spec: backbones.BackboneSpec, image_size: int,
                       bf16: bool = False) -> FeatureCacheSpec:
    """What the pooled features depend on: backbone, its weights' bytes, input size, preprocessing, pooling, and
    (`bf16`: extracted by the model's bf16 copy) the inference precision."""
    weights = cfg.model.weights
    weights_id: str = weights.lower()
    if weights_id not in ("imagenet", "none"):
        weights_id = file_hash(weights)
    parts = {"backbone": spec.name, "weights": weights_id, "kwargs": cfg.model.backbone_kwargs,
             "image_size": image_size, "preprocess": spec.preprocess_mode, "pooling": cfg.model.pooling,
             "keras": keras.__version__, "decode": DECODE_VERSION}
    if weights_id == "none":  # random weights depend on the seed
        parts["seed"] = cfg.runtime.seed
    if bf16:  # only then: float32 features keep the keys they always had
        parts["inference_precision"] = "mixed_bfloat16"
    return FeatureCacheSpec(parts, Path(cfg.runtime.cache_dir) if cfg.runtime.cache_dir else default_cache_dir(),
                            bf16=bf16)


@dataclass
class Experiment:
    """A resolved config with its data, runtime choices and untrained model: what fit and lr-find start from."""

    cfg: ExperimentConfig
    spec: backbones.BackboneSpec
    image_size: int
    source: DataSource
    info: RuntimeInfo
    blocks: list[backbones.Block]
    data: Datasets
    model: keras.Model
    target: TargetDomain | None = None
    l2sp_reference: dict[int, np.ndarray] | None = None
    teacher: Teacher | None = None  # with distill.teacher
    unlabeled: Split | None = None  # distill.unlabeled's images
    inference: Bf16Verdict = field(default_factory=lambda: Bf16Verdict(False, "not resolved"))  # bf16 or float32

    def for_inference(self, model: keras.Model) -> keras.Model:
        """`model` as feature extraction and evaluation run it: its bf16 copy where the probe said bf16 pays."""
        return bf16_copy(model) if self.inference.use_bf16 else model


def prepare_experiment(cfg: ExperimentConfig) -> Experiment:
    """Resolves names and sizes, loads and checks the data, applies the runtime, builds the model.

    Everything that can fail on bad input fails here, before any run directory exists.
    """
    spec = backbones.get_backbone_spec(cfg.model.backbone)
    image_size = resolve_image_size(cfg, spec)
    if cfg.adapt.method != "none" and not cfg.adapt.target:
        raise ConfigError(f"adapt.method {cfg.adapt.method} needs target images: give --target DATA "
                          "(adapt.target)")
    if cfg.distill.teacher:
        check_distill_config(cfg)  # before the data is listed: a combination distillation refuses
    if not cfg.name:
        cfg = replace(cfg, name=default_run_name(cfg))
    check_run_name(cfg.name)  # before the data is listed: runs/<name>/ and the export folder are made from it
    cfg = replace(cfg, data=replace(cfg.data, image_size=image_size))
    info = configure_runtime(cfg.runtime)  # first: strategies need a fresh TensorFlow runtime
    source = source_from_config(cfg.data)
    weights = None if cfg.model.weights.lower() == "none" else cfg.model.weights
    alpha = backbones.alpha_from_weights_name(spec, weights, cfg.model.backbone_kwargs)
    if alpha is not None:  # recorded in the saved config, so the run says what it built
        logger.info("model.backbone_kwargs.alpha = %g, read from the weights file name %s", alpha, weights)
        cfg = replace(cfg, model=replace(cfg.model, backbone_kwargs={**cfg.model.backbone_kwargs, "alpha": alpha}))
    with info.scope():
        backbone = backbones.build_backbone(spec, image_size, weights, **cfg.model.backbone_kwargs)
        blocks = backbones.blocks_for(spec, backbone)
        model = build_model(cfg.model, spec, len(source.class_names), image_size, backbone=backbone)
    logger.info("data: %d train / %d val examples, %d classes (%s)", len(source.train),
                len(source.val) if source.val is not None else 0, len(source.class_names), source.split_method)
    data = make_datasets(cfg.data, source, image_size, seed=cfg.runtime.seed, has_gpu=info.device == "gpu")
    placement, requested = data.augment_placement, cfg.data.augment.placement
    if placement is not None:
        where = {"model": f"inside the training step (on the {info.device.upper()})",
                 "pipeline": "in the tf.data pipeline (on the CPU)"}[placement]
        logger.info("training augmentation runs %s: data.augment.placement %s%s", where, requested,
                    f" -> {placement}" if requested != placement else "")
    target = None
    if cfg.adapt.target:
        target = load_target(cfg.adapt.target, source.class_names, cfg.data, max_images=cfg.adapt.max_target_images,
                             seed=cfg.runtime.seed)
    teacher, unlabeled = _distill_inputs(cfg, source)
    reference = None
    finetune = cfg.phases.finetune
    if finetune.l2_sp_alpha > 0 and finetune.epochs > 0 and finetune.unfreeze_blocks > 0:
        # The starting point L2-SP pulls toward: the pretrained values, taken before anything trains or resumes.
        reference = {id(v): np.array(v.numpy(), np.float32) for v in get_backbone(model).trainable_weights}
    inference = resolve_inference(cfg, spec.name, image_size, info, model, data)
    return Experiment(cfg, spec, image_size, source, info, blocks, data, model, target, reference, teacher, unlabeled,
                      inference)


PROBE_BATCHES = 2  # training batches the bf16 probe times (after a warm-up call each)


def resolve_inference(cfg: ExperimentConfig, backbone: str, image_size: int, info: RuntimeInfo,
                      model: keras.Model, data: Datasets) -> Bf16Verdict:
    """Whether feature extraction and evaluation run in bf16 (runtime.precision auto, CPU with AMX, measured to
    pay), through the verdict cached per backbone, image size and CPU model."""
    cache_dir = Path(cfg.runtime.cache_dir) if cfg.runtime.cache_dir else default_cache_dir()

    def probe() -> Bf16Verdict:
        batches = [np.asarray(element[0], np.float32)
                   for element in data.ordered_train(augment=False).take(PROBE_BATCHES)]
        return Bf16Probe().measure(model, batches)

    verdict = inference_precision(cfg.runtime.precision, info.device, probe,
                                  bf16_verdict_path(cache_dir, backbone, image_size))
    logger.info("inference precision %s%s: %s", verdict.precision, " (cached probe)" if verdict.from_cache else "",
                verdict.reason)
    return verdict


def _distill_inputs(cfg: ExperimentConfig, source: DataSource) -> tuple[Teacher | None, Split | None]:
    """With distill.teacher: the teacher run (checked against the data's classes) and the unlabeled images."""
    if not cfg.distill.teacher:
        if cfg.distill.unlabeled or cfg.distill.baseline:
            raise ConfigError("distill.unlabeled and distill.baseline need distill.teacher")
        return None, None
    teacher = load_teacher(cfg.distill.teacher, source.class_names)
    unlabeled = None
    if cfg.distill.unlabeled:
        unlabeled = load_unlabeled(cfg.distill.unlabeled, cfg.distill.max_unlabeled, cfg.runtime.seed)
    logger.info("distilling from %s (%s, val accuracy %s)%s", teacher.path, teacher.backbone,
                f"{teacher.val_accuracy:.4f}" if teacher.val_accuracy is not None else "unknown",
                f" with {len(unlabeled)} unlabeled images" if unlabeled is not None else "")
    return teacher, unlabeled


def _distillation(exp: Experiment) -> Distillation | None:
    """The fixed views and their teacher logits, made while the student still has its initial weights."""
    if exp.teacher is None:
        return None
    cfg = exp.cfg
    cache = feature_cache_spec(cfg, exp.spec, exp.image_size)
    views = build_distill_views(exp.model, exp.teacher, exp.data, exp.unlabeled, cfg.distill, cfg.runtime.seed,
                                cache.key_parts, cache.cache_dir)
    return Distillation(views, cfg.distill.alpha, cfg.distill.temperature)


def _agreement(probs: np.ndarray, teacher_probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, top-1 agreement with the teacher and mean KL(teacher || model) at temperature 1."""
    eps = 1e-7
    kl = np.sum(teacher_probs * (np.log(teacher_probs + eps) - np.log(probs + eps)), axis=1)
    return {"accuracy": float(np.mean(np.argmax(probs, 1) == labels)),
            "agreement_with_teacher": float(np.mean(np.argmax(probs, 1) == np.argmax(teacher_probs, 1))),
            "kl_to_teacher": float(np.mean(kl))}


def distill_metrics(exp: Experiment, model: keras.Model, distill: Distillation) -> dict[str, Any]:
    """metrics.json's distill part: the teacher, the settings, and teacher vs student (vs baseline) on val."""
    cfg, teacher = exp.cfg.distill, exp.teacher
    assert teacher is not None
    entry: dict[str, Any] = {
        "teacher": {"path": str(teacher.path), "backbone": teacher.backbone, "image_size": teacher.run.image_size,
                    "val_accuracy": teacher.val_accuracy, "model_sha256": teacher.model_hash},
        "alpha": cfg.alpha, "temperature": cfg.temperature, "views": distill.views.views,
        "train_images": len(exp.source.train), "unlabeled_images": len(exp.unlabeled) if exp.unlabeled else 0,
        "unlabeled": cfg.unlabeled or None, "views_from_cache": distill.views.from_cache}
    if exp.data.val is None:
        return entry
    labels, teacher_probs = predict_dataset(teacher.run.model, exp.data.val)
    _, probs = predict_dataset(model, exp.data.val)
    entry["teacher"]["here"] = _agreement(teacher_probs, teacher_probs, labels)
    entry["student"] = _agreement(probs, teacher_probs, labels)
    if cfg.baseline:
        _, baseline_probs = predict_dataset(load_run(cfg.baseline).model, exp.data.val)
        entry["baseline"] = {"path": cfg.baseline, **_agreement(baseline_probs, teacher_probs, labels)}
    return entry


def run_fit(cfg: ExperimentConfig | None, overwrite: bool = False, verbose: int = 0,
            resume: str | Path | None = None) -> FitResult:
    """The `tftransfer fit` job: data -> model -> two phases -> evaluation -> export -> run directory.

    With `resume` (a run directory), the run's own config.yaml is used and training continues from its newest
    checkpoint; `cfg` is ignored.
    """

    started = time.perf_counter()
    checkpoint = None
    if resume is not None:
        cfg, checkpoint = _resume_point(Path(resume))
    assert cfg is not None
    check_activation_cache(cfg)  # an impossible activation_cache=on fails before the data is even listed
    exp = prepare_experiment(cfg)
    if exp.info.chief:
        return _fit_job(exp, _open_run(exp, Path(resume) if resume is not None else None, overwrite), checkpoint,
                        verbose, started)
    # A non-chief worker of a multi-worker run trains in lockstep with the chief but writes nothing of the run's:
    # its run directory and export go to a temporary folder, removed at the end (the TF multi-worker guide's rule).
    scratch = Path(tempfile.mkdtemp(prefix=f"tftransfer-{exp.info.task.replace(' ', '')}-"))
    try:
        exp = replace(exp, cfg=replace(exp.cfg, runs_dir=str(scratch / "runs"),
                                       export=replace(exp.cfg.export, dir=str(scratch / "saved"))))
        logger.info("%s is not the chief: it writes its run files to %s (removed at the end)", exp.info.task,
                    scratch)
        return _fit_job(exp, _open_run(exp, None, overwrite=True), checkpoint, verbose, started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _fit_job(exp: Experiment, run: RunDir, checkpoint: Checkpoint | None, verbose: int,
             started: float) -> FitResult:
    """run_fit after the run directory is open: train, save, evaluate, export, write the metrics."""
    cfg, source, data, model = exp.cfg, exp.source, exp.data, exp.model
    distill = _distillation(exp)  # before a checkpoint's weights: phase 1's features are the initial backbone's
    evaluate_val = None
    if data.val is not None:
        def evaluate_val(m: keras.Model) -> dict[str, Any]:
            return evaluate_model(exp.for_inference(m), data.val, source.class_names)
    if checkpoint is not None:
        checkpoint.restore_model(model)
        # Reseed from the resume point: the resumed epochs are reproducible, though their data order differs
        # from an uninterrupted run (tf.data iterator state is not checkpointed).
        keras.utils.set_random_seed(cfg.runtime.seed + checkpoint.state.epoch)
        logger.info("resuming %s from %s (%d epochs done)", run.path, checkpoint.path.name, checkpoint.state.epoch)
    fitted = _train(exp, run, checkpoint, evaluate_val, verbose, distill)
    # Every worker of a multi-worker run logs it: equal digests show they ended on the same all-reduced weights.
    logger.info("final weights digest %s (%s)", arrays_digest(model.get_weights()), exp.info.task or "one process")
    write_json(run.history, fitted.history)
    model.save(run.model)

    final_val = fitted.phases[-1].val if fitted.phases else None
    if final_val is None and evaluate_val is not None:
        final_val = evaluate_val(model)
    export_dir, export_entry = _export(exp, run, final_val)
    record = replace(_fit_metrics(exp, run, fitted, final_val, export_entry, started),
                     adapt=adaptation_summary(model, cfg, exp.target, data, fitted.history)
                     if exp.target is not None else None,
                     distill=distill_metrics(exp, model, distill) if distill is not None else None)
    _write_plots(report, run, fitted, final_val)
    _write_train_batch(exp.data, run)
    record.write(run.metrics)
    metrics = record.to_dict()
    report.write_summary(metrics, run.path)
    return FitResult(run_dir=run.path, metrics=metrics, export_dir=export_dir, model=model)


def _open_run(exp: Experiment, resumed: Path | None, overwrite: bool) -> RunDir:
    """The run directory: a new one with the config and split, or the `resumed` one (checked to see the same data),
    with the runtime, labels, skipped files and TensorBoard hparams written."""
    cfg, source = exp.cfg, exp.source
    if resumed is not None:
        run = RunDir(resumed)
        _check_same_data(run, source)
    else:
        run = create_run_dir(cfg.runs_dir, cfg.name, overwrite=overwrite)
        save_config(cfg, run.config)
        write_json(run.split, source.split_record())
    write_json(run.path / "runtime.json", {**exp.info.to_dict(), "augment_placement": exp.data.augment_placement,
                                           "inference_precision": exp.inference.to_dict()})
    run.labels.write_text("\n".join(source.class_names) + "\n")
    if source.skipped:
        run.skipped.write_text("".join(f"{path}\t{why}\n" for path, why in source.skipped))
        logger.warning("skipped %d bad files; listed in %s", len(source.skipped), run.skipped)
    tensorboard_hparams(run.logs, cfg)
    return run


def _train(exp: Experiment, run: RunDir, checkpoint: Checkpoint | None,
           evaluate_val: Callable[[keras.Model], dict[str, Any]] | None, verbose: int,
           distill: Distillation | None = None) -> FitPhasesResult:
    """Both phases in the runtime's scope; Ctrl-C says how to resume."""
    cfg = exp.cfg
    try:
        with exp.info.scope():
            return fit_phases(exp.model, cfg, exp.data, exp.blocks, run=run, jit_compile=exp.info.jit_compile,
                              verbose=verbose, evaluate_phase=evaluate_val,
                              feature_cache=feature_cache_spec(cfg, exp.spec, exp.image_size, exp.inference.use_bf16),
                              resume=checkpoint,
                              target=exp.target, l2sp_reference=exp.l2sp_reference, distill=distill)
    except KeyboardInterrupt:
        raise TrainingError(f"interrupted. Every finished epoch is checkpointed in {run.checkpoints}; continue with: "
                            f"tftransfer fit --resume {run.path}") from None


def _export(exp: Experiment, run: RunDir, final_val: dict | None) -> tuple[Path | None, dict[str, Any] | None]:
    """With export.enabled, the run published through `export`'s path (gate, staged SavedModel, fresh-process
    parity check, rename): (its version folder, or None when it was refused; the metrics entry)."""
    cfg = exp.cfg
    if not cfg.export.enabled:
        return None, None
    model_dir = Path(cfg.export.dir) / cfg.name
    unpublished = {"path": None, "version": None, "published": False}
    try:
        result = publish_model(exp.model, run, model_dir, exp.source.class_names, exp.image_size, exp.source,
                               ExportCommandConfig(), cfg.export, final_val)
    except ExportGateError as refused:
        # the run is complete and kept: only its publication is refused
        logger.warning("%s: tftransfer export %s --force", refused, run.path)
        return None, {**unpublished, "gate": str(refused)}
    except ParityError as failed:
        logger.error("%s", failed)
        return None, {**unpublished, "path": str(failed.kept), **_parity_entry(failed.parity, cfg, ok=False)}
    return result.version_dir, {"path": str(result.version_dir), "version": int(result.version_dir.name),
                                "published": True, **_parity_entry(result.parity, cfg, ok=True)}


def _parity_entry(parity: dict[str, Any], cfg: ExperimentConfig, ok: bool) -> dict[str, Any]:
    return {"parity_max_abs_diff": parity["max_abs_diff"], "parity_tolerance": cfg.export.parity_tolerance,
            "parity_ok": ok}


def _fit_metrics(exp: Experiment, run: RunDir, fitted: FitPhasesResult, final_val: dict | None,
                 export_entry: dict[str, Any] | None, started: float) -> RunMetrics:
    """metrics.json without the adaptation part: the run, its phases, the final validation and the export."""
    cfg, source, info = exp.cfg, exp.source, exp.info
    return RunMetrics(
        run={"name": cfg.name, "backbone": exp.spec.name, "weights": cfg.model.weights,
                "image_size": exp.image_size, "num_classes": len(source.class_names),
                "class_names": source.class_names, "train_examples": len(source.train),
                "val_examples": exp.data.val_examples, "skipped_files": len(source.skipped),
                "split": source.split_method, "run_dir": str(run.path),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "tftransfer_version": tftransfer.__version__, "tensorflow_version": tf.__version__,
                "keras_version": keras.__version__, "python_version": platform.python_version(),
                "runtime": {**info.to_dict(), "jit_compile": fitted.jit_compile,
                            "augment_placement": exp.data.augment_placement,
                            "inference_precision": exp.inference.to_dict()}},
        phases=[_phase_entry(phase, phase.val) for phase in fitted.phases],
        final={"val": final_val,
               "eval_images_per_second": final_val.get("images_per_second") if final_val else None},
        export=export_entry,
        timings={"total_seconds": time.perf_counter() - started},
    )


def adaptation_summary(model: keras.Model, cfg: ExperimentConfig, target: TargetDomain, data: Datasets,
                       history: list[dict[str, Any]]) -> dict[str, Any]:
    """The target side of a run: final target accuracy (when labels exist) and how label-free model-selection
    rules (source val loss/accuracy, target entropy) would have chosen among the epochs, against the truth."""

    entry: dict[str, Any] = {"method": cfg.adapt.method, "target": target.spec, "target_examples": len(target),
                             "labeled": target.labels is not None, "skipped_files": len(target.skipped)}
    if target.labels is not None:
        labeled = replace(target.split, labels=target.labels)
        ds = make_split_dataset(labeled, data.image_size, data.batch_size, shuffle=False, cache="none")
        found = evaluate_model(model, ds, data.class_names)
        entry["final"] = {k: found[k] for k in ("accuracy", "macro_f1", "top_k_accuracy", "ece", "nll")
                          if k in found}
    rules = {"source val_loss (min)": ("val_loss", min), "source val_accuracy (max)": ("val_accuracy", max),
             "target_entropy (min)": ("target_entropy", min), "oracle: target_accuracy (max)": ("target_accuracy", max)}
    selection = {}
    for rule, (key, pick) in rules.items():
        rows = [r for r in history if key in r and math.isfinite(r[key])]
        if rows:
            row = pick(rows, key=lambda r, k=key: r[k])
            selection[rule] = {"epoch": row["epoch"], "phase": row["phase"], key: row[key],
                               "target_accuracy": row.get("target_accuracy")}
    entry["selection"] = selection
    return entry


def _resume_point(run_path: Path) -> tuple[ExperimentConfig, Checkpoint]:
    """The config and newest checkpoint of an unfinished run."""
    run = RunDir(run_path)
    if not run.config.is_file():
        raise RunDirError(f"{run_path} is not a tftransfer run directory (no config.yaml)")
    if run.metrics.is_file():
        raise RunDirError(f"{run_path} has finished (metrics.json exists); nothing to resume")

    return load_config(run.config), load_latest(run.checkpoints)


def _check_same_data(run: RunDir, source: DataSource) -> None:
    """A resumed run must see the examples it started with."""

    saved = read_json(run.split).get("fingerprint")
    if saved != source.split_record()["fingerprint"]:
        raise RunDirError(f"the data of {run.path} changed since the run started ({run.split} no longer matches "
                          f"{source.root}); start a new run instead of resuming")


def _write_train_batch(data: Datasets, run: RunDir) -> None:
    """train_batch.png: one training batch augmented as the training step sees it (fastai's show_batch), so a
    user can check the augmentation and labels by eye."""
    try:
        pixels, labels = next(iter(data.train.take(1)))[:2]
        augmenter = step_augmenter(data)
        if augmenter is not None:  # placement `model`: the pipeline's batches are not augmented yet
            # in a graph, as in the training step (some augmentations are written for tracing, e.g. the XLA warp)
            pixels = tf.function(lambda images: augment_float32(augmenter, images))(pixels)
        grids.plot_train_batch(np.asarray(pixels), np.asarray(labels), data.class_names,
                               run.path / grids.TRAIN_BATCH_PNG)
    except Exception:  # noqa: BLE001  (a picture must not cost the run its metrics)
        logger.exception("could not draw %s", run.path / grids.TRAIN_BATCH_PNG)


def _write_plots(report: Any, run: RunDir, fitted: FitPhasesResult, final_val: dict | None) -> None:
    """History, confusion and reliability plots; a plotting failure must not cost the run its metrics."""
    try:
        series: dict[str, list[float]] = {}
        for key in ("loss", "val_loss", "accuracy", "val_accuracy", "learning_rate"):  # a panel each, LR on log y
            if fitted.history and key in fitted.history[0]:
                series[key] = [row.get(key, float("nan")) for row in fitted.history]
        boundaries = [p.first_epoch - 1 for p in fitted.phases[1:]]
        report.plot_history(series, run.path / "history.png", phase_boundaries=boundaries)
        if final_val:
            report.plot_confusion_matrix(final_val["confusion_matrix"], final_val["class_names"],
                                         run.path / "confusion_matrix.png")
            if "reliability" in final_val:
                report.plot_reliability_diagram(final_val["reliability"], run.path / "reliability.png")
            # The same images in TensorBoard, at the last epoch, beside the training curves
            report.write_tensorboard_images(
                run.logs / "validation", {name: run.path / name for name in ("confusion_matrix.png", "reliability.png")
                                          if (run.path / name).is_file()}, step=len(fitted.history))
    except Exception:  # noqa: BLE001
        logger.exception("could not draw the plots of %s", run.path)
