"""Layers that make preprocessing and inference-mode backbones part of the saved graph."""

from __future__ import annotations

import keras
import numpy as np

from tftransfer.model.layers import InferenceBackbone, Preprocess


def _bn_model() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inputs, x)


def test_keras3_does_not_keep_construction_training_false():
    """The reason InferenceBackbone exists: if Keras ever fixes this, the wrapper could go."""
    base = _bn_model()
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, base(inputs, training=False))
    x = np.random.default_rng(0).uniform(0, 10, (4, 8, 8, 3)).astype("float32")
    assert np.abs(model(x, training=True) - model(x, training=False)).max() > 1e-3


def test_inference_backbone_ignores_training_true_and_round_trips(tmp_path):
    base = _bn_model()
    inputs = keras.Input((None, None, 3))
    x = InferenceBackbone(base, name="backbone")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    data = np.random.default_rng(0).uniform(0, 10, (4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(model(data, training=True), model(data, training=False), atol=1e-6)
    bn = base.layers[-1]
    before = bn.moving_mean.numpy().copy()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data, np.array([0, 1, 0, 1]), epochs=1, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before)  # statistics untouched by training
    path = tmp_path / "m.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded(data), model(data), atol=1e-6)


def test_preprocess_modes():
    x = np.array([[[[0.0, 127.5, 255.0]]]], dtype="float32")
    np.testing.assert_allclose(Preprocess("tf")(x), [[[[-1.0, 0.0, 1.0]]]], atol=1e-6)
    np.testing.assert_allclose(Preprocess("unit")(x), [[[[0.0, 0.5, 1.0]]]], atol=1e-6)
    np.testing.assert_allclose(Preprocess("none")(x), x)
    caffe = Preprocess("caffe")(x).numpy()
    np.testing.assert_allclose(caffe[0, 0, 0], [255.0 - 103.939, 127.5 - 116.779, 0.0 - 123.68], atol=1e-4)
    torch = Preprocess("torch")(x).numpy()
    np.testing.assert_allclose(torch[0, 0, 0, 0], (0.0 - 0.485) / 0.229, atol=1e-5)
