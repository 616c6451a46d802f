"""Serializable layers that keep preprocessing and inference-mode backbones inside the saved graph."""

from __future__ import annotations

from typing import Any

import keras

from tftransfer.model.catalog import PREPROCESS_MODES

# Per-channel constants of keras.applications.imagenet_utils (RGB order for "torch", BGR for "caffe").
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="tftransfer")
class Preprocess(keras.layers.Layer):
    """Maps raw RGB pixels in [0, 255] to what a backbone expects.

    Modes follow `keras.applications.imagenet_utils.preprocess_input`: "tf" -> [-1, 1], "torch" -> ImageNet
    mean/std, "caffe" -> BGR minus ImageNet mean, "unit" -> [0, 1], "none" -> unchanged (backbones such as
    EfficientNet and ConvNeXt normalise inside themselves).
    """

    def __init__(self, mode: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"unknown preprocess mode {mode!r}; expected one of {PREPROCESS_MODES}")
        self.mode = mode

    def call(self, x):  # noqa: D102
        x = keras.ops.cast(x, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "torch":
            mean = keras.ops.convert_to_tensor(_TORCH_MEAN, dtype=self.compute_dtype)
            std = keras.ops.convert_to_tensor(_TORCH_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            mean = keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
            return keras.ops.flip(x, axis=-1) - mean
        return x

    def get_config(self) -> dict[str, Any]:  # noqa: D102
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="tftransfer")
class InferenceBackbone(keras.layers.Layer):
    """Calls a backbone model with `training=False`, whatever the outer call says.

    Keras 3 overrides a nested model's construction-time `training=False` with the outer `fit` call's
    `training=True` (checked in tests/test_layers.py), so BatchNorm would use batch statistics and update its
    moving averages during fine-tuning. Wrapping the call pins BatchNorm and backbone dropout to inference mode
    in both phases, which is what fine-tuning on small data needs.
    """

    def __init__(self, backbone: keras.Model, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone

    def build(self, input_shape) -> None:  # noqa: D102
        if not self.backbone.built:
            self.backbone.build(input_shape)
        self.built = True

    def call(self, x):  # noqa: D102
        return self.backbone(x, training=False)

    def compute_output_shape(self, input_shape):  # noqa: D102
        return self.backbone.compute_output_shape(input_shape)

    def get_config(self) -> dict[str, Any]:  # noqa: D102
        return {**super().get_config(), "backbone": keras.saving.serialize_keras_object(self.backbone)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> InferenceBackbone:  # noqa: D102
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="tftransfer")
class SkipSameSizeResizing(keras.layers.Resizing):
    """Keras' Resizing, but an identity for inputs whose static height and width already match.

    Batches from the tftransfer pipeline are always at the target size, where an antialiased resize returns its
    input unchanged yet costs a CPU-only op (ScaleAndTranslate) that XLA cannot compile: with it in the graph, XLA
    training fails on every device and GPU steps copy each batch to the host and back. Raw inputs of another or
    unknown size (the serving signatures) are still resized.
    """

    def call(self, inputs):  # noqa: D102
        shape = getattr(inputs, "shape", None)
        if shape is not None and len(shape) == 4 and shape[1] == self.height and shape[2] == self.width:
            return keras.ops.cast(inputs, self.compute_dtype)
        return super().call(inputs)
