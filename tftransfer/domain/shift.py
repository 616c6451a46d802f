"""Label-free measures of the shift between a source and a target domain.

On pooled backbone features (the vectors the phase-1 head is trained on):

- proxy A-distance d_A = 2 (1 - 2 err) of a domain classifier (Ben-David et al. 2007), done so that the number
  means something: both domains subsampled to the same size (otherwise "always guess the larger domain" already
  scores below 0.5 error), err measured on held-out folds (a training error of a linear model in 1,280 dimensions
  is 0 for any two samples), mean and standard deviation over folds, the mean clipped to [0, 2];
- unbiased MMD^2 with a Gaussian kernel whose bandwidth is the median pairwise distance, and a permutation test
  p-value: is there a shift at all, or is the difference what two samples of one domain would show?
- CORAL distance: ||C_s - C_t||_F^2 / (4 d^2) of the feature covariances (Sun & Saenko 2016).

In the network: per-BatchNorm-layer drift, the target's exact input statistics against the statistics the layer
normalises with, ranked, so the user sees where the shift lives. On predictions: class distribution, confidence
and entropy, which need no labels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np

from tftransfer.core.numerics import entropy, marginal_entropy
from tftransfer.domain import batchnorm

logger = logging.getLogger(__name__)

_EPS = 1e-12


def _as_2d(x: Any, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D [examples, features] array; got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return x


def _check_pair(source: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    s, t = _as_2d(source, "source features"), _as_2d(target, "target features")
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"source and target features differ in width: {s.shape[1]} vs {t.shape[1]}")
    return s, t


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[np.sort(rng.choice(len(x), size=n, replace=False))]


# --- proxy A-distance ------------------------------------------------------------------------------------------


def proxy_a_distance(source: Any, target: Any, folds: int = 5, max_per_domain: int = 1000, seed: int = 0,
                     C: float = 1.0) -> dict[str, Any]:  # noqa: N803
    """Proxy A-distance from the held-out error of a logistic-regression domain classifier.

    Each domain is subsampled to n = min(sizes, max_per_domain) examples, so chance error is exactly 0.5. The
    classifier (standardised features, L2-regularised logistic regression) is scored with stratified k-fold
    cross-validation; d_A = 2 (1 - 2 err) per fold. "value" is the fold mean clipped to [0, 2] (0: the domains
    cannot be told apart, 2: perfectly separable); "std" is the sample standard deviation over folds.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    s, t = _check_pair(source, target)
    rng = np.random.default_rng(seed)
    n = min(len(s), len(t), int(max_per_domain))
    if n < max(folds, 2):
        raise ValueError(f"proxy A-distance needs at least {max(folds, 2)} examples per domain for {folds}-fold "
                         f"cross-validation; got {len(s)} source and {len(t)} target")
    x = np.concatenate([_subsample(s, n, rng), _subsample(t, n, rng)])
    y = np.concatenate([np.zeros(n, np.int64), np.ones(n, np.int64)])
    errors = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
        clf.fit(x[train], y[train])
        errors.append(float(np.mean(clf.predict(x[test]) != y[test])))
    errors_arr = np.asarray(errors)
    d = 2.0 * (1.0 - 2.0 * errors_arr)
    return {
        "value": float(np.clip(d.mean(), 0.0, 2.0)),
        "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
        "folds": d.tolist(),
        "error": float(errors_arr.mean()),
        "fold_errors": errors,
        "per_domain": int(n),
        "k": int(folds),
        "classifier": f"logistic regression on standardised features, C={C}, {folds}-fold held-out error",
    }


# --- MMD -----------------------------------------------------------------------------------------------------


def squared_distances(x: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances of the rows of x (float64, clipped at 0, zero diagonal)."""
    sq = np.einsum("ij,ij->i", x, x)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def median_bandwidth(d2: np.ndarray) -> float:
    """The median pairwise distance (off the diagonal) of a squared-distance matrix: the median heuristic."""
    upper = d2[np.triu_indices_from(d2, k=1)]
    sigma = float(np.median(np.sqrt(upper))) if upper.size else 0.0
    return sigma if sigma > 0 else 1.0  # all points equal: any bandwidth gives MMD 0


def _mmd2_many(k: np.ndarray, member: np.ndarray, n: int, m: int) -> np.ndarray:
    """Unbiased MMD^2 for many splits at once; member is [N, B] with 1 where a point is in the first sample.

    Uses k_ii = 1 (Gaussian kernel): sum_{i != j in X} k_ij = a^T K a - n, and likewise for Y.
    """
    ka = k @ member
    other = 1.0 - member
    rows = k.sum(axis=1, keepdims=True)
    xx = np.einsum("ib,ib->b", member, ka) - n
    yy = np.einsum("ib,ib->b", other, rows - ka) - m
    xy = np.einsum("ib,ib->b", other, ka)
    return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m)


def mmd_test(source: Any, target: Any, permutations: int = 1000, max_per_domain: int = 500,
             seed: int = 0) -> dict[str, Any]:
    """Unbiased MMD^2 (Gaussian kernel, median-distance bandwidth) with a permutation-test p-value.

    The bandwidth is chosen once on the pooled sample, then every permutation reuses the same kernel matrix (the
    test stays valid: the statistic is a function of the pooled sample and the split). p = (1 + #{permuted >=
    observed}) / (1 + permutations), never 0.
    """
    s, t = _check_pair(source, target)
    rng = np.random.default_rng(seed)
    s, t = _subsample(s, int(max_per_domain), rng), _subsample(t, int(max_per_domain), rng)
    n, m = len(s), len(t)
    if n < 2 or m < 2:
        raise ValueError(f"MMD needs at least 2 examples per domain; got {n} source and {m} target")
    z = np.concatenate([s, t])
    d2 = squared_distances(z)
    sigma = median_bandwidth(d2)
    k = np.exp(-d2 / (2.0 * sigma**2))
    observed_member = np.zeros((n + m, 1))
    observed_member[:n] = 1.0
    observed = float(_mmd2_many(k, observed_member, n, m)[0])
    exceed = 0
    chunk = 256
    for start in range(0, int(permutations), chunk):
        b = min(chunk, int(permutations) - start)
        member = np.zeros((n + m, b))
        for j in range(b):
            member[rng.permutation(n + m)[:n], j] = 1.0
        # A tiny tolerance: a permutation equal to the observed split must count as "as extreme".
        exceed += int(np.sum(_mmd2_many(k, member, n, m) >= observed - 1e-12))
    p_value = (1 + exceed) / (1 + int(permutations))
    return {"mmd2": observed, "p_value": float(p_value), "bandwidth": sigma, "permutations": int(permutations),
            "n_source": n, "n_target": m, "shift_detected": bool(p_value < 0.05),
            "kernel": "gaussian exp(-d^2 / (2 sigma^2)), sigma = median pairwise distance of the pooled sample"}


# --- CORAL ---------------------------------------------------------------------------------------------------


def coral_distance(source: Any, target: Any) -> dict[str, Any]:
    """CORAL distance ||C_s - C_t||_F^2 / (4 d^2), plus the scale-free ||C_s - C_t||_F / ||C_s||_F."""
    s, t = _check_pair(source, target)
    if len(s) < 2 or len(t) < 2:
        raise ValueError("CORAL needs at least 2 examples per domain")
    cs, ct = np.cov(s, rowvar=False), np.cov(t, rowvar=False)
    d = s.shape[1]
    diff = np.linalg.norm(cs - ct, "fro")
    return {"value": float(diff**2 / (4.0 * d * d)),
            "relative": float(diff / max(np.linalg.norm(cs, "fro"), _EPS)), "dim": int(d)}


def feature_shift(source: Any, target: Any, *, folds: int = 5, permutations: int = 1000,
                  max_per_domain: int = 1000, seed: int = 0) -> dict[str, Any]:
    """All feature-space measures: proxy A-distance, MMD test and CORAL."""
    return {"proxy_a_distance": proxy_a_distance(source, target, folds=folds, max_per_domain=max_per_domain,
                                                 seed=seed),
            "mmd": mmd_test(source, target, permutations=permutations, max_per_domain=min(max_per_domain, 500),
                            seed=seed),
            "coral": coral_distance(source, target)}


# --- BatchNorm drift -------------------------------------------------------------------------------------------


def gaussian_drift(mean: np.ndarray, variance: np.ndarray, ref_mean: np.ndarray, ref_variance: np.ndarray,
                   epsilon: float) -> dict[str, float]:
    """How far N(mean, variance) is from N(ref_mean, ref_variance), averaged over channels.

    kl: KL(observed || reference) of per-channel Gaussians (both with the layer's epsilon added, as normalisation
    sees them); mean_shift: |mean - ref_mean| / ref_std; log_std_ratio: |log(std / ref_std)|.
    """
    var = np.asarray(variance, np.float64) + epsilon
    ref_var = np.asarray(ref_variance, np.float64) + epsilon
    diff = np.asarray(mean, np.float64) - np.asarray(ref_mean, np.float64)
    kl = 0.5 * (np.log(ref_var / var) + (var + diff**2) / ref_var - 1.0)
    return {"kl": float(np.mean(kl)), "mean_shift": float(np.mean(np.abs(diff) / np.sqrt(ref_var))),
            "log_std_ratio": float(np.mean(np.abs(0.5 * np.log(var / ref_var))))}


def batchnorm_drift(model: keras.Model, target_batches: Iterable[np.ndarray],
                    source_batches: Iterable[np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Per-BatchNorm-layer drift of the target's input statistics from the stored ones, largest first.

    Each layer's input is measured exactly over all target images, with the network in inference mode (as the
    model runs). With `source_batches`, the source's own drift is measured too: the stored statistics come from
    the backbone's pre-training data, so the source drifts as well, and the target's excess over it is the part
    the domain change adds. Entries carry the layer's position in the network ("depth", 0 = first).
    """
    layers = batchnorm.require_batchnorm(model, "BatchNorm drift")
    target = batchnorm.input_moments(model, layers, target_batches)
    source = batchnorm.input_moments(model, layers, source_batches) if source_batches is not None else None
    rows = []
    for i, layer in enumerate(layers):
        ref_mean, ref_var = batchnorm.stored_moments(layer)
        row: dict[str, Any] = {"layer": layer.name, "depth": i, "channels": int(ref_mean.shape[0]),
                               "target": gaussian_drift(target[i].mean, target[i].variance, ref_mean, ref_var,
                                                        layer.epsilon)}
        if source is not None:
            row["source"] = gaussian_drift(source[i].mean, source[i].variance, ref_mean, ref_var, layer.epsilon)
            row["excess_kl"] = row["target"]["kl"] - row["source"]["kl"]
            # Target statistics against the source's own: the shift between the domains at this layer.
            row["target_vs_source"] = gaussian_drift(target[i].mean, target[i].variance, source[i].mean,
                                                     source[i].variance, layer.epsilon)
        rows.append(row)
    return sorted(rows, key=lambda r: r["target"]["kl"], reverse=True)


# --- label-free signals on predictions ---------------------------------------------------------------------------


def prediction_signals(probs: Any, class_names: Sequence[str] | None = None,
                       reference_probs: Any | None = None) -> dict[str, Any]:
    """Mean confidence, entropy and the predicted class distribution; vs a reference when given.

    The reference is typically the same model on source data: a target whose predicted class distribution moves
    far from it, or whose confidence and entropy change a lot, is shifted even when no label says so. Distances
    between distributions: total variation (half the L1 distance, in [0, 1]) and Jensen-Shannon divergence
    (nats, in [0, ln 2]).
    """
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"probs must be a non-empty [examples, classes] array; got shape {p.shape}")
    c = p.shape[1]
    ent = entropy(p)
    dist = np.bincount(p.argmax(axis=1), minlength=c) / len(p)
    out: dict[str, Any] = {
        "num_examples": int(len(p)),
        "mean_confidence": float(p.max(axis=1).mean()),
        "mean_entropy": float(ent.mean()),
        "mean_normalized_entropy": float(ent.mean() / math.log(c)),
        "predicted_distribution": _named(dist, class_names),
        # Entropy of the average prediction over the data, normalised: 1 = classes predicted evenly, 0 = always
        # the same class (the collapse TENT must avoid).
        "prediction_diversity": marginal_entropy(p),
    }
    if reference_probs is not None:
        ref = np.asarray(reference_probs, np.float64)
        ref_dist = np.bincount(ref.argmax(axis=1), minlength=c) / len(ref)
        out["reference"] = {"mean_confidence": float(ref.max(axis=1).mean()),
                            "mean_entropy": float(entropy(ref).mean()),
                            "predicted_distribution": _named(ref_dist, class_names)}
        out["distribution_tv"] = float(0.5 * np.abs(dist - ref_dist).sum())
        out["distribution_js"] = js_divergence(dist, ref_dist)
        out["confidence_change"] = out["mean_confidence"] - out["reference"]["mean_confidence"]
        out["entropy_change"] = out["mean_entropy"] - out["reference"]["mean_entropy"]
    return out


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two distributions, in nats."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    mix = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log(a[mask] / b[mask])))

    return 0.5 * kl(p, mix) + 0.5 * kl(q, mix)


def _named(values: np.ndarray, class_names: Sequence[str] | None) -> dict[str, float] | list[float]:
    if class_names is None:
        return [float(v) for v in values]
    return {str(name): float(v) for name, v in zip(class_names, values)}
