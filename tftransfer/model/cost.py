"""What a backbone costs to run, read from its Keras graph: parameters, multiply-accumulates (MACs), and the
parameters an inference converter keeps once BatchNormalization is folded (what a TFLite file holds).

MACs count the convolution and dense layers only (every layer with a kernel: output positions x kernel size); the
element-wise work (BatchNormalization, activations, additions, pooling) is left out, as in the MAC counts papers
quote for MobileNets and EfficientNets. FLOPs are reported as 2 x MACs.
"""

from __future__ import annotations

import math

import keras


def _positions(shape: tuple) -> int:
    """Output positions of a kernel layer: every axis but the batch and the channels."""
    return math.prod(int(d) for d in shape[1:-1] if d is not None)


def _kernel_size(layer: keras.Layer, attr: str) -> int:
    return math.prod(int(d) for d in getattr(layer, attr).shape)


def layer_macs(layer: keras.Layer) -> int:
    """Multiply-accumulates of one call of `layer` at its built output shape (0 for layers without a kernel)."""
    if isinstance(layer, keras.Model):
        return model_macs(layer)
    try:
        output_shape = tuple(layer.output.shape)
    except (AttributeError, ValueError):  # a layer never called in a functional graph
        return 0
    if hasattr(layer, "depthwise_kernel") and hasattr(layer, "pointwise_kernel"):  # separable convolution
        return _positions(output_shape) * (_kernel_size(layer, "depthwise_kernel")
                                           + _kernel_size(layer, "pointwise_kernel"))
    if isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)):
        return _positions(tuple(layer.input.shape)) * _kernel_size(layer, "kernel")
    for attr in ("kernel", "depthwise_kernel"):
        if hasattr(layer, attr) and getattr(layer, attr) is not None:
            return _positions(output_shape) * _kernel_size(layer, attr)
    return 0


def model_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one image through `model` (its nested models included)."""
    return int(sum(layer_macs(layer) for layer in model.layers))


def folded_params(model: keras.Model) -> int:
    """Parameters left once every BatchNormalization is folded into the layer before it, as TFLite and other
    inference converters store the model: its per-channel scale, offset, mean and variance become one bias.

    An estimate of what a converted file holds, not a count of one: a layer that already had a bias keeps one
    bias, not two, so this errs high by at most one vector per such layer."""
    total = int(model.count_params())
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total -= int(layer.count_params()) - folded_params(layer)
        elif isinstance(layer, keras.layers.BatchNormalization) and layer.built:
            total -= int(layer.count_params()) - int(layer.moving_mean.shape[0])
    return total
