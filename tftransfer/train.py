"""Two-phase training and the whole `fit` job.

fit_phases(): phase 1 "head" trains the new head on a frozen backbone; phase 2 "finetune" unfreezes the top N
whole blocks (BatchNorm stays frozen and in inference mode) and trains at a low rate. Both phases share one
continuous epoch axis in history.json and TensorBoard. run_fit() wraps it with data, model, evaluation and export.
"""

from __future__ import annotations

import logging
import math
import platform
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import tftransfer
from tftransfer import backbones
from tftransfer.adapt.data import (
    TargetDomain,
    feature_ordered,
    feature_stream,
    load_target,
    target_ordered,
    target_stream,
)
from tftransfer.adapt.methods import AdaptMethod, build_method
from tftransfer.adapt.trainer import AdaptiveTrainer, L2SPSpec, TargetMonitor
from tftransfer.checkpoint import Checkpoint, TrainState, load_latest, save_checkpoint
from tftransfer.config import (
    DataConfig,
    ExperimentConfig,
    FinetuneConfig,
    HeadConfig,
    PhaseConfig,
    config_to_dict,
    flatten,
    save_config,
)
from tftransfer.data.augment import AUGMENT_VERSION
from tftransfer.data.balance import class_weight_for
from tftransfer.data.images import DECODE_VERSION
from tftransfer.data.pipeline import Datasets, make_datasets, make_split_dataset, take_pixels
from tftransfer.data.sources import DataSource, source_from_config
from tftransfer.device_augment import AugmentingModel, step_augmenter
from tftransfer.errors import ConfigError, RunDirError, TfTransferError
from tftransfer.features import (
    build_chain,
    build_feature_extractor,
    build_head_model,
    cached_features,
    default_cache_dir,
    features_dataset,
    file_hash,
)
from tftransfer.freezing import FreezeReport, freeze_backbone, unfreeze_top_blocks
from tftransfer.model import (
    BOTTLENECK_LAYER,
    HEAD_LAYER,
    POOL_LAYER,
    alignment_layer,
    build_inference_fn,
    build_model,
    get_backbone,
)
from tftransfer.runtime import RuntimeInfo, configure_runtime
from tftransfer.workdir import RunDir, create_run_dir, write_json

logger = logging.getLogger(__name__)


class TrainingError(TfTransferError):
    """Training could not go on (e.g. the loss became NaN); the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------------------------
# Learning rate, optimizer, loss


@keras.saving.register_keras_serializable(package="tftransfer")
class PhaseSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then constant, cosine decay to zero, or step decay, over one phase's steps."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0, kind: str = "constant",
                 decay_rate: float = 0.1, decay_steps: int = 1) -> None:
        self.peak = float(peak)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = max(int(warmup_steps), 0)
        self.kind = kind
        self.decay_rate = float(decay_rate)
        self.decay_steps = max(int(decay_steps), 1)

    def __call__(self, step):  # noqa: D102
        step = keras.ops.cast(step, "float32")
        warm = float(max(self.warmup_steps, 1))
        warmup = self.peak * keras.ops.minimum((step + 1.0) / warm, 1.0)
        after = keras.ops.maximum(step - self.warmup_steps, 0.0)
        if self.kind == "cosine":
            span = float(max(self.total_steps - self.warmup_steps, 1))
            progress = keras.ops.minimum(after / span, 1.0)
            value = 0.5 * self.peak * (1.0 + keras.ops.cos(math.pi * progress))
        elif self.kind == "step":
            value = self.peak * keras.ops.power(self.decay_rate, keras.ops.floor(after / self.decay_steps))
        else:
            value = keras.ops.convert_to_tensor(self.peak, "float32")
        if self.warmup_steps == 0:
            return value
        return keras.ops.where(step < self.warmup_steps, warmup, value)

    def get_config(self) -> dict[str, Any]:  # noqa: D102
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "kind": self.kind, "decay_rate": self.decay_rate, "decay_steps": self.decay_steps}


def build_schedule(phase: PhaseConfig, steps_per_epoch: int) -> PhaseSchedule:
    """The phase's learning-rate schedule, with epochs converted to optimizer steps."""
    return PhaseSchedule(peak=phase.learning_rate, total_steps=phase.epochs * steps_per_epoch,
                         warmup_steps=round(phase.warmup_epochs * steps_per_epoch), kind=phase.schedule,
                         decay_rate=phase.decay_rate, decay_steps=round(phase.decay_epochs * steps_per_epoch))


OPTIMIZERS: dict[str, Callable[[PhaseConfig, Any], keras.optimizers.Optimizer]] = {
    "adam": lambda p, lr: keras.optimizers.Adam(learning_rate=lr),
    "adamw": lambda p, lr: keras.optimizers.AdamW(learning_rate=lr, weight_decay=p.weight_decay),
    "sgd": lambda p, lr: keras.optimizers.SGD(learning_rate=lr, momentum=p.momentum, nesterov=p.nesterov,
                                              weight_decay=p.weight_decay or None),
}


def build_optimizer(phase: PhaseConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """A fresh optimizer for one phase (fresh state: phase 2 must not inherit phase 1's moments)."""
    return OPTIMIZERS[phase.optimizer](phase, build_schedule(phase, steps_per_epoch))


@keras.saving.register_keras_serializable(package="tftransfer")
class SparseCrossentropy(keras.losses.Loss):
    """Cross-entropy on integer labels and logits, with optional label smoothing (Keras' sparse loss has none)."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, name: str = "sparse_crossentropy",
                 **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):  # noqa: D102
        labels = keras.ops.one_hot(keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,)), self.num_classes)
        return keras.losses.categorical_crossentropy(labels, y_pred, from_logits=True,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self) -> dict[str, Any]:  # noqa: D102
        return {**super().get_config(), "num_classes": self.num_classes, "label_smoothing": self.label_smoothing}


def compile_for_phase(model: keras.Model, phase: PhaseConfig, steps_per_epoch: int, num_classes: int,
                      jit_compile: bool) -> None:
    """(Re)compiles the model; needed after every change of trainable flags."""
    model.compile(optimizer=build_optimizer(phase, steps_per_epoch),
                  loss=SparseCrossentropy(num_classes, phase.label_smoothing),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=jit_compile)


# ---------------------------------------------------------------------------------------------------------------
# Callbacks


class HistoryRecorder(keras.callbacks.Callback):
    """Collects per-epoch logs of every phase, with the phase name and learning rate, in one list."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.phase = ""
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        row = {"epoch": epoch + 1, "phase": self.phase}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        optimizer = self.model.optimizer
        row.setdefault("learning_rate", float(keras.ops.convert_to_numpy(optimizer.learning_rate)))
        row["seconds"] = time.perf_counter() - self._epoch_start
        self.rows.append(row)
        shown = "  ".join(f"{k} {row[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in row)
        logger.info("epoch %d [%s] %s  lr %.2e  (%.1f s)", epoch + 1, self.phase, shown, row["learning_rate"],
                    row["seconds"])

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        self._epoch_start = time.perf_counter()


class BestWeights(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the lowest monitored value; restores them when the phase ends."""

    def __init__(self, monitor: str = "val_loss") -> None:
        super().__init__()
        self.monitor = monitor
        self.best = math.inf
        self.best_epoch: int | None = None
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        value = (logs or {}).get(self.monitor)
        if value is not None and math.isfinite(value) and value < self.best:
            self.best, self.best_epoch = float(value), epoch + 1
            self.best_weights = self.model.get_weights()

    def on_train_end(self, logs: dict | None = None) -> None:  # noqa: D102
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)
            logger.info("restored weights of epoch %d (%s %.4f)", self.best_epoch, self.monitor, self.best)


class NaNGuard(keras.callbacks.Callback):
    """Stops at the first non-finite loss; the epoch checkpoint of the last good epoch stays on disk."""

    def __init__(self) -> None:
        super().__init__()
        self.bad_batch: int | None = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:  # noqa: D102
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_batch = batch
            self.model.stop_training = True


def _tensorboard_hparams(log_dir: Path, cfg: ExperimentConfig) -> None:
    """Writes the run's hyperparameters for TensorBoard's HParams dashboard."""
    try:
        from tensorboard.plugins.hparams import api as hp
    except ImportError:  # tensorboard ships with tensorflow; be quiet if someone removed it
        return
    values = {}
    for key, value in flatten(config_to_dict(cfg)).items():
        values[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    with tf.summary.create_file_writer(str(log_dir / "hparams")).as_default():
        hp.hparams(values)


# ---------------------------------------------------------------------------------------------------------------
# Phases


@dataclass
class PhaseResult:
    """What one phase did."""

    name: str
    epochs_run: int
    best_epoch: int | None
    freeze: FreezeReport
    learning_rate: float
    seconds: float
    train_images_per_second: float
    first_epoch: int
    val: dict[str, Any] | None = None


@dataclass
class FitPhasesResult:
    """Phases run and the continuous per-epoch history."""

    phases: list[PhaseResult] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    jit_compile: bool = False  # what was used in the end (False after a fallback)


@dataclass
class PhaseInputs:
    """What one phase's `fit` runs on: the model to fit (the full model, or the head alone on cached features)."""

    model: keras.Model
    train: tf.data.Dataset
    val: tf.data.Dataset | None
    steps_per_epoch: int
    note: str = "images"
    target_features: np.ndarray | None = None  # cached target features (phase 1 with a target)
    target_index: np.ndarray | None = None  # the target example index of each cached vector
    on_features: bool = False  # trains on cached features: epochs take milliseconds, not worth a checkpoint each
    callbacks: list[keras.callbacks.Callback] = field(default_factory=list)  # run before all others


@dataclass(frozen=True)
class FeatureCacheSpec:
    """Everything the cached features depend on besides the data, and where the cache lives."""

    key_parts: dict[str, Any]
    cache_dir: Path | None


def _head_on_features(model: keras.Model, head: HeadConfig, data: Datasets, cache: FeatureCacheSpec,
                      seed: int, target: TargetDomain | None = None,
                      data_cfg: DataConfig | None = None) -> PhaseInputs:
    """Phase 1 on cached pooled features: the frozen backbone runs once per image view, not once per epoch."""
    extractor = build_inference_fn(build_feature_extractor(model))  # traced once for every view and split
    views = head.feature_cache_views if data.augmenter is not None else 1
    if data.augmenter is not None and views == 1:
        logger.info("phase head trains on cached features of un-augmented images "
                    "(set phases.head.feature_cache_views > 1 for augmented views, or feature_cache=false)")
    parts = {**cache.key_parts,
             "augment": f"{AUGMENT_VERSION} {data.augmenter.get_config()}" if views > 1 else None,
             "seed": seed if views > 1 else None}
    # View 1 is always the clean image; further views go through the training augmenter.
    train_views = [data.ordered_train(augment=False)] + [data.ordered_train(augment=True)] * (views - 1)
    train_set = cached_features(extractor, train_views, data.source.train, parts, cache.cache_dir, what="train")
    val_ds = None
    if data.val is not None and data.source.val is not None:
        # Validation images are never augmented: their key leaves out the training views' settings, so changing
        # feature_cache_views does not recompute them.
        val_set = cached_features(extractor, [data.val], data.source.val, cache.key_parts, cache.cache_dir,
                                  what="val")
        val_ds = features_dataset(val_set.features, val_set.labels, data.batch_size, training=False,
                                  shuffle_buffer=1, seed=seed)
    train_ds = features_dataset(train_set.features, train_set.labels, data.batch_size, training=True,
                                shuffle_buffer=data.shuffle_buffer, seed=seed)
    target_features = target_index = None
    if target is not None:
        assert data_cfg is not None, "a target needs the data settings its pipeline uses"
        target_set = cached_features(extractor, [target_ordered(target, data.image_size, data_cfg)],
                                     target.split, cache.key_parts, cache.cache_dir, what="target")
        target_features, target_index = target_set.features, target_set.labels
    steps = max(1, math.ceil(len(train_set.labels) / data.batch_size))
    return PhaseInputs(build_head_model(model), train_ds, val_ds, steps,
                       note=f"cached features ({views} view{'s' if views > 1 else ''} per image"
                            f"{', from cache' if train_set.from_cache else ''})", target_features=target_features,
                       target_index=target_index, on_features=True)


def _adaptive_inputs(name: str, phase: PhaseConfig, model: keras.Model, inputs: PhaseInputs, cfg: ExperimentConfig,
                     data: Datasets, target: TargetDomain | None, l2sp_reference: dict[int, np.ndarray] | None,
                     class_weight: dict[int, float] | None, epochs_before: int, total_epochs: int,
                     method: AdaptMethod | None, augmenter: keras.Layer | None = None) -> PhaseInputs:
    """The phase's inputs re-wrapped for the AdaptiveTrainer when it adapts to a target or uses L2-SP.

    `augmenter` (placement model) is handed to the trainer for a phase on images: it then augments the source and
    target batches in its training step, and the target stream stays un-augmented like the source's.
    """
    l2sp = None
    if isinstance(phase, FinetuneConfig) and (phase.l2_sp_alpha > 0 or phase.l2_sp_beta > 0):
        l2sp = L2SPSpec(phase.l2_sp_alpha, phase.l2_sp_beta, l2sp_reference or {})
    if target is None and l2sp is None:
        return inputs
    align = alignment_layer(model)
    on_features = inputs.on_features
    if on_features:
        encoder = build_chain(model, POOL_LAYER, align, name="encoder") if align != POOL_LAYER else None
    else:
        encoder = keras.Model(model.inputs, model.get_layer(align).output, name="encoder")
    classifier = build_head_model(model, after=align)
    head_vars = [w for layer in model.layers if layer.name in (HEAD_LAYER, BOTTLENECK_LAYER)
                 for w in layer.trainable_weights]
    steps = inputs.steps_per_epoch
    trainer = AdaptiveTrainer(encoder, classifier, len(data.class_names), method=method, weight=cfg.adapt.weight,
                              num_target=len(target) if target is not None else 0, class_weight=class_weight,
                              label_smoothing=phase.label_smoothing, progress_offset=epochs_before * steps,
                              total_steps=total_epochs * steps, l2sp=l2sp, head_variables=head_vars,
                              augmenter=None if on_features else augmenter, name=f"adaptive_{name}")
    train, callbacks, note = inputs.train, [], inputs.note
    if target is not None:
        seed = cfg.runtime.seed
        if on_features:
            assert inputs.target_features is not None and inputs.target_index is not None
            stream = feature_stream(inputs.target_features, inputs.target_index, data.batch_size, seed=seed,
                                    shuffle_buffer=data.shuffle_buffer)
            ordered = feature_ordered(inputs.target_features, inputs.target_index, data.batch_size)
        else:
            stream = target_stream(target, data.image_size, cfg.data, seed=seed,
                                   augmenter=None if data.augment_in_model else data.augmenter)
            ordered = target_ordered(target, data.image_size, cfg.data)
        if method is not None:
            train = tf.data.Dataset.zip((inputs.train, stream))
        callbacks.append(TargetMonitor(trainer, ordered, target.labels, len(target),
                                       round_epochs=cfg.adapt.pseudo_round_epochs))
        note += f"; target {target.spec} ({len(target)} images), adapt.method {cfg.adapt.method}"
    if l2sp is not None:
        note += f"; L2-SP alpha {l2sp.alpha:g} beta {l2sp.beta:g}"
    return PhaseInputs(trainer, train, inputs.val, steps, note=note, callbacks=callbacks,
                       on_features=inputs.on_features)


def compile_inputs(inputs: PhaseInputs, phase: PhaseConfig, num_classes: int, jit_compile: bool) -> None:
    """Compiles a phase's model: the AdaptiveTrainer computes its own losses, a plain model gets the task loss."""
    if isinstance(inputs.model, AdaptiveTrainer):
        inputs.model.compile(optimizer=build_optimizer(phase, inputs.steps_per_epoch), jit_compile=jit_compile)
    else:
        compile_for_phase(inputs.model, phase, inputs.steps_per_epoch, num_classes, jit_compile)



@dataclass
class _Progress:
    """Mutable facts the per-epoch checkpoint needs about the phase in progress."""

    recorder: HistoryRecorder
    phase: str = ""
    phase_start: int = 0
    started: float = 0.0
    seconds_before: float = 0.0
    completed: list[dict[str, Any]] = field(default_factory=list)
    best: BestWeights | None = None

    def state(self, epoch: int, phase_done: bool = False) -> TrainState:
        best = self.best
        return TrainState(epoch=epoch, phase=self.phase, phase_start=self.phase_start, phase_done=phase_done,
                          phase_seconds=self.seconds_before + time.perf_counter() - self.started,
                          completed=list(self.completed), history=list(self.recorder.rows),
                          best_value=best.best if best and best.best_epoch else None,
                          best_epoch=best.best_epoch if best else None)


class EpochCheckpoint(keras.callbacks.Callback):
    """Checkpoints the full model, the optimizer and the training state after every epoch (last callback)."""

    def __init__(self, full_model: keras.Model, checkpoints: Path, progress: _Progress) -> None:
        super().__init__()
        self.full_model = full_model
        self.checkpoints = checkpoints
        self.progress = progress

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        loss = (logs or {}).get("loss")
        if loss is None or not math.isfinite(float(loss)):
            return  # never overwrite the last good checkpoint with a diverged epoch
        best = self.progress.best
        save_checkpoint(self.checkpoints, self.full_model, self.model.optimizer, self.progress.state(epoch + 1),
                        best.best_weights if best else None, extra_weights=_extra_weights(self.model))


def _extra_weights(model: keras.Model) -> list[np.ndarray] | None:
    """An adaptive trainer's method weights (not part of the exported model), for checkpoints."""
    method = getattr(model, "method", None) if isinstance(model, AdaptiveTrainer) else None
    return method.get_weights() if method is not None and method.weights else None


def _why_no_xla(model: keras.Model) -> str:
    """Why Keras will not XLA-compile `model`: the layers it marks as not compilable, or op determinism."""
    def unsupported(layer: keras.Layer) -> set[str]:
        return {type(sub).__name__ for sub in layer._flatten_layers() if not sub.supports_jit}

    layers = unsupported(model)
    if layers:
        augmenter = getattr(model, "augmenter", None)  # an AugmentingModel's or an AdaptiveTrainer's
        hint = ("; data.augment.placement=pipeline keeps XLA for the model"
                if augmenter is not None and unsupported(augmenter) else "")
        return f"layers without XLA support: {', '.join(sorted(layers))}{hint}"
    from tensorflow.python.framework.config import is_op_determinism_enabled  # what Keras itself checks

    if is_op_determinism_enabled():
        return "runtime.deterministic=true: Keras does not use XLA under op determinism"
    return "unknown reason"


def _phase_from_dict(data: dict[str, Any]) -> PhaseResult:
    return PhaseResult(**{**data, "freeze": FreezeReport(**data["freeze"])})


def fit_phases(model: keras.Model, cfg: ExperimentConfig, data: Datasets, blocks: list[backbones.Block],
               run: RunDir | None = None, jit_compile: bool = False, verbose: int = 0,
               evaluate_phase: Callable[[keras.Model], dict[str, Any]] | None = None,
               feature_cache: FeatureCacheSpec | None = None, resume: Checkpoint | None = None,
               target: TargetDomain | None = None,
               l2sp_reference: dict[int, np.ndarray] | None = None) -> FitPhasesResult:
    """Runs phase 1 (head on a frozen backbone) and phase 2 (top blocks unfrozen), each skipped at 0 epochs.

    With `feature_cache` (and phases.head.feature_cache on), phase 1 trains the head on cached pooled features.
    `evaluate_phase(model)`, when given, measures the full model at the end of each phase. With `run`, every
    epoch is checkpointed; `resume` (whose weights are already in `model`) continues from such a checkpoint.
    With a `target` (and cfg.adapt.method) or L2-SP, phases train through the AdaptiveTrainer. When
    `data.augment_in_model`, phases on images augment inside the training step (tftransfer.device_augment).
    """
    head: HeadConfig = cfg.phases.head
    finetune: FinetuneConfig = cfg.phases.finetune
    recorder = HistoryRecorder()
    progress = _Progress(recorder)
    shared: list[keras.callbacks.Callback] = [recorder]
    if run is not None:
        shared.append(keras.callbacks.TensorBoard(log_dir=str(run.logs), histogram_freq=0, write_graph=False))
    finished: dict[str, dict[str, Any]] = {}
    if resume is not None:
        recorder.rows = list(resume.state.history)
        finished = {d["name"]: d for d in resume.state.completed}
    result = FitPhasesResult()
    class_weight = class_weight_for(cfg.data, data.source.train.labels, len(data.class_names))
    if class_weight:
        logger.info("class weights (inverse frequency): %s",
                    ", ".join(f"{data.class_names[i]} {w:.2f}" for i, w in class_weight.items()))
    epoch = 0
    method = build_method(cfg.adapt) if target is not None else None  # one for all phases: DANN's discriminator
    method_restored = False                                               # keeps learning across them
    plan: list[tuple[str, PhaseConfig, Callable[[], FreezeReport]]] = [
        ("head", head, lambda: freeze_backbone(model)),
    ]
    if finetune.unfreeze_blocks > 0:
        plan.append(("finetune", finetune, lambda: unfreeze_top_blocks(model, blocks, finetune.unfreeze_blocks)))
    else:
        logger.info("phase finetune skipped: phases.finetune.unfreeze_blocks is 0")
    total_epochs = sum(phase.epochs for _, phase, _ in plan)  # DANN's lambda ramps over the whole run
    # One for both phases, so its seed stream continues across them; built here, in the strategy's scope.
    augmenter = step_augmenter(data)
    for name, phase, set_trainable in plan:
        if phase.epochs == 0:
            logger.info("phase %s skipped: 0 epochs", name)
            continue
        if name in finished:  # completed before the interruption
            done = _phase_from_dict(finished[name])
            result.phases.append(done)
            progress.completed.append(finished[name])
            epoch = done.first_epoch - 1 + done.epochs_run
            continue
        report = set_trainable()
        started = time.perf_counter()
        if name == "head" and head.feature_cache and feature_cache is not None:
            inputs = _head_on_features(model, head, data, feature_cache, cfg.runtime.seed, target, cfg.data)
        else:
            inputs = PhaseInputs(model, data.train, data.val, data.steps_per_epoch)
        inputs = _adaptive_inputs(name, phase, model, inputs, cfg, data, target, l2sp_reference, class_weight,
                                  epoch, total_epochs, method, augmenter)
        if augmenter is not None and not inputs.on_features:
            if not isinstance(inputs.model, AdaptiveTrainer):  # the trainer augments in its own train_step
                inputs = replace(inputs, model=AugmentingModel(inputs.model, augmenter, name=f"augmenting_{name}"))
            inputs = replace(inputs, note=f"{inputs.note}; augmented in the training step")
        if resume is not None and method is not None and not method_restored:
            saved = resume.extra_weights()
            if saved:
                method.set_weights(saved)
            method_restored = True
        fit_class_weight = None if isinstance(inputs.model, AdaptiveTrainer) else class_weight
        logger.info("phase %s: %d epochs at lr %g (%s) on %s; trainable params %s, frozen %s%s", name,
                    phase.epochs, phase.learning_rate, phase.schedule, inputs.note,
                    f"{report.trainable_params:,}", f"{report.non_trainable_params:,}",
                    f"; unfrozen blocks {report.unfrozen_blocks}" if report.unfrozen_blocks else "")
        compile_inputs(inputs, phase, len(data.class_names), jit_compile)
        if jit_compile and not inputs.model.jit_compile:
            # Keras turns XLA off by itself (with only a Python warning) for a layer it marks as not compilable,
            # e.g. the random geometry layers inside RandAugment when it runs in the step, or under determinism.
            logger.warning("phase %s runs without XLA: Keras refused jit_compile for %s (%s)", name,
                           inputs.model.name, _why_no_xla(inputs.model))
            jit_compile = False
        recorder.phase = name
        has_val = inputs.val is not None
        best = BestWeights() if phase.restore_best and has_val else None
        progress.phase, progress.phase_start, progress.started, progress.best = name, epoch, started, best
        progress.seconds_before = 0.0
        initial_epoch = epoch
        if resume is not None and resume.state.phase == name and not resume.state.phase_done:
            initial_epoch = resume.state.epoch
            resume.restore_optimizer(inputs.model.optimizer, inputs.model.trainable_variables)
            progress.seconds_before = resume.state.phase_seconds
            if best is not None and resume.state.best_epoch:
                best.best, best.best_epoch = resume.state.best_value, resume.state.best_epoch
                best.best_weights = resume.best_weights()
            logger.info("resuming phase %s after epoch %d of %d", name, initial_epoch - epoch, phase.epochs)
        guard = NaNGuard()
        callbacks = inputs.callbacks + shared + [guard] + ([best] if best else [])
        if phase.early_stopping_patience and has_val:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss",
                                                           patience=phase.early_stopping_patience))
        if run is not None and not inputs.on_features:
            # A phase on cached features is over in seconds (saving the full model and optimizer every epoch cost
            # two thirds of it); it is checkpointed when it ends, and a run killed inside it redoes it.
            callbacks.append(EpochCheckpoint(model, run.checkpoints, progress))
        with warnings.catch_warnings():
            # The file pipeline drops undecodable files, so its length is unknown until the first pass ends;
            # Keras then warns that the input "ran out of data" although every epoch saw all of it.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            rows_before = len(recorder.rows)
            try:
                inputs.model.fit(inputs.train, validation_data=inputs.val, initial_epoch=initial_epoch,
                                 epochs=epoch + phase.epochs, shuffle=False, callbacks=callbacks, verbose=verbose,
                                 class_weight=fit_class_weight)
            except tf.errors.OpError as exc:
                # XLA cannot compile every op of every backbone; a failure before the first epoch finished has
                # changed no weights, so the phase restarts without XLA instead of ending the run.
                if not jit_compile or len(recorder.rows) != rows_before:
                    raise
                logger.warning("XLA compilation failed in phase %s (%s: %s); continuing without XLA", name,
                               type(exc).__name__, str(exc).splitlines()[0][:200])
                jit_compile = False
                compile_inputs(inputs, phase, len(data.class_names), False)
                inputs.model.fit(inputs.train, validation_data=inputs.val, initial_epoch=initial_epoch,
                                 epochs=epoch + phase.epochs, shuffle=False, callbacks=callbacks, verbose=verbose,
                                 class_weight=fit_class_weight)
        result.jit_compile = jit_compile
        seconds = progress.seconds_before + time.perf_counter() - started
        if guard.bad_batch is not None:
            raise TrainingError(f"phase {name}: the loss became NaN/inf at batch {guard.bad_batch} of epoch "
                                f"{len(recorder.rows) + 1}; lower phases.{name}.learning_rate. "
                                + (f"The last good epoch is checkpointed in {run.checkpoints}." if run else ""))
        epochs_run = sum(1 for row in recorder.rows if row["phase"] == name)
        done = PhaseResult(
            name=name, epochs_run=epochs_run, best_epoch=best.best_epoch if best else None, freeze=report,
            learning_rate=phase.learning_rate, seconds=seconds,
            train_images_per_second=epochs_run * data.train_examples / seconds if seconds > 0 else 0.0,
            first_epoch=epoch + 1, val=evaluate_phase(model) if evaluate_phase else None)
        result.phases.append(done)
        epoch += epochs_run
        progress.completed.append(asdict(done))
        if run is not None:  # the phase's final weights (best restored), so a resume starts the next phase
            progress.best = None
            save_checkpoint(run.checkpoints, model, None, progress.state(epoch, phase_done=True),
                            extra_weights=_extra_weights(inputs.model))
    result.history = recorder.rows
    return result


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
            "val": val_metrics}


def feature_cache_spec(cfg: ExperimentConfig, spec: backbones.BackboneSpec, image_size: int) -> FeatureCacheSpec:
    """What the pooled features depend on: backbone, its weights' bytes, input size, preprocessing, pooling."""
    weights = cfg.model.weights
    weights_id: str = weights.lower()
    if weights_id not in ("imagenet", "none"):
        weights_id = file_hash(weights)
    parts = {"backbone": spec.name, "weights": weights_id, "kwargs": cfg.model.backbone_kwargs,
             "image_size": image_size, "preprocess": spec.preprocess_mode, "pooling": cfg.model.pooling,
             "keras": keras.__version__, "decode": DECODE_VERSION}
    if weights_id == "none":  # random weights depend on the seed
        parts["seed"] = cfg.runtime.seed
    return FeatureCacheSpec(parts, Path(cfg.runtime.cache_dir) if cfg.runtime.cache_dir else default_cache_dir())


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


def prepare_experiment(cfg: ExperimentConfig) -> Experiment:
    """Resolves names and sizes, loads and checks the data, applies the runtime, builds the model.

    Everything that can fail on bad input fails here, before any run directory exists.
    """
    spec = backbones.get_backbone_spec(cfg.model.backbone)
    image_size = resolve_image_size(cfg, spec)
    if cfg.adapt.method != "none" and not cfg.adapt.target:
        raise ConfigError(f"adapt.method {cfg.adapt.method} needs target images: give --target DATA "
                          "(adapt.target)")
    if not cfg.name:
        cfg = replace(cfg, name=default_run_name(cfg))
    cfg = replace(cfg, data=replace(cfg.data, image_size=image_size))
    info = configure_runtime(cfg.runtime)  # first: strategies need a fresh TensorFlow runtime
    source = source_from_config(cfg.data)
    weights = None if cfg.model.weights.lower() == "none" else cfg.model.weights
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
    reference = None
    finetune = cfg.phases.finetune
    if finetune.l2_sp_alpha > 0 and finetune.epochs > 0 and finetune.unfreeze_blocks > 0:
        # The starting point L2-SP pulls toward: the pretrained values, taken before anything trains or resumes.
        reference = {id(v): np.array(v.numpy(), np.float32) for v in get_backbone(model).trainable_weights}
    return Experiment(cfg, spec, image_size, source, info, blocks, data, model, target, reference)


def run_fit(cfg: ExperimentConfig | None, overwrite: bool = False, verbose: int = 0,
            resume: str | Path | None = None) -> FitResult:
    """The `tftransfer fit` job: data -> model -> two phases -> evaluation -> export -> run directory.

    With `resume` (a run directory), the run's own config.yaml is used and training continues from its newest
    checkpoint; `cfg` is ignored.
    """
    from tftransfer import evaluate, export, report  # heavy plotting/export imports only when fitting

    started = time.perf_counter()
    checkpoint = None
    if resume is not None:
        cfg, checkpoint = _resume_point(Path(resume))
    assert cfg is not None
    exp = prepare_experiment(cfg)
    cfg, spec, source, info, blocks, data, model = (exp.cfg, exp.spec, exp.source, exp.info, exp.blocks, exp.data,
                                                    exp.model)
    image_size = exp.image_size

    if checkpoint is not None:
        run = RunDir(Path(resume))  # type: ignore[arg-type]
        _check_same_data(run, source)
    else:
        run = create_run_dir(cfg.runs_dir, cfg.name, overwrite=overwrite)
        save_config(cfg, run.config)
        write_json(run.split, source.split_record())
    write_json(run.path / "runtime.json", {**info.to_dict(), "augment_placement": exp.data.augment_placement})
    run.labels.write_text("\n".join(source.class_names) + "\n")
    if source.skipped:
        run.skipped.write_text("".join(f"{path}\t{why}\n" for path, why in source.skipped))
        logger.warning("skipped %d bad files; listed in %s", len(source.skipped), run.skipped)
    _tensorboard_hparams(run.logs, cfg)
    evaluate_val = None
    if data.val is not None:
        def evaluate_val(m: keras.Model) -> dict[str, Any]:
            return evaluate.evaluate_model(m, data.val, source.class_names)
    if checkpoint is not None:
        checkpoint.restore_model(model)
        # Reseed from the resume point: the resumed epochs are reproducible, though their data order differs
        # from an uninterrupted run (tf.data iterator state is not checkpointed).
        keras.utils.set_random_seed(cfg.runtime.seed + checkpoint.state.epoch)
        logger.info("resuming %s from %s (%d epochs done)", run.path, checkpoint.path.name, checkpoint.state.epoch)
    try:
        with info.scope():
            fitted = fit_phases(model, cfg, data, blocks, run=run, jit_compile=info.jit_compile, verbose=verbose,
                                evaluate_phase=evaluate_val, feature_cache=feature_cache_spec(cfg, spec, image_size),
                                resume=checkpoint, target=exp.target, l2sp_reference=exp.l2sp_reference)
    except KeyboardInterrupt:
        raise TrainingError(f"interrupted. Every finished epoch is checkpointed in {run.checkpoints}; continue with: "
                            f"tftransfer fit --resume {run.path}") from None
    write_json(run.history, fitted.history)
    model.save(run.model)

    phase_entries = [_phase_entry(phase, phase.val) for phase in fitted.phases]
    final_val = fitted.phases[-1].val if fitted.phases else None
    if final_val is None and evaluate_val is not None:
        final_val = evaluate_val(model)

    export_entry = None
    export_dir = None
    if cfg.export.enabled:
        export_dir = export.export_saved_model(model, Path(cfg.export.dir) / cfg.name, source.class_names,
                                               image_size, top_k=cfg.export.top_k,
                                               model_card=export.build_model_card(run.path, val_metrics=final_val))
        parity_data = data.val if data.val is not None else data.train
        diff = export.check_parity(model, export_dir, take_pixels(parity_data, 256))
        export_entry = {"path": str(export_dir), "version": int(export_dir.name), "parity_max_abs_diff": diff,
                        "parity_tolerance": cfg.export.parity_tolerance,
                        "parity_ok": bool(diff <= cfg.export.parity_tolerance)}
        if not export_entry["parity_ok"]:
            logger.error("exported model disagrees with the Keras model: max abs diff %.2e > %.0e", diff,
                         cfg.export.parity_tolerance)

    metrics = {
        "schema_version": 1,
        "run": {"name": cfg.name, "backbone": spec.name, "weights": cfg.model.weights, "image_size": image_size,
                "num_classes": len(source.class_names), "class_names": source.class_names,
                "train_examples": len(source.train), "val_examples": data.val_examples,
                "skipped_files": len(source.skipped), "split": source.split_method,
                "run_dir": str(run.path), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "tftransfer_version": tftransfer.__version__, "tensorflow_version": tf.__version__,
                "keras_version": keras.__version__, "python_version": platform.python_version(),
                "runtime": {**info.to_dict(), "jit_compile": fitted.jit_compile,
                            "augment_placement": exp.data.augment_placement}},
        "phases": phase_entries,
        "final": {"val": final_val,
                  "eval_images_per_second": final_val.get("images_per_second") if final_val else None},
        "export": export_entry,
        "timings": {"total_seconds": time.perf_counter() - started},
    }
    if exp.target is not None:
        metrics["adapt"] = adaptation_summary(model, cfg, exp.target, data, fitted.history)
    _write_plots(report, run, fitted, final_val)
    write_json(run.metrics, metrics)
    report.write_summary(metrics, run.path)
    return FitResult(run_dir=run.path, metrics=metrics, export_dir=export_dir, model=model)


def adaptation_summary(model: keras.Model, cfg: ExperimentConfig, target: TargetDomain, data: Datasets,
                       history: list[dict[str, Any]]) -> dict[str, Any]:
    """The target side of a run: final target accuracy (when labels exist) and how label-free model-selection
    rules (source val loss/accuracy, target entropy) would have chosen among the epochs, against the truth."""
    from tftransfer import evaluate

    entry: dict[str, Any] = {"method": cfg.adapt.method, "target": target.spec, "target_examples": len(target),
                             "labeled": target.labels is not None, "skipped_files": len(target.skipped)}
    if target.labels is not None:
        labeled = replace(target.split, labels=target.labels)
        ds = make_split_dataset(labeled, data.image_size, data.batch_size, shuffle=False, cache="none")
        found = evaluate.evaluate_model(model, ds, data.class_names)
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
    from tftransfer.config import load_config

    return load_config(run.config), load_latest(run.checkpoints)


def _check_same_data(run: RunDir, source: DataSource) -> None:
    """A resumed run must see the examples it started with."""
    from tftransfer.workdir import read_json

    saved = read_json(run.split).get("fingerprint")
    if saved != source.split_record()["fingerprint"]:
        raise RunDirError(f"the data of {run.path} changed since the run started ({run.split} no longer matches "
                          f"{source.root}); start a new run instead of resuming")


def _write_plots(report: Any, run: RunDir, fitted: FitPhasesResult, final_val: dict | None) -> None:
    """History, confusion and reliability plots; a plotting failure must not cost the run its metrics."""
    try:
        series: dict[str, list[float]] = {}
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            if fitted.history and key in fitted.history[0]:
                series[key] = [row.get(key, float("nan")) for row in fitted.history]
        boundaries = [p.first_epoch - 1 for p in fitted.phases[1:]]
        report.plot_history(series, run.path / "history.png", phase_boundaries=boundaries)
        if final_val:
            report.plot_confusion_matrix(final_val["confusion_matrix"], final_val["class_names"],
                                         run.path / "confusion_matrix.png")
            if "reliability" in final_val:
                report.plot_reliability_diagram(final_val["reliability"], run.path / "reliability.png")
    except Exception:  # noqa: BLE001
        logger.exception("could not draw the plots of %s", run.path)
