"""Knowledge distillation (Hinton et al. 2015): a student trained on a finished teacher run's soft targets.

The loss of one example is `alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(label, s)`, with
teacher logits t and student logits s, computed in float32 whatever the precision policy; an unlabeled example
(label -1) has only the soft term.

The teacher runs once per image and view, never per epoch: `build_distill_views` makes a fixed set of `views`
images per training image (view 1 the clean image, the others seeded draws of the run's training augmentation, at
the student's input size, rounded to uint8) and stores, for each, the pixels, the teacher's logits and the
student's initial pooled features, in one file of the feature cache. Phase 1 trains the head on the features of
every view; phase 2 draws, every epoch, one of each image's fixed views (so the augmentation phase 2 sees is
those views, not fresh draws). The teacher takes raw pixels (its preprocessing is inside its model), so it sees
exactly the view the student sees, resized by its own resizing layer when its input size differs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import tftransfer
from tftransfer.config.experiment import DistillConfig
from tftransfer.core.cache import cache_key, file_hash
from tftransfer.core.errors import ConfigError, DataError, RunDirError
from tftransfer.data.augment import AUGMENT_VERSION, augment_with_seed, stateless_layers
from tftransfer.data.files import collect_images
from tftransfer.data.pipeline import Datasets, make_split_dataset
from tftransfer.data.sources import Split, split_fingerprint
from tftransfer.model.classifier import build_inference_fn
from tftransfer.model.features import build_feature_extractor
from tftransfer.runs.finished import FinishedRun, load_run
from tftransfer.runs.layout import RunDir
from tftransfer.runs.records import RunMetrics
from tftransfer.training.loop import batch_weights, real_rows

logger = logging.getLogger(__name__)

UNLABELED = -1  # the label of an image only the teacher labels


# ---------------------------------------------------------------------------------------------------------------
# The loss


def distillation_losses(labels: Any, student_logits: Any, teacher_logits: Any, alpha: float,
                        temperature: float) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per-example (total, soft, hard) losses, float32 [N]; `labels` -1 marks unlabeled examples (hard = 0).

    soft = T^2 KL(softmax(teacher/T) || softmax(student/T)): the T^2 keeps its gradients on the scale of the hard
    term's as T changes (Hinton et al. 2015, section 2).
    """
    s = tf.cast(student_logits, tf.float32)
    t = tf.cast(teacher_logits, tf.float32)
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    log_p_teacher = tf.nn.log_softmax(t / temperature, axis=-1)
    log_p_student = tf.nn.log_softmax(s / temperature, axis=-1)
    soft = temperature ** 2 * tf.reduce_sum(tf.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    labeled = labels >= 0
    hard = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(labels, 0), logits=s)
    hard = tf.where(labeled, hard, tf.zeros_like(hard))
    total = alpha * soft + (1.0 - alpha) * hard
    return total, soft, hard


class DistillTrainer(keras.Model):
    """Trains `net` (the full classifier, or its head on features) on (x, label, teacher logits) batches.

    Validation batches are (x, label): the hard cross-entropy and accuracy, as a plain fit reports them, so
    val_loss picks the best epoch the same way.
    """

    def __init__(self, net: keras.Model, alpha: float, temperature: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = net
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.trackers = {name: keras.metrics.Mean(name=name) for name in ("loss", "soft_loss", "hard_loss")}
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.built = True

    @property
    def metrics(self) -> list[keras.metrics.Metric]:  # noqa: D102 - Keras resets these every epoch
        return [*self.trackers.values(), self.accuracy_metric]

    def call(self, x, training=False):  # noqa: D102
        return self.net(x, training=training)

    def train_step(self, data):  # noqa: D102
        # A padded batch (training.loop.pad_partial_batches, several replicas) carries per-row weights last.
        x, labels, teacher = data[:3]
        row_weight = batch_weights(data, 3)
        real = real_rows(row_weight)
        with tf.GradientTape() as tape:
            logits = self.net(x, training=True)
            total, soft, hard = distillation_losses(labels, logits, teacher, self.alpha, self.temperature)
            if row_weight is not None:
                total, soft = total * row_weight, soft * row_weight
            loss = tf.reduce_mean(total)
            replicas = float(tf.distribute.get_strategy().num_replicas_in_sync)
            scaled = self.optimizer.scale_loss(loss / replicas)
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        labeled = tf.cast(tf.reshape(labels, [-1]) >= 0, tf.float32) * (1.0 if real is None else real)
        self.trackers["loss"].update_state(loss)
        self.trackers["soft_loss"].update_state(tf.reduce_mean(soft))
        hard_mean = tf.reduce_sum(hard * labeled) / tf.maximum(tf.reduce_sum(labeled), 1.0)
        self.trackers["hard_loss"].update_state(hard_mean)
        self.accuracy_metric.update_state(tf.maximum(tf.reshape(labels, [-1]), 0), logits, sample_weight=labeled)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):  # noqa: D102
        x, y, row_weight = data[0], data[1], batch_weights(data, 2)
        logits = tf.cast(self.net(x, training=False), tf.float32)
        y = tf.reshape(tf.cast(y, tf.int32), [-1])
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        if row_weight is not None:
            loss = loss * row_weight
        self.trackers["loss"].update_state(tf.reduce_mean(loss))
        self.accuracy_metric.update_state(y, logits, sample_weight=real_rows(row_weight))
        return {"loss": self.trackers["loss"].result(), "accuracy": self.accuracy_metric.result()}


# ---------------------------------------------------------------------------------------------------------------
# The teacher and the unlabeled images


@dataclass
class Teacher:
    """A finished run used as the teacher: its model, and what the student's run records about it."""

    run: FinishedRun
    backbone: str
    val_accuracy: float | None  # its own metrics.json final.val.accuracy
    model_hash: str  # sha256 of its model.keras: the cached soft targets depend on it

    @property
    def path(self) -> Path:
        """The teacher's run directory."""
        return self.run.path


def load_teacher(path: str, class_names: list[str]) -> Teacher:
    """The teacher run of distill.teacher, checked to be finished and to predict exactly `class_names`."""
    run_dir = Path(path)
    layout = RunDir(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"distill.teacher: {run_dir} does not exist (give a finished run directory, runs/<name>)")
    if not layout.metrics.is_file():
        raise RunDirError(f"distill.teacher: {run_dir} is not a finished run ({layout.metrics.name} is missing)")
    run = load_run(run_dir)
    if run.class_names != list(class_names):
        raise ConfigError(f"distill.teacher: the classes of {layout.labels} ({', '.join(run.class_names)}) are not "
                          f"the data's ({', '.join(class_names)})")
    metrics = RunMetrics.read(layout.metrics)
    return Teacher(run, metrics.backbone or "unknown", metrics.val_accuracy, file_hash(layout.model))


def load_unlabeled(spec: str, max_images: int = 0, seed: int = 0) -> Split:
    """distill.unlabeled: every readable image under a folder (any layout), labelled UNLABELED."""
    root = Path(spec)
    if not root.is_dir():
        raise DataError(f"distill.unlabeled: {spec} is not a folder")
    files, skipped = collect_images([spec])
    if not files:
        raise DataError(f"distill.unlabeled: {spec} has no readable images ({len(skipped)} files skipped)")
    if skipped:
        logger.warning("distill.unlabeled: skipped %d unreadable files in %s", len(skipped), spec)
    if max_images and len(files) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False))
        files = [files[i] for i in keep]
    keys = [f.relative_to(root).as_posix() for f in files]
    logger.info("distill.unlabeled: %d images from %s", len(files), spec)
    return Split(labels=np.full(len(files), UNLABELED, np.int64), keys=keys, paths=[str(f) for f in files])


def check_distill_config(cfg: Any) -> None:
    """What distillation does not combine with, as one-line errors naming the key (cfg: an ExperimentConfig)."""
    finetune = cfg.phases.finetune
    refused = {"adapt.method": cfg.adapt.method != "none",
               "phases.finetune.l2_sp_alpha": finetune.l2_sp_alpha > 0 or finetune.l2_sp_beta > 0,
               "data.class_weight": cfg.data.class_weight != "none",
               "data.balanced_sampling": cfg.data.balanced_sampling}
    for key, bad in refused.items():
        if bad:
            raise ConfigError(f"{key}: not supported together with distill.teacher")
    if cfg.distill.baseline and not RunDir(Path(cfg.distill.baseline)).metrics.is_file():
        raise RunDirError(f"distill.baseline: {cfg.distill.baseline} is not a finished run (no metrics.json)")


# ---------------------------------------------------------------------------------------------------------------
# The fixed views and their cached teacher outputs


@dataclass
class DistillViews:
    """`views` fixed views of `images` training images, row v * images + i: pixels, labels, teacher logits and
    the student's initial pooled features."""

    pixels: np.ndarray  # uint8 [V * M, S, S, 3]
    labels: np.ndarray  # int64 [V * M], UNLABELED for teacher-only images
    teacher_logits: np.ndarray  # float32 [V * M, C]
    features: np.ndarray  # float32 [V * M, D]
    views: int
    images: int
    from_cache: bool = False


def _view_batches(split: Split, data: Datasets, view: int, seed: int) -> Any:
    """Batches of one view of `split`: the clean images (view 0), else a seeded draw of the augmentation."""
    ds = make_split_dataset(split, data.image_size, data.batch_size, shuffle=False, cache="none")
    if view == 0 or data.augmenter is None:
        return ds
    layers = stateless_layers(data.augmenter)
    if layers is None:  # Keras' own random layers (randaugment): seeded once, the draw is stored anyway
        keras.utils.set_random_seed(seed + view)
        return ds.map(lambda x, y: (data.augmenter(x, training=True), y))
    seeds = tf.data.Dataset.range(10**6).map(lambda b: tf.stack([tf.cast(seed, tf.int64) + view, b]))
    return tf.data.Dataset.zip((ds, seeds)).map(lambda batch, s: (augment_with_seed(layers, batch[0], s), batch[1]))


def _compute_views(student: keras.Model, teacher: keras.Model, splits: list[Split], data: Datasets, views: int,
                   seed: int) -> DistillViews:
    extractor = build_inference_fn(build_feature_extractor(student))
    infer_teacher = build_inference_fn(teacher)
    chunks: dict[str, list[np.ndarray]] = {"pixels": [], "labels": [], "teacher_logits": [], "features": []}
    started = time.perf_counter()
    for view in range(views):
        for split in splits:
            for x, y in _view_batches(split, data, view, seed):
                pixels = np.clip(np.round(x.numpy()), 0, 255).astype(np.uint8)
                chunks["pixels"].append(pixels)
                chunks["labels"].append(y.numpy().astype(np.int64))
                chunks["teacher_logits"].append(np.asarray(infer_teacher(pixels.astype(np.float32)), np.float32))
                chunks["features"].append(np.asarray(extractor(pixels.astype(np.float32)), np.float32))
    out = {k: np.concatenate(v) for k, v in chunks.items()}
    rows = len(out["labels"])
    if rows % views:
        raise DataError(f"distill: an image failed to decode in some views only ({rows} rows for {views} views)")
    logger.info("distill: teacher and student features for %d views of %d images in %.1f s", views, rows // views,
                time.perf_counter() - started)
    return DistillViews(**out, views=views, images=rows // views)


def build_distill_views(student: keras.Model, teacher: Teacher, data: Datasets, unlabeled: Split | None,
                        cfg: DistillConfig, seed: int, key_parts: dict[str, Any],
                        cache_dir: Path | None) -> DistillViews:
    """The fixed views of the training (and unlabeled) images with the teacher's logits, from the cache or made.

    `student` must still have its initial backbone weights (its features are what phase 1 trains on).
    """
    splits = [data.source.train] + ([unlabeled] if unlabeled is not None else [])
    views = cfg.views if data.augmenter is not None else 1
    augment = None
    if data.augmenter is not None:  # layer names leave the key: Keras numbers them per process
        layers = [(type(la).__name__, {k: v for k, v in la.get_config().items() if k != "name"})
                  for la in data.augmenter.layers]
        augment = f"{AUGMENT_VERSION} {layers}"
    parts = {**key_parts, "teacher": teacher.model_hash, "views": views, "augment": augment, "seed": seed,
             "splits": [split_fingerprint(s) for s in splits], "batch": data.batch_size,
             "tftransfer": tftransfer.__version__}
    path = Path(cache_dir) / "distill" / f"views-{cache_key(parts)}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            with np.load(path) as stored:
                found = DistillViews(**{k: stored[k] for k in ("pixels", "labels", "teacher_logits", "features")},
                                     views=views, images=len(stored["labels"]) // views, from_cache=True)
            logger.info("distill: teacher outputs read from the cache %s", path)
            return found
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable distillation cache %s: %s", path, exc)
    found = _compute_views(student, teacher.run.model, splits, data, views, seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, pixels=found.pixels, labels=found.labels, teacher_logits=found.teacher_logits,
                 features=found.features)
        os.replace(tmp, path)
    return found


def view_feature_dataset(views: DistillViews, batch_size: int, shuffle_buffer: int, seed: int) -> tf.data.Dataset:
    """Phase 1: (features, label, teacher logits) of every view, shuffled every epoch."""
    ds = tf.data.Dataset.from_tensor_slices((views.features, views.labels, views.teacher_logits))
    ds = ds.shuffle(min(shuffle_buffer, max(len(views.labels), 1)), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def view_pixel_dataset(views: DistillViews, batch_size: int, shuffle_buffer: int, seed: int) -> tf.data.Dataset:
    """Phase 2: every image once per epoch, in a new order, each as one of its fixed views drawn at random."""
    with tf.init_scope(), tf.device("/CPU:0"):  # read by the pipeline on the CPU, never copied per epoch
        pixels = tf.Variable(views.pixels, trainable=False, name="distill_pixels")
    labels = tf.constant(views.labels)
    logits = tf.constant(views.teacher_logits)
    m, k = views.images, views.views
    order = tf.data.Dataset.range(m).shuffle(min(shuffle_buffer, max(m, 1)), seed=seed, reshuffle_each_iteration=True)
    draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)

    def example(i: tf.Tensor, r: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        row = (r % k) * m + i
        return tf.cast(tf.gather(pixels, row), tf.float32), tf.gather(labels, row), tf.gather(logits, row)

    ds = tf.data.Dataset.zip((order, draws)).map(example, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def view_steps(views: DistillViews, batch_size: int, on_features: bool) -> int:
    """Steps per epoch: every view's vector in phase 1, one view per image in phase 2."""
    rows = views.views * views.images if on_features else views.images
    return max(1, math.ceil(rows / batch_size))


@dataclass
class Distillation:
    """What fit_phases needs to distill: the fixed views with their teacher logits, and the loss settings."""

    views: DistillViews
    alpha: float
    temperature: float
