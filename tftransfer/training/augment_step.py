"""Training augmentation inside the training step (data.augment.placement=model), for the accelerator.

With placement `pipeline` the tf.data pipeline augments training batches on the CPU. With `model` the pipeline
yields the un-augmented batches and the phase's Keras model runs the augmenter at the start of its training step,
so on a GPU the warps run there (inside the XLA-compiled step with runtime.jit) instead of on the host:

- a phase on images trains `AugmentingModel(model, augmenter)`, whose call augments only when training; the full
  model's variables are the wrapper's own (the augmenter has none), so checkpoints, best-weights restores,
  evaluation and export keep using the plain model, and optimizer state transfers between placements;
- the AdaptiveTrainer (a target or L2-SP) takes the augmenter itself and applies it to source and target images;
- phases on cached features are unaffected (phase 1's augmented views are extracted through the pipeline).
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import tensorflow as tf

from tftransfer.data.pipeline import Datasets

logger = logging.getLogger(__name__)


def device_augmenter(augmenter: keras.Sequential) -> keras.Sequential:
    """A copy of the pipeline's augmenter for the training step: the same layers and seeds, in float32.

    A copy rather than the pipeline's own instance: built here (inside the caller's tf.distribute scope, as
    fit_phases is) its seed state is a strategy variable like a Dropout layer's, and its layers are float32 even
    when built under a mixed-precision policy (Keras' own random layers would otherwise compute in float16).
    """
    layers = [type(layer).from_config({**layer.get_config(), "dtype": "float32"}) for layer in augmenter.layers]
    copy = keras.Sequential(layers, name="device_augment")
    # Built now: under a tf.distribute strategy, Keras' fit first calls an unbuilt model on a symbolic batch, and
    # the AdaptiveTrainer's call cannot take its ((source), (target)) training batches.
    copy.build((None, None, None, 3))
    return copy


def step_augmenter(data: Datasets) -> keras.Sequential | None:
    """The training step's augmenter (a `device_augmenter` copy) when `data` leaves augmentation to it, else None."""
    if not data.augment_in_model or data.augmenter is None:
        return None
    return device_augmenter(data.augmenter)


def augment_float32(augmenter: keras.Layer, images: Any) -> tf.Tensor:
    """Training-mode augmentation of float32 pixels, returning float32 pixels for the model's float32 input."""
    return tf.cast(augmenter(tf.cast(images, tf.float32), training=True), tf.float32)


class AugmentingModel(keras.Model):
    """`model` trained on augmented batches: `augmenter` runs in its call when training, never in inference.

    The wrapper owns no variables besides the augmenter's seed state (not a weight): its trainable variables are
    `model`'s, the same objects in the same order, so an optimizer state saved from either restores into the other.
    """

    def __init__(self, model: keras.Model, augmenter: keras.Layer, **kwargs: Any) -> None:
        kwargs.setdefault("name", f"{model.name}_augmenting")
        # The model's policy, so that under mixed_float16 compile() wraps the optimizer in the same loss-scaling
        # optimizer as the plain model's (same state, same checkpoints); no autocast, so the pixels stay float32
        # for the augmenter and the model's float32 input instead of being cast to float16 on the way in.
        super().__init__(dtype=model.dtype_policy, autocast=False, **kwargs)
        self.inner = model  # tracked first: its weights lead every weight list
        self.augmenter = augmenter
        self.built = True

    def call(self, x: Any, training: bool = False) -> Any:  # noqa: D102
        if training:
            x = augment_float32(self.augmenter, x)
        return self.inner(x, training=training)
