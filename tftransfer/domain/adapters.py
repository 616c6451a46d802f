"""Cheap test-time adaptation to a target domain, in a registry: AdaBN, per-batch BN statistics, TENT.

All three only touch BatchNorm, and none needs target labels:

- "adabn" (Li et al. 2016): every BatchNorm layer's moving mean and variance replaced by the exact statistics of
  its input over the whole target set. Computed level by level: a layer is measured only after every BatchNorm
  layer below it has been adapted, so it sees the activations the adapted network will feed it (a momentum
  update, or measuring all layers in one pass through the unadapted network, gives other numbers; the tests
  compare with a hand computation). The result is an ordinary inference-mode model that can be saved and served.
- "bn-batch": every BatchNorm normalises with the statistics of the current test batch (the "BN adaptation"
  baseline of the TENT paper); predictions then depend on which images share a batch, so target batches are
  drawn in a seeded random order rather than folder (class) order.
- "tent" (Wang et al., ICLR 2021): bn-batch plus online entropy minimisation of the predictions, updating only
  BatchNorm scale and offset with Adam, one step per batch, predictions taken before the batch's update (as the
  reference implementation). `episodic` resets the parameters and optimizer for every batch. A collapse guard
  stops and falls back to the unadapted predictions when the predicted class distribution degenerates or the
  prediction entropy collapses.

Why the care: Keras runs a non-trainable BatchNorm in inference mode even under `training=True`, and the
tftransfer model pins its backbone to inference mode anyway, so "call it in training mode" silently changes
nothing. The batch-statistics model here swaps each BatchNorm for a layer that always uses batch statistics and
never updates the stored ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.core.cache import arrays_digest
from tftransfer.core.errors import ConfigError
from tftransfer.core.memo import per_object
from tftransfer.core.numerics import entropy, marginal_entropy, stable_softmax
from tftransfer.domain import batchnorm
from tftransfer.evaluation.inference import batches_of, predict_probabilities
from tftransfer.model.features import POOL_LAYER, build_head_model

logger = logging.getLogger(__name__)


@dataclass
class AdaptationResult:
    """Target predictions of one method, aligned with the input images, and what the method did."""

    method: str
    probs: np.ndarray
    seconds: float
    # An inference model reproducing `probs` (AdaBN); None when predictions depend on the batch composition. It is
    # the adapted model's working copy, which the next adapt() on the same model overwrites: copy_model() it to
    # keep it.
    model: keras.Model | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter:
    """A registered adaptation method: fn(model, images, batch_size=, seed=, reference_probs=, **options)."""

    name: str
    fn: Callable[..., AdaptationResult]
    description: str


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Adds an adaptation method to the registry."""
    if adapter.name in ADAPTERS:
        raise ValueError(f"adapter {adapter.name!r} is already registered")
    ADAPTERS[adapter.name] = adapter
    return adapter


def list_adapters() -> list[str]:
    """Registered method names."""
    return list(ADAPTERS)


def resolve_adapters(names: str | Sequence[str]) -> list[str]:
    """'all', 'adabn,tent' or a list -> validated names; unknown names are a ConfigError naming them."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["all"]:
        return list_adapters()
    unknown = [n for n in names if n not in ADAPTERS]
    if unknown:
        raise ConfigError(f"unknown adaptation method(s) {unknown}; available: {', '.join(ADAPTERS)}")
    return list(dict.fromkeys(names))


def adapt(name: str, model: keras.Model, images: np.ndarray, **kwargs: Any) -> AdaptationResult:
    """Runs the registered method `name` on target `images` (float32 [N, H, W, 3] pixels in [0, 255])."""
    resolve_adapters([name])
    return ADAPTERS[name].fn(model, images, **kwargs)


# --- helpers -------------------------------------------------------------------------------------------------


def copy_model(model: keras.Model) -> keras.Model:
    """An independent copy (own variables) of a tftransfer model."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


# One working copy per (model, kind), reset to the model's weights at every use. The domain report adapts one
# model dozens of times (each method on the target and the source, each corruption); a fresh copy per call
# would trace its inference (and TENT's step) again every time: seconds each for a MobileNetV2.
def _workspace(model: keras.Model, kind: str, build: Callable[[keras.Model], Any]) -> Any:
    return per_object(model, ("workspace", kind), lambda: build(model))


def working_copy(model: keras.Model) -> keras.Model:
    """This model's reusable copy (see _workspace), with the model's current weights."""
    copy = _workspace(model, "copy", copy_model)
    copy.set_weights(model.get_weights())
    return copy


def _parent_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    # Keras 3 keeps the functional graph in (private) inbound nodes; backbones.py reads them the same way.
    return [parent.operation for node in layer._inbound_nodes for parent in node.parent_nodes]


def batchnorm_stages(backbone: keras.Model) -> dict[int, int]:
    """Per layer (by id): the most BatchNorm layers on any path into its output, itself included.

    A BatchNorm layer of stage k depends only on BatchNorm layers of stages below k, so all layers of one stage
    can be measured together once the lower stages are adapted (a residual shortcut's BN and its branch's BN).
    """
    stage: dict[int, int] = {}
    for layer in backbone.layers:  # functional models list layers in topological order
        below = max((stage.get(id(p), 0) for p in _parent_layers(layer)), default=0)
        stage[id(layer)] = below + (1 if isinstance(layer, keras.layers.BatchNormalization) else 0)
    return stage


def batchnorm_levels(backbone: keras.Model, layers: Sequence[keras.layers.BatchNormalization]
                     ) -> list[list[keras.layers.BatchNormalization]]:
    """The BatchNorm layers grouped by stage, lowest first."""
    stage = batchnorm_stages(backbone)
    groups: dict[int, list[keras.layers.BatchNormalization]] = {}
    for layer in layers:
        groups.setdefault(stage[id(layer)], []).append(layer)
    return [groups[k] for k in sorted(groups)]


def _frontier(backbone: keras.Model, stage: dict[int, int], k: int) -> list[keras.layers.Layer]:
    """Layers of stage < k whose outputs feed a layer of stage >= k: all the network beyond stage k-1 needs.

    The inputs of stage-k BatchNorm layers are among them, so their statistics come straight from these values.
    """
    needed = {id(p) for layer in backbone.layers if stage[id(layer)] >= k for p in _parent_layers(layer)}
    return [layer for layer in backbone.layers if stage[id(layer)] < k and id(layer) in needed]


def _one_or_list(items: list) -> Any:
    # A single-input Keras model is built and called with the tensor itself, else Keras warns about structure.
    return items[0] if len(items) == 1 else items


def _align_to_source(target: batchnorm.Moments, source: batchnorm.Moments, stored_mean: np.ndarray,
                     stored_var: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Statistics (m', v') under which target inputs leave the layer with the mean and spread source inputs have
    under the stored (m, v): (mu_t - m') / sqrt(v' + eps) = (mu_s - m) / sqrt(v + eps) and sigma_t / sqrt(v' + eps)
    = sigma_s / sqrt(v + eps). With (m, v) = the source's own statistics this is plain AdaBN (up to eps)."""
    sd_t, sd_s = np.sqrt(target.variance), np.sqrt(source.variance)
    live = sd_s > 1e-6
    ratio = np.where(live, sd_t / np.where(live, sd_s, 1.0), 1.0)
    new_var = np.where(live, (stored_var + eps) * ratio**2 - eps, stored_var)
    clipped = int(np.sum(new_var < 0))
    new_mean = target.mean - (source.mean - stored_mean) * ratio
    return new_mean, np.maximum(new_var, 0.0), clipped


def source_input_moments(model: keras.Model, images: np.ndarray, batch_size: int = 32
                         ) -> dict[str, batchnorm.Moments]:
    """Exact statistics of every backbone BatchNorm layer's input over source `images`, by layer name: what
    adabn-aligned maps the target onto. A run can keep them (batchnorm.save_moments) for source-free use."""
    layers = batchnorm.require_batchnorm(model, "AdaBN")
    images = np.asarray(images, np.float32)

    def measure() -> dict[str, batchnorm.Moments]:
        measured = batchnorm.input_moments(model, layers, batches_of(images, batch_size))
        return dict(zip((layer.name for layer in layers), measured))

    # A domain report aligns every corruption to the same source: measure it once per images and weights (the
    # weights' digest, so a model trained further is measured again).
    key = ("source moments", arrays_digest([images]), arrays_digest(model.get_weights()), batch_size)
    return dict(per_object(model, key, measure))


def adabn_model(model: keras.Model, images: np.ndarray, batch_size: int = 32, *,
                source_images: np.ndarray | None = None, memory_budget_mb: float = 512.0,
                source_moments: dict[str, batchnorm.Moments] | None = None,
                reuse_copy: bool = False) -> tuple[keras.Model, dict]:
    """A copy of `model` whose BatchNorm moving statistics are the exact statistics of the target images.

    Stage by stage (see batchnorm_stages): the inputs of stage-k layers are measured over all images with every
    lower stage already adapted, then the layers are set, then the next stage. The network is not re-run from
    the pixels for every stage: the activations all later layers need (the frontier) are kept in memory when
    they fit `memory_budget_mb`, and each stage computes forward from the last kept frontier; with a budget of
    0 every stage starts from the pixels (slow, same result).

    With `source_images`, each layer is aligned to the source instead (see _align_to_source): the head was
    trained on features made with the stored statistics, which in a fine-tuned tftransfer model are the
    backbone's pre-training (ImageNet) statistics, not the source's, so plain AdaBN also moves the source.
    `source_moments` (from source_input_moments) stand for `source_images` when the source data is gone.
    Returns (adapted model, info). The input model is not changed. With `reuse_copy` the adapted model is the
    model's working copy (see working_copy), overwritten by the next such call; else a new copy.
    """
    batchnorm.require_batchnorm(model, "AdaBN")
    if source_images is not None and source_moments is None:
        source_moments = source_input_moments(model, source_images, batch_size)
    adapted = working_copy(model) if reuse_copy else copy_model(model)
    backbone = batchnorm.get_backbone(adapted)
    bn_layers = batchnorm.batchnorm_layers(backbone)
    stage = batchnorm_stages(backbone)
    levels = batchnorm_levels(backbone, bn_layers)
    to_backbone = batchnorm.front(adapted)
    batches = batches_of(np.asarray(images, np.float32), batch_size)
    # The first checkpoint: the backbone's input for every image (same size as the pixels, already in memory).
    checkpoint = (list(backbone.inputs), [[np.asarray(to_backbone(tf.convert_to_tensor(b))) for b in batches]])
    budget = memory_budget_mb * 2**20
    changes, clipped = [], 0
    for group in levels:
        k = stage[id(group[0])]
        front_tensors = [layer.output for layer in _frontier(backbone, stage, k)]
        moments, kept, fits = _measure_stage(backbone, stage, k, group, checkpoint, len(batches), budget)
        stage_changes, stage_clipped = _set_stage(group, moments, source_moments, k)
        changes += stage_changes
        clipped += stage_clipped
        if fits:
            checkpoint = (front_tensors, kept)
    info = {"layers": len(bn_layers), "stages": len(levels), "images": int(len(images)),
            "aligned_to_source": source_moments is not None, "changes": changes}
    if clipped:
        info["clipped_variances"] = clipped
    return adapted, info


def _measure_stage(backbone: keras.Model, stage: dict[int, int], k: int, group: list, checkpoint: tuple,
                   num_batches: int, budget: float) -> tuple[list[batchnorm.Moments], list[list[np.ndarray]], bool]:
    """Input moments of the stage-k layers, computed forward from the last checkpoint; also the frontier
    activations (kept when they fit the budget) for the next stage to start from."""
    ckpt_tensors, ckpt_values = checkpoint
    front_layers = _frontier(backbone, stage, k)
    front_tensors = [layer.output for layer in front_layers]
    # Frontier tensors already in the checkpoint pass straight through (a Keras model cannot output one of
    # its own intermediate inputs); the rest are computed from the checkpoint.
    carried = {id(t): i for i, t in enumerate(ckpt_tensors)}
    computed = [t for t in front_tensors if id(t) not in carried]
    sub = keras.Model(_one_or_list(ckpt_tensors), computed, name=f"stage_{k}") if computed else None
    position = {id(layer): i for i, layer in enumerate(front_layers)}
    moments = [batchnorm.Moments() for _ in group]
    kept: list[list[np.ndarray]] = [[] for _ in front_tensors]
    size = 0
    for i in range(num_batches):
        inputs = [values[i] for values in ckpt_values]
        new = sub(_one_or_list(inputs), training=False) if sub is not None else []
        new = list(new) if isinstance(new, (list, tuple)) else [new]
        outs = [inputs[carried[id(t)]] if id(t) in carried else new.pop(0) for t in front_tensors]
        for layer, acc in zip(group, moments):
            x = tf.cast(outs[position[id(_parent_layers(layer)[0])]], tf.float32)
            mean, variance = tf.nn.moments(x, axes=batchnorm.reduction_axes(layer, len(x.shape)))
            acc.update(mean.numpy(), variance.numpy(), float(np.prod(x.shape[:-1])))
        size += sum(int(np.prod(o.shape)) * 4 for o in outs)
        if size <= budget:
            for store, out in zip(kept, outs):
                store.append(np.asarray(out))
    return moments, kept, size <= budget


def _set_stage(group: list, moments: list[batchnorm.Moments], source_moments: dict[str, batchnorm.Moments] | None,
               k: int) -> tuple[list[dict[str, Any]], int]:
    """Sets the stage's moving statistics to the measured (or source-aligned) ones; (per-layer changes, clipped)."""
    changes, clipped = [], 0
    for layer, acc in zip(group, moments):
        old_mean, old_var = batchnorm.stored_moments(layer)
        new_mean, new_var = acc.mean, acc.variance
        if source_moments is not None:
            new_mean, new_var, n_clipped = _align_to_source(acc, source_moments[layer.name], old_mean,
                                                            old_var, layer.epsilon)
            clipped += n_clipped
        layer.moving_mean.assign(new_mean.astype(np.float32))
        layer.moving_variance.assign(new_var.astype(np.float32))
        changes.append({"layer": layer.name, "stage": k,
                        "mean_change": float(np.mean(np.abs(new_mean - old_mean))),
                        "variance_ratio": float(np.mean((new_var + layer.epsilon) / (old_var + layer.epsilon)))})
    return changes, clipped


def _adabn(model: keras.Model, images: np.ndarray, *, batch_size: int = 32, seed: int = 0,
           reference_probs: np.ndarray | None = None, source_images: np.ndarray | None = None,
           aligned: bool = False) -> AdaptationResult:
    started = time.perf_counter()
    if aligned and source_images is None:
        raise ConfigError("adabn-aligned needs source images (the domain report passes the source's)")
    adapted, info = adabn_model(model, images, batch_size, source_images=source_images if aligned else None,
                                reuse_copy=True)
    probs = predict_probabilities(adapted, images, batch_size)
    info.pop("changes")  # per-layer detail is for adabn_model callers; the report keeps the summary
    return AdaptationResult("adabn-aligned" if aligned else "adabn", probs, time.perf_counter() - started,
                            model=adapted, info=info)


def _adabn_aligned(model: keras.Model, images: np.ndarray, **kwargs: Any) -> AdaptationResult:
    return _adabn(model, images, aligned=True, **kwargs)


# --- batch statistics and TENT ---------------------------------------------------------------------------------


class BatchStatsNormalization(keras.layers.BatchNormalization):
    """BatchNormalization that always normalises with the current batch's statistics and never updates the
    stored ones (whatever `training` and `trainable` say)."""

    def call(self, inputs, training=None, mask=None):  # noqa: D102
        x = keras.ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        rank = len(x.shape)
        axis = self.axis % rank
        mean, variance = keras.ops.moments(x, axes=[i for i in range(rank) if i != axis])
        out = keras.ops.batch_normalization(
            x, mean, variance, axis=self.axis, epsilon=self.epsilon,
            offset=keras.ops.cast(self.beta, x.dtype) if self.center else None,
            scale=keras.ops.cast(self.gamma, x.dtype) if self.scale else None)
        return keras.ops.cast(out, self.compute_dtype)


@dataclass
class _StatsCopy:
    """A batch-statistics model (build_batch_stats_model), its BatchNorm layers and its own backbone copy."""

    model: keras.Model
    layers: list[BatchStatsNormalization]
    backbone: keras.Model

    def sync(self, source: keras.Model) -> None:
        """Back to the source model's current backbone weights."""
        self.backbone.set_weights(batchnorm.get_backbone(source).get_weights())


def _stats_copy(model: keras.Model) -> _StatsCopy:
    batchnorm.require_batchnorm(model, "batch-statistics adaptation")
    backbone = batchnorm.get_backbone(model)

    def swap(layer: keras.layers.Layer) -> keras.layers.Layer:
        cls = BatchStatsNormalization if type(layer) is keras.layers.BatchNormalization else layer.__class__
        return cls.from_config(layer.get_config())

    clone = keras.models.clone_model(backbone, clone_function=swap)
    clone.set_weights(backbone.get_weights())
    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="pixels")
    x = batchnorm.front(model)(inputs)
    x = model.get_layer(POOL_LAYER)(clone(x))
    outputs = build_head_model(model)(x)
    layers = [layer for layer in clone.layers if isinstance(layer, BatchStatsNormalization)]
    return _StatsCopy(keras.Model(inputs, outputs, name="batch_stats"), layers, clone)


def build_batch_stats_model(model: keras.Model) -> tuple[keras.Model, list[BatchStatsNormalization]]:
    """pixels -> logits like `model`, but every backbone BatchNorm uses batch statistics; own BN variables.

    The front (resize, preprocess) and head layers are shared with `model` and not trained here; the backbone
    is a copy, so updating its BatchNorm scale and offset leaves `model` untouched.
    """
    built = _stats_copy(model)
    return built.model, built.layers


def _working_stats(model: keras.Model) -> _StatsCopy:
    """The model's reusable batch-statistics copy (see _workspace), synced to its current weights."""
    built = _workspace(model, "stats", _stats_copy)
    built.sync(model)
    return built


def _shuffled(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(images))
    return images[order], order


def _unshuffle(probs: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(probs)
    out[order] = probs
    return out


def _bn_batch(model: keras.Model, images: np.ndarray, *, batch_size: int = 32, seed: int = 0,
              reference_probs: np.ndarray | None = None, source_images: np.ndarray | None = None
              ) -> AdaptationResult:
    started = time.perf_counter()
    stats = _working_stats(model)
    stats_model, layers = stats.model, stats.layers
    shuffled, order = _shuffled(np.asarray(images, np.float32), seed)
    probs = _unshuffle(predict_probabilities(stats_model, shuffled, batch_size), order)
    info = {"layers": len(layers), "batch_size": int(batch_size), "batches": len(batches_of(shuffled, batch_size)),
            "order": f"random, seed {seed}"}
    return AdaptationResult("bn-batch", probs, time.perf_counter() - started, info=info)


@dataclass
class _TentLearner:
    """The batch-statistics model, its BatchNorm scale/offset parameters, one entropy step and a reset."""

    stats: _StatsCopy
    params: list
    optimizer: keras.optimizers.Optimizer
    step: Any
    initial: list[np.ndarray] = field(default_factory=list)

    @property
    def stats_model(self) -> keras.Model:  # noqa: D102
        return self.stats.model

    @property
    def layers(self) -> list[BatchStatsNormalization]:  # noqa: D102
        return self.stats.layers

    def start(self, source: keras.Model, learning_rate: float) -> None:
        """Back to the source model's parameters, at this learning rate, with a fresh optimizer state."""
        self.stats.sync(source)
        self.initial = [keras.ops.convert_to_numpy(p) for p in self.params]
        self.optimizer.learning_rate = learning_rate
        self.reset()

    def reset(self) -> None:
        """Parameters as at start(), optimizer moments and step count zero (the learning rate is kept)."""
        for p, value in zip(self.params, self.initial):
            p.assign(value)
        for v in self.optimizer.variables:
            if not v.path.endswith("learning_rate"):
                v.assign(tf.zeros_like(v))


def _build_tent_learner(model: keras.Model) -> _TentLearner:
    stats = _stats_copy(model)
    params = [w for layer in stats.layers for w in (layer.gamma if layer.scale else None,
                                                    layer.beta if layer.center else None) if w is not None]
    if not params:
        raise batchnorm.ModelStructureError("TENT needs BatchNorm layers with a scale or offset to train")
    optimizer = keras.optimizers.Adam(learning_rate=1e-3)
    optimizer.build(params)
    stats_model = stats.model

    @tf.function(reduce_retracing=True)
    def step(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            logits = tf.cast(stats_model(x, training=False), tf.float32)
            log_p = tf.nn.log_softmax(logits)
            loss = -tf.reduce_mean(tf.reduce_sum(tf.exp(log_p) * log_p, axis=-1))
        optimizer.apply(tape.gradient(loss, params), params)
        return logits, loss

    return _TentLearner(stats, params, optimizer, step)


def _tent_learner(model: keras.Model, learning_rate: float) -> _TentLearner:
    """The model's reusable TENT learner (see _workspace), started from its current weights."""
    learner = _workspace(model, "tent", _build_tent_learner)
    learner.start(model, learning_rate)
    return learner


@dataclass
class _CollapseGuard:
    """Stops TENT when its predictions degenerate: their diversity (normalised entropy of the mean prediction)
    falls below min_diversity_ratio x the reference's over the examples seen, or a batch's mean entropy below
    min_entropy_ratio x the first batch's."""

    reference: np.ndarray | None
    min_diversity_ratio: float
    min_entropy_ratio: float
    first_entropy: float | None = None
    ref_diversity: float = 0.0

    def check(self, index: int, outputs: list[np.ndarray], seen: int) -> str | None:
        probs = outputs[-1]
        batch_entropy = float(entropy(probs).mean())
        if self.first_entropy is None:
            self.first_entropy = batch_entropy
            self.ref_diversity = marginal_entropy(self.reference[:seen] if self.reference is not None else probs)
        if index == 0:
            return None
        adapted_div = marginal_entropy(np.concatenate(outputs))
        if self.reference is not None:
            self.ref_diversity = marginal_entropy(self.reference[:seen])
        if self.ref_diversity > 0 and adapted_div < self.min_diversity_ratio * self.ref_diversity:
            return (f"predicted class distribution degenerated: diversity {adapted_div:.3f} < "
                    f"{self.min_diversity_ratio} x {self.ref_diversity:.3f} (unadapted) after {seen} images")
        if self.first_entropy > 0 and batch_entropy < self.min_entropy_ratio * self.first_entropy:
            return (f"prediction entropy collapsed: {batch_entropy:.2e} < {self.min_entropy_ratio} x "
                    f"{self.first_entropy:.2e} (first batch) at batch {index + 1}")
        return None


def _tent(model: keras.Model, images: np.ndarray, *, batch_size: int = 32, seed: int = 0,
          reference_probs: np.ndarray | None = None, source_images: np.ndarray | None = None,
          learning_rate: float = 1e-3, steps: int = 1,
          episodic: bool = False, min_diversity_ratio: float = 0.5,
          min_entropy_ratio: float = 0.01) -> AdaptationResult:
    """TENT; see the module docstring. The guard (_CollapseGuard) compares, over the examples seen so far, the
    diversity of the predictions with that of `reference_probs` (the unadapted model's; the first, still unadapted
    batch when absent), and each batch's mean entropy with the first batch's."""
    started = time.perf_counter()
    learner = _tent_learner(model, learning_rate)
    shuffled, order = _shuffled(np.asarray(images, np.float32), seed)
    guard = _CollapseGuard(None if reference_probs is None else np.asarray(reference_probs, np.float64)[order],
                           min_diversity_ratio, min_entropy_ratio)
    outputs: list[np.ndarray] = []
    losses: list[float] = []
    collapse, seen = None, 0
    for index, batch in enumerate(batches_of(shuffled, batch_size)):
        if episodic:
            learner.reset()
        logits = None
        for _ in range(max(1, steps)):
            out, loss = learner.step(tf.convert_to_tensor(batch))
            logits = out.numpy() if logits is None else logits  # the prediction precedes this batch's update
            losses.append(float(loss))
        outputs.append(stable_softmax(logits))
        seen += len(batch)
        collapse = guard.check(index, outputs, seen)
        if collapse:
            break
    info: dict[str, Any] = {"layers": len(learner.layers), "parameters": int(sum(int(np.prod(p.shape))
                                                                                for p in learner.params)),
                            "learning_rate": learning_rate, "steps_per_batch": int(steps), "episodic": episodic,
                            "batch_size": int(batch_size), "order": f"random, seed {seed}",
                            "loss_first": losses[0], "loss_last": losses[-1], "collapsed": collapse is not None}
    if collapse is None:
        probs = np.concatenate(outputs)
        return AdaptationResult("tent", _unshuffle(probs, order), time.perf_counter() - started, info=info)
    return _tent_fallback(learner, collapse, info, reference_probs, shuffled, order, batch_size, started)


def _tent_fallback(learner: _TentLearner, collapse: str, info: dict[str, Any], reference_probs: np.ndarray | None,
                   shuffled: np.ndarray, order: np.ndarray, batch_size: int, started: float) -> AdaptationResult:
    """After a collapse: the unadapted predictions when known, else batch statistics without TENT's updates."""
    logger.warning("TENT stopped: %s; falling back to the unadapted predictions", collapse)
    info["collapse_reason"] = collapse
    learner.reset()
    if reference_probs is not None:
        info["fallback"] = "source-only (unadapted) predictions"
        return AdaptationResult("tent", np.asarray(reference_probs, np.float32), time.perf_counter() - started,
                                info=info)
    info["fallback"] = "batch statistics without TENT updates"
    probs = predict_probabilities(learner.stats_model, shuffled, batch_size)
    return AdaptationResult("tent", _unshuffle(probs, order), time.perf_counter() - started, info=info)


register_adapter(Adapter("adabn", _adabn, "AdaBN: BatchNorm moving statistics set to the exact target statistics, "
                                          "layer by layer"))
register_adapter(Adapter("adabn-aligned", _adabn_aligned,
                         "AdaBN relative to the source: each BatchNorm maps target activations to the mean and "
                         "spread source activations have under the stored statistics"))
register_adapter(Adapter("bn-batch", _bn_batch, "BatchNorm normalises with each test batch's own statistics"))
register_adapter(Adapter("tent", _tent, "TENT: batch statistics + online entropy minimisation of BatchNorm scale "
                                        "and offset (Adam), with a collapse guard"))
