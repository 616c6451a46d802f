"""The backbone registry: every `keras.applications` model tftransfer can fine-tune, plus a tiny test backbone.

A `BackboneSpec` says how to build a backbone (constructor, fixed kwargs, default and minimum input size), how to
preprocess pixels for it (a `tftransfer.model.layers.Preprocess` mode equal to the module's own `preprocess_input`) and
how to cut it into whole blocks for "unfreeze the top N blocks".

Registered families (Keras 3.15): ResNet50/101/152, ResNet50V2/101V2/152V2, EfficientNetB0-B7,
EfficientNetV2B0-B3/S/M/L, MobileNet, MobileNetV2, MobileNetV3Small/Large, ConvNeXtTiny/Small/Base/Large/XLarge,
DenseNet121/169/201, Xception, InceptionV3, InceptionResNetV2, NASNetMobile/Large, VGG16/19, and "tiny". RegNet
is not in Keras 3's `keras.applications` (it only existed in tf.keras 2.x), so it is not offered. Their names, sizes
and preprocessing modes are a static table in `tftransfer.model.catalog` (readable without Keras); this module adds
the constructors, `preprocess_input` and block rules.

Blocks. Each family has name rules (regexes) that label layers with their block ("conv5_block3", "block_16",
"block7a", "mixed9", ...). A block's output is the last labelled layer of the block, extended over trailing
parameter-free merges/activations that consume only it (Xception's unnamed `add`, InceptionResNetV2's final
scale layer, ConvNeXt's residual `+`). Layers the rules cannot name (Inception's `conv2d_N`, NASNet cells,
auto-named shortcut layers) are placed by graph ancestry: a block is every operation needed to compute its output
that no earlier block already computes. That makes every block whole (a residual branch, its shortcut and its
add land together) and guarantees each layer's inputs sit in its own or an earlier block. Where a family has
no named stem (Inception), the stem ends at the last single-tensor bottleneck before the first block.
Layers after the last block form a "top" block (MobileNetV2's Conv_1, EfficientNet's top_conv, ...) when they
hold a convolution or dense kernel; a top of only normalisation and activation (ResNetV2's post_bn, DenseNet's
final bn, ConvNeXt's final LayerNorm, NASNet's final ReLU) is merged into the last block, so that unfreezing N
blocks always trains N blocks with kernels.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import socket
import urllib.error
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from tftransfer.core.errors import BackboneError
from tftransfer.model.catalog import (
    BUILTIN_BACKBONES,
    PREPROCESS_MODES,
    BackboneEntry,
    normalize_name,
    unknown_backbone,
)

logger = logging.getLogger(__name__)

_apps = keras.applications


@dataclass(frozen=True)
class Block:
    """A whole unit of the backbone that is frozen or unfrozen together."""

    name: str
    layer_names: tuple[str, ...]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build, preprocess for and cut into blocks one backbone."""

    name: str
    family: str
    constructor: Callable[..., keras.Model]
    preprocess_mode: str
    preprocess_input: Callable | None
    default_size: int
    min_size: int
    block_fn: Callable[[keras.Model], list[Block]]
    constructor_kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}

# Arguments build_backbone sets itself; a user value would silently change what the rest of tftransfer expects.
_RESERVED_KWARGS = ("include_top", "weights", "input_tensor", "input_shape", "pooling", "name")
_WEIGHT_SUFFIXES = (".h5", ".hdf5", ".keras")


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Adds a spec to the registry under its (normalised) name; a duplicate name is a ValueError."""
    key = normalize_name(spec.name)
    if key != spec.name:
        raise ValueError(f"backbone name {spec.name!r} must be lowercase without '-', '_' or spaces ({key!r})")
    if key in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    if spec.preprocess_mode not in PREPROCESS_MODES:
        raise ValueError(f"backbone {spec.name!r}: unknown preprocess mode {spec.preprocess_mode!r}")
    if not 0 < spec.min_size <= spec.default_size:
        raise ValueError(f"backbone {spec.name!r}: need 0 < min_size <= default_size")
    _REGISTRY[key] = spec
    return spec


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec for `name`, ignoring case, '-' and '_' ("MobileNet_V2" is "mobilenetv2")."""
    key = normalize_name(str(name))
    if key in _REGISTRY:
        return _REGISTRY[key]
    raise unknown_backbone(name, _REGISTRY)


def validate_image_size(spec: BackboneSpec, image_size: int) -> None:
    """Raises BackboneError when `image_size` is not an int the backbone can take."""
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise BackboneError(f"image size must be an integer, got {image_size!r}")
    if image_size < spec.min_size:
        raise BackboneError(f"image size {image_size} is too small for {spec.name} (minimum {spec.min_size})")


# --------------------------------------------------------------------------------------------------------------
# Building


def _check_kwargs(spec: BackboneSpec, kwargs: Mapping[str, Any]) -> None:
    reserved = sorted(set(kwargs) & set(_RESERVED_KWARGS))
    if reserved:
        raise BackboneError(f"{spec.name}: {', '.join(reserved)} cannot be set in model.backbone_kwargs; "
                            "tftransfer sets these itself")
    pinned = sorted(k for k in kwargs if k in spec.constructor_kwargs and kwargs[k] != spec.constructor_kwargs[k])
    if pinned:
        raise BackboneError(f"{spec.name}: {', '.join(pinned)} is fixed to "
                            f"{', '.join(f'{k}={spec.constructor_kwargs[k]!r}' for k in pinned)} because "
                            f"preprocessing mode {spec.preprocess_mode!r} depends on it")
    params = inspect.signature(spec.constructor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = sorted(set(params) - set(_RESERVED_KWARGS) - set(spec.constructor_kwargs)
                          - {"classes", "classifier_activation"})
        raise BackboneError(f"{spec.name} does not accept {', '.join(unknown)} (model.backbone_kwargs); "
                            f"it accepts: {', '.join(accepted) or 'nothing'}")


def _keras_cache_dir() -> str:
    # Mirrors keras.utils.get_file: $KERAS_HOME or ~/.keras, then the "models" cache_subdir.
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models")


def _is_download_failure(exc: BaseException) -> bool:
    # keras.utils.get_file turns URLError/HTTPError into a bare Exception("URL fetch failure ...") and raises
    # ValueError for a corrupt cached file; sockets and h5py raise OSError subclasses.
    if isinstance(exc, (OSError, urllib.error.URLError, socket.timeout)):
        return True
    if any(k in str(exc) for k in ("URL fetch failure", "Incomplete or corrupted file")):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "get_file":
            return True
        tb = tb.tb_next
    return False


# How keras.applications names its width-multiplier weights files: MobileNet "mobilenet_2_5_224_tf_no_top.h5"
# (alpha 0.25), MobileNetV2 "..._tf_kernels_0.35_224_no_top.h5", MobileNetV3 "..._small_224_0.75_float_no_top...".
_ALPHA_IN_FILE_NAME = (
    (re.compile(r"^mobilenet_(\d)_(\d)_\d+_tf(?:_no_top)?\.h5$"), lambda m: float(f"0.{m[1]}{m[2]}") if m[1] != "1"
     else 1.0),
    (re.compile(r"_tf_kernels_(\d+(?:\.\d+)?)_\d+(?:_no_top)?\.h5$"), lambda m: float(m[1])),
    (re.compile(r"_\d+_(\d\.\d+)_float(?:_no_top)?(?:_v\d+)?\.h5$"), lambda m: float(m[1])),
)


def alpha_from_weights_name(spec: BackboneSpec, weights: str | os.PathLike | None,
                            kwargs: Mapping[str, Any]) -> float | None:
    """The width multiplier an official keras.applications weights file's name states, when the backbone takes
    `alpha` and the config does not set it (a 0.5 file then loads without `backbone_kwargs: {alpha: 0.5}`)."""
    if weights is None or "alpha" in kwargs or "alpha" not in inspect.signature(spec.constructor).parameters:
        return None
    name = Path(str(weights)).name
    for pattern, value in _ALPHA_IN_FILE_NAME:
        found = pattern.search(name)
        if found:
            return value(found)
    return None


def _weights_hint(spec: BackboneSpec) -> str:
    params = inspect.signature(spec.constructor).parameters
    if "alpha" in params:
        return (" Check that model.backbone_kwargs.alpha (and other width arguments) match the file, e.g. "
                "alpha: 0.5 for a *_0.5_224_no_top.h5 file.")
    return f" Check that the file holds {spec.name} weights saved without the classification top."


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()).rstrip(".")
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


# Keras warns instead of raising when parts of a .weights.h5/.keras file match nothing in the model.
_PARTIAL_LOAD_WARNINGS = ("could not be loaded", "freshly-initialized", "Skipping nested container")


def _load_weights_file(model: keras.Model, spec: BackboneSpec, path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(str(path))
            error: Exception | None = None
        except Exception as exc:  # noqa: BLE001 - Keras raises ValueError, KeyError, OSError... for a bad file
            error = exc
    partial = [str(w.message) for w in caught if any(k in str(w.message) for k in _PARTIAL_LOAD_WARNINGS)]
    if error is None and partial:
        error = ValueError(f"{len(partial)} parts of the file were skipped, e.g. {partial[0]}")
    if error is not None:
        raise BackboneError(f"weights file {path} does not fit backbone {spec.name}: {_one_line(error)}."
                            f"{_weights_hint(spec)}") from error
    for w in caught:
        logger.warning("loading %s: %s", path, w.message)


def build_backbone(spec: BackboneSpec, image_size: int, weights: str | os.PathLike | None = "imagenet",
                   **kwargs: Any) -> keras.Model:
    """The backbone without its classifier: (image_size, image_size, 3) in, the last feature map out.

    `weights` is "imagenet", None/"none" or a local .h5/.weights.h5/.keras file; extra kwargs (e.g. alpha=0.5)
    go to the keras.applications constructor. Every failure a user can fix is a BackboneError.
    """
    validate_image_size(spec, image_size)
    _check_kwargs(spec, kwargs)
    path: Path | None = None
    if isinstance(weights, str) and weights.strip().lower() in ("none", ""):
        weights = None
    elif isinstance(weights, str) and weights.strip().lower() == "imagenet":
        weights = "imagenet"
    elif weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneError(f"weights file {path} does not exist (model.weights takes imagenet, none or the "
                                "path of a local .h5/.weights.h5/.keras file)")
        if not path.name.endswith(_WEIGHT_SUFFIXES):
            raise BackboneError(f"weights file {path} is not a .h5, .weights.h5 or .keras file")

    call_kwargs = {**spec.constructor_kwargs, **kwargs, "include_top": False,
                   "input_shape": (image_size, image_size, 3), "pooling": None,
                   # A file is loaded below, so that a mismatch becomes one clear error for every family.
                   "weights": "imagenet" if weights == "imagenet" else None}
    try:
        model = spec.constructor(**call_kwargs)
    except Exception as exc:  # classified below into download vs. configuration errors
        if weights == "imagenet" and _is_download_failure(exc):
            raise BackboneError(
                f"ImageNet weights for {spec.name} could not be downloaded ({_one_line(exc)}). "
                f"Keras caches them in {_keras_cache_dir()} (~/.keras/models/, or $KERAS_HOME/models/); put the "
                "file there, or pass --weights PATH (a local .h5/.weights.h5 file) or --weights none to start from "
                "random weights.") from exc
        what = "with ImageNet weights " if weights == "imagenet" else ""
        raise BackboneError(f"cannot build {spec.name} {what}at {image_size}x{image_size} with "
                            f"{dict(kwargs) or 'no extra arguments'}: {_one_line(exc)}") from exc
    if path is not None:
        _load_weights_file(model, spec, path)
    # Keep keras' layer names (weights files and block rules rely on them); only the model itself is renamed.
    model.name = f"backbone_{spec.name}"
    logger.debug("built %s at %d px, weights=%s, kwargs=%s", spec.name, image_size, weights, kwargs)
    return model


def blocks_for(spec: BackboneSpec, model: keras.Model) -> list[Block]:
    """The backbone's whole blocks, bottom to top; "unfreeze the top N blocks" takes the last N."""
    return spec.block_fn(model)


def describe_backbone(spec: BackboneSpec, image_size: int | None = None) -> dict[str, Any]:
    """Builds the backbone without weights and summarises it (params, number of blocks, top block names)."""
    # Parameter counts do not depend on the input size, so a small input keeps this fast.
    size = image_size if image_size is not None else max(spec.min_size, min(spec.default_size, 32))
    model = build_backbone(spec, size, weights=None)
    blocks = blocks_for(spec, model)
    return {"name": spec.name, "family": spec.family, "default_size": spec.default_size,
            "min_size": spec.min_size, "preprocess": spec.preprocess_mode, "params": int(model.count_params()),
            "blocks": len(blocks), "top_blocks": [b.name for b in blocks[-3:]]}


# --------------------------------------------------------------------------------------------------------------
# Cutting a model into blocks


_NORMALIZATION_LAYERS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
                         keras.layers.GroupNormalization, keras.layers.Normalization)

Rule = tuple[str, "str | Callable[[re.Match], str]"]


def _graph(model: keras.Model) -> tuple[list[Any], dict[int, list[Any]], dict[int, list[Any]]]:
    """Operations in topological order (keras' own) with their parents and consumers inside this model."""
    ops = list(model.operations)
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if nodes_by_depth:
        # Only this model's nodes: a layer reused in another graph has extra nodes that are not ours.
        nodes = [node for depth_nodes in nodes_by_depth.values() for node in depth_nodes]
    else:
        nodes = [node for op in ops for node in op._inbound_nodes]
    node_ids = {id(n) for n in nodes}
    parents: dict[int, list[Any]] = {id(op): [] for op in ops}
    children: dict[int, list[Any]] = {id(op): [] for op in ops}
    for node in nodes:
        op = node.operation
        if id(op) not in parents:
            continue
        for parent in node.parent_nodes:
            source = parent.operation
            if id(parent) in node_ids and id(source) in parents and all(p is not source for p in parents[id(op)]):
                parents[id(op)].append(source)
                children[id(source)].append(op)
    return ops, parents, children


def _has_weights(op: Any) -> bool:
    return bool(getattr(op, "weights", None))


def _has_kernel(op: Any) -> bool:
    return _has_weights(op) and not isinstance(op, _NORMALIZATION_LAYERS)


def _label(name: str, rules: Sequence[Rule]) -> str | None:
    for pattern, target in rules:
        match = re.search(pattern, name)
        if match:
            return target(match) if callable(target) else match.expand(target)
    return None


def _stem_end(ops: list[Any], parents: dict[int, list[Any]], first_output: Any) -> Any | None:
    """The last operation every path to `first_output` passes through (the stem's output), or None."""
    ancestors = _ancestors(first_output, parents, set())
    order = [op for op in ops if id(op) in ancestors]
    position = {id(op): i for i, op in enumerate(order)}
    reach = list(range(len(order)))  # furthest position that reads each operation's output
    for i, op in enumerate(order):
        for parent in parents[id(op)]:
            reach[position[id(parent)]] = max(reach[position[id(parent)]], i)
    best, furthest = None, 0
    for k in range(len(order) - 1):
        # Nothing before order[k] is read after it, so everything later is computed from order[k] alone.
        if furthest <= k:
            best = order[k]
        furthest = max(furthest, reach[k])
    if best is None or isinstance(best, keras.layers.InputLayer):
        return None
    return best


def _ancestors(op: Any, parents: dict[int, list[Any]], stop: set[int]) -> set[int]:
    seen = {id(op)}
    stack = [op]
    while stack:
        for parent in parents[id(stack.pop())]:
            if id(parent) not in seen and id(parent) not in stop:
                seen.add(id(parent))
                stack.append(parent)
    return seen


def blocks_by_rules(model: keras.Model, rules: Sequence[Rule], find_stem: bool = False) -> list[Block]:
    """Cuts `model` into whole blocks labelled by name `rules` (see the module docstring for the method).

    `rules` are (regex, label) pairs tried in order with `re.search` on each layer name; the label is a
    `match.expand` template or a callable on the match. Unmatched layers are placed by graph ancestry. With
    `find_stem`, a family whose stem layers have no names gets a "stem" block ending at the last bottleneck
    before the first labelled block.
    """
    ops, parents, children = _graph(model)
    position = {id(op): i for i, op in enumerate(ops)}
    labels = {id(op): _label(op.name, rules) for op in ops if not isinstance(op, keras.layers.InputLayer)}
    last: dict[str, Any] = {}
    for op in ops:
        if labels.get(id(op)) is not None:
            last[labels[id(op)]] = op

    def extend(op: Any) -> Any:
        # A parameter-free merge or activation fed only by this block's output finishes the block
        # (Xception's unnamed add, ConvNeXt's residual "+", MobileNetV3's unnamed hard-swish).
        while len(children[id(op)]) == 1:
            nxt = children[id(op)][0]
            if labels.get(id(nxt)) is not None or _has_weights(nxt):
                break
            op = nxt
        return op

    outputs = sorted(((name, extend(op)) for name, op in last.items()), key=lambda item: position[id(item[1])])
    output_op = model.outputs[0]._keras_history.operation
    if outputs and outputs[-1][0] != "top" and id(outputs[-1][1]) != id(output_op):
        outputs.append(("top", output_op))
    elif outputs and outputs[-1][0] == "top":
        outputs[-1] = ("top", output_op)
    elif not outputs:
        outputs = [("top", output_op)]
    if find_stem and "stem" not in last and outputs:
        stem = _stem_end(ops, parents, outputs[0][1])
        if stem is not None:
            outputs.insert(0, ("stem", stem))

    assigned: set[int] = set()
    blocks: list[tuple[str, list[Any]]] = []
    for name, out in outputs:
        members = _ancestors(out, parents, assigned) - assigned
        assigned |= members
        layers = [op for op in ops if id(op) in members and isinstance(op, keras.layers.Layer)
                  and not isinstance(op, keras.layers.InputLayer)]
        if layers:
            blocks.append((name, layers))

    wrong = [f"{op.name} (rule: {labels[id(op)]}, placed in: {name})" for name, layers in blocks for op in layers
             if labels.get(id(op)) not in (None, name)]
    if wrong:
        # A rule that disagrees with the graph would unfreeze half a block; this is a bug in this module.
        raise RuntimeError(f"block rules for {model.name} disagree with its graph: {', '.join(wrong[:5])}")

    if len(blocks) > 1 and blocks[-1][0] == "top" and not any(_has_kernel(op) for op in blocks[-1][1]):
        name, layers = blocks[-2]
        blocks[-2:] = [(name, layers + blocks[-1][1])]
    return [Block(name, tuple(op.name for op in layers)) for name, layers in blocks]


def _rules_fn(*rules: Rule, find_stem: bool = False) -> Callable[[keras.Model], list[Block]]:
    return functools.partial(blocks_by_rules, rules=tuple(rules), find_stem=find_stem)


# Per-family name rules, checked against the real layer names of Keras 3.15 (tests build every model).
_RESNET_RULES = _rules_fn((r"^(conv1|pool1)_", "stem"), (r"^(conv\d+_block\d+)_", r"\1"), (r"^post_", "top"))
_DENSENET_RULES = _rules_fn((r"^(conv1_|pool1$)", "stem"), (r"^(conv\d+_block\d+)_", r"\1"),
                            (r"^(pool\d+)_", r"\1"), (r"^(bn|relu)$", "top"))
_VGG_RULES = _rules_fn((r"^(block\d+)_", r"\1"))
_XCEPTION_RULES = _rules_fn((r"^block1_", "stem"), (r"^(block\d+)_", r"\1"))
_MOBILENET_RULES = _rules_fn((r"^conv1(_bn|_relu)?$", "stem"), (r"^conv_(?:dw|pw|pad)_(\d+)", r"block_\1"))
_MOBILENET_V2_RULES = _rules_fn((r"^(Conv1|bn_Conv1|Conv1_relu)$", "stem"), (r"^expanded_conv_", "block_0"),
                                (r"^(block_\d+)_", r"\1"), (r"^(Conv_1|Conv_1_bn|out_relu)$", "top"))
_MOBILENET_V3_RULES = _rules_fn((r"^(conv|conv_bn)$", "stem"), (r"^expanded_conv_(\d+)_", r"block_\1"),
                                (r"^expanded_conv_", "block_0"), (r"^conv_1(_bn)?$", "top"))
_EFFICIENTNET_RULES = _rules_fn((r"^stem_", "stem"), (r"^(block\d+[a-z])_", r"\1"), (r"^top_", "top"))
_CONVNEXT_RULES = _rules_fn(
    (r"_(prestem_normalization|stem)$", "stem"),
    (r"_(stage_\d+_block_\d+)_", r"\1"),
    # The downsampling layer opens the next stage, so it belongs to that stage's first block.
    (r"_downsampling_block_(\d+)$", lambda m: f"stage_{int(m.group(1)) + 1}_block_0"))
_INCEPTION_V3_RULES = _rules_fn((r"^(mixed\d+)$", r"\1"), find_stem=True)
_INCEPTION_RESNET_V2_RULES = _rules_fn((r"^(mixed_\w+)$", r"\1"), (r"^(block(?:35|17|8)_\d+)_", r"\1"),
                                       (r"^conv_7b", "top"), find_stem=True)
_NASNET_RULES = _rules_fn((r"^stem_(conv|bn)1$", "stem"), (r"^normal_concat_(\d+)$", r"normal_\1"),
                          (r"^reduction_concat_stem_(\d+)$", r"reduction_stem_\1"),
                          (r"^reduction_concat_reduce_(\d+)$", r"reduction_\1"))
_TINY_RULES = _rules_fn((r"^stem_", "stem"), (r"^(block\d+)_", r"\1"))


# --------------------------------------------------------------------------------------------------------------
# The tiny test backbone


def build_tiny_backbone(include_top: bool = False, weights: str | os.PathLike | None = None,
                        input_shape: tuple[int, int, int] = (32, 32, 3), pooling: str | None = None,
                        width: int = 8, classes: int = 1000, classifier_activation: str | None = "softmax",
                        name: str = "tiny", **kwargs: Any) -> keras.Model:
    """A small ResNet-like model (conv stem + 3 residual blocks) that trains in seconds on a CPU.

    Same calling convention as keras.applications; `weights` is None or a weights file (no ImageNet weights).
    """
    if kwargs:
        raise TypeError(f"build_tiny_backbone() got unexpected keyword arguments {sorted(kwargs)}")
    if weights == "imagenet":
        raise ValueError("the tiny backbone has no ImageNet weights; use weights=None or a weights file")
    inputs = keras.Input(shape=input_shape, name="input_layer")
    x = keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for i, multiplier in enumerate((1, 2, 4), start=1):
        filters, stride = width * multiplier, 1 if i == 1 else 2
        shortcut = x
        if stride != 1:
            # Pool, then a stride-1 1x1 conv: the gradient of a strided 1x1 conv crashes TF 2.21's oneDNN CPU
            # kernels (double free) for some batch sizes, e.g. a last partial batch of 5.
            shortcut = keras.layers.AveragePooling2D(stride, padding="same", name=f"block{i}_pool")(shortcut)
        if stride != 1 or x.shape[-1] != filters:
            shortcut = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"block{i}_shortcut")(shortcut)
        y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                                name=f"block{i}_conv")(x)
        y = keras.layers.BatchNormalization(name=f"block{i}_bn")(y)
        y = keras.layers.ReLU(name=f"block{i}_relu")(y)
        x = keras.layers.Add(name=f"block{i}_add")([shortcut, y])
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        model.load_weights(str(weights))
    return model


def _unit_preprocess_input(x: Any) -> Any:
    """Reference for the "unit" mode: pixels in [0, 255] to [0, 1]."""
    return x / 255.0


# --------------------------------------------------------------------------------------------------------------
# The registry


# Block rules per family; the names, sizes and preprocessing of each backbone are in tftransfer.model.catalog.
_FAMILY_RULES: dict[str, Callable[[keras.Model], list[Block]]] = {
    "resnet": _RESNET_RULES, "resnet_v2": _RESNET_RULES, "efficientnet": _EFFICIENTNET_RULES,
    "efficientnet_v2": _EFFICIENTNET_RULES, "mobilenet": _MOBILENET_RULES, "mobilenet_v2": _MOBILENET_V2_RULES,
    "mobilenet_v3": _MOBILENET_V3_RULES, "convnext": _CONVNEXT_RULES, "densenet": _DENSENET_RULES,
    "xception": _XCEPTION_RULES, "inception_v3": _INCEPTION_V3_RULES,
    "inception_resnet_v2": _INCEPTION_RESNET_V2_RULES, "nasnet": _NASNET_RULES, "vgg": _VGG_RULES,
    "tiny": _TINY_RULES,
}


def _builtin_spec(entry: BackboneEntry) -> BackboneSpec:
    """The spec of a catalog entry: its keras.applications constructor and preprocess_input, its family's rules."""
    if entry.keras_name is None:  # tftransfer's own test backbone
        constructor: Callable[..., keras.Model] = build_tiny_backbone
        preprocess_input: Callable = _unit_preprocess_input
    else:
        constructor = getattr(_apps, entry.keras_name)
        preprocess_input = getattr(_apps, entry.keras_module).preprocess_input
    return BackboneSpec(name=entry.name, family=entry.family, constructor=constructor,
                        preprocess_mode=entry.preprocess_mode, preprocess_input=preprocess_input,
                        default_size=entry.default_size, min_size=entry.min_size,
                        block_fn=_FAMILY_RULES[entry.family], constructor_kwargs=dict(entry.constructor_kwargs),
                        description=entry.description)


def _register_builtins() -> None:
    for entry in BUILTIN_BACKBONES:
        register_backbone(_builtin_spec(entry))


_register_builtins()
