"""Shift measures against independent computations and against data whose answer is known."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tftransfer.domain import shift


def gaussians(n: int, m: int, dim: int = 8, offset: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)), rng.normal(size=(m, dim)) + offset


# --- proxy A-distance ------------------------------------------------------------------------------------------


def test_a_distance_is_near_zero_for_one_domain_and_two_for_separable_domains():
    same = shift.proxy_a_distance(*gaussians(200, 200), seed=1)
    far = shift.proxy_a_distance(*gaussians(200, 200, offset=4.0), seed=1)
    assert same["value"] < 0.4 and 0.3 < same["error"] < 0.7
    assert far["value"] > 1.9 and far["error"] < 0.03
    for result in (same, far):
        assert 0.0 <= result["value"] <= 2.0
        assert len(result["folds"]) == result["k"] == 5 and result["std"] >= 0.0
        # The reported value is the fold mean (clipped), and each fold is 2 (1 - 2 err) of its own held-out error.
        np.testing.assert_allclose(result["folds"], [2 * (1 - 2 * e) for e in result["fold_errors"]])
        assert result["value"] == pytest.approx(min(max(np.mean(result["folds"]), 0.0), 2.0))


def test_a_distance_balances_the_domains():
    """50 vs 1,000 samples of one distribution: an unbalanced classifier gets 5% error by always answering "target"
    (d_A = 1.8, a shift that is not there); balanced subsampling keeps chance at 50%."""
    result = shift.proxy_a_distance(*gaussians(50, 1000, seed=2), seed=0)
    assert result["per_domain"] == 50
    assert result["value"] < 0.5
    naive_error = 50 / 1050
    assert 2 * (1 - 2 * naive_error) > 1.5  # what the unbalanced majority guess would have reported


def test_a_distance_is_reproducible_and_rejects_tiny_samples():
    a, b = gaussians(60, 80, offset=0.5)
    assert shift.proxy_a_distance(a, b, seed=3) == shift.proxy_a_distance(a, b, seed=3)
    with pytest.raises(ValueError, match="at least 5 examples per domain"):
        shift.proxy_a_distance(a[:3], b)
    with pytest.raises(ValueError, match="differ in width"):
        shift.proxy_a_distance(a, b[:, :4])


# --- MMD ------------------------------------------------------------------------------------------------------


def mmd2_by_loops(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """The unbiased estimator written out term by term (Gretton et al. 2012, eq. 3)."""
    k = lambda a, b: math.exp(-float(np.sum((a - b) ** 2)) / (2 * sigma**2))  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_statistic_and_bandwidth_match_a_direct_computation():
    x, y = gaussians(9, 7, dim=3, offset=0.7, seed=4)
    result = shift.mmd_test(x, y, permutations=50, seed=0)
    z = np.concatenate([x, y])
    dists = [np.linalg.norm(z[i] - z[j]) for i, j in itertools.combinations(range(len(z)), 2)]
    assert result["bandwidth"] == pytest.approx(float(np.median(dists)))
    assert result["mmd2"] == pytest.approx(mmd2_by_loops(x, y, result["bandwidth"]), rel=1e-9)
    assert (result["n_source"], result["n_target"]) == (9, 7)


def test_mmd_permutation_test_detects_a_shift_and_not_its_absence():
    shifted = shift.mmd_test(*gaussians(80, 100, offset=0.6, seed=5), permutations=300, seed=0)
    same = shift.mmd_test(*gaussians(80, 100, seed=6), permutations=300, seed=0)
    assert shifted["p_value"] == pytest.approx(1 / 301) and shifted["shift_detected"]
    assert same["p_value"] > 0.05 and not same["shift_detected"]
    assert shifted["mmd2"] > same["mmd2"]


def test_mmd_p_values_are_uniform_under_no_shift():
    """A valid test rejects about 5% of true nulls at the 5% level: over 40 null pairs, a handful at most."""
    p = [shift.mmd_test(*gaussians(25, 30, dim=4, seed=100 + s), permutations=99, seed=s)["p_value"]
         for s in range(40)]
    assert sum(v < 0.05 for v in p) <= 6
    assert 0.3 < float(np.mean(p)) < 0.7


# --- CORAL and signals ------------------------------------------------------------------------------------------


def test_coral_distance_matches_its_formula():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, 3))
    y = rng.normal(size=(300, 3)) * np.array([1.0, 2.0, 0.5])
    cs, ct = np.cov(x.T), np.cov(y.T)
    result = shift.coral_distance(x, y)
    assert result["value"] == pytest.approx(float(np.sum((cs - ct) ** 2)) / (4 * 9))
    assert result["relative"] == pytest.approx(np.linalg.norm(cs - ct) / np.linalg.norm(cs))
    assert shift.coral_distance(x, x)["value"] == 0.0


def test_prediction_signals_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    ref = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])
    out = shift.prediction_signals(probs, ["a", "b"], reference_probs=ref)
    ent = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in (0.9, 0.6, 0.2, 0.5)]
    assert out["mean_entropy"] == pytest.approx(np.mean(ent))
    assert out["mean_normalized_entropy"] == pytest.approx(np.mean(ent) / math.log(2))
    assert out["mean_confidence"] == pytest.approx((0.9 + 0.6 + 0.8 + 0.5) / 4)
    # argmax ties go to the lower class id: predictions a, a, b, a
    assert out["predicted_distribution"] == {"a": 0.75, "b": 0.25}
    assert out["reference"]["predicted_distribution"] == {"a": 0.75, "b": 0.25}
    assert out["distribution_tv"] == 0.0 and out["distribution_js"] == 0.0
    mean = probs.mean(axis=0)
    assert out["prediction_diversity"] == pytest.approx(-(mean * np.log(mean)).sum() / math.log(2))
    collapsed = shift.prediction_signals(np.tile([[0.99, 0.01]], (5, 1)))
    assert collapsed["prediction_diversity"] < 0.1 and collapsed["predicted_distribution"] == [1.0, 0.0]


def test_js_divergence_bounds():
    assert shift.js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(math.log(2))
    assert shift.js_divergence(np.array([0.3, 0.7]), np.array([0.3, 0.7])) == 0.0


def test_gaussian_drift_is_the_kl_of_two_gaussians():
    mean, var = np.array([1.0, 0.0]), np.array([4.0, 1.0])
    ref_mean, ref_var = np.array([0.0, 0.0]), np.array([1.0, 1.0])
    out = shift.gaussian_drift(mean, var, ref_mean, ref_var, epsilon=0.0)
    kl0 = 0.5 * (math.log(1 / 4) + (4 + 1) / 1 - 1)  # KL(N(1, 4) || N(0, 1))
    assert out["kl"] == pytest.approx((kl0 + 0.0) / 2)
    assert out["mean_shift"] == pytest.approx(0.5)
    assert out["log_std_ratio"] == pytest.approx(math.log(2) / 2)
    assert shift.gaussian_drift(ref_mean, ref_var, ref_mean, ref_var, 1e-3)["kl"] == 0.0
