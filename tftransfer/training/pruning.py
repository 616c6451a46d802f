"""Magnitude pruning during fine-tuning (Zhu & Gupta 2017, "To prune, or not to prune"), for Keras 3.

No tf_keras / tensorflow_model_optimization wrappers: the model keeps its ordinary layers, and a callback owns one
boolean mask per prunable kernel. Every `frequency` optimizer steps between `begin_step` and `end_step` it sets each
mask to keep the highest-scoring weights of its kernel, at the sparsity of the polynomial schedule

    s(t) = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0)) ** power,   t_0 <= t <= t_1,

and after *every* optimizer step it multiplies each kernel by its mask, so pruned weights stay exactly zero. The score
(prune.score, PRUNE_SCORES) is by default the BatchNorm-folded weight |w * gamma / sqrt(var + eps)|: BatchNorm is
frozen in phase 2, so that is what the layer multiplies by. Kernels under prune.min_weights weights stay dense, and
prune.allocation (PRUNE_ALLOCATIONS) spreads the target uniformly over the kernels or by one global ranking. The masks
are training state: they go into each checkpoint (masks.npz) and come back on resume. They never enter the model, so
model.keras, the SavedModel and TFLite files hold plain weights with zeros in them and no mask variables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from tftransfer.config.experiment import PruneConfig
from tftransfer.core.errors import ConfigError, RunDirError
from tftransfer.model.classifier import HEAD_LAYER
from tftransfer.model.layers import InferenceBackbone

logger = logging.getLogger(__name__)

# prune.layers names -> the Keras layer classes whose `kernel` is pruned (a registry; DepthwiseConv2D is not a
# Conv2D subclass in Keras 3, so "conv" leaves depthwise kernels alone: they hold few of a MobileNet's weights, and
# each of their 3x3 filters sees a single channel, so pruning one removes much of what that channel computes).
PRUNABLE_LAYERS: dict[str, tuple[type, ...]] = {
    "conv": (keras.layers.Conv2D, keras.layers.Conv1D, keras.layers.Conv3D),
    "dense": (keras.layers.Dense,),
    "depthwise": (keras.layers.DepthwiseConv2D,),
}


def polynomial_sparsity(step: int, target: float, begin_step: int, end_step: int, initial: float = 0.0,
                        power: float = 3.0) -> float:
    """Zhu & Gupta's schedule: 0 before `begin_step`, `initial` at it, rising to `target` at `end_step`, then flat."""
    if step < begin_step:
        return 0.0
    if step >= end_step or end_step <= begin_step:
        return float(target)
    progress = (step - begin_step) / (end_step - begin_step)
    return float(target + (initial - target) * (1.0 - progress) ** power)


def score_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """A boolean mask that keeps all but the round(sparsity * size) lowest-scoring weights."""
    flat = np.asarray(scores, np.float32).ravel()
    drop = int(round(float(sparsity) * flat.size))
    keep = np.ones(flat.size, bool)
    if drop > 0:
        # argpartition: exactly `drop` weights go, ties broken by position (zeros already pruned score lowest)
        keep[np.argpartition(flat, drop - 1)[:drop]] = False
    return keep.reshape(np.shape(scores))


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """A boolean mask that keeps all but the round(sparsity * size) smallest-magnitude weights."""
    return score_mask(np.abs(np.asarray(weights, np.float32)), sparsity)


# -- scores: what ranks a weight. Each takes the kernel's values, its kind and the BatchNorm that follows it (or None)


def _bn_scale(bn: keras.layers.BatchNormalization) -> np.ndarray:
    """gamma / sqrt(moving_variance + epsilon): the per-channel factor a frozen BatchNorm multiplies by."""
    variance = np.asarray(keras.ops.convert_to_numpy(bn.moving_variance), np.float32)
    gamma = np.asarray(keras.ops.convert_to_numpy(bn.gamma), np.float32) if bn.scale else 1.0
    return gamma / np.sqrt(variance + bn.epsilon)


def magnitude_score(values: np.ndarray, kind: str, bn: keras.layers.BatchNormalization | None) -> np.ndarray:
    """|w|."""
    return np.abs(np.asarray(values, np.float32))


def folded_score(values: np.ndarray, kind: str, bn: keras.layers.BatchNormalization | None) -> np.ndarray:
    """|w * gamma / sqrt(var + eps)| with the following BatchNorm's statistics (|w| without one): the weight the
    frozen conv + BatchNorm pair really applies, so a channel that BatchNorm amplifies keeps more of its weights."""
    values = np.asarray(values, np.float32)
    if bn is None:
        return np.abs(values)
    scale = _bn_scale(bn)
    if kind == "depthwise":  # (kh, kw, in, multiplier): output channel c * multiplier + m
        scale = scale.reshape(values.shape[-2], values.shape[-1])
    return np.abs(values * scale)


PRUNE_SCORES: dict[str, Callable[[np.ndarray, str, Any], np.ndarray]] = {
    "folded": folded_score,
    "magnitude": magnitude_score,
}


# -- allocations: how the target sparsity is spread over the kernels (each maps kernel path -> scores to masks)


def uniform_masks(scores: dict[str, np.ndarray], sparsity: float) -> dict[str, np.ndarray]:
    """Every kernel at `sparsity`."""
    return {path: score_mask(values, sparsity) for path, values in scores.items()}


def global_masks(scores: dict[str, np.ndarray], sparsity: float) -> dict[str, np.ndarray]:
    """One ranking over all kernels' scores: round(sparsity * total) lowest go, wherever they are."""
    paths = list(scores)
    flat = score_mask(np.concatenate([scores[p].ravel() for p in paths]) if paths else np.zeros(0), sparsity)
    masks, start = {}, 0
    for path in paths:
        size = scores[path].size
        masks[path] = flat[start:start + size].reshape(scores[path].shape)
        start += size
    return masks


PRUNE_ALLOCATIONS: dict[str, Callable[[dict[str, np.ndarray], float], dict[str, np.ndarray]]] = {
    "uniform": uniform_masks,
    "global": global_masks,
}


def _registered(registry: dict[str, Any], name: str, key: str) -> Any:
    if name not in registry:
        raise ConfigError(f"{key}: unknown value {name!r}; choose one of {', '.join(registry)}")
    return registry[name]


def layer_kind(layer: keras.Layer) -> str | None:
    """The PRUNABLE_LAYERS name of a layer, or None."""
    for kind, classes in PRUNABLE_LAYERS.items():
        if isinstance(layer, classes):
            return kind
    return None


def _leaf_layers(layer: keras.Layer) -> list[keras.Layer]:
    """Every layer inside `layer` that is not itself a model, depth first, the backbone's layers included."""
    if isinstance(layer, InferenceBackbone):
        return _leaf_layers(layer.backbone)
    if not isinstance(layer, keras.Model):
        return [layer]
    return [leaf for child in layer.layers for leaf in _leaf_layers(child)]


def prunable_kernels(model: keras.Model, kinds: Sequence[str], trainable_only: bool = True, min_weights: int = 0
                     ) -> list[tuple[str, str, Any]]:
    """(layer name, kind, kernel variable) of every layer of the given kinds, nested models included, in order.

    `trainable_only`: only the kernels the phase trains (a frozen kernel could not recover from being pruned).
    `min_weights`: kernels with fewer weights are left out (prune.min_weights: they hold few of the weights, and
    a stem or a narrow 1x1 projection loses much of what it computes when pruned at the big kernels' rate).
    The classifier's output layer is never pruned: it holds classes x features weights, too few to matter, and
    each of them decides a class.
    """
    found = []
    for layer in _leaf_layers(model):
        kind = layer_kind(layer)
        if kind is None or kind not in kinds or layer.name == HEAD_LAYER:
            continue
        kernel = getattr(layer, "kernel", None)  # Keras 3's DepthwiseConv2D names its kernel `kernel` too
        if kernel is None or (trainable_only and not (layer.trainable and kernel.trainable)):
            continue
        if int(np.prod(kernel.shape)) < min_weights:
            continue
        found.append((layer.name, kind, kernel))
    return found


def _single_tensor(layer: keras.Layer, attribute: str) -> Any:
    """layer.input / layer.output when the layer was called exactly once on one tensor, else None."""
    try:
        tensor = getattr(layer, attribute)
    except (AttributeError, ValueError):  # never called, or called more than once (shared layer)
        return None
    return tensor if not isinstance(tensor, (list, tuple, dict)) else None


def following_batchnorms(model: keras.Model) -> dict[str, keras.layers.BatchNormalization]:
    """Kernel variable path -> the BatchNormalization that takes that layer's output directly (channels last),
    for every prunable layer of `model` (nested models included) that has one."""
    leaves = _leaf_layers(model)
    producers = {}
    for layer in leaves:
        output = _single_tensor(layer, "output")
        if layer_kind(layer) is not None and output is not None:
            producers[id(output)] = layer
    found = {}
    for bn in leaves:
        if not isinstance(bn, keras.layers.BatchNormalization) or bn.axis not in (-1, len(bn.input.shape) - 1):
            continue
        producer = producers.get(id(_single_tensor(bn, "input")))
        if producer is not None:
            found[producer.kernel.path] = bn
    return found


def kernel_scores(kernels: Sequence[tuple[str, str, Any]], score: str,
                  batchnorms: dict[str, keras.layers.BatchNormalization]) -> dict[str, np.ndarray]:
    """Kernel path -> the score (prune.score) of each of its weights, from the kernels' current values."""
    scorer = _registered(PRUNE_SCORES, score, "prune.score")
    return {kernel.path: scorer(keras.ops.convert_to_numpy(kernel), kind, batchnorms.get(kernel.path))
            for _, kind, kernel in kernels}


def compute_masks(kernels: Sequence[tuple[str, str, Any]], cfg: PruneConfig, sparsity: float,
                  batchnorms: dict[str, keras.layers.BatchNormalization]) -> dict[str, np.ndarray]:
    """Kernel path -> boolean mask at `sparsity`, by cfg.score and cfg.allocation."""
    allocate = _registered(PRUNE_ALLOCATIONS, cfg.allocation, "prune.allocation")
    return allocate(kernel_scores(kernels, cfg.score, batchnorms), sparsity)


def prune_once(model: keras.Model, cfg: PruneConfig, sparsity: float | None = None,
               trainable_only: bool = False) -> dict[str, np.ndarray]:
    """One-shot pruning: zeroes the weights `cfg` would mask at `sparsity` (default its target) and returns the
    masks (to measure what pruning costs before any fine-tuning)."""
    kernels = prunable_kernels(model, cfg.layers, trainable_only=trainable_only, min_weights=cfg.min_weights)
    masks = compute_masks(kernels, cfg, cfg.target_sparsity if sparsity is None else sparsity,
                          following_batchnorms(model))
    for _, _, kernel in kernels:
        kernel.assign(keras.ops.convert_to_numpy(kernel) * masks[kernel.path])
    return masks


def sparsity_rows(kernels: Sequence[tuple[str, str, Any]]) -> dict[str, Any]:
    """Measured zeros of each kernel and over all of them: what the weights really hold."""
    layers, zeros, total = [], 0, 0
    for name, kind, kernel in kernels:
        values = np.asarray(keras.ops.convert_to_numpy(kernel))
        n_zero = int(np.count_nonzero(values == 0))
        layers.append({"layer": name, "kind": kind, "weights": int(values.size), "zeros": n_zero,
                       "sparsity": n_zero / values.size if values.size else 0.0})
        zeros, total = zeros + n_zero, total + int(values.size)
    return {"layers": layers, "weights": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0}


def kernel_sparsity(model: keras.Model, kinds: Sequence[str] = tuple(PRUNABLE_LAYERS)) -> dict[str, Any]:
    """Measured zeros per conv/dense/depthwise kernel of a model (trainable or not) and over all of them."""
    return sparsity_rows(prunable_kernels(model, kinds, trainable_only=False))


class MagnitudePruning(keras.callbacks.Callback):
    """Prunes `kernels` on the polynomial schedule of `cfg` over a phase of `total_steps` optimizer steps.

    The step is the phase optimizer's `iterations` (restored on resume, kept exact by StepCount), so a resumed
    phase continues the schedule where it stopped. `set_masks` puts a checkpoint's masks back.
    """

    def __init__(self, cfg: PruneConfig, kernels: list[tuple[str, str, Any]], total_steps: int,
                 batchnorms: dict[str, keras.layers.BatchNormalization] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels
        self.batchnorms = batchnorms or {}  # kernel path -> the BatchNorm after it (the folded score's statistics)
        self.begin_step = int(round(cfg.begin_fraction * total_steps))
        self.end_step = max(self.begin_step, int(round(cfg.end_fraction * total_steps)))
        self.frequency = cfg.frequency or max(1, (self.end_step - self.begin_step) // 16)
        self.masks: dict[str, np.ndarray] = {}
        self._factors: dict[str, Any] = {}  # each mask as a tensor of its kernel's dtype: multiplied in every step
        self.sparsity = 0.0  # the schedule's value at the last mask update

    # -- masks as training state
    def mask_arrays(self) -> dict[str, np.ndarray]:
        """The masks keyed by kernel variable path (for checkpoints)."""
        return dict(self.masks)

    def _set(self, path: str, mask: np.ndarray, kernel: Any) -> None:
        self.masks[path] = mask
        self._factors[path] = keras.ops.convert_to_tensor(mask, dtype=kernel.dtype)

    def set_masks(self, masks: dict[str, np.ndarray] | None, sparsity: float | None, source: str) -> None:
        """A checkpoint's masks, verified against the model: one per pruned kernel, of its shape, and the kernel
        zero wherever its mask is (the weights and masks were saved together). RunDirError naming `source`."""
        if not sparsity:
            return  # saved before the schedule's first update: no masks yet
        masks = masks or {}
        for _, _, kernel in self.kernels:
            saved = masks.get(kernel.path)
            if saved is None:
                raise RunDirError(f"{source}: no pruning mask for {kernel.path}; the run's config or code changed "
                                  "since it was saved")
            if tuple(saved.shape) != tuple(kernel.shape):
                raise RunDirError(f"{source}: the mask of {kernel.path} has shape {saved.shape}, the kernel "
                                  f"{tuple(kernel.shape)}")
            if np.any(keras.ops.convert_to_numpy(kernel)[~saved] != 0):
                raise RunDirError(f"{source}: {kernel.path} has nonzero weights where its mask prunes them; the "
                                  "checkpoint's weights and masks do not belong together")
            self._set(kernel.path, saved.astype(bool), kernel)
        self.sparsity = float(sparsity)
        logger.info("restored %d pruning masks at sparsity %.3f from %s", len(self.masks), self.sparsity, source)

    def apply_masks(self) -> None:
        """Zeroes every masked weight (the optimizer's step, momentum included, may have moved it)."""
        for _, _, kernel in self.kernels:
            factor = self._factors.get(kernel.path)
            if factor is not None:
                kernel.assign(kernel * factor)

    def update_masks(self, sparsity: float) -> None:
        """New masks at `sparsity` from the kernels' current scores (already-pruned zeros score 0 and stay pruned)."""
        masks = compute_masks(self.kernels, self.cfg, sparsity, self.batchnorms)
        for _, _, kernel in self.kernels:
            self._set(kernel.path, masks[kernel.path], kernel)
        self.sparsity = sparsity
        self.apply_masks()

    # -- the schedule
    def _step(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _due(self, step: int) -> bool:
        if step < self.begin_step:
            return False
        if step >= self.end_step:  # once, at the end step (or the first step after it, e.g. end_fraction 0)
            return self.sparsity < self.cfg.target_sparsity
        return (step - self.begin_step) % self.frequency == 0

    def on_train_begin(self, logs: dict | None = None) -> None:  # noqa: D102
        logger.info("pruning %d kernels (%s, at least %d weights) to sparsity %.2f (%s score, %s allocation): "
                    "polynomial schedule from step %d to %d, masks updated every %d steps", len(self.kernels),
                    ", ".join(self.cfg.layers), self.cfg.min_weights, self.cfg.target_sparsity, self.cfg.score,
                    self.cfg.allocation, self.begin_step, self.end_step, self.frequency)
        self.apply_masks()  # a resumed phase: its weights already hold the zeros, this keeps them

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:  # noqa: D102
        step = self._step()
        if self._due(step):
            self.update_masks(polynomial_sparsity(step, self.cfg.target_sparsity, self.begin_step, self.end_step,
                                                  self.cfg.initial_sparsity, self.cfg.power))
        else:
            self.apply_masks()

    def on_train_end(self, logs: dict | None = None) -> None:  # noqa: D102
        if self._step() < self.end_step:
            logger.warning("the phase ended at step %d, before the pruning schedule's end (step %d): sparsity is "
                           "%.3f, not the target %.3f", self._step(), self.end_step, self.sparsity,
                           self.cfg.target_sparsity)
        self.apply_masks()

    def report(self, model: keras.Model) -> dict[str, Any]:
        """The schedule and the measured per-layer sparsity of the pruned kernels (metrics.json phases[].pruning)."""
        pruned = sparsity_rows(self.kernels)
        measured = kernel_sparsity(model, self.cfg.layers)
        return {"target_sparsity": self.cfg.target_sparsity, "initial_sparsity": self.cfg.initial_sparsity,
                "schedule": "polynomial", "power": self.cfg.power, "begin_step": self.begin_step,
                "end_step": self.end_step, "frequency": self.frequency, "layer_kinds": list(self.cfg.layers),
                "min_weights": self.cfg.min_weights, "score": self.cfg.score, "allocation": self.cfg.allocation,
                "folded_kernels": sum(kernel.path in self.batchnorms for _, _, kernel in self.kernels),
                "scheduled_sparsity": self.sparsity, "pruned_kernels": len(pruned["layers"]),
                "pruned_weights": pruned["weights"], "zeros": pruned["zeros"], "sparsity": pruned["sparsity"],
                "model_kernel_sparsity": measured["sparsity"], "model_kernel_weights": measured["weights"],
                "layers": pruned["layers"]}


def build_pruning(cfg: PruneConfig, model: keras.Model, total_steps: int) -> MagnitudePruning | None:
    """The pruning callback for a phase of `total_steps` steps, or None when pruning is off or nothing is prunable."""
    if cfg.target_sparsity <= 0:
        return None
    kernels = prunable_kernels(model, cfg.layers, min_weights=cfg.min_weights)
    if not kernels:
        logger.warning("prune.target_sparsity %.2f but no trainable %s kernel of at least prune.min_weights=%d "
                       "weights in this phase: nothing is pruned", cfg.target_sparsity, "/".join(cfg.layers),
                       cfg.min_weights)
        return None
    batchnorms = following_batchnorms(model) if cfg.score == "folded" else {}
    return MagnitudePruning(cfg, kernels, total_steps, batchnorms)
