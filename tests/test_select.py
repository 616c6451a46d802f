"""`tftransfer select`: the transferability scores on cases with known answers (numpy only), MAC counting, candidate
parsing and its errors, and the command end to end on the tiny backbone (random weights, 32 px colour images)."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_colour_folder
from scipy.optimize import minimize
from scipy.stats import multivariate_normal

import tftransfer
from tftransfer.cli import SELECT_CRITERIA, main
from tftransfer.core.errors import BackboneError, ConfigError, RunDirError
from tftransfer.evaluation import transferability as tr
from tftransfer.jobs import select as select_job
from tftransfer.jobs.select import parse_candidates, rank_candidates, run_select
from tftransfer.model.cost import folded_params, model_macs


def _informative(rng: np.random.Generator, n: int, d: int, classes: int = 3, separation: float = 1.0):
    labels = rng.integers(0, classes, n)
    means = rng.normal(size=(classes, d)) * separation
    return means[labels] + rng.normal(size=(n, d)), labels


# ---------------------------------------------------------------------------------------------------------------
# LogME


def test_log_evidence_equals_the_gaussian_marginal_likelihood():
    """log p(y | F, alpha, beta) by the SVD trick is the density of y ~ N(0, F F^T / alpha + I / beta), for D < N and
    for D > N (where F^T F is singular)."""
    rng = np.random.default_rng(0)
    for n, d in ((40, 7), (25, 60)):
        f = rng.normal(size=(n, d))
        y = rng.normal(size=n)
        u, s, _ = np.linalg.svd(f, full_matrices=False)
        for alpha, beta in ((1.0, 1.0), (0.3, 5.0), (20.0, 0.1)):
            direct = multivariate_normal(np.zeros(n), f @ f.T / alpha + np.eye(n) / beta).logpdf(y)
            assert tr.log_evidence(s, u.T @ y, float(y @ y), n, d, alpha, beta) == pytest.approx(direct, rel=1e-9)


def test_fixed_point_finds_the_evidence_maximum():
    """MacKay's updates land on the (alpha, beta) a generic optimiser finds for the closed-form evidence, with the
    same maximum; and a noise-free linear target gets a far higher evidence than a random one."""
    rng = np.random.default_rng(1)
    n, d = 80, 6
    f = rng.normal(size=(n, d))
    y = f @ rng.normal(size=d) + 0.3 * rng.normal(size=n)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    found = tr.maximise_evidence(s, u.T @ y, float(y @ y), n, d)

    def negative(log_ab):
        a, b = np.exp(log_ab)
        return -multivariate_normal(np.zeros(n), f @ f.T / a + np.eye(n) / b).logpdf(y)

    best = minimize(negative, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12,
                                                                          "maxiter": 4000})
    assert found.value == pytest.approx(-best.fun / n, abs=1e-6)
    assert math.log(found.alpha) == pytest.approx(best.x[0], abs=1e-3)
    assert math.log(found.beta) == pytest.approx(best.x[1], abs=1e-3)
    # beta is the noise precision: about 1 / 0.3^2
    assert 1 / found.beta == pytest.approx(0.09, rel=0.35)
    noise = rng.normal(size=n)
    assert tr.maximise_evidence(s, u.T @ noise, float(noise @ noise), n, d).value < found.value - 0.5


@pytest.mark.parametrize("n,d", [(50, 200), (200, 20)])
def test_logme_through_the_smaller_gram_matrix_equals_the_svd_route(n, d):
    """logme_per_class takes U and s from the N x N (or D x D) eigenproblem; the evidence is the SVD's."""
    rng = np.random.default_rng(6)
    f = np.abs(rng.normal(size=(n, d)))
    labels = rng.integers(0, 3, n)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    for label, found in zip(range(3), tr.logme_per_class(f, labels)):
        y = (labels == label).astype(float)
        direct = tr.maximise_evidence(s, u.T @ y, float(y @ y), n, d)
        assert found.value == pytest.approx(direct.value, rel=1e-8)
        assert found.alpha == pytest.approx(direct.alpha, rel=1e-6)


@pytest.mark.parametrize("n,d", [(300, 64), (90, 256)])  # more images than dimensions, and fewer
def test_logme_and_h_score_tell_informative_features_from_random_ones(n, d):
    features, labels = _informative(np.random.default_rng(2), n, d)
    noise = np.random.default_rng(3).normal(size=(n, d))
    assert tr.logme(features, labels) > tr.logme(noise, labels) + 0.3
    assert tr.h_score(features, labels) > 1.0 > 0.3 > tr.h_score(noise, labels)
    # More class signal, higher scores: the scores order feature sets, not only separate two.
    weaker, same_labels = _informative(np.random.default_rng(2), n, d, separation=0.3)
    assert np.array_equal(same_labels, labels)
    assert tr.logme(noise, labels) < tr.logme(weaker, labels) < tr.logme(features, labels)
    assert tr.h_score(weaker, labels) < tr.h_score(features, labels)


def test_plain_h_score_saturates_when_dimensions_exceed_images():
    """Why h_score shrinks the covariance: with D >= N the plain H-score is (classes - 1) for noise too."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 60)
    noise = rng.normal(size=(60, 200))
    assert tr.h_score(noise, labels, shrink=False) == pytest.approx(2.0, abs=1e-6)
    assert tr.h_score(noise, labels) < 0.5


def test_linear_probe_on_separable_and_on_random_data():
    rng = np.random.default_rng(4)
    features, labels = _informative(rng, 120, 16, separation=4.0)
    separable = tr.linear_probe(features, labels, folds=5)
    assert separable.accuracy == 1.0 and separable.std == 0.0 and separable.folds == 5
    chance = tr.linear_probe(rng.normal(size=(120, 16)), labels, folds=5)
    assert chance.accuracy < 0.6
    few = tr.linear_probe(features[:9], np.array([0, 0, 0, 1, 1, 1, 2, 2, 2]), folds=5)
    assert few.folds == 3  # no more folds than the smallest class has images


def test_scores_refuse_one_class_and_non_finite_features():
    with pytest.raises(tftransfer.core.errors.DataError, match="two classes"):
        tr.logme(np.ones((5, 3)), np.zeros(5))
    bad = np.ones((4, 2))
    bad[0, 0] = np.nan
    with pytest.raises(tftransfer.core.errors.DataError, match="NaN"):
        tr.h_score(bad, np.array([0, 0, 1, 1]))


def test_cli_criteria_are_the_score_registry():
    assert SELECT_CRITERIA == tuple(tr.SCORES)
    entry = tr.score_features(*_informative(np.random.default_rng(5), 60, 8))
    assert set(SELECT_CRITERIA) <= set(entry) and "probe_accuracy_std" in entry


# ---------------------------------------------------------------------------------------------------------------
# Cost, ranking, candidates


def test_macs_count_conv_depthwise_and_dense_layers():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8*8 positions * 3*3*3*4
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 4*4 * 3*3*4
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5)(x)  # 4*5
    model = keras.Model(inputs, outputs)
    assert model_macs(model) == 64 * 108 + 16 * 36 + 20
    outer = keras.Model(inputs, keras.layers.Dense(2)(model(inputs)))  # nested models count too
    assert model_macs(outer) == model_macs(model) + 10


def test_folded_params_turn_each_batchnorm_into_one_bias():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)  # 108 weights
    x = keras.layers.BatchNormalization()(x)  # 16 parameters, folded into 4 biases
    x = keras.layers.BatchNormalization(center=False, scale=False)(x)  # 8 (mean, variance), folded into 4
    model = keras.Model(inputs, x)
    assert model.count_params() == 108 + 16 + 8
    assert folded_params(model) == 108 + 4 + 4
    outer = keras.Model(inputs, keras.layers.Dense(2)(model(inputs)))  # nested models fold too
    assert folded_params(outer) == folded_params(model) + outer.layers[-1].count_params()


def test_ranking_and_pareto_front():
    entries = [{"backbone": "a", "logme": 1.0, "probe_accuracy": 0.9, "latency_batch1_ms": 10.0},
               {"backbone": "b", "logme": 2.0, "probe_accuracy": 0.8, "latency_batch1_ms": 5.0},
               {"backbone": "c", "logme": 0.5, "probe_accuracy": 0.7, "latency_batch1_ms": 20.0},
               {"backbone": "d", "skipped": "budget"}]
    rank_candidates(entries, "logme")
    assert [(e["backbone"], e.get("rank")) for e in entries] == [("b", 1), ("a", 2), ("c", 3), ("d", None)]
    assert {e["backbone"] for e in entries if e.get("pareto")} == {"a", "b"}
    rank_candidates(entries, "probe_accuracy")
    assert entries[0]["backbone"] == "a"


def test_candidate_names_sizes_and_yaml(tmp_path):
    found = parse_candidates("MobileNet_V2, tiny@48", weights="none")
    assert [(c.backbone, c.weights, c.image_size) for c in found] == [("mobilenetv2", "none", 224),
                                                                      ("tiny", "none", 48)]
    (tmp_path / "w.weights.h5").write_bytes(b"")
    spec = tmp_path / "candidates.yaml"
    spec.write_text("- {backbone: mobilenet, weights: w.weights.h5, backbone_kwargs: {alpha: 0.25}, "
                    "image_size: 128}\n- tiny\n")
    first, second = parse_candidates(str(spec))
    assert first.weights == str(tmp_path / "w.weights.h5")  # relative to the YAML file
    assert first.backbone_kwargs == {"alpha": 0.25} and first.image_size == 128
    assert second.backbone == "tiny" and second.weights == "imagenet"


@pytest.mark.parametrize("yaml_text,match", [
    ("- {backbone: tiny, colour: red}\n", r"candidates\.yaml: candidates\[0\]: unknown key 'colour'"),
    ("- {weights: none}\n", r"candidates\[0\]\.backbone: a backbone name is required"),
    ("- {backbone: tiny, image_size: big}\n", r"candidates\[0\]\.image_size"),
    ("- {backbone: tiny, backbone_kwargs: 3}\n", r"candidates\[0\]\.backbone_kwargs"),
    ("- {backbone: tiny, weights: missing.h5}\n", r"candidate 1 \(tiny\): weights file not found: missing\.h5"),
    ("backbone: tiny\n", "expected a non-empty list"),
    ("- [\n", "cannot read the candidates"),
])
def test_bad_candidates_yaml_names_the_file_and_key(tmp_path, yaml_text, match):
    spec = tmp_path / "candidates.yaml"
    spec.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        parse_candidates(str(spec))


def test_bad_candidate_names_and_sizes():
    with pytest.raises(BackboneError, match=r"--candidates: candidate 2 \(mobilenetv9\): .*mobilenetv9"):
        parse_candidates("tiny,mobilenetv9")
    with pytest.raises(BackboneError, match=r"candidate 1 \(tiny\): image size 4 is too small"):
        parse_candidates("tiny@4")
    with pytest.raises(ConfigError, match="size after @ must be an integer"):
        parse_candidates("tiny@big")
    with pytest.raises(ConfigError, match="file not found"):
        parse_candidates("nothere.yaml")


# ---------------------------------------------------------------------------------------------------------------
# The command


def _select_args(tmp_path, data, name="pick"):
    return ["select", "--data", str(data), "--candidates", "tiny@32,tiny@40", "--weights", "none", "--name", name,
            "--runs-dir", str(tmp_path / "runs"), "--folds", "3", "--batch-size", "8"]


def test_select_end_to_end_and_fit_reuses_the_features(tmp_path, monkeypatch):
    monkeypatch.setenv("TFTRANSFER_CACHE", str(tmp_path / "cache"))
    data = make_colour_folder(tmp_path / "colours", per_class=12)
    result = CliRunner().invoke(main, _select_args(tmp_path, data), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "pick"
    report = json.loads((run / "select.json").read_text())
    assert (run / "select.md").is_file() and (run / "select.png").is_file()
    candidates = report["candidates"]
    assert [c["rank"] for c in candidates] == [1, 2]
    for c in candidates:
        assert c["backbone"] == "tiny" and c["weights"] == "none" and c["image_size"] in (32, 40)
        assert c["images"] == 36 and c["params"] > 0 and c["flops"] > 0
        assert c["latency_batch1_ms"] > 0 and c["latency_batch32_ms"] > 0 and c["extract_images_per_second"] > 0
        assert c["probe_accuracy"] >= 0.9 and c["probe_accuracy_std"] >= 0  # solid colours: separable
        assert all(np.isfinite(c[k]) for k in ("logme", "h_score"))
    command = report["recommendation"]["fit_command"]
    assert command.startswith(f"tftransfer fit --data {data} --backbone tiny --weights none --image-size ")
    assert "recommendation:" in result.output and command in result.output
    assert "# Backbone selection" in (run / "select.md").read_text()

    # The pick's phase 1 reads the features select cached: fit adds no feature file.
    cached = sorted((tmp_path / "cache" / "features").iterdir())
    size = candidates[0]["image_size"]
    fit = tftransfer.fit(values={"data.path": str(data), "model.backbone": "tiny", "model.weights": "none",
                                 "data.image_size": size, "phases.head.epochs": 1, "phases.finetune.epochs": 0,
                                 "export.enabled": False, "runs_dir": str(tmp_path / "runs"), "name": "fitted"})
    assert sorted((tmp_path / "cache" / "features").iterdir()) == cached
    assert fit.metrics["run"]["image_size"] == size


def test_select_never_overwrites_and_bad_input_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TFTRANSFER_CACHE", str(tmp_path / "cache"))
    data = make_colour_folder(tmp_path / "colours", per_class=6)
    (tmp_path / "runs" / "pick").mkdir(parents=True)
    (tmp_path / "runs" / "pick" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, _select_args(tmp_path, data))
    assert result.exit_code == 1 and "already exists" in result.output
    assert "Traceback" not in result.output and (tmp_path / "runs" / "pick" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "runs" / "pick" / "select.json").exists()
    args = _select_args(tmp_path, data, name="other")
    args[args.index("--candidates") + 1] = "tiny,resnet51"
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "resnet51" in result.output and "--candidates" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "runs" / "other").exists()
    result = CliRunner().invoke(main, [*_select_args(tmp_path, data, name="third"), "--rank-by", "accuracy"])
    assert result.exit_code == 2 and "accuracy" in result.output


def test_a_warm_select_reads_features_and_cost_and_builds_no_model(tmp_path, monkeypatch):
    data = make_colour_folder(tmp_path / "colours", per_class=6)
    settings = {"weights": "none", "runs_dir": tmp_path / "runs", "cache_dir": str(tmp_path / "cache"), "folds": 2,
                "latency_runs": 2}
    cold = run_select(str(data), "tiny@32", name="cold", **settings).candidates[0]
    assert not cold["features_from_cache"] and not cold["cost_from_cache"]
    assert 0 < cold["tflite_float32_mb_estimate"] < cold["saved_model_variables_mb_estimate"]

    def no_build(*args, **kwargs):
        raise AssertionError("a warm candidate built its backbone")

    monkeypatch.setattr(select_job.backbones, "build_backbone", no_build)
    warm = run_select(str(data), "tiny@32", name="warm", **settings).candidates[0]
    assert warm["features_from_cache"] and warm["cost_from_cache"] and warm["extract_seconds"] is None
    assert {k: warm[k] for k in ("logme", "probe_accuracy", "latency_batch1_ms", "flops")} == \
        {k: cold[k] for k in ("logme", "probe_accuracy", "latency_batch1_ms", "flops")}
    with pytest.raises(AssertionError, match="built its backbone"):  # another timing setting is measured again
        run_select(str(data), "tiny@32", name="remeasure", **{**settings, "latency_runs": 3})


def test_select_api_budget_skips_later_candidates(tmp_path):
    data = make_colour_folder(tmp_path / "colours", per_class=6)
    found = run_select(str(data), ["tiny", {"backbone": "tiny", "weights": "none", "image_size": 40}],
                       weights="none", image_size=32, budget_seconds=1e-6, runs_dir=tmp_path / "runs",
                       cache_dir=str(tmp_path / "cache"), folds=2, latency_runs=2, rank_by="probe_accuracy")
    assert [c.get("rank") for c in found.candidates] == [1, None]
    assert "budget" in found.candidates[1]["skipped"]
    assert found.recommendation is not None and "tiny@32" in found.recommendation["candidate"]
    with pytest.raises(RunDirError):
        run_select(str(data), "tiny@32", weights="none", runs_dir=tmp_path / "runs", name=found.run_dir.name)


def test_bad_data_fails_before_the_run_folder_and_a_broken_candidate_is_left_out(tmp_path):
    result = CliRunner().invoke(main, _select_args(tmp_path, tmp_path / "no_such_folder"))
    assert result.exit_code == 1 and "no_such_folder" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "runs" / "pick").exists()

    data = make_colour_folder(tmp_path / "colours", per_class=6)
    (tmp_path / "broken.weights.h5").write_bytes(b"not an HDF5 file")
    found = run_select(str(data), [{"backbone": "tiny", "weights": str(tmp_path / "broken.weights.h5"),
                                    "image_size": 32}, "tiny@32"], weights="none", runs_dir=tmp_path / "runs",
                       cache_dir=str(tmp_path / "cache"), folds=2, latency_runs=2)
    broken, good = sorted(found.candidates, key=lambda c: c["weights"] == "none")
    assert "broken.weights.h5" in broken["error"] and broken.get("rank") is None
    assert good["rank"] == 1 and "tiny@32 (none)" in found.recommendation["candidate"]
    assert "error: " in (found.run_dir / "select.md").read_text()
    with pytest.raises(BackboneError, match="no candidate could be built"):
        run_select(str(data), [{"backbone": "tiny", "weights": str(tmp_path / "broken.weights.h5")}],
                   runs_dir=tmp_path / "runs", name="none_built", cache_dir=str(tmp_path / "cache"))
    assert json.loads((tmp_path / "runs" / "none_built" / "select.json").read_text())["candidates"][0]["error"]


def test_a_candidate_takes_its_width_multiplier_from_an_official_weights_file_name(tmp_path):
    """As fit does (issue 13 item 10), so the recommended fit command builds the backbone that was scored."""
    official = tmp_path / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    official.write_bytes(b"not read here")
    [found] = parse_candidates([{"backbone": "mobilenetv2", "weights": str(official)}])
    assert found.backbone_kwargs == {"alpha": 0.35}
    [kept] = parse_candidates([{"backbone": "mobilenetv2", "weights": str(official),
                                "backbone_kwargs": {"alpha": 1.0}}])
    assert kept.backbone_kwargs == {"alpha": 1.0}
