"""Training-time adaptation methods, one small class each, in a registry keyed by `adapt.method`.

A method sees one training step's source and target features (the alignment layer's output: the bottleneck, or
pooling without one), their logits and the target examples' indices, and returns its loss plus the scalars it
wants logged. The trainer (tftransfer/adapt/trainer.py) adds `adapt.weight * loss` to the task loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.config.experiment import AdaptConfig
from tftransfer.core.errors import ConfigError
from tftransfer.training.adaptation.losses import (
    GradientReversal,
    coral_loss,
    dann_lambda,
    mmd_loss,
    select_pseudo_labels,
)

logger = logging.getLogger(__name__)


class AdaptMethod(keras.layers.Layer):
    """Base class: a Keras layer, so the trainer tracks (and the optimizer trains) any weights it owns."""

    #: the scalars `alignment` returns besides the loss, logged per epoch as train metrics
    metric_names: tuple[str, ...] = ()

    def build_for(self, feature_dim: int, num_classes: int, num_target: int) -> None:
        """Creates the method's weights before training (Keras must see every variable before `fit` traces);
        a second call (the next phase) keeps them."""
        self.built = True

    def alignment(self, source: tf.Tensor, target: tf.Tensor, source_logits: tf.Tensor, target_logits: tf.Tensor,
                  target_index: tf.Tensor, progress: tf.Tensor, training: bool = True
                  ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """The adaptation loss of one step and its logged scalars."""
        raise NotImplementedError

    def on_target_probs(self, probs: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
        """Called with fresh target predictions at each pseudo-label round start; returns scalars to log."""
        return {}


class DANN(AdaptMethod):
    """Ganin et al. 2016: a domain classifier on the features behind a gradient-reversal layer.

    The discriminator learns to tell source from target; the reversed gradient (scaled by the usual ramp
    2/(1+exp(-10p)) - 1 over training progress p) pushes the features to make that impossible.
    """

    metric_names = ("domain_loss", "domain_accuracy", "lambda")

    def __init__(self, units: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.reverse = GradientReversal(name="gradient_reversal")
        self.hidden1 = keras.layers.Dense(units, activation="relu", name="domain_hidden1")
        self.drop1 = keras.layers.Dropout(0.5, name="domain_dropout1")
        self.hidden2 = keras.layers.Dense(units, activation="relu", name="domain_hidden2")
        self.drop2 = keras.layers.Dropout(0.5, name="domain_dropout2")
        self.out = keras.layers.Dense(1, dtype="float32", name="domain_logit")

    def build_for(self, feature_dim: int, num_classes: int, num_target: int) -> None:  # noqa: D102
        if self.built:  # one method serves every phase of a fit, its weights carried across
            return
        self.reverse.build((None, feature_dim))
        self.hidden1.build((None, feature_dim))
        self.drop1.build((None, self.units))
        self.hidden2.build((None, self.units))
        self.drop2.build((None, self.units))
        self.out.build((None, self.units))
        self.built = True

    def discriminate(self, features: tf.Tensor, lam: tf.Tensor, training: bool) -> tf.Tensor:
        """Domain logits (source = 1) of features seen through the gradient-reversal layer."""
        x = self.reverse(features, lam)
        x = self.drop1(self.hidden1(x), training=training)
        x = self.drop2(self.hidden2(x), training=training)
        return tf.reshape(self.out(x), [-1])

    def alignment(self, source, target, source_logits, target_logits, target_index, progress,  # noqa: D102
                  training=True):
        lam = tf.cast(dann_lambda(progress), tf.float32)
        logits = self.discriminate(tf.concat([source, target], 0), lam, training)
        domains = tf.concat([tf.ones(tf.shape(source)[:1]), tf.zeros(tf.shape(target)[:1])], 0)
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=domains, logits=logits))
        accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.cast(logits > 0, tf.float32), domains), tf.float32))
        return loss, {"domain_loss": loss, "domain_accuracy": accuracy, "lambda": lam}


class FeatureDistance(AdaptMethod):
    """A distance between the source and target feature batches, minimised with the task loss.

    Deep CORAL (Sun & Saenko 2016) matches their covariances; MMD (Long et al. 2015, DAN) matches their
    distributions under a multi-kernel Gaussian MMD.
    """

    def __init__(self, distance: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], metric: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.distance = distance
        self.metric_names = (metric,)

    def alignment(self, source, target, source_logits, target_logits, target_index, progress,  # noqa: D102
                  training=True):
        loss = self.distance(source, target)
        return loss, {self.metric_names[0]: loss}


class PseudoLabel(AdaptMethod):
    """Self-training: confident target predictions become labels, re-drawn at the start of every round.

    Labels live in non-trainable variables indexed by the target example's position, so a round's new labels
    reach the compiled train step without retracing. Unselected examples have weight 0.
    """

    metric_names = ("pseudo_loss", "pseudo_fraction")

    def __init__(self, threshold: float = 0.9, max_per_class: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.max_per_class = max_per_class

    def build_for(self, feature_dim: int, num_classes: int, num_target: int) -> None:  # noqa: D102
        if self.built:
            return
        self.num_classes = num_classes
        self.labels = self.add_weight(shape=(max(num_target, 1),), dtype="int32", initializer="zeros",
                                      trainable=False, name="pseudo_labels")
        self.mask = self.add_weight(shape=(max(num_target, 1),), dtype="float32", initializer="zeros",
                                    trainable=False, name="pseudo_mask")
        self.built = True

    def alignment(self, source, target, source_logits, target_logits, target_index, progress,  # noqa: D102
                  training=True):
        index = tf.cast(target_index, tf.int32)
        labels = tf.gather(self.labels, index)
        weights = tf.gather(self.mask, index)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                                logits=tf.cast(target_logits, tf.float32))
        loss = tf.reduce_sum(weights * losses) / tf.cast(tf.maximum(tf.size(weights), 1), tf.float32)
        return loss, {"pseudo_loss": loss, "pseudo_fraction": tf.reduce_mean(weights)}

    def on_target_probs(self, probs: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:  # noqa: D102
        chosen, mask = select_pseudo_labels(probs, self.threshold, max_per_class=self.max_per_class or None,
                                            class_balanced=not self.max_per_class)
        self.labels.assign(chosen.astype(np.int32))
        self.mask.assign(mask.astype(np.float32))
        out = {"pseudo_selected": float(mask.sum())}
        if labels is not None and mask.any():
            out["pseudo_label_accuracy"] = float(np.mean(chosen[mask] == labels[mask]))
        logger.info("pseudo-label round: %d of %d target images selected%s", int(mask.sum()), len(mask),
                    f" ({out['pseudo_label_accuracy']:.3f} of them right)" if "pseudo_label_accuracy" in out else "")
        return out


METHODS: dict[str, Callable[[AdaptConfig], AdaptMethod | None]] = {
    "none": lambda cfg: None,
    "dann": lambda cfg: DANN(cfg.discriminator_units, name="dann"),
    "coral": lambda cfg: FeatureDistance(coral_loss, "coral_loss", name="coral"),
    "mmd": lambda cfg: FeatureDistance(mmd_loss, "mmd_loss", name="mmd"),
    "pseudo-label": lambda cfg: PseudoLabel(cfg.pseudo_threshold, cfg.pseudo_max_per_class, name="pseudo_label"),
}


def build_method(cfg: AdaptConfig) -> AdaptMethod | None:
    """The adaptation method `cfg.method` names (None for "none")."""
    if cfg.method not in METHODS:

        raise ConfigError(f"adapt.method: unknown method {cfg.method!r}; one of {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)
