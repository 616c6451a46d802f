"""build_model(): raw pixels -> resize -> preprocess -> backbone (inference mode) -> pooling -> dropout -> logits."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.config.experiment import ModelConfig
from tftransfer.model.backbones import BackboneSpec, build_backbone
from tftransfer.model.layers import InferenceBackbone, Preprocess, SkipSameSizeResizing

logger = logging.getLogger(__name__)

BACKBONE_LAYER = "backbone"
HEAD_LAYER = "logits"
BOTTLENECK_LAYER = "bottleneck"
POOL_LAYER = "pool"
RESIZE_LAYER = "resize"
PREPROCESS_LAYER = "preprocess"


def build_model(cfg: ModelConfig, spec: BackboneSpec, num_classes: int, image_size: int,
                backbone: keras.Model | None = None) -> keras.Model:
    """The classifier: takes float32 [N, H, W, 3] pixels in [0, 255] of any size, returns float32 logits.

    Preprocessing and resizing are inside, so the exported model needs nothing but pixels; the Dense head is
    float32 even under a mixed policy, so logits, softmax and the loss stay numerically safe.
    """
    weights = None if cfg.weights.lower() == "none" else cfg.weights
    if backbone is None:
        backbone = build_backbone(spec, image_size, weights, **cfg.backbone_kwargs)
    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="pixels")
    x = SkipSameSizeResizing(image_size, image_size, interpolation="bilinear", antialias=True,
                             name=RESIZE_LAYER)(inputs)
    x = Preprocess(spec.preprocess_mode, name=PREPROCESS_LAYER)(x)
    x = InferenceBackbone(backbone, name=BACKBONE_LAYER)(x)
    pool = keras.layers.GlobalAveragePooling2D if cfg.pooling == "avg" else keras.layers.GlobalMaxPooling2D
    x = pool(name=POOL_LAYER)(x)
    if cfg.bottleneck > 0:
        x = keras.layers.Dense(cfg.bottleneck, activation="relu", name=BOTTLENECK_LAYER)(x)
    if cfg.dropout > 0:
        x = keras.layers.Dropout(cfg.dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, dtype="float32", name=HEAD_LAYER)(x)
    return keras.Model(inputs, outputs, name=f"tftransfer_{spec.name}")


def alignment_layer(model: keras.Model) -> str:
    """The layer whose output domain-adaptation losses align: the bottleneck when there is one, else pooling."""
    names = {layer.name for layer in model.layers}
    return BOTTLENECK_LAYER if BOTTLENECK_LAYER in names else POOL_LAYER


def get_backbone(model: keras.Model) -> keras.Model:
    """The keras.applications model inside a model made by build_model."""
    return model.get_layer(BACKBONE_LAYER).backbone


def build_inference_fn(model: keras.Model, weak: bool = False) -> Callable[[Any], np.ndarray]:
    """A compiled inference-mode call returning numpy, usable under every tf.distribute strategy.

    Keras' predict_on_batch is not: under MirroredStrategy it returns one output per replica for the whole
    batch (twice the rows with 2 replicas), so evaluation and feature extraction go through this instead.
    `weak=True` refers to the model weakly, for a function cached per model (a strong closure would keep the
    model alive forever); calling it after the model is gone raises ReferenceError.
    """
    ref = weakref.ref(model) if weak else (lambda: model)

    # One trace for every batch size: an unknown batch dimension in the signature (tracing MobileNetV2 costs
    # seconds, and the last, smaller batch of every pass would otherwise trace again).
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), model.inputs[0].dtype)

    @tf.function(input_signature=[spec])
    def infer(x):
        live = ref()
        if live is None:
            raise ReferenceError("the model of this inference function was deleted")
        return live(x, training=False)

    return lambda x: infer(tf.cast(x, spec.dtype)).numpy()


def count_params(weights: list) -> int:
    """Number of scalars in a list of variables."""
    return int(sum(int(keras.ops.size(w)) for w in weights))
