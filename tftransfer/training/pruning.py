"""Magnitude pruning during fine-tuning (Zhu & Gupta 2017, "To prune, or not to prune"), for Keras 3.

No tf_keras / tensorflow_model_optimization wrappers: the model keeps its ordinary layers, and a callback owns one
boolean mask per prunable kernel. Every `frequency` optimizer steps between `begin_step` and `end_step` it sets each
mask to keep the largest-magnitude weights of its kernel, at the sparsity of the polynomial schedule

    s(t) = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0)) ** power,   t_0 <= t <= t_1,

and after *every* optimizer step it multiplies each kernel by its mask, so pruned weights stay exactly zero. The masks
are training state: they go into each checkpoint (masks.npz) and come back on resume. They never enter the model, so
model.keras, the SavedModel and TFLite files hold plain weights with zeros in them and no mask variables.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from tftransfer.config.experiment import PruneConfig
from tftransfer.core.errors import RunDirError
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


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """A boolean mask that keeps all but the round(sparsity * size) smallest-magnitude weights."""
    flat = np.abs(np.asarray(weights, np.float32)).ravel()
    drop = int(round(float(sparsity) * flat.size))
    keep = np.ones(flat.size, bool)
    if drop > 0:
        # argpartition: exactly `drop` weights go, ties broken by position (zeros already pruned are the smallest)
        keep[np.argpartition(flat, drop - 1)[:drop]] = False
    return keep.reshape(np.shape(weights))


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


def prunable_kernels(model: keras.Model, kinds: Sequence[str], trainable_only: bool = True
                     ) -> list[tuple[str, str, Any]]:
    """(layer name, kind, kernel variable) of every layer of the given kinds, nested models included, in order.

    `trainable_only`: only the kernels the phase trains (a frozen kernel could not recover from being pruned).
    The classifier's output layer is never pruned: it holds classes x features weights, too few to matter, and
    each of them decides a class.
    """
    found = []
    for layer in _leaf_layers(model):
        kind = layer_kind(layer)
        if kind is None or kind not in kinds or layer.name == HEAD_LAYER:
            continue
        kernel = getattr(layer, "depthwise_kernel" if kind == "depthwise" else "kernel", None)
        if kernel is None or (trainable_only and not (layer.trainable and kernel.trainable)):
            continue
        found.append((layer.name, kind, kernel))
    return found


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

    def __init__(self, cfg: PruneConfig, kernels: list[tuple[str, str, Any]], total_steps: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels
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
        """New masks at `sparsity` from the kernels' current magnitudes (already-pruned zeros stay pruned)."""
        for _, _, kernel in self.kernels:
            self._set(kernel.path, magnitude_mask(keras.ops.convert_to_numpy(kernel), sparsity), kernel)
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
        logger.info("pruning %d kernels (%s) to sparsity %.2f: polynomial schedule from step %d to %d, masks "
                    "updated every %d steps", len(self.kernels), ", ".join(self.cfg.layers), self.cfg.target_sparsity,
                    self.begin_step, self.end_step, self.frequency)
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
                "scheduled_sparsity": self.sparsity, "pruned_kernels": len(pruned["layers"]),
                "pruned_weights": pruned["weights"], "zeros": pruned["zeros"], "sparsity": pruned["sparsity"],
                "model_kernel_sparsity": measured["sparsity"], "model_kernel_weights": measured["weights"],
                "layers": pruned["layers"]}


def build_pruning(cfg: PruneConfig, model: keras.Model, total_steps: int) -> MagnitudePruning | None:
    """The pruning callback for a phase of `total_steps` steps, or None when pruning is off or nothing is prunable."""
    if cfg.target_sparsity <= 0:
        return None
    kernels = prunable_kernels(model, cfg.layers)
    if not kernels:
        logger.warning("prune.target_sparsity %.2f but no trainable %s kernel in this phase: nothing is pruned",
                       cfg.target_sparsity, "/".join(cfg.layers))
        return None
    return MagnitudePruning(cfg, kernels, total_steps)
