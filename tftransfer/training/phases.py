"""Two-phase training and the whole `fit` job.

fit_phases(): phase 1 "head" trains the new head on a frozen backbone; phase 2 "finetune" unfreezes the top N
whole blocks (BatchNorm stays frozen and in inference mode) and trains at a low rate. Both phases share one
continuous epoch axis in history.json and TensorBoard. run_fit() wraps it with data, model, evaluation and export.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.config.experiment import DataConfig, ExperimentConfig, FinetuneConfig, HeadConfig, PhaseConfig
from tftransfer.core.errors import TfTransferError
from tftransfer.data.augment import AUGMENT_VERSION
from tftransfer.data.balance import class_weight_for
from tftransfer.data.pipeline import Datasets
from tftransfer.data.sources import DataSource
from tftransfer.model import backbones
from tftransfer.model.activations import ModelCut, split_at_trainable
from tftransfer.model.classifier import BOTTLENECK_LAYER, HEAD_LAYER, POOL_LAYER, alignment_layer, build_inference_fn
from tftransfer.model.features import (
    FeatureSet,
    build_chain,
    build_feature_extractor,
    build_head_model,
    cached_features,
    feature_cache_path,
    features_dataset,
    read_cached_features,
)
from tftransfer.model.freezing import FreezeReport, freeze_backbone, top_blocks, unfreeze_top_blocks
from tftransfer.model.precision import bf16_copy
from tftransfer.runs.layout import RunDir
from tftransfer.training.activation_cache import (
    activation_datasets,
    activation_key_parts,
    blocked_by,
    cached_activations,
    config_conditions,
    estimated_mb,
    refuse_or_skip,
)
from tftransfer.training.adaptation.methods import AdaptMethod, build_method
from tftransfer.training.adaptation.target import (
    TargetDomain,
    feature_ordered,
    feature_stream,
    target_ordered,
    target_stream,
)
from tftransfer.training.adaptation.trainer import AdaptiveTrainer, L2SPSpec, TargetMonitor
from tftransfer.training.augment_step import AugmentingModel, step_augmenter
from tftransfer.training.callbacks import (
    BestWeights,
    EpochCheckpoint,
    HistoryRecorder,
    NaNGuard,
    Progress,
    StepCount,
    StepProgress,
    extra_weights,
)
from tftransfer.training.checkpoint import Checkpoint, save_checkpoint
from tftransfer.training.distill import (
    Distillation,
    DistillTrainer,
    view_feature_dataset,
    view_pixel_dataset,
    view_steps,
)
from tftransfer.training.loop import fit_loop, holds_first_replica, is_multiworker, resolve_loop, share_from_chief
from tftransfer.training.pruning import MagnitudePruning, build_pruning
from tftransfer.training.schedule import build_optimizer, compile_for_phase

logger = logging.getLogger(__name__)


class TrainingError(TfTransferError):
    """Training could not go on (e.g. the loss became NaN); the last good checkpoint is kept."""




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
    pruning: dict[str, Any] | None = None  # the pruning schedule and measured per-layer sparsity, if it pruned
    activation_cache: dict[str, Any] | None = None  # phase 2: whether it trained on cached activations, and why


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
    on_activations: bool = False  # phase 2's top on cached trunk activations (augmented views are in the cache)
    activation_cache: dict[str, Any] | None = None  # the activation cache decision, recorded in the phase result
    callbacks: list[keras.callbacks.Callback] = field(default_factory=list)  # run before all others


@dataclass(frozen=True)
class FeatureCacheSpec:
    """Everything the cached features depend on besides the data, and where the cache lives."""

    key_parts: dict[str, Any]
    cache_dir: Path | None
    bf16: bool = False  # extract with the model's bf16 copy (runtime.precision auto, where the probe said it pays)


def _phase1_key_parts(cache: FeatureCacheSpec, views: int, augmenter: Any, seed: int) -> dict[str, Any]:
    """The cache key of phase 1's train features: the backbone's, plus the augmentation of views beyond the first."""
    # Random weights (key part "seed") depend on the seed even when no view is augmented.
    return {**cache.key_parts,
            "augment": f"{AUGMENT_VERSION} {augmenter.get_config()}" if views > 1 else None,
            "seed": seed if views > 1 else cache.key_parts.get("seed")}


def phase1_feature_sets(extractor: Callable[[Any], np.ndarray], views: int, data: Datasets,
                        cache: FeatureCacheSpec, seed: int) -> tuple[FeatureSet, FeatureSet | None]:
    """The train (`views` per image) and val pooled features phase 1 trains on, through the feature cache.

    `tftransfer select` calls this too (views=1), so the phase 1 of a later fit of the chosen backbone on the same
    data reads the features select computed.
    """
    views = views if data.augmenter is not None else 1
    parts = _phase1_key_parts(cache, views, data.augmenter, seed)
    # View 1 is always the clean image; further views go through the training augmenter.
    train_views = [data.ordered_train(augment=False)] + [data.ordered_train(augment=True)] * (views - 1)
    train_set = cached_features(extractor, train_views, data.source.train, parts, cache.cache_dir, what="train")
    val_set = None
    if data.val is not None and data.source.val is not None:
        # Validation images are never augmented: their key leaves out the training views' settings, so changing
        # feature_cache_views does not recompute them.
        val_set = cached_features(extractor, [data.val], data.source.val, cache.key_parts, cache.cache_dir,
                                  what="val")
    return train_set, val_set


def cached_clean_feature_sets(source: DataSource, cache: FeatureCacheSpec,
                              seed: int) -> tuple[FeatureSet, FeatureSet | None] | None:
    """What phase1_feature_sets(views=1) would read from the cache, found without building a model or a pipeline;
    None when any of it is not cached."""
    train = read_cached_features(feature_cache_path(source.train, _phase1_key_parts(cache, 1, None, seed), 1,
                                                    cache.cache_dir, "train"), 1)
    if train is None:
        return None
    if source.val is None or len(source.val) == 0:
        return train, None
    val = read_cached_features(feature_cache_path(source.val, cache.key_parts, 1, cache.cache_dir, "val"), 1)
    return (train, val) if val is not None else None


def _shared_features(found: FeatureSet | None, views: int) -> FeatureSet:
    """Under multiworker the feature cache is computed (or read) once, by the process holding replica 0, and sent
    to the others through the strategy's all-reduce: no cache folder needs to be shared between machines."""
    strategy = tf.distribute.get_strategy()
    if not is_multiworker(strategy):
        assert found is not None
        return found
    features = share_from_chief(strategy, found.features if found else None)
    labels = share_from_chief(strategy, found.labels if found else None).astype(np.int64)  # one dtype on all
    return FeatureSet(features, labels, views, bool(found.from_cache) if found else False,
                      found.path if found else None)


def head_on_features(model: keras.Model, head: HeadConfig, data: Datasets, cache: FeatureCacheSpec,
                      seed: int, target: TargetDomain | None = None,
                      data_cfg: DataConfig | None = None) -> PhaseInputs:
    """Phase 1 on cached pooled features: the frozen backbone runs once per image view, not once per epoch."""
    # Traced once for every view and split; the bf16 copy's weights are the model's now (the frozen backbone's).
    extractor = build_inference_fn(build_feature_extractor(bf16_copy(model) if cache.bf16 else model))
    views = head.feature_cache_views if data.augmenter is not None else 1
    if data.augmenter is not None and views == 1:
        logger.info("phase head trains on cached features of un-augmented images "
                    "(set phases.head.feature_cache_views > 1 for augmented views, or feature_cache=false)")
    first = holds_first_replica(tf.distribute.get_strategy())  # True but under multiworker's other workers
    train_set, val_set = phase1_feature_sets(extractor, views, data, cache, seed) if first else (None, None)
    has_val = data.val is not None and data.source.val is not None
    train_set = _shared_features(train_set, views)
    val_set = _shared_features(val_set, 1) if has_val else None
    val_ds = None
    if val_set is not None:
        val_ds = features_dataset(val_set.features, val_set.labels, data.batch_size, training=False,
                                  shuffle_buffer=1, seed=seed)
    train_ds = features_dataset(train_set.features, train_set.labels, data.batch_size, training=True,
                                shuffle_buffer=data.shuffle_buffer, seed=seed)
    target_features = target_index = None
    if target is not None:
        assert data_cfg is not None, "a target needs the data settings its pipeline uses"
        target_set = _shared_features(cached_features(
            extractor, [target_ordered(target, data.image_size, data_cfg)], target.split, cache.key_parts,
            cache.cache_dir, what="target") if first else None, 1)
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
                       on_features=inputs.on_features, activation_cache=inputs.activation_cache)


def _own_loss(model: keras.Model) -> bool:
    """Whether the phase model computes its own losses (and class weights) in its train_step."""
    return isinstance(model, (AdaptiveTrainer, DistillTrainer))


def compile_inputs(inputs: PhaseInputs, phase: PhaseConfig, num_classes: int, jit_compile: bool) -> None:
    """Compiles a phase's model: the trainers compute their own losses, a plain model gets the task loss."""
    if _own_loss(inputs.model):
        inputs.model.compile(optimizer=build_optimizer(phase, inputs.steps_per_epoch), jit_compile=jit_compile)
    else:
        compile_for_phase(inputs.model, phase, inputs.steps_per_epoch, num_classes, jit_compile)




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


@dataclass
class _FitState:
    """What fit_phases carries from one phase to the next."""

    model: keras.Model
    cfg: ExperimentConfig
    data: Datasets
    run: RunDir | None
    jit_compile: bool
    resume: Checkpoint | None
    target: TargetDomain | None
    recorder: HistoryRecorder
    progress: Progress
    shared: list[keras.callbacks.Callback]  # every phase's callbacks: the history, TensorBoard
    class_weight: dict[int, float] | None
    method: AdaptMethod | None  # one for all phases: DANN's discriminator keeps learning across them
    epoch: int = 0  # epochs finished before the current phase, on the continuous axis
    total_epochs: int = 0
    augmenter: keras.Layer | None = None  # the training-step augmenter, when data.augment_in_model
    method_restored: bool = False
    distill: Distillation | None = None
    loop: str = "keras"  # the step driver: Model.fit, or tftransfer's own (training.loop)
    blocks: list[backbones.Block] = field(default_factory=list)  # the backbone's blocks, bottom to top


def _start_fit(model: keras.Model, cfg: ExperimentConfig, data: Datasets, run: RunDir | None, jit_compile: bool,
               resume: Checkpoint | None, target: TargetDomain | None,
               distill: Distillation | None = None) -> _FitState:
    """The history recorder (with a resumed run's rows), TensorBoard, class weights and the adaptation method."""
    recorder = HistoryRecorder()
    progress = Progress(recorder)
    shared: list[keras.callbacks.Callback] = [recorder]
    if run is not None:
        shared.append(keras.callbacks.TensorBoard(log_dir=str(run.logs), histogram_freq=0, write_graph=False))
    if resume is not None:
        recorder.rows = list(resume.state.history)
    class_weight = class_weight_for(cfg.data, data.source.train.labels, len(data.class_names))
    if class_weight:
        logger.info("class weights (inverse frequency): %s",
                    ", ".join(f"{data.class_names[i]} {w:.2f}" for i, w in class_weight.items()))
    method = build_method(cfg.adapt) if target is not None else None
    return _FitState(model, cfg, data, run, jit_compile, resume, target, recorder, progress, shared, class_weight,
                     method, distill=distill, loop=resolve_loop(cfg.runtime.loop))


_Plan = list[tuple[str, PhaseConfig, Callable[[], FreezeReport]]]


def _phase_plan(model: keras.Model, cfg: ExperimentConfig, blocks: list[backbones.Block]) -> _Plan:
    """The phases in order, each with what it makes trainable: the head alone, then the top blocks."""
    finetune: FinetuneConfig = cfg.phases.finetune
    plan: _Plan = [("head", cfg.phases.head, lambda: freeze_backbone(model))]
    if finetune.unfreeze_blocks > 0:
        plan.append(("finetune", finetune, lambda: unfreeze_top_blocks(model, blocks, finetune.unfreeze_blocks)))
    else:
        logger.info("phase finetune skipped: phases.finetune.unfreeze_blocks is 0")
    return plan


def _phase_inputs(state: _FitState, name: str, phase: PhaseConfig, feature_cache: FeatureCacheSpec | None,
                  l2sp_reference: dict[int, np.ndarray] | None) -> PhaseInputs:
    """What the phase fits: images or cached features, through the AdaptiveTrainer or the step augmenter."""
    cfg, data, model, head = state.cfg, state.data, state.model, state.cfg.phases.head
    if state.distill is not None:
        return _distill_inputs(state, state.distill, name == "head" and head.feature_cache, feature_cache)
    if name == "head" and head.feature_cache and feature_cache is not None:
        inputs = head_on_features(model, head, data, feature_cache, cfg.runtime.seed, state.target, cfg.data)
    elif isinstance(phase, FinetuneConfig):
        inputs = _activation_inputs(state, phase, feature_cache)
        if inputs.on_activations:
            return inputs
    else:
        inputs = PhaseInputs(model, data.train, data.val, data.steps_per_epoch)
    inputs = _adaptive_inputs(name, phase, model, inputs, cfg, data, state.target, l2sp_reference,
                              state.class_weight, state.epoch, state.total_epochs, state.method, state.augmenter)
    return _augmenting_inputs(inputs, state.augmenter, name)


def _activation_cut_or_reason(state: _FitState, phase: FinetuneConfig, views: int) -> tuple[ModelCut | None, str]:
    """The model's cut below its unfrozen blocks when phase 2 can train on cached activations, else why not."""
    cfg, data, model = state.cfg, state.data, state.model
    strategy = tf.distribute.get_strategy()
    conditions = config_conditions(cfg, multiworker=is_multiworker(strategy), replicas=strategy.num_replicas_in_sync)
    why = blocked_by(replace(conditions, distill=state.distill is not None,
                             adaptive=conditions.adaptive or state.target is not None))
    if why is not None:
        return None, why
    names = [layer for block in top_blocks(state.blocks, phase.unfreeze_blocks) for layer in block.layer_names]
    result = split_at_trainable(model, names)
    if result.cut is None:
        return None, result.reason
    if [id(v) for v in result.cut.top.trainable_variables] != [id(v) for v in model.trainable_variables]:
        return None, "the model trains weights outside the unfrozen blocks and head"
    size = estimated_mb(result.cut, len(data.source.train), data.val_examples if data.val is not None else 0, views)
    if size > phase.activation_cache_max_mb:
        return None, (f"it would take {size:.0f} MB, over phases.finetune.activation_cache_max_mb "
                      f"{phase.activation_cache_max_mb:g}")
    return result.cut, f"{result.reason}, {size:.1f} MB"


def _activation_inputs(state: _FitState, phase: FinetuneConfig,
                       feature_cache: FeatureCacheSpec | None) -> PhaseInputs:
    """Phase 2's top blocks and head on cached trunk activations (tftransfer.training.activation_cache), or the
    images' inputs to use instead with the reason; `on` where the cache cannot apply is a ConfigError."""
    data, seed = state.data, state.cfg.runtime.seed
    views = phase.activation_cache_views if data.augmenter is not None else 1
    if phase.activation_cache == "off":
        cut, why = None, "phases.finetune.activation_cache is off"
    else:
        cut, why = _activation_cut_or_reason(state, phase, views)
    if cut is None:
        logger.info("phase finetune trains on images, not cached activations: %s", refuse_or_skip(phase, why))
        return PhaseInputs(state.model, data.train, data.val, data.steps_per_epoch,
                           activation_cache={"used": False, "reason": why})
    clean = phase.activation_cache_clean_view and views > 1
    parts = activation_key_parts(cut, data, feature_cache.key_parts if feature_cache else {}, views, clean, seed)
    found = cached_activations(cut, data, views, clean, parts, feature_cache.cache_dir if feature_cache else None)
    train, val, steps, schedule = activation_datasets(found, cut, data.batch_size, data.shuffle_buffer, seed,
                                                      state.epoch)
    decision = {"used": True, "reason": why, "cut": cut.cut, "views": views, "clean_view": clean,
                "from_cache": found.from_cache, "compute_seconds": round(found.seconds, 3),
                "path": str(found.path) if found.path else None}
    note = (f"cached activations at {cut.cut} ({views} view{'s' if views > 1 else ''} per image, epoch e on view "
            f"e % {views}{', from cache' if found.from_cache else ''})")
    return PhaseInputs(cut.top, train, val, steps, note=note, callbacks=[schedule], on_activations=True,
                       activation_cache=decision)


def _distill_inputs(state: _FitState, distill: Distillation, on_features: bool,
                    feature_cache: FeatureCacheSpec | None) -> PhaseInputs:
    """A distillation phase: the head on the cached features of the fixed views, or the model on the views'
    pixels, each with its cached teacher logits, through the DistillTrainer (the views are the augmentation)."""
    data, model, seed = state.data, state.model, state.cfg.runtime.seed
    views = distill.views
    on_features = on_features and feature_cache is not None
    val = data.val
    if on_features:
        assert feature_cache is not None
        net = build_head_model(model)
        train = view_feature_dataset(views, data.batch_size, data.shuffle_buffer, seed)
        if data.val is not None and data.source.val is not None:
            extractor = build_inference_fn(build_feature_extractor(model))
            found = cached_features(extractor, [data.val], data.source.val, feature_cache.key_parts,
                                    feature_cache.cache_dir, what="val")
            val = features_dataset(found.features, found.labels, data.batch_size, training=False, shuffle_buffer=1,
                                   seed=seed)
    else:
        net = model
        train = view_pixel_dataset(views, data.batch_size, data.shuffle_buffer, seed)
    trainer = DistillTrainer(net, distill.alpha, distill.temperature, name="distill")
    where = "cached features of " if on_features else ""
    note = (f"{where}{views.views} fixed view{'s' if views.views > 1 else ''} of {views.images} images with cached "
            f"teacher logits (distill alpha {distill.alpha:g}, temperature {distill.temperature:g}"
            f"{', from cache' if views.from_cache else ''})")
    return PhaseInputs(trainer, train, val, view_steps(views, data.batch_size, on_features), note=note,
                       on_features=on_features)


def _augmenting_inputs(inputs: PhaseInputs, augmenter: keras.Layer | None, name: str) -> PhaseInputs:
    """A phase on images with a step augmenter: the model wrapped in an AugmentingModel (the trainer augments in
    its own train_step)."""
    if augmenter is None or inputs.on_features or inputs.on_activations:
        return inputs
    if not isinstance(inputs.model, AdaptiveTrainer):
        inputs = replace(inputs, model=AugmentingModel(inputs.model, augmenter, name=f"augmenting_{name}"))
    return replace(inputs, note=f"{inputs.note}; augmented in the training step")


def _restore_method(state: _FitState) -> None:
    """The adaptation method's weights from the checkpoint being resumed, once, before its first phase runs."""
    if state.resume is not None and state.method is not None and not state.method_restored:
        saved = state.resume.extra_weights()
        if saved:
            state.method.set_weights(saved)
        state.method_restored = True


def _keras_keeps_xla(inputs: PhaseInputs, name: str, jit_compile: bool) -> bool:
    """Whether the compiled phase model still uses XLA, warning when Keras turned it off."""
    if jit_compile and not inputs.model.jit_compile:
        # Keras turns XLA off by itself (with only a Python warning) for a layer it marks as not compilable,
        # e.g. the random geometry layers inside RandAugment when it runs in the step, or under determinism.
        logger.warning("phase %s runs without XLA: Keras refused jit_compile for %s (%s)", name,
                       inputs.model.name, _why_no_xla(inputs.model))
        return False
    return jit_compile


def _resume_phase(state: _FitState, name: str, phase: PhaseConfig, inputs: PhaseInputs,
                  best: BestWeights | None) -> int:
    """The epoch the phase starts after: inside an interrupted phase, its optimizer and best weights come back."""
    resume = state.resume
    if resume is None or resume.state.phase != name or resume.state.phase_done:
        return state.epoch
    resume.restore_optimizer(inputs.model.optimizer, inputs.model.trainable_variables)
    if state.progress.pruning is not None:
        state.progress.pruning.set_masks(resume.masks(), resume.state.prune_sparsity, str(resume.path))
    state.progress.seconds_before = resume.state.phase_seconds
    if best is not None and resume.state.best_epoch:
        best.best, best.best_epoch = resume.state.best_value, resume.state.best_epoch
        best.best_weights = resume.best_weights()
    logger.info("resuming phase %s after epoch %d of %d", name, resume.state.epoch - state.epoch, phase.epochs)
    return resume.state.epoch


def _phase_callbacks(state: _FitState, name: str, phase: PhaseConfig, inputs: PhaseInputs, guard: NaNGuard,
                     best: BestWeights | None) -> list[keras.callbacks.Callback]:
    # StepCount first: the callbacks after it read the learning rate and save the optimizer at an epoch's end
    pruning = [state.progress.pruning] if state.progress.pruning is not None else []
    callbacks = [StepCount(), *pruning, *inputs.callbacks, *state.shared, guard] + ([best] if best else [])
    callbacks.append(StepProgress(name, inputs.steps_per_epoch, state.epoch, phase.epochs))
    if phase.early_stopping_patience and inputs.val is not None:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=phase.early_stopping_patience))
    if state.run is not None and not inputs.on_features:
        # A phase on cached features is over in seconds (saving the full model and optimizer every epoch cost
        # two thirds of it); it is checkpointed when it ends, and a run killed inside it redoes it.
        callbacks.append(EpochCheckpoint(state.model, state.run.checkpoints, state.progress))
    return callbacks


def _fit_falling_back_from_xla(state: _FitState, name: str, phase: PhaseConfig, inputs: PhaseInputs,
                               **fit_kwargs: Any) -> bool:
    """Fits the phase's compiled model; returns whether XLA was used in the end.

    XLA cannot compile every op of every backbone; a failure before the first epoch finished has changed no
    weights, so the phase is recompiled and restarts without XLA instead of ending the run.
    """
    rows_before = len(state.recorder.rows)
    with warnings.catch_warnings():
        # The file pipeline drops undecodable files, so its length is unknown until the first pass ends;
        # Keras then warns that the input "ran out of data" although every epoch saw all of it.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        for jit in ((True, False) if state.jit_compile else (False,)):
            if state.jit_compile and not jit:  # the fallback
                compile_inputs(inputs, phase, len(state.data.class_names), False)
            try:
                if state.loop == "keras":
                    inputs.model.fit(inputs.train, validation_data=inputs.val, shuffle=False, **fit_kwargs)
                else:  # the same callbacks and arguments, tftransfer's step driver
                    fit_loop(inputs.model, inputs.train, validation_data=inputs.val,
                             global_batch=state.data.batch_size, **fit_kwargs)
                return jit
            except tf.errors.OpError as exc:
                if not jit or len(state.recorder.rows) != rows_before:
                    raise
                logger.warning("XLA compilation failed in phase %s (%s: %s); continuing without XLA", name,
                               type(exc).__name__, str(exc).splitlines()[0][:200])
    raise AssertionError("unreachable: the last attempt returns or raises")


def _end_phase(state: _FitState, name: str, phase: PhaseConfig, inputs: PhaseInputs, report: FreezeReport,
               best: BestWeights | None, guard: NaNGuard, started: float,
               evaluate_phase: Callable[[keras.Model], dict[str, Any]] | None) -> PhaseResult:
    """The phase's result; a NaN loss is a TrainingError; with a run, the phase's final weights are saved."""
    recorder, progress, run = state.recorder, state.progress, state.run
    seconds = progress.seconds_before + time.perf_counter() - started
    if guard.bad_batch is not None:
        raise TrainingError(f"phase {name}: the loss became NaN/inf at batch {guard.bad_batch} of epoch "
                            f"{len(recorder.rows) + 1}; lower phases.{name}.learning_rate. "
                            + (f"The last good epoch is checkpointed in {run.checkpoints}." if run else ""))
    epochs_run = sum(1 for row in recorder.rows if row["phase"] == name)
    done = PhaseResult(
        name=name, epochs_run=epochs_run, best_epoch=best.best_epoch if best else None, freeze=report,
        learning_rate=phase.learning_rate, seconds=seconds,
        train_images_per_second=epochs_run * state.data.train_examples / seconds if seconds > 0 else 0.0,
        first_epoch=state.epoch + 1, val=evaluate_phase(state.model) if evaluate_phase else None,
        pruning=progress.pruning.report(state.model) if progress.pruning is not None else None,
        activation_cache=inputs.activation_cache)
    state.epoch += epochs_run
    progress.completed.append(asdict(done))
    if run is not None:  # the phase's final weights (best restored), so a resume starts the next phase
        progress.best = None
        save_checkpoint(run.checkpoints, state.model, None, progress.state(state.epoch, phase_done=True),
                        extra_weights=extra_weights(inputs.model), masks=progress.masks())
    progress.pruning = None
    return done


def _phase_pruning(state: _FitState, name: str, phase: PhaseConfig, inputs: PhaseInputs) -> MagnitudePruning | None:
    """Phase 2's pruning callback when prune.target_sparsity > 0 (its best-epoch restore is then off)."""
    if name != "finetune":
        return None
    pruning = build_pruning(state.cfg.prune, state.model, phase.epochs * inputs.steps_per_epoch)
    if pruning is not None and phase.restore_best:
        logger.info("phase %s keeps its last epoch's weights (restore_best is off while pruning: an earlier epoch "
                    "is less sparse than the target)", name)
    return pruning


def _run_phase(state: _FitState, name: str, phase: PhaseConfig, set_trainable: Callable[[], FreezeReport],
               verbose: int, evaluate_phase: Callable[[keras.Model], dict[str, Any]] | None,
               feature_cache: FeatureCacheSpec | None, l2sp_reference: dict[int, np.ndarray] | None) -> PhaseResult:
    """One phase: make its layers trainable, build and compile what it fits, resume inside it, fit, record."""
    report = set_trainable()
    started = time.perf_counter()
    inputs = _phase_inputs(state, name, phase, feature_cache, l2sp_reference)
    _restore_method(state)
    logger.info("phase %s: %d epochs at lr %g (%s) on %s; trainable params %s, frozen %s%s", name,
                phase.epochs, phase.learning_rate, phase.schedule, inputs.note,
                f"{report.trainable_params:,}", f"{report.non_trainable_params:,}",
                f"; unfrozen blocks {report.unfrozen_blocks}" if report.unfrozen_blocks else "")
    compile_inputs(inputs, phase, len(state.data.class_names), state.jit_compile)
    state.jit_compile = _keras_keeps_xla(inputs, name, state.jit_compile)
    state.recorder.phase = name
    progress = state.progress
    progress.pruning = _phase_pruning(state, name, phase, inputs)
    best = BestWeights() if phase.restore_best and inputs.val is not None and progress.pruning is None else None
    progress.phase, progress.phase_start, progress.started, progress.best = name, state.epoch, started, best
    progress.seconds_before = 0.0
    initial_epoch = _resume_phase(state, name, phase, inputs, best)
    guard = NaNGuard()
    state.jit_compile = _fit_falling_back_from_xla(
        state, name, phase, inputs, initial_epoch=initial_epoch, epochs=state.epoch + phase.epochs,
        callbacks=_phase_callbacks(state, name, phase, inputs, guard, best), verbose=verbose,
        class_weight=None if _own_loss(inputs.model) else state.class_weight)
    return _end_phase(state, name, phase, inputs, report, best, guard, started, evaluate_phase)


def fit_phases(model: keras.Model, cfg: ExperimentConfig, data: Datasets, blocks: list[backbones.Block],
               run: RunDir | None = None, jit_compile: bool = False, verbose: int = 0,
               evaluate_phase: Callable[[keras.Model], dict[str, Any]] | None = None,
               feature_cache: FeatureCacheSpec | None = None, resume: Checkpoint | None = None,
               target: TargetDomain | None = None,
               l2sp_reference: dict[int, np.ndarray] | None = None,
               distill: Distillation | None = None) -> FitPhasesResult:
    """Runs phase 1 (head on a frozen backbone) and phase 2 (top blocks unfrozen), each skipped at 0 epochs.

    With `feature_cache` (and phases.head.feature_cache on), phase 1 trains the head on cached pooled features.
    `evaluate_phase(model)`, when given, measures the full model at the end of each phase. With `run`, every
    epoch is checkpointed; `resume` (whose weights are already in `model`) continues from such a checkpoint.
    With a `target` (and cfg.adapt.method) or L2-SP, phases train through the AdaptiveTrainer. When
    `data.augment_in_model`, phases on images augment inside the training step (tftransfer.training.augment_step).
    With `distill`, both phases train on its fixed views and teacher logits (tftransfer.training.distill).
    """
    state = _start_fit(model, cfg, data, run, jit_compile, resume, target, distill)
    state.blocks = list(blocks)
    finished = {d["name"]: d for d in resume.state.completed} if resume is not None else {}
    plan = _phase_plan(model, cfg, blocks)
    state.total_epochs = sum(phase.epochs for _, phase, _ in plan)  # DANN's lambda ramps over the whole run
    # One for both phases, so its seed stream continues across them; built here, in the strategy's scope.
    state.augmenter = step_augmenter(data)
    result = FitPhasesResult()
    for name, phase, set_trainable in plan:
        if phase.epochs == 0:
            logger.info("phase %s skipped: 0 epochs", name)
        elif name in finished:  # completed before the interruption
            done = _phase_from_dict(finished[name])
            state.progress.completed.append(finished[name])
            state.epoch = done.first_epoch - 1 + done.epochs_run
            result.phases.append(done)
        else:
            result.phases.append(_run_phase(state, name, phase, set_trainable, verbose, evaluate_phase,
                                            feature_cache, l2sp_reference))
            result.jit_compile = state.jit_compile
    result.history = state.recorder.rows
    return result
