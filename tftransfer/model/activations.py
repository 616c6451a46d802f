"""The model cut below its first trainable block: a frozen `trunk` (pixels -> cut) and a trainable `top`.

In phase 2 only the top blocks of the backbone train and BatchNorm is frozen, so for a given input view the
output of everything below the first unfrozen block never changes. `split_at_trainable` finds that tensor (the
cut) and builds two models that REUSE the full model's layer objects: training `top` trains the real model's
weights, and `top(trunk(x))` is the full model's output. A cut exists only where the graph splits cleanly there,
i.e. one tensor carries everything the unfrozen layers read from the frozen ones; otherwise the reason is returned.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from tftransfer.model.classifier import BACKBONE_LAYER, PREPROCESS_LAYER, get_backbone
from tftransfer.model.features import build_chain
from tftransfer.model.layers import InferenceBackbone


@dataclass(frozen=True)
class ModelCut:
    """The full model as trunk (frozen, pixels -> cut activations) then top (cut -> logits), sharing its layers."""

    trunk: keras.Model
    top: keras.Model
    cut: str  # the layer whose output is the cut
    shape: tuple[int, ...]  # one example's activation shape
    dtype: str

    @property
    def values_per_example(self) -> int:
        """Scalars in one example's activations."""
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class CutResult:
    """A cut, or why there is none."""

    cut: ModelCut | None
    reason: str


def _model_nodes(model: keras.Model) -> list[Any]:
    # Only this model's own nodes: its layers may also be called in other graphs (sub-models built on them).
    by_depth = getattr(model, "_nodes_by_depth", None) or {}
    return [node for nodes in by_depth.values() for node in nodes]


def _producer(tensor: Any) -> Any:
    return tensor._keras_history.operation


def find_cut_tensor(backbone: keras.Model, unfrozen: Iterable[str]) -> tuple[Any | None, str]:
    """The one tensor through which the frozen part of `backbone` feeds the `unfrozen` layers, or (None, why)."""
    names = set(unfrozen)
    if not names:
        return None, "no backbone block is unfrozen"
    crossing: dict[int, Any] = {}
    leaks: list[str] = []
    for node in _model_nodes(backbone):
        op = node.operation
        if isinstance(op, keras.layers.InputLayer):
            continue
        inputs = list(node.input_tensors)
        if op.name in names:
            crossing.update({id(t): t for t in inputs if _producer(t).name not in names})
        elif any(_producer(t).name in names for t in inputs):
            leaks.append(op.name)
    if leaks:
        return None, f"frozen layers read unfrozen ones ({', '.join(sorted(leaks)[:3])})"
    outputs = [_producer(t).name for t in backbone.outputs]
    if any(name not in names for name in outputs):
        return None, "the backbone's output is computed by frozen layers"
    if len(crossing) != 1:
        return None, (f"the unfrozen blocks read {len(crossing)} tensors of the frozen ones (a connection skips "
                      "over the first unfrozen block), so no single tensor can be cached")
    tensor = next(iter(crossing.values()))
    if isinstance(_producer(tensor), keras.layers.InputLayer):
        return None, "every backbone layer trains: nothing frozen below them to cache"
    return tensor, ""


def split_at_trainable(model: keras.Model, unfrozen: Iterable[str]) -> CutResult:
    """trunk + top of a build_model classifier whose backbone layers `unfrozen` train (see the module docstring).

    Both run the backbone in inference mode, as the full model does; the head after the backbone (pooling,
    bottleneck, dropout, logits) is the model's own layers.
    """
    backbone = get_backbone(model)
    tensor, reason = find_cut_tensor(backbone, unfrozen)
    if tensor is None:
        return CutResult(None, reason)
    lower = keras.Model(backbone.input, tensor, name="backbone_trunk")
    upper = keras.Model(tensor, backbone.output, name="backbone_top")
    pixels = keras.Input(shape=model.inputs[0].shape[1:], dtype=model.inputs[0].dtype, name="pixels")
    preprocess = keras.Model(model.inputs, model.get_layer(PREPROCESS_LAYER).output, name="preprocessing")
    trunk = keras.Model(pixels, InferenceBackbone(lower, name="trunk_backbone")(preprocess(pixels)), name="trunk")
    acts = keras.Input(shape=tensor.shape[1:], dtype=tensor.dtype, name="activations")
    head = build_chain(model, BACKBONE_LAYER, None, name="head")
    top = keras.Model(acts, head(InferenceBackbone(upper, name="top_backbone")(acts)), name="top")
    name = _producer(tensor).name
    return CutResult(ModelCut(trunk, top, name, tuple(int(d) for d in tensor.shape[1:]), str(tensor.dtype)),
                     f"cut at {name} {tuple(tensor.shape[1:])}")
