"""Label-free validators: which adapted model to trust when the target has no labels.

Each validator scores one candidate from what a user has (target predictions, target features, and for DEV a
labeled source validation split); higher is better. On labeled benchmark tasks their picks are compared with the
oracle's (benchmarks/hard_shift_adapt.py):
- `entropy`: minus the mean prediction entropy on the target (Grandvalet & Bengio 2004; Morerio et al. 2018).
- `snd`: soft neighbourhood density (Saito et al., "Tune it the Right Way", ICCV 2021): the entropy of each target
  example's softmax similarity to its neighbours, high when predictions form dense clusters.
- `dev`: minus deep embedded validation's risk (You et al., ICML 2019): the source validation loss importance-
  weighted by a source/target domain classifier, with its control variate.
A candidate whose predictions collapse onto few classes can look confident; `is_collapsed` flags it, and
`choose` never picks one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from tftransfer.config.experiment import VALIDATOR_NAMES
from tftransfer.core.numerics import entropy, marginal_entropy

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One adapted model's outputs: target probabilities and features, and (for DEV) source validation ones."""

    name: str
    target_probs: np.ndarray
    target_features: np.ndarray | None = None
    source_val_probs: np.ndarray | None = None
    source_val_labels: np.ndarray | None = None
    source_val_features: np.ndarray | None = None


def entropy_score(candidate: Candidate) -> float:
    """Minus the mean target prediction entropy (nats)."""
    return -float(np.mean(entropy(candidate.target_probs)))


def snd_score(candidate: Candidate, temperature: float = 0.05) -> float:
    """Soft neighbourhood density of the target predictions (L2-normalised softmax vectors, self excluded)."""
    p = np.asarray(candidate.target_probs, np.float64)
    p = p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-12)
    sim = p @ p.T
    np.fill_diagonal(sim, -np.inf)
    logits = sim / temperature
    logits -= logits.max(axis=1, keepdims=True)
    soft = np.exp(logits)
    soft /= soft.sum(axis=1, keepdims=True)
    return float(np.mean(entropy(soft)))


def dev_score(candidate: Candidate, seed: int = 0) -> float:
    """Minus DEV's risk estimate; needs the candidate's source-validation outputs and both domains' features."""
    needed = (candidate.source_val_probs, candidate.source_val_labels, candidate.source_val_features,
              candidate.target_features)
    if any(value is None for value in needed):
        return float("nan")
    fs, ft = np.asarray(candidate.source_val_features), np.asarray(candidate.target_features)
    x = np.concatenate([fs, ft])
    d = np.concatenate([np.zeros(len(fs)), np.ones(len(ft))])
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(x, d)
    p_t = np.clip(clf.predict_proba(fs)[:, 1], 1e-6, 1 - 1e-6)
    weights = (p_t / (1 - p_t)) * (len(fs) / len(ft))
    probs = np.clip(np.asarray(candidate.source_val_probs, np.float64), 1e-12, 1.0)
    loss = -np.log(probs[np.arange(len(probs)), np.asarray(candidate.source_val_labels, np.int64)])
    weighted = weights * loss
    var = np.var(weights)
    eta = -np.cov(weighted, weights)[0, 1] / var if var > 0 else 0.0
    return -float(np.mean(weighted) + eta * np.mean(weights) - eta)


VALIDATORS: dict[str, Callable[[Candidate], float]] = {"entropy": entropy_score, "snd": snd_score, "dev": dev_score}


def is_collapsed(candidate: Candidate, reference: Candidate, tolerance: float = 0.5) -> bool:
    """True when the candidate's predictions use far fewer classes than the reference's (the unadapted model)."""
    return marginal_entropy(candidate.target_probs) < tolerance * marginal_entropy(reference.target_probs)


@dataclass
class Choice:
    """The pick among candidates, every candidate's scores, and why."""

    chosen: str
    scores: dict[str, dict[str, float]]
    reason: str


def score_all(candidates: Sequence[Candidate]) -> dict[str, dict[str, float]]:
    """Every validator's score of every candidate (NaN where a validator lacks its inputs)."""
    return {c.name: {name: fn(c) for name, fn in VALIDATORS.items()} | {"marginal_entropy":
                                                                        marginal_entropy(c.target_probs)}
            for c in candidates}


def choose(candidates: Sequence[Candidate], reference: Candidate, validator: str = VALIDATOR_NAMES[0],
           margin: float = 0.02) -> Choice:
    """The candidate with the best `validator` score that did not collapse; the reference (no adaptation) unless
    the best beats the reference's own score by more than `margin` (relative)."""
    if validator not in VALIDATORS:
        raise ValueError(f"unknown validator {validator!r}; choose from {', '.join(VALIDATORS)}")
    scores = score_all([reference, *candidates])
    live = [c for c in candidates if not is_collapsed(c, reference) and np.isfinite(scores[c.name][validator])]
    if not live:
        return Choice(reference.name, scores, "every candidate collapsed or could not be scored")
    best = max(live, key=lambda c: scores[c.name][validator])
    base, top = scores[reference.name][validator], scores[best.name][validator]
    if np.isfinite(base) and top <= base + margin * abs(base):
        return Choice(reference.name, scores, f"no candidate beats no adaptation by {validator} (best {best.name}: "
                                              f"{top:.4f} vs {base:.4f})")
    return Choice(best.name, scores, f"best {validator} score ({top:.4f}; no adaptation {base:.4f})")
