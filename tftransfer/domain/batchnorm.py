"""BatchNorm plumbing shared by the drift measure and the adapters: find the layers, measure their inputs exactly.

Statistics are accumulated per channel in float64 with Chan et al.'s pairwise merge of per-batch (mean, variance,
count), so the result is the exact population mean and (biased, ddof=0) variance of a layer's input over a whole
data set, whatever the batch size: the quantity Keras BatchNormalization stores as moving_mean/moving_variance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tftransfer.core.errors import TfTransferError
from tftransfer.core.memo import per_object
from tftransfer.model.classifier import BACKBONE_LAYER, PREPROCESS_LAYER, RESIZE_LAYER

logger = logging.getLogger(__name__)

FRONT_LAYERS = (RESIZE_LAYER, PREPROCESS_LAYER)


class ModelStructureError(TfTransferError):
    """The model is not one tftransfer built, or lacks what a measure or adapter needs (e.g. BatchNorm)."""


@dataclass
class Moments:
    """Running per-channel count, mean and sum of squared deviations (float64)."""

    count: float = 0.0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def update(self, mean: np.ndarray, variance: np.ndarray, count: float) -> None:
        """Merges one batch's exact (mean, biased variance) over `count` values per channel."""
        mean = np.asarray(mean, np.float64)
        m2 = np.asarray(variance, np.float64) * count
        if self.mean is None:
            self.count, self.mean, self.m2 = float(count), mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        """Population (ddof=0) variance, as BatchNormalization stores it."""
        if self.mean is None or self.count == 0:
            raise ValueError("no values accumulated")
        return self.m2 / self.count


def get_backbone(model: keras.Model) -> keras.Model:
    """The keras.applications model inside a tftransfer model; a clear error for any other model."""
    try:
        layer = model.get_layer(BACKBONE_LAYER)
    except ValueError:
        raise ModelStructureError(f"model {model.name!r} has no {BACKBONE_LAYER!r} layer: it was not built by "
                                  "tftransfer (pass a run directory or its model.keras)") from None
    backbone = getattr(layer, "backbone", None)
    if not isinstance(backbone, keras.Model):
        raise ModelStructureError(f"layer {BACKBONE_LAYER!r} of {model.name!r} does not wrap a Keras model")
    return backbone


def batchnorm_layers(backbone: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The backbone's BatchNormalization layers in graph (topological) order."""
    layers = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    nested = [layer.name for layer in backbone.layers if isinstance(layer, keras.Model)
              and any(isinstance(inner, keras.layers.BatchNormalization) for inner in layer.layers)]
    if nested:
        # Their inputs are not tensors of the backbone's graph, so a probe cannot reach them.
        logger.warning("BatchNorm layers inside nested models %s are not measured or adapted", nested)
    return layers


def require_batchnorm(model: keras.Model, what: str) -> list[keras.layers.BatchNormalization]:
    """The backbone's BatchNorm layers, or an error saying `what` needs them."""
    layers = batchnorm_layers(get_backbone(model))
    if not layers:
        raise ModelStructureError(f"{what} needs BatchNormalization layers, and the backbone of {model.name!r} has "
                                  "none (e.g. ConvNeXt uses LayerNormalization)")
    return layers


def front(model: keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    """pixels -> backbone input through the model's own resize and preprocess layers."""
    try:
        layers = [model.get_layer(name) for name in FRONT_LAYERS]
    except ValueError:
        raise ModelStructureError(f"model {model.name!r} lacks the {FRONT_LAYERS} layers tftransfer builds") from None

    def apply(pixels: tf.Tensor) -> tf.Tensor:
        x = pixels
        for layer in layers:
            x = layer(x)
        return x

    return apply


def reduction_axes(layer: keras.layers.BatchNormalization, rank: int) -> list[int]:
    """The axes a BatchNorm layer averages over (all but its channel axis) for an input of this rank."""
    axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
    axis = axis % rank
    return [i for i in range(rank) if i != axis]


def build_input_probe(model: keras.Model, layers: Sequence[keras.layers.BatchNormalization]
                      ) -> Callable[[tf.Tensor], list[tuple[tf.Tensor, tf.Tensor, tf.Tensor]]]:
    """A compiled function pixels -> [(batch mean, batch variance, values per channel)] of each layer's input.

    The backbone runs in inference mode (stored statistics in every BatchNorm), as it does inside the model.
    """
    backbone = get_backbone(model)
    inner = keras.Model(backbone.inputs, [layer.input for layer in layers], name="batchnorm_inputs")
    to_backbone = front(model)

    @tf.function(reduce_retracing=True)
    def probe(pixels: tf.Tensor) -> list[tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
        outputs = inner(to_backbone(pixels), training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        result = []
        for layer, out in zip(layers, outputs):
            out = tf.cast(out, tf.float32)
            axes = reduction_axes(layer, len(out.shape))
            mean, variance = tf.nn.moments(out, axes=axes)
            count = tf.cast(tf.size(out), tf.float32) / tf.cast(tf.shape(mean)[0], tf.float32)
            result.append((mean, variance, count))
        return result

    return probe


def input_moments(model: keras.Model, layers: Sequence[keras.layers.BatchNormalization],
                  batches: Iterable[np.ndarray | tf.Tensor]) -> list[Moments]:
    """Exact per-channel mean and variance of each layer's input over all `batches` of pixels."""
    # One probe per model and layer set: AdaBN aligned to the source measures the same model's source inputs for
    # every adaptation of a domain report, and a new probe would be traced each time.
    key = ("input probe", *(id(layer) for layer in layers))
    probe = per_object(model, key, lambda: build_input_probe(model, layers))
    moments = [Moments() for _ in layers]
    for pixels in batches:
        for acc, (mean, variance, count) in zip(moments, probe(tf.convert_to_tensor(pixels, tf.float32))):
            acc.update(mean.numpy(), variance.numpy(), float(count.numpy()))
    if moments and moments[0].mean is None:
        raise ValueError("no batches: nothing to measure")
    return moments


def stored_moments(layer: keras.layers.BatchNormalization) -> tuple[np.ndarray, np.ndarray]:
    """The layer's moving mean and variance as float64 arrays."""
    return (np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), np.float64),
            np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), np.float64))


def save_moments(path: str | Path, moments: dict[str, Moments]) -> Path:
    """Per-layer statistics as an .npz (layer names as keys; count, mean, m2 each), written atomically."""
    path = Path(path)
    arrays = {}
    for name, acc in moments.items():
        arrays[f"{name}/count"] = np.asarray(acc.count, np.float64)
        arrays[f"{name}/mean"] = acc.mean
        arrays[f"{name}/m2"] = acc.m2
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load_moments(path: str | Path) -> dict[str, Moments]:
    """The statistics save_moments wrote; TfTransferError naming the file when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            names = sorted({key.rsplit("/", 1)[0] for key in data.files})
            return {name: Moments(float(data[f"{name}/count"]), data[f"{name}/mean"], data[f"{name}/m2"])
                    for name in names}
    except (OSError, ValueError, KeyError) as exc:
        raise TfTransferError(f"{path}: not a BatchNorm statistics file ({exc})") from None
