"""The built-in backbones as a static table: name, family, input sizes and preprocessing, without importing Keras.

`tftransfer backbones` lists this table, so it answers without loading TensorFlow. `tftransfer.model.backbones`
builds its registry from it, adding what needs Keras: the `keras.applications` constructor, the module's
`preprocess_input` and the block rules. tests/test_backbones.py ties the table to `keras.applications` (every
constructor and module named here exists, and every model in `keras.applications` is here).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tftransfer.core.errors import BackboneError

# The modes of tftransfer.model.layers.Preprocess, defined here so the table can be checked without Keras.
PREPROCESS_MODES = ("tf", "torch", "caffe", "unit", "none")


@dataclass(frozen=True)
class BackboneEntry:
    """One built-in backbone as `tftransfer backbones` lists it, and where keras.applications keeps it."""

    name: str
    family: str
    keras_name: str | None  # the keras.applications constructor; None for tftransfer's own "tiny"
    keras_module: str | None  # the keras.applications module whose preprocess_input `preprocess_mode` equals
    preprocess_mode: str
    default_size: int
    min_size: int
    constructor_kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


def normalize_name(name: str) -> str:
    """A backbone name as the registry keys it: lowercase, without spaces, '-' or '_'."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def unknown_backbone(name: str, known: Iterable[str]) -> BackboneError:
    """The error for a name that is not registered, suggesting the nearest of `known`."""
    known = list(known)
    close = difflib.get_close_matches(normalize_name(str(name)), known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return BackboneError(f"unknown backbone {name!r}{hint} (`tftransfer backbones` lists all {len(known)})")


def _family(family: str, module: str, mode: str, models: Iterable[tuple[str, int, int]],
            constructor_kwargs: Mapping[str, Any] | None = None) -> tuple[BackboneEntry, ...]:
    return tuple(BackboneEntry(name=attr.lower(), family=family, keras_name=attr, keras_module=module,
                               preprocess_mode=mode, default_size=default_size, min_size=min_size,
                               constructor_kwargs=dict(constructor_kwargs or {}),
                               description=f"keras.applications.{attr}")
                 for attr, default_size, min_size in models)


# min_size is the smallest square input Keras accepts with include_top=False (each builds there in the tests): 32
# for most, 71 for Xception and 75 for the Inception family, whose stems shrink the input by valid convolutions.
BUILTIN_BACKBONES: tuple[BackboneEntry, ...] = (
    *_family("resnet", "resnet", "caffe", [("ResNet50", 224, 32), ("ResNet101", 224, 32), ("ResNet152", 224, 32)]),
    *_family("resnet_v2", "resnet_v2", "tf",
             [("ResNet50V2", 224, 32), ("ResNet101V2", 224, 32), ("ResNet152V2", 224, 32)]),
    # EfficientNet (v1) has its Rescaling/Normalization inside the model, so pixels go in unchanged.
    *_family("efficientnet", "efficientnet", "none",
             [("EfficientNetB0", 224, 32), ("EfficientNetB1", 240, 32), ("EfficientNetB2", 260, 32),
              ("EfficientNetB3", 300, 32), ("EfficientNetB4", 380, 32), ("EfficientNetB5", 456, 32),
              ("EfficientNetB6", 528, 32), ("EfficientNetB7", 600, 32)]),
    # "none" is only right while the model rescales internally, hence include_preprocessing is pinned.
    *_family("efficientnet_v2", "efficientnet_v2", "none",
             [("EfficientNetV2B0", 224, 32), ("EfficientNetV2B1", 240, 32), ("EfficientNetV2B2", 260, 32),
              ("EfficientNetV2B3", 300, 32), ("EfficientNetV2S", 384, 32), ("EfficientNetV2M", 480, 32),
              ("EfficientNetV2L", 480, 32)], constructor_kwargs={"include_preprocessing": True}),
    *_family("mobilenet", "mobilenet", "tf", [("MobileNet", 224, 32)]),
    *_family("mobilenet_v2", "mobilenet_v2", "tf", [("MobileNetV2", 224, 32)]),
    *_family("mobilenet_v3", "mobilenet_v3", "none", [("MobileNetV3Small", 224, 32), ("MobileNetV3Large", 224, 32)],
             constructor_kwargs={"include_preprocessing": True}),
    *_family("convnext", "convnext", "none",
             [("ConvNeXtTiny", 224, 32), ("ConvNeXtSmall", 224, 32), ("ConvNeXtBase", 224, 32),
              ("ConvNeXtLarge", 224, 32), ("ConvNeXtXLarge", 224, 32)],
             constructor_kwargs={"include_preprocessing": True}),
    *_family("densenet", "densenet", "torch",
             [("DenseNet121", 224, 32), ("DenseNet169", 224, 32), ("DenseNet201", 224, 32)]),
    *_family("xception", "xception", "tf", [("Xception", 299, 71)]),
    *_family("inception_v3", "inception_v3", "tf", [("InceptionV3", 299, 75)]),
    *_family("inception_resnet_v2", "inception_resnet_v2", "tf", [("InceptionResNetV2", 299, 75)]),
    *_family("nasnet", "nasnet", "tf", [("NASNetMobile", 224, 32), ("NASNetLarge", 331, 32)]),
    *_family("vgg", "vgg16", "caffe", [("VGG16", 224, 32)]),
    *_family("vgg", "vgg19", "caffe", [("VGG19", 224, 32)]),
    BackboneEntry(name="tiny", family="tiny", keras_name=None, keras_module=None, preprocess_mode="unit",
                  default_size=32, min_size=8,
                  description="conv stem + 3 residual blocks, for tests and smoke runs (no pretrained weights)"),
)

_BY_NAME = {entry.name: entry for entry in BUILTIN_BACKBONES}


def builtin_backbones() -> list[BackboneEntry]:
    """The built-in backbones sorted by name (the order of `tftransfer.model.backbones.list_backbones`)."""
    return [_BY_NAME[name] for name in sorted(_BY_NAME)]

