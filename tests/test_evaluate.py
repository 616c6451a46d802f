"""Metrics against hand-computed values, ECE against an independent loop, and prediction over tf.data."""

from __future__ import annotations

import json
import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_colour_folder
from sklearn.metrics import balanced_accuracy_score

from tftransfer.core.errors import DataError
from tftransfer.core.numerics import stable_softmax
from tftransfer.data.selection import align_classes, select_split
from tftransfer.data.specs import load_source
from tftransfer.evaluation.inference import predict_dataset
from tftransfer.evaluation.metrics import (
    apply_temperature,
    calibration_metrics,
    classification_metrics,
    confident_mistakes,
    evaluate_model,
    fit_temperature,
    reliability_curve,
)

NAMES = ["ant", "bee", "wasp"]

# 3 classes, 8 examples. Argmax predictions are [0, 0, 1, 1, 1, 2, 2, 0]; the max probabilities are chosen to
# sit on 5-bin edges or well inside bins so the hand ECE below is exact.
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # true 0, pred 0, conf .7
        [0.5, 0.3, 0.2],  # true 0, pred 0, conf .5
        [0.4, 0.5, 0.1],  # true 0, pred 1, conf .5
        [0.1, 0.8, 0.1],  # true 1, pred 1, conf .8
        [0.2, 0.6, 0.2],  # true 1, pred 1, conf .6
        [0.1, 0.3, 0.6],  # true 1, pred 2, conf .6
        [0.05, 0.05, 0.9],  # true 2, pred 2, conf .9
        [0.6, 0.3, 0.1],  # true 2, pred 0, conf .6; true class ranked last, so a top-2 miss
    ]
)


def reference_ece(y_true: np.ndarray, probs: np.ndarray, bins: int) -> float:
    """Straightforward ECE: loop over bins ((m-1)/M, m/M], weight |accuracy - confidence| by bin fraction."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    total = 0.0
    for m in range(bins):
        lo, hi = m / bins, (m + 1) / bins
        in_bin = (conf > lo) & (conf <= hi)
        if m == 0:
            in_bin |= conf == 0.0
        if in_bin.sum() == 0:
            continue
        total += abs(correct[in_bin].mean() - conf[in_bin].mean()) * in_bin.sum() / len(conf)
    return total


def test_metrics_match_hand_computation():
    m = classification_metrics(Y_TRUE, PROBS, NAMES, top_k=2, ece_bins=5)

    # Confusion (rows true): ant -> 2 ant, 1 bee; bee -> 2 bee, 1 wasp; wasp -> 1 ant, 1 wasp.
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
    assert m["num_examples"] == 8
    assert m["accuracy"] == pytest.approx(5 / 8)
    # Precision: ant 2 of 3 predicted, bee 2 of 3, wasp 1 of 2. Recall: 2/3, 2/3, 1/2.
    expected = {"ant": (2 / 3, 2 / 3, 3), "bee": (2 / 3, 2 / 3, 3), "wasp": (1 / 2, 1 / 2, 2)}
    for name, (precision, recall, support) in expected.items():
        pc = m["per_class"][name]
        assert pc["precision"] == pytest.approx(precision)
        assert pc["recall"] == pytest.approx(recall)
        assert pc["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
        assert pc["support"] == support
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y_TRUE, PROBS.argmax(axis=1)))
    # Top-2: every example except the last has its true class in the two highest probabilities.
    assert m["top_k_accuracy"] == {"k": 2, "value": pytest.approx(7 / 8)}
    true_probs = [0.7, 0.5, 0.4, 0.8, 0.6, 0.3, 0.9, 0.1]
    assert m["log_loss"] == pytest.approx(-sum(math.log(p) for p in true_probs) / 8)
    assert m["mean_confidence"] == pytest.approx((0.7 + 0.5 + 0.5 + 0.8 + 0.6 + 0.6 + 0.9 + 0.6) / 8)
    # 5 bins: (.4,.6] holds .5c .5w .6c .6w .6w -> |2/5 - .56| * 5/8 = .1; (.6,.8] holds .7c .8c ->
    # |1 - .75| * 2/8 = .0625; (.8,1] holds .9c -> .1 * 1/8 = .0125.
    assert m["ece"] == pytest.approx(0.175)
    assert m["class_names"] == NAMES
    assert json.loads(json.dumps(m)) == m  # plain JSON types only


def test_top_k_is_capped_at_number_of_classes_and_top1_equals_accuracy():
    m = classification_metrics(Y_TRUE, PROBS, NAMES)
    assert m["top_k_accuracy"] == {"k": 3, "value": 1.0}
    # Ties break towards the lower index in both argmax and the top-k ranking.
    tied = np.array([[0.5, 0.5], [0.5, 0.5]])
    m1 = classification_metrics([0, 1], tied, ["a", "b"], top_k=1)
    assert m1["top_k_accuracy"]["value"] == m1["accuracy"] == 0.5


def test_ece_matches_reference_loop_on_random_predictions():
    rng = np.random.default_rng(0)
    for n, c, bins in [(200, 5, 15), (57, 2, 10), (31, 10, 1), (500, 31, 20)]:
        probs = stable_softmax(rng.normal(scale=3.0, size=(n, c)))
        y = rng.integers(0, c, size=n)
        m = classification_metrics(y, probs, [f"c{i}" for i in range(c)], ece_bins=bins)
        assert m["ece"] == pytest.approx(reference_ece(y, probs.astype(np.float64), bins), abs=1e-12)
    assert classification_metrics(Y_TRUE, PROBS, NAMES, ece_bins=5)["ece"] == pytest.approx(
        reference_ece(Y_TRUE, PROBS, 5)
    )


def test_ece_tiny_hand_case():
    # 10 bins: .95 right -> |1 - .95| * 1/4; .85 wrong -> .85 * 1/4; .75 and .72 right share (.7, .8] ->
    # |1 - .735| * 2/4. Total .0125 + .2125 + .1325.
    y = [0, 0, 1, 1]
    probs = [[0.95, 0.05], [0.15, 0.85], [0.25, 0.75], [0.28, 0.72]]
    curve = reliability_curve(y, probs, bins=10)
    assert curve["ece"] == pytest.approx(0.3575)
    assert curve["count"] == [0, 0, 0, 0, 0, 0, 0, 2, 1, 1]
    assert curve["accuracy"][7:] == [1.0, 0.0, 1.0]
    assert curve["confidence"][7] == pytest.approx(0.735)
    assert curve["confidence"][0] is None
    assert curve["edges"][0] == 0.0 and curve["edges"][-1] == 1.0 and len(curve["edges"]) == 11
    assert curve["num_examples"] == 4


def test_log_loss_clips_zero_probability():
    m = classification_metrics([0, 1], [[0.0, 1.0], [0.0, 1.0]], ["a", "b"])
    assert m["log_loss"] == pytest.approx((-math.log(1e-12) - math.log(1.0)) / 2)
    assert math.isfinite(m["log_loss"])


def test_missing_class_is_reported_without_warnings(caplog):
    # "wasp" never occurs in y_true but is predicted once.
    y = [0, 0, 1, 1]
    probs = [[0.9, 0.05, 0.05], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y, probs, NAMES)
    assert m["confusion_matrix"] == [[1, 0, 1], [0, 2, 0], [0, 0, 0]]
    assert m["per_class"]["wasp"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)  # over classes present in y_true
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # over all classes
    assert "wasp" in caplog.text


def test_two_classes_single_example():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(np.array([1]), np.array([[0.3, 0.7]], dtype=np.float32), ["cat", "dog"])
    assert m["num_examples"] == 1
    assert m["accuracy"] == 1.0
    assert m["balanced_accuracy"] == 1.0
    assert m["top_k_accuracy"] == {"k": 2, "value": 1.0}
    assert m["log_loss"] == pytest.approx(-math.log(0.7), rel=1e-6)
    assert m["confusion_matrix"] == [[0, 0], [0, 1]]
    assert m["per_class"]["cat"]["support"] == 0
    assert m["ece"] == pytest.approx(0.3, rel=1e-6)
    json.dumps(m)


@pytest.mark.parametrize(
    ("y", "probs", "names", "kwargs", "match"),
    [
        ([0, 1], [0.5, 0.5], ["a", "b"], {}, "2-D"),
        ([0, 1, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], {}, "3 labels but probs has 2 rows"),
        ([0, 2], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], {}, r"in \[0, 1\]"),
        ([0, -1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], {}, r"in \[0, 1\]"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b", "c"], {}, "3 class names"),
        ([0, 1], [[2.0, -1.0], [0.1, 3.0]], ["a", "b"], {}, "not logits"),
        ([0, 1], [[0.6, 0.6], [0.5, 0.5]], ["a", "b"], {}, "sum to 1"),
        ([0, 1], [[np.nan, 0.5], [0.5, 0.5]], ["a", "b"], {}, "NaN"),
        ([0.5, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], {}, "integer"),
        ([[0, 1]], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], {}, "1-D"),
        ([], np.zeros((0, 2)), ["a", "b"], {}, "no examples"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "a"], {}, "unique"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], {"top_k": 0}, "top_k"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], {"ece_bins": 0}, "bins"),
    ],
)
def test_invalid_input_raises_value_error(y, probs, names, kwargs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, probs, names, **kwargs)


def test_float_labels_with_integer_values_are_accepted():
    m = classification_metrics(np.array([0.0, 1.0]), [[0.9, 0.1], [0.2, 0.8]], ["a", "b"])
    assert m["accuracy"] == 1.0


def test_stable_softmax_handles_huge_logits():
    probs = stable_softmax(np.array([[1000.0, 0.0, -1000.0], [-5e4, -5e4, -5e4]]))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-7)


def _tiny_model(num_classes: int = 3) -> keras.Model:
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=0))(x)
    return keras.Model(inputs, outputs)


def _tiny_data(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.uniform(0, 255, size=(n, 4, 4, 3)).astype(np.float32), rng.integers(0, 3, size=n).astype(np.int32)


def test_predict_dataset_matches_keras_softmax():
    model = _tiny_model()
    x, y = _tiny_data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # 4 + 4 + 2: a partial last batch
    y_true, probs = predict_dataset(model, dataset)

    assert y_true.dtype == np.int64 and probs.dtype == np.float32
    np.testing.assert_array_equal(y_true, y)
    assert probs.shape == (10, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(model(x, training=False), axis=-1))
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_predict_dataset_rejects_bad_datasets():
    model = _tiny_model()
    x, y = _tiny_data(4)
    with pytest.raises(ValueError, match="pixels, labels"):
        predict_dataset(model, tf.data.Dataset.from_tensor_slices(x).batch(2))
    with pytest.raises(ValueError, match="no batches"):
        predict_dataset(model, tf.data.Dataset.from_tensor_slices((x, y)).take(0).batch(2))
    one_hot = np.eye(3, dtype=np.float32)[y]
    with pytest.raises(ValueError, match="one-hot"):
        predict_dataset(model, tf.data.Dataset.from_tensor_slices((x, one_hot)).batch(2))


def test_evaluate_model_adds_timing():
    model = _tiny_model()
    x, y = _tiny_data()
    m = evaluate_model(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(4), NAMES)
    assert m["num_examples"] == 10
    assert m["seconds"] > 0 and m["images_per_second"] > 0
    assert m["top_k_accuracy"]["k"] == 3
    json.dumps(m)


# --- temperature scaling, mistakes, class alignment, splits ----------------------------------------------------


def _softmax64(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_with():
    # Labels drawn from softmax(z / 2.5): the model's softmax(z) is over-confident by exactly T = 2.5.
    rng = np.random.default_rng(0)
    z = rng.normal(scale=4.0, size=(20000, 4))
    true_probs = _softmax64(z / 2.5)
    y = (rng.random((len(z), 1)) > np.cumsum(true_probs, axis=1)).sum(axis=1)
    probs = _softmax64(z)

    temperature = fit_temperature(y, probs)
    assert temperature == pytest.approx(2.5, rel=0.05)
    calibration = calibration_metrics(y, probs, temperature)
    assert calibration["after"]["log_loss"] < calibration["before"]["log_loss"]
    assert calibration["after"]["ece"] < calibration["before"]["ece"] / 3
    assert calibration["after"]["mean_confidence"] < calibration["before"]["mean_confidence"]
    # An under-confident model gets T < 1.
    assert fit_temperature(y, _softmax64(z / 5.0)) == pytest.approx(2.5 / 5.0, rel=0.05)


def test_apply_temperature_divides_the_logits_and_keeps_the_argmax():
    rng = np.random.default_rng(1)
    z = rng.normal(scale=3.0, size=(50, 5))
    scaled = apply_temperature(_softmax64(z), 1.7)
    np.testing.assert_allclose(scaled, _softmax64(z / 1.7), atol=1e-6)
    np.testing.assert_array_equal(scaled.argmax(axis=1), z.argmax(axis=1))
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(_softmax64(z), 0.0)


def test_fit_temperature_never_makes_nll_worse():
    # Already calibrated labels (drawn from the model's own probabilities): T stays near 1 and NLL does not rise.
    rng = np.random.default_rng(2)
    probs = _softmax64(rng.normal(scale=2.0, size=(3000, 3)))
    y = (rng.random((len(probs), 1)) > np.cumsum(probs, axis=1)).sum(axis=1)
    temperature = fit_temperature(y, probs)
    assert temperature == pytest.approx(1.0, abs=0.1)
    calibration = calibration_metrics(y, probs, temperature)
    assert calibration["after"]["log_loss"] <= calibration["before"]["log_loss"] + 1e-12


def test_confident_mistakes_are_sorted_and_name_their_files():
    files = [f"img_{i}.jpg" for i in range(len(Y_TRUE))]
    mistakes = confident_mistakes(Y_TRUE, PROBS, files, NAMES, n=2)
    # Wrong: #2 (.5, pred bee), #5 (.6, pred wasp), #7 (.6, pred ant); equal confidences keep data order.
    assert [m["file"] for m in mistakes] == ["img_5.jpg", "img_7.jpg"]
    assert mistakes[0] == {"file": "img_5.jpg", "true": "bee", "predicted": "wasp", "confidence": pytest.approx(0.6),
                           "true_class_probability": pytest.approx(0.3)}
    assert len(confident_mistakes(Y_TRUE, PROBS, files, NAMES, n=10)) == 3
    assert confident_mistakes(Y_TRUE, PROBS, files, NAMES, n=0) == []
    with pytest.raises(ValueError, match="file names"):
        confident_mistakes(Y_TRUE, PROBS, files[:3], NAMES)


def test_align_classes_maps_by_name_and_lists_both_sets_on_mismatch():
    # A data set with only some of the model's classes is allowed; its ids map to the model's by name.
    np.testing.assert_array_equal(align_classes(["ant", "bee", "wasp"], ["wasp", "ant"], "d"), [2, 0])
    with pytest.raises(DataError) as raised:
        align_classes(["ant", "bee"], ["ant", "fly"], "target/")
    message = str(raised.value)
    assert "target/" in message and "['ant', 'fly']" in message and "['ant', 'bee']" in message
    assert "not known to the model: ['fly']" in message


def test_select_split_choices(tmp_path):
    folders = load_source(str(make_colour_folder(tmp_path / "split", per_class=6, splits=True)), 0.0)
    examples, name = select_split(folders, "auto")
    assert name == "val" and len(examples) == 3 * 2
    assert select_split(folders, "all")[0].paths == folders.train.paths + folders.val.paths
    assert select_split(folders, "train")[1] == "train"
    with pytest.raises(DataError, match="no test examples"):
        select_split(folders, "test")
    flat = load_source(str(make_colour_folder(tmp_path / "flat", per_class=4)), 0.0)
    examples, name = select_split(flat, "auto")
    assert name == "all" and len(examples) == 12
    with pytest.raises(DataError, match="unknown split"):
        select_split(flat, "holdout")
