"""Transferability scores: how well a frozen backbone's pooled features suit a labelled data set, before training.

Each score maps (features [N, D], integer labels [N]) to one number, higher is better, and sits in `SCORES`:

- `logme`: LogME (You, Liu, Wang, Long, ICML 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning"). For each class, the one-vs-rest target y is modelled as y = F w + noise with a Gaussian prior
  w ~ N(0, I / alpha) and noise ~ N(0, I / beta); alpha and beta maximise the evidence p(y | F, alpha, beta) by
  MacKay's fixed-point updates, computed on F's SVD so each iteration costs O(N D) at most. The score is the
  maximised log evidence divided by N, averaged over classes.
- `h_score`: H-score (Bao, Li, Huang, Zheng, Ma, 2019, "An Information-Theoretic Approach to Transferability in
  Task Transfer Learning"): tr(cov(f)^-1 cov(E[f | y])). With as many feature dimensions as images the sample
  covariance is singular and the plain H-score saturates at (classes - 1) for any features, random ones included,
  so cov(f) is shrunk toward a scaled identity with the Ledoit-Wolf weight (Ibrahim, Ponomareva, Mazumder 2022,
  "Newer is not always better: rethinking transferability metrics"); `h_score(..., shrink=False)` is the plain one.
- `probe_accuracy`: mean accuracy of a k-fold cross-validated logistic regression on standardised features (its
  standard deviation over the folds comes with it as `probe_accuracy_std`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.covariance import ledoit_wolf
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from tftransfer.core.errors import DataError

LOGME_MAX_ITER = 100
LOGME_TOL = 1e-5  # relative change of alpha / beta between iterations that ends the fixed-point loop
# L-BFGS iterations of each probe fit. The held-out accuracy settles long before the loss: on Office-31 dslr
# (31 classes, 1280-d features) 100 and 1000 iterations gave the same accuracy for every backbone, and a random-
# weights backbone's features, which never converge, cost 4x less.
PROBE_MAX_ITER = 100


def _as_arrays(features: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if f.ndim != 2 or len(f) != len(y):
        raise ValueError(f"{what}: need features [N, D] and N labels, got {f.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        raise DataError(f"{what}: needs at least two classes among the labelled images, found {len(np.unique(y))}")
    if not np.all(np.isfinite(f)):
        raise DataError(f"{what}: the features hold NaN or infinite values")
    return f, y


# ---------------------------------------------------------------------------------------------------------------
# LogME


@dataclass(frozen=True)
class Evidence:
    """The maximised evidence of one target: log p(y | F, alpha, beta) / N at the fixed point, and alpha, beta."""

    value: float
    alpha: float
    beta: float
    iterations: int


def log_evidence(s: np.ndarray, z: np.ndarray, y_norm2: float, n: int, d: int, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) from F's singular values `s` and z = U^T y (the SVD trick of LogME's paper).

    With A = alpha I + beta F^T F and m = beta A^-1 F^T y:
    n/2 log beta + d/2 log alpha - n/2 log 2 pi - beta/2 |F m - y|^2 - alpha/2 |m|^2 - 1/2 log det A.
    """
    sigma = s ** 2
    denom = alpha + beta * sigma
    m2 = float(np.sum((beta * s * z / denom) ** 2))
    residual = float(np.sum((alpha * z / denom) ** 2)) + max(y_norm2 - float(np.sum(z ** 2)), 0.0)
    logdet = float(np.sum(np.log(denom))) + (d - len(s)) * math.log(alpha)
    return (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
            - beta / 2 * residual - alpha / 2 * m2 - logdet / 2)


def maximise_evidence(s: np.ndarray, z: np.ndarray, y_norm2: float, n: int, d: int) -> Evidence:
    """MacKay's fixed point for alpha and beta (LogME's Algorithm 1): gamma = sum beta sigma / (alpha + beta sigma),
    alpha = gamma / |m|^2, beta = (n - gamma) / |F m - y|^2, from alpha = beta = 1 until both settle."""
    sigma = s ** 2
    alpha, beta = 1.0, 1.0
    iterations = 0
    for iterations in range(1, LOGME_MAX_ITER + 1):  # noqa: B007
        denom = alpha + beta * sigma
        gamma = float(np.sum(beta * sigma / denom))
        m2 = float(np.sum((beta * s * z / denom) ** 2))
        residual = float(np.sum((alpha * z / denom) ** 2)) + max(y_norm2 - float(np.sum(z ** 2)), 0.0)
        new_alpha = gamma / max(m2, 1e-300)
        new_beta = (n - gamma) / max(residual, 1e-300)
        # The fixed point is only defined up to where alpha, beta stay finite and positive.
        new_alpha, new_beta = min(max(new_alpha, 1e-12), 1e12), min(max(new_beta, 1e-12), 1e12)
        done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < LOGME_TOL
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return Evidence(log_evidence(s, z, y_norm2, n, d, alpha, beta) / n, float(alpha), float(beta), iterations)


def left_singular(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F's left singular vectors U and singular values s (those above round-off), from the eigendecomposition of
    the smaller of F F^T and F^T F: with 1280-dimensional features of a few hundred images that is an N x N
    problem, several times faster than the SVD of F."""
    n, d = f.shape
    if n <= d:
        eigenvalues, u = np.linalg.eigh(f @ f.T)
    else:
        eigenvalues, v = np.linalg.eigh(f.T @ f)
    keep = eigenvalues > max(float(eigenvalues.max(initial=0.0)), 1e-300) * max(n, d) * np.finfo(np.float64).eps
    s = np.sqrt(eigenvalues[keep])
    if n <= d:
        return u[:, keep], s
    return f @ v[:, keep] / s, s


def logme_per_class(features: np.ndarray, labels: np.ndarray) -> list[Evidence]:
    """The maximised evidence of each one-vs-rest target (classes in sorted order)."""
    f, y = _as_arrays(features, labels, "LogME")
    n, d = f.shape
    u, s = left_singular(f)
    found = []
    for label in np.unique(y):
        target = (y == label).astype(np.float64)
        found.append(maximise_evidence(s, u.T @ target, float(target @ target), n, d))
    return found


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME: the maximised log evidence per image, averaged over the one-vs-rest targets of every class."""
    return float(np.mean([e.value for e in logme_per_class(features, labels)]))


# ---------------------------------------------------------------------------------------------------------------
# H-score


def h_score(features: np.ndarray, labels: np.ndarray, shrink: bool = True) -> float:
    """tr(cov(f)^-1 cov(E[f | y])): between-class feature variance in units of the total variance.

    With `shrink` (the default) cov(f) is Ledoit-Wolf shrunk, and the class-mean covariance scaled by the same
    (1 - shrinkage), as Ibrahim et al. (2022) do; without, the pseudo-inverse of the sample covariance is used.
    """
    f, y = _as_arrays(features, labels, "H-score")
    f = f - f.mean(axis=0)
    class_means = np.zeros_like(f)
    for label in np.unique(y):
        rows = y == label
        class_means[rows] = f[rows].mean(axis=0)
    cov_g = class_means.T @ class_means / len(f)
    if shrink:
        cov_f, shrinkage = ledoit_wolf(f, assume_centered=True)
        return float(np.trace(np.linalg.solve(cov_f, (1 - shrinkage) * cov_g)))
    cov_f = f.T @ f / len(f)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-15, hermitian=True) @ cov_g))


# ---------------------------------------------------------------------------------------------------------------
# Linear probe


@dataclass(frozen=True)
class ProbeResult:
    """Cross-validated accuracy of a logistic regression on the features."""

    accuracy: float
    std: float
    folds: int


def linear_probe(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0,
                 c: float = 1.0) -> ProbeResult:
    """Stratified k-fold accuracy (mean and std over folds) of standardised features -> logistic regression.

    The number of folds drops to the smallest class's size when that is below `folds` (at least 2). Each fit
    stops after PROBE_MAX_ITER iterations, converged or not.
    """
    f, y = _as_arrays(features, labels, "linear probe")
    smallest = int(np.bincount(np.unique(y, return_inverse=True)[1]).min())
    k = min(folds, smallest)
    if k < 2:
        raise DataError(f"linear probe: every class needs at least 2 images for cross-validation; the smallest has "
                        f"{smallest}")
    scores = []
    for train, test in StratifiedKFold(k, shuffle=True, random_state=seed).split(f, y):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=PROBE_MAX_ITER))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(f[train], y[train])
        scores.append(float(np.mean(probe.predict(f[test]) == y[test])))
    return ProbeResult(float(np.mean(scores)), float(np.std(scores)), k)


# ---------------------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class TransferScore:
    """A score of features for labels, higher is better: f(features, labels, folds=, seed=) -> {name: value}."""

    name: str
    compute: Callable[..., dict[str, float]]
    description: str


def _logme_entry(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> dict[str, float]:
    return {"logme": logme(features, labels)}


def _h_score_entry(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> dict[str, float]:
    return {"h_score": h_score(features, labels)}


def _probe_entry(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> dict[str, float]:
    found = linear_probe(features, labels, folds=folds, seed=seed)
    return {"probe_accuracy": found.accuracy, "probe_accuracy_std": found.std, "probe_folds": found.folds}


SCORES: dict[str, TransferScore] = {}


def register_score(score: TransferScore) -> TransferScore:
    """Adds a score; `tftransfer select --rank-by` takes its name."""
    SCORES[score.name] = score
    return score


register_score(TransferScore("logme", _logme_entry, "LogME: maximised label evidence per image (You et al. 2021)"))
register_score(TransferScore("h_score", _h_score_entry,
                             "H-score with Ledoit-Wolf shrinkage (Bao et al. 2019; Ibrahim et al. 2022)"))
register_score(TransferScore("probe_accuracy", _probe_entry,
                             "k-fold cross-validated logistic-regression accuracy on the features"))


def score_features(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Every registered score of the features: {logme, h_score, probe_accuracy, probe_accuracy_std, ...}.

    BLAS runs single-threaded here: the matrices are small, and on a loaded 2-core machine OpenBLAS's threads
    fighting for the cores made the probe on Office-31 dslr features 28x slower (97 s against 3.5 s).
    """
    found: dict[str, float] = {}
    with threadpool_limits(1):
        for score in SCORES.values():
            found.update(score.compute(features, labels, folds=folds, seed=seed))
    return found
