"""The backbone registry: names, sizes, preprocessing, weights errors, and whole blocks for every backbone."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import keras
import numpy as np
import pytest

from tftransfer.core.errors import BackboneError
from tftransfer.model import backbones, catalog
from tftransfer.model.backbones import BackboneSpec, Block
from tftransfer.model.layers import Preprocess

# The biggest graphs take 2-5 s each just to build on a 2-core CPU (all 41 take ~65 s); the block logic they
# exercise is the same as their smaller siblings', which stay in the fast run.
SLOW_BACKBONES = {"nasnetlarge", "efficientnetv2l", "efficientnetv2m", "efficientnetv2s", "efficientnetb7",
                  "efficientnetb6", "efficientnetb5", "efficientnetb4", "convnextxlarge", "convnextlarge",
                  "convnextbase", "densenet201", "resnet152", "resnet152v2"}

# First block and last two blocks, as documented in tftransfer/backbones.py (one backbone per family).
EXPECTED_ENDS = {
    "resnet50": ("stem", ["conv5_block2", "conv5_block3"]),
    "resnet50v2": ("stem", ["conv5_block2", "conv5_block3"]),  # post_bn/post_relu merged into conv5_block3
    "efficientnetb0": ("stem", ["block7a", "top"]),
    "efficientnetv2b0": ("stem", ["block6h", "top"]),
    "mobilenet": ("stem", ["block_12", "block_13"]),
    "mobilenetv2": ("stem", ["block_16", "top"]),
    "mobilenetv3small": ("stem", ["block_10", "top"]),
    "convnexttiny": ("stem", ["stage_3_block_1", "stage_3_block_2"]),
    "densenet121": ("stem", ["conv5_block15", "conv5_block16"]),
    "xception": ("stem", ["block13", "block14"]),
    "inceptionv3": ("stem", ["mixed9", "mixed10"]),
    "inceptionresnetv2": ("stem", ["block8_10", "top"]),
    "nasnetmobile": ("stem", ["normal_11", "normal_12"]),
    "vgg16": ("block1", ["block4", "block5"]),
    "tiny": ("stem", ["block2", "block3"]),
}


# Keras names InceptionV3's inner concats of the last two blocks mixed9_0 and mixed9_1 (a loop counter), but
# mixed9_1 is inside the block that ends at mixed10, so the name-prefix check does not apply to it.
MISLEADING_NAMES = {"mixed9_1"}


def _param(name: str):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW_BACKBONES else name


def _inbound_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The layers feeding `layer`, looking through non-layer ops such as ConvNeXt's residual `+`."""
    found, stack = [], [node for node in layer._inbound_nodes]
    while stack:
        for parent in stack.pop().parent_nodes:
            if isinstance(parent.operation, keras.layers.Layer):
                found.append(parent.operation)
            else:
                stack.extend(parent.operation._inbound_nodes)
    return found


def check_blocks(model: keras.Model, blocks: list[Block]) -> None:
    """Every non-input layer in exactly one whole block; blocks in model order; the output in the last block."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    index = {layer.name: i for i, layer in enumerate(model.layers)}
    assert blocks and all(block.layer_names for block in blocks)
    assert len({block.name for block in blocks}) == len(blocks), "block names must be unique"
    placed = [name for block in blocks for name in block.layer_names]
    assert sorted(placed) == sorted(layer.name for layer in layers), "each layer in exactly one block"
    block_of = {name: b for b, block in enumerate(blocks) for name in block.layer_names}
    for block in blocks:
        positions = [index[name] for name in block.layer_names]  # KeyError: a name not in the model
        assert positions == sorted(positions), f"{block.name} is not in model order"
    ends = [max(index[name] for name in block.layer_names) for block in blocks]
    assert ends == sorted(ends), "blocks must go bottom to top"
    for layer in layers:
        for parent in _inbound_layers(layer):
            if isinstance(parent, keras.layers.InputLayer):
                continue
            assert block_of[parent.name] <= block_of[layer.name], (
                f"{layer.name} ({blocks[block_of[layer.name]].name}) reads {parent.name} from a later block "
                f"({blocks[block_of[parent.name]].name})")
    # Keras' own names agree with the blocks wherever a layer is named after one ("conv5_block3_add").
    names = {block.name for block in blocks}
    for layer in layers:
        if layer.name in MISLEADING_NAMES:
            continue
        for name in names:
            if layer.name.startswith(name + "_"):
                assert blocks[block_of[layer.name]].name == name, f"{layer.name} is not in block {name}"
    output_layer = model.layers[-1]
    assert output_layer.output is model.outputs[0]
    assert output_layer.name in blocks[-1].layer_names


@pytest.mark.parametrize("name", [_param(n) for n in backbones.list_backbones()])
def test_every_backbone_builds_and_splits_into_whole_blocks(name):
    spec = backbones.get_backbone_spec(name)
    model = backbones.build_backbone(spec, spec.min_size, weights=None)
    blocks = backbones.blocks_for(spec, model)
    check_blocks(model, blocks)
    assert model.name == f"backbone_{spec.name}"
    assert model.input_shape == (None, spec.min_size, spec.min_size, 3)
    if name in EXPECTED_ENDS:
        first, last_two = EXPECTED_ENDS[name]
        assert blocks[0].name == first
        assert [b.name for b in blocks[-2:]] == last_two
    keras.backend.clear_session()


def test_specific_block_contents():
    spec = backbones.get_backbone_spec("resnet50")
    blocks = {b.name: b.layer_names for b in backbones.blocks_for(spec, backbones.build_backbone(spec, 32, None))}
    assert {"conv5_block1_0_conv", "conv5_block1_0_bn", "conv5_block1_add", "conv5_block1_out"} <= \
        set(blocks["conv5_block1"])
    assert blocks["stem"] == ("conv1_pad", "conv1_conv", "conv1_bn", "conv1_relu", "pool1_pad", "pool1_pool")
    keras.backend.clear_session()
    spec = backbones.get_backbone_spec("mobilenetv2")
    blocks = backbones.blocks_for(spec, backbones.build_backbone(spec, 32, None))
    assert blocks[-1] == Block("top", ("Conv_1", "Conv_1_bn", "out_relu"))
    assert blocks[-2].layer_names[-1] == "block_16_project_BN"
    keras.backend.clear_session()
    # Xception's residual adds and shortcut convs have generated names; they belong to the block they close.
    spec = backbones.get_backbone_spec("xception")
    model = backbones.build_backbone(spec, 71, None)
    block2 = next(b for b in backbones.blocks_for(spec, model) if b.name == "block2")
    kinds = {type(model.get_layer(n)).__name__ for n in block2.layer_names}
    assert {"Add", "Conv2D", "SeparableConv2D", "MaxPooling2D", "BatchNormalization"} <= kinds


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_preprocess_mode_matches_keras_preprocess_input(name):
    spec = backbones.get_backbone_spec(name)
    assert spec.preprocess_input is not None
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype("float32")
    expected = spec.preprocess_input(pixels.copy())
    got = keras.ops.convert_to_numpy(Preprocess(spec.preprocess_mode)(pixels))
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4, rtol=1e-6)
    if spec.preprocess_mode == "none":
        np.testing.assert_allclose(got, pixels)


def test_registry_contents_and_lookup():
    names = backbones.list_backbones()
    assert names == sorted(names) and len(names) == 41
    assert {"resnet50", "mobilenetv2", "efficientnetb0", "efficientnetv2s", "convnexttiny", "nasnetlarge",
            "inceptionresnetv2", "vgg19", "tiny"} <= set(names)
    assert not any("regnet" in n for n in names)  # not in Keras 3's keras.applications
    for alias, name in [("MobileNet_V2", "mobilenetv2"), ("ResNet50", "resnet50"), ("mobilenet-v2", "mobilenetv2"),
                        ("EfficientNet-V2-S", "efficientnetv2s"), ("convnext_tiny", "convnexttiny")]:
        assert backbones.get_backbone_spec(alias).name == name
    sizes = {n: backbones.get_backbone_spec(n).default_size for n in ("efficientnetb7", "nasnetlarge", "xception")}
    assert sizes == {"efficientnetb7": 600, "nasnetlarge": 331, "xception": 299}


class _SizeSeen(Exception):
    pass


def test_catalog_is_keras_applications_and_the_registry(monkeypatch):
    """The static table `tftransfer backbones` lists without Keras says what keras.applications and the registry do."""
    entries = catalog.builtin_backbones()
    assert [e.name for e in entries] == backbones.list_backbones()
    offered = {e.keras_name for e in entries if e.keras_name is not None}
    assert offered == {n for n in dir(keras.applications) if n[:1].isupper()}  # every keras.applications model

    def obtain_input_shape(input_shape, default_size, min_size, *args, **kwargs):
        raise _SizeSeen(default_size, min_size)  # stops the constructor before it builds anything

    monkeypatch.setattr(keras.src.applications.imagenet_utils, "obtain_input_shape", obtain_input_shape)
    for entry in entries:
        spec = backbones.get_backbone_spec(entry.name)
        assert (spec.family, spec.preprocess_mode, spec.default_size, spec.min_size, dict(spec.constructor_kwargs),
                spec.description) == (entry.family, entry.preprocess_mode, entry.default_size, entry.min_size,
                                      dict(entry.constructor_kwargs), entry.description)
        if entry.keras_name is None:
            assert spec.constructor is backbones.build_tiny_backbone
            continue
        assert spec.constructor is getattr(keras.applications, entry.keras_name)
        assert spec.constructor.__module__.rsplit(".", 1)[-1] == entry.keras_module
        assert spec.preprocess_input is getattr(keras.applications, entry.keras_module).preprocess_input
        if entry.family == "mobilenet_v3":
            continue  # checks its input shape itself (no obtain_input_shape); 224 is its weights' size
        with pytest.raises(_SizeSeen) as seen:
            spec.constructor(include_top=False, weights=None)
        assert seen.value.args == (entry.default_size, entry.min_size), entry.name


def test_unknown_backbone_suggests_nearest_names():
    with pytest.raises(BackboneError, match=r"resnet5'.*did you mean resnet50"):
        backbones.get_backbone_spec("resnet5")
    with pytest.raises(BackboneError, match="unknown backbone 'zzz'"):
        backbones.get_backbone_spec("zzz")


def test_register_rejects_duplicates_and_bad_specs():
    spec = backbones.get_backbone_spec("tiny")
    with pytest.raises(ValueError, match="already registered"):
        backbones.register_backbone(spec)
    with pytest.raises(ValueError, match="preprocess mode"):
        backbones.register_backbone(BackboneSpec(**{**spec.__dict__, "name": "tiny2", "preprocess_mode": "x"}))
    assert "tiny2" not in backbones.list_backbones()


def test_validate_image_size():
    resnet = backbones.get_backbone_spec("resnet50")
    with pytest.raises(BackboneError, match=r"^image size 16 is too small for resnet50 \(minimum 32\)$"):
        backbones.validate_image_size(resnet, 16)
    backbones.validate_image_size(resnet, 32)
    with pytest.raises(BackboneError, match="minimum 75"):
        backbones.validate_image_size(backbones.get_backbone_spec("inceptionv3"), 74)
    with pytest.raises(BackboneError, match="integer"):
        backbones.validate_image_size(resnet, 224.0)
    with pytest.raises(BackboneError, match="too small"):
        backbones.build_backbone(resnet, 31, weights=None)


def test_tiny_backbone_weights_round_trip_and_mismatch(tmp_path: Path):
    tiny = backbones.get_backbone_spec("tiny")
    model = backbones.build_backbone(tiny, 32, weights="none")
    assert model.output_shape == (None, 4, 4, 32)
    assert [b.name for b in backbones.blocks_for(tiny, model)] == ["stem", "block1", "block2", "block3"]
    path = tmp_path / "tiny8.weights.h5"
    model.save_weights(path)
    reloaded = backbones.build_backbone(tiny, 32, weights=str(path))
    for a, b in zip(model.get_weights(), reloaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(BackboneError, match=re.escape(f"weights file {path} does not fit backbone tiny")):
        backbones.build_backbone(tiny, 32, weights=str(path), width=16)
    keras_path = tmp_path / "tiny8.keras"
    model.save(keras_path)
    with pytest.raises(BackboneError, match=r"tiny8\.keras does not fit backbone tiny"):
        backbones.build_backbone(tiny, 32, weights=keras_path, width=16)


def test_weights_file_errors(tmp_path: Path):
    tiny = backbones.get_backbone_spec("tiny")
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(BackboneError, match=re.escape(f"weights file {missing} does not exist")):
        backbones.build_backbone(tiny, 32, weights=str(missing))
    odd = tmp_path / "weights.bin"
    odd.write_bytes(b"x")
    with pytest.raises(BackboneError, match=r"not a \.h5, \.weights\.h5 or \.keras file"):
        backbones.build_backbone(tiny, 32, weights=str(odd))
    with pytest.raises(BackboneError, match=r"tiny with ImageNet weights.*no ImageNet weights"):
        backbones.build_backbone(tiny, 32, weights="imagenet")


@pytest.mark.parametrize("error", [urllib.error.URLError("[Errno -2] Name or service not known"),
                                   OSError("Network is unreachable"),
                                   Exception("URL fetch failure on https://example.invalid: None -- offline")])
def test_imagenet_download_failure_is_actionable(monkeypatch, error):
    from keras.src.utils import file_utils

    def offline_get_file(*args, **kwargs):
        raise error

    # keras.applications modules call keras.src.utils.file_utils.get_file; keras.utils.get_file is the same function.
    monkeypatch.setattr(file_utils, "get_file", offline_get_file)
    monkeypatch.setattr(keras.utils, "get_file", offline_get_file)
    with pytest.raises(BackboneError) as info:
        backbones.build_backbone(backbones.get_backbone_spec("vgg16"), 32, weights="imagenet")
    message = str(info.value)
    assert "ImageNet weights for vgg16 could not be downloaded" in message
    assert ".keras/models" in message and "KERAS_HOME" in message
    assert "--weights PATH" in message and "--weights none" in message


def test_constructor_kwargs_are_checked():
    with pytest.raises(BackboneError, match="resnet50 does not accept alpha, bogus"):
        backbones.build_backbone(backbones.get_backbone_spec("resnet50"), 32, None, alpha=0.5, bogus=1)
    with pytest.raises(BackboneError, match="include_top"):
        backbones.build_backbone(backbones.get_backbone_spec("tiny"), 32, None, include_top=True)
    with pytest.raises(BackboneError, match="include_preprocessing is fixed"):
        backbones.build_backbone(backbones.get_backbone_spec("efficientnetv2b0"), 32, None,
                                 include_preprocessing=False)
    model = backbones.build_backbone(backbones.get_backbone_spec("mobilenetv2"), 32, None, alpha=0.35)
    assert model.get_layer("Conv1").filters == 16


def test_describe_backbone():
    info = backbones.describe_backbone(backbones.get_backbone_spec("tiny"))
    assert info == {"name": "tiny", "family": "tiny", "default_size": 32, "min_size": 8, "preprocess": "unit",
                    "params": info["params"], "blocks": 4, "top_blocks": ["block1", "block2", "block3"]}
    assert 0 < info["params"] < 50_000


def test_tiny_backbone_trains_fast():
    backbone = backbones.build_backbone(backbones.get_backbone_spec("tiny"), 16, None)
    inputs = keras.Input((16, 16, 3))
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(backbone(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).uniform(0, 1, (16, 16, 16, 3)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0.5).astype("int32")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.slow
def test_real_mobilenetv2_weights_load(shared_data: Path):
    path = shared_data / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    spec = backbones.get_backbone_spec("mobilenetv2")
    model = backbones.build_backbone(spec, 224, weights=str(path), alpha=0.5)
    variance = keras.ops.convert_to_numpy(model.get_layer("block_16_project_BN").moving_variance)
    assert not np.allclose(variance, 1.0)
    with pytest.raises(BackboneError, match="alpha"):
        backbones.build_backbone(spec, 224, weights=str(path), alpha=0.35)


@pytest.mark.parametrize("backbone, file_name, alpha", [
    ("mobilenet", "mobilenet_2_5_224_tf_no_top.h5", 0.25),
    ("mobilenet", "mobilenet_1_0_224_tf.h5", 1.0),
    ("mobilenetv2", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5", 0.35),
    ("mobilenetv3small", "weights_mobilenet_v3_small_224_0.75_float_no_top_v2.h5", 0.75),
    ("mobilenetv2", "my_finetuned.weights.h5", None),  # not an official name: nothing is guessed
    ("resnet50", "mobilenet_2_5_224_tf_no_top.h5", None),  # no width multiplier to set
])
def test_alpha_is_read_from_an_official_weights_file_name(backbone, file_name, alpha):
    """Issue 13 item 10: a 0.35 file needs no backbone_kwargs; a set alpha is never overridden."""
    spec = backbones.get_backbone_spec(backbone)
    assert backbones.alpha_from_weights_name(spec, f"/w/{file_name}", {}) == alpha
    assert backbones.alpha_from_weights_name(spec, f"/w/{file_name}", {"alpha": 0.5}) is None
