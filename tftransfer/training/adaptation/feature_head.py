"""Adaptation on pooled backbone features: cheap enough for a CPU, and where the measured gains are.

Two ways, both on features computed once (the backbone stays frozen, so a run takes seconds, not an epoch of
backbone passes per step):
- `train_head`: a head (the fitted run's own, or a new bottleneck Dense -> BatchNorm -> ReLU -> Dense) trained on
  labeled source features and unlabeled target features with a registered method (`source-only`, `mcc`, `cdan-e`),
  the TLlib recipe:
  Nesterov SGD, lr0 * (1 + 10 p)^-0.75, weight decay, source and target in one batch so the bottleneck's
  BatchNorm sees both domains.
- `shot`: source-free (SHOT): the classifier of an existing head is frozen and the layers before it are trained on
  target features alone, with information maximisation and centroid pseudo-labels.

Target labels never enter this module: the functions take target features only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.config.commands import HEAD_INITS, FeatureRecipe
from tftransfer.model.classifier import HEAD_LAYER
from tftransfer.training.adaptation.losses import (
    cdan_input,
    centroid_pseudo_labels,
    dann_lambda,
    entropy_weights,
    gradient_reversal,
    information_maximization,
    mcc_loss,
)

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = FeatureRecipe()



class AnnealedRate(keras.optimizers.schedules.LearningRateSchedule):
    """lr0 * (1 + 10 p)^-0.75 with p = step / total, the annealing of DANN, CDAN and MCC."""

    def __init__(self, base: float, total: int) -> None:
        self.base, self.total = float(base), max(int(total), 1)

    def __call__(self, step: Any) -> tf.Tensor:  # noqa: D102
        progress = tf.minimum(tf.cast(step, tf.float32) / float(self.total), 1.0)
        return self.base * tf.pow(1.0 + 10.0 * progress, -0.75)

    def get_config(self) -> dict[str, Any]:  # noqa: D102
        return {"base": self.base, "total": self.total}


def _optimizer(recipe: FeatureRecipe, steps: int) -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(AnnealedRate(recipe.learning_rate, steps), momentum=recipe.momentum, nesterov=True,
                                weight_decay=recipe.weight_decay)


@dataclass
class FeatureHead:
    """features -> (embedding, logits): `transform` layers (trainable by SHOT) then the `classifier` Dense."""

    transform: list[keras.layers.Layer]
    classifier: keras.layers.Layer

    def embed(self, x: Any, training: bool = False) -> tf.Tensor:
        """The embedding the classifier reads (and SHOT's centroids live in)."""
        for layer in self.transform:
            x = layer(x, training=training) if isinstance(layer, keras.layers.BatchNormalization) else layer(x)
        return x

    def __call__(self, x: Any, training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        z = self.embed(x, training)
        return z, self.classifier(z)

    @property
    def transform_variables(self) -> list[tf.Variable]:  # noqa: D102
        return [v for layer in self.transform for v in layer.trainable_weights]

    @property
    def trainable_variables(self) -> list[tf.Variable]:  # noqa: D102
        return self.transform_variables + list(self.classifier.trainable_weights)

    def predict(self, features: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, softmax probabilities) in inference mode."""
        zs, ps = [], []
        for start in range(0, len(features), batch_size):
            z, logits = self(tf.convert_to_tensor(features[start:start + batch_size], tf.float32))
            zs.append(z.numpy())
            ps.append(tf.nn.softmax(logits).numpy())
        return np.concatenate(zs), np.concatenate(ps)


def new_head(feature_dim: int, num_classes: int, units: int, seed: int) -> FeatureHead:
    """A freshly initialised bottleneck head, built for `feature_dim` inputs."""
    init = keras.initializers.GlorotUniform(seed=seed)
    head = FeatureHead(
        transform=[keras.layers.Dense(units, kernel_initializer=init, name="adapt_bottleneck"),
                   keras.layers.BatchNormalization(name="adapt_bottleneck_bn"),
                   keras.layers.ReLU(name="adapt_bottleneck_relu")],
        classifier=keras.layers.Dense(num_classes, dtype="float32", name=HEAD_LAYER,
                                      kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1)))
    head(tf.zeros((2, feature_dim), tf.float32))
    return head


# --- methods with labeled source and unlabeled target ----------------------------------------------------------


@dataclass
class Batch:
    """One training step's tensors: source embedding/logits, target embedding/logits, progress in [0, 1]."""

    source: tf.Tensor
    target: tf.Tensor
    source_logits: tf.Tensor
    target_logits: tf.Tensor
    progress: tf.Tensor


@dataclass(frozen=True)
class FeatureMethod:
    """A registered feature-level method: `build(recipe, num_classes, width)` makes its extra layers for embeddings
    `width` wide (or None), `loss`
    is its adaptation loss for a Batch (added to the source cross-entropy with recipe.weight)."""

    name: str
    description: str
    loss: Callable[[Batch, Any, FeatureRecipe], tf.Tensor]
    build: Callable[[FeatureRecipe, int, int], Any] = lambda recipe, num_classes, width: None


FEATURE_METHODS: dict[str, FeatureMethod] = {}


def register_feature_method(method: FeatureMethod) -> FeatureMethod:
    """Adds a method to the registry; names are unique."""
    if method.name in FEATURE_METHODS:
        raise ValueError(f"feature method {method.name!r} is already registered")
    FEATURE_METHODS[method.name] = method
    return method


def _no_loss(batch: Batch, extra: Any, recipe: FeatureRecipe) -> tf.Tensor:
    return tf.constant(0.0)


def _mcc(batch: Batch, extra: Any, recipe: FeatureRecipe) -> tf.Tensor:
    return mcc_loss(batch.target_logits, recipe.mcc_temperature)


MULTILINEAR_MAX = 4096  # above this f (x) g width, CDAN's randomized multilinear map (as in the paper)


@dataclass
class CdanDiscriminator:
    """The domain classifier on f (x) g, with the fixed random projections of the randomized map when f (x) g would
    be wider than MULTILINEAR_MAX."""

    model: keras.Sequential
    projections: tuple[tf.Tensor, tf.Tensor] | None

    @property
    def trainable_weights(self) -> list[tf.Variable]:  # noqa: D102
        return self.model.trainable_weights

    def conditioned(self, z: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
        """f (x) g, or its randomized approximation (R_f f) * (R_g g) / sqrt(d)."""
        if self.projections is None:
            return cdan_input(z, probs)
        r_f, r_g = self.projections
        return tf.matmul(z, r_f) * tf.matmul(probs, r_g) / math.sqrt(MULTILINEAR_MAX)


def _discriminator(recipe: FeatureRecipe, num_classes: int, width: int) -> CdanDiscriminator:
    units = recipe.discriminator_units
    init = keras.initializers.GlorotUniform(seed=recipe.seed + 7)
    model = keras.Sequential([keras.layers.Dense(units, activation="relu", kernel_initializer=init),
                              keras.layers.Dropout(0.5, seed=recipe.seed),
                              keras.layers.Dense(units, activation="relu", kernel_initializer=init),
                              keras.layers.Dropout(0.5, seed=recipe.seed + 1),
                              keras.layers.Dense(1, kernel_initializer=init)], name="cdan_discriminator")
    projections = None
    if width * num_classes > MULTILINEAR_MAX:
        rng = np.random.default_rng(recipe.seed + 11)
        projections = (tf.constant(rng.standard_normal((width, MULTILINEAR_MAX)), tf.float32),
                       tf.constant(rng.standard_normal((num_classes, MULTILINEAR_MAX)), tf.float32))
    model.build((None, MULTILINEAR_MAX if projections is not None else width * num_classes))
    return CdanDiscriminator(model, projections)


def _cdan_e(batch: Batch, discriminator: CdanDiscriminator, recipe: FeatureRecipe) -> tf.Tensor:
    z = tf.concat([batch.source, batch.target], axis=0)
    probs = tf.stop_gradient(tf.nn.softmax(tf.concat([batch.source_logits, batch.target_logits], axis=0)))
    reversed_z = gradient_reversal(z, dann_lambda(batch.progress))
    logits = discriminator.model(discriminator.conditioned(reversed_z, probs), training=True)[:, 0]
    domain = tf.concat([tf.ones(tf.shape(batch.source)[:1]), tf.zeros(tf.shape(batch.target)[:1])], axis=0)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=domain, logits=logits)
    return tf.reduce_mean(entropy_weights(probs) * bce)


register_feature_method(FeatureMethod("source-only", "the head trained on the source features alone (the baseline)",
                                      _no_loss))
register_feature_method(FeatureMethod("mcc", "Minimum Class Confusion on the target predictions (Jin et al. 2020)",
                                      _mcc))
register_feature_method(FeatureMethod("cdan-e", "conditional adversarial alignment with entropy weights "
                                                "(Long et al. 2018)", _cdan_e, _discriminator))


def list_feature_methods() -> list[str]:
    """Names of the registered source+target feature methods."""
    return list(FEATURE_METHODS)


@dataclass
class TrainedHead:
    """A trained head and its per-step losses."""

    head: FeatureHead
    method: str
    history: dict[str, list[float]] = field(default_factory=dict)


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless index batches: a fresh permutation per pass, so every example is seen once per pass."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[start:start + batch_size]


def train_head(method: str, source_features: np.ndarray, source_labels: np.ndarray,
               target_features: np.ndarray, num_classes: int, recipe: FeatureRecipe = DEFAULT_RECIPE,
               init: FeatureHead | None = None) -> TrainedHead:
    """Trains a head with `method` on labeled source and unlabeled target features: `init` (changed in place, e.g.
    the fitted run's own head) or a new one."""
    if method not in FEATURE_METHODS:
        raise ValueError(f"unknown feature method {method!r}; choose from {', '.join(FEATURE_METHODS)}")
    if recipe.head_init not in HEAD_INITS:
        raise ValueError(f"head_init {recipe.head_init!r}: choose from {', '.join(HEAD_INITS)}")
    spec = FEATURE_METHODS[method]
    keras.utils.set_random_seed(recipe.seed)
    head = init or new_head(source_features.shape[1], num_classes, recipe.bottleneck, recipe.seed)
    width = int(head.embed(tf.zeros((2, source_features.shape[1]), tf.float32)).shape[-1])
    extra = spec.build(recipe, num_classes, width)
    variables = head.trainable_variables + (list(extra.trainable_weights) if extra is not None else [])
    optimizer = _optimizer(recipe, recipe.steps)
    xs_all = tf.constant(source_features, tf.float32)
    ys_all = tf.constant(source_labels, tf.int64)
    xt_all = tf.constant(target_features, tf.float32)

    @tf.function(reduce_retracing=True)
    def step(src: tf.Tensor, tgt: tf.Tensor, progress: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        xs, ys, xt = tf.gather(xs_all, src), tf.gather(ys_all, src), tf.gather(xt_all, tgt)
        with tf.GradientTape() as tape:
            z, logits = head(tf.concat([xs, xt], axis=0), training=True)
            n = tf.shape(xs)[0]
            batch = Batch(z[:n], z[n:], logits[:n], logits[n:], progress)
            ce = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(ys, batch.source_logits,
                                                                             from_logits=True))
            adaptation = spec.loss(batch, extra, recipe)
            loss = ce + recipe.weight * adaptation
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return ce, adaptation

    rng = np.random.default_rng(recipe.seed)
    src_batches = _batches(len(source_features), min(recipe.batch_size, len(source_features)), rng)
    tgt_batches = _batches(len(target_features), min(recipe.batch_size, len(target_features)), rng)
    history: dict[str, list[float]] = {"source_loss": [], "adaptation_loss": []}
    for i in range(recipe.steps):
        ce, adaptation = step(tf.constant(next(src_batches)), tf.constant(next(tgt_batches)),
                              tf.constant(i / recipe.steps, tf.float32))
        history["source_loss"].append(float(ce))
        history["adaptation_loss"].append(float(adaptation))
    _check_finite(history, method)
    return TrainedHead(head, method, history)


def _check_finite(history: dict[str, list[float]], method: str) -> None:
    for key, values in history.items():
        if values and not math.isfinite(values[-1]):
            raise FloatingPointError(f"{method}: {key} is not finite after training ({values[-1]})")


# --- SHOT: source-free -----------------------------------------------------------------------------------------


def shot(head: FeatureHead, target_features: np.ndarray, recipe: FeatureRecipe = DEFAULT_RECIPE
         ) -> dict[str, list[float]]:
    """SHOT: trains `head.transform` (its classifier frozen) on target features; returns per-step losses.

    Each pass over the target starts by re-labelling every example with its nearest target centroid in the current
    embedding (centroid_pseudo_labels); each step minimises information maximisation plus
    recipe.shot_pseudo_weight times the cross-entropy to those labels. `head` is changed in place.
    """
    variables = head.transform_variables
    if not variables:
        raise ValueError("SHOT needs trainable layers before the classifier (a bottleneck or an adapter)")
    keras.utils.set_random_seed(recipe.seed)
    optimizer = _optimizer(recipe, recipe.shot_steps)
    x_all = tf.constant(target_features, tf.float32)
    labels = tf.Variable(tf.zeros((len(target_features),), tf.int64), trainable=False)

    @tf.function(reduce_retracing=True)
    def step(idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            _, logits = head(tf.gather(x_all, idx), training=True)
            im = information_maximization(logits)
            pseudo = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(tf.gather(labels, idx), logits,
                                                                                 from_logits=True))
            loss = im + recipe.shot_pseudo_weight * pseudo
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return im, pseudo

    rng = np.random.default_rng(recipe.seed)
    batch = min(recipe.batch_size, len(target_features))
    per_pass = max(len(target_features) // batch, 1)
    history: dict[str, list[float]] = {"information_maximization": [], "pseudo_label_loss": []}
    batches = _batches(len(target_features), batch, rng)
    for i in range(recipe.shot_steps):
        if i % per_pass == 0:
            embeddings, probs = head.predict(target_features)
            labels.assign(centroid_pseudo_labels(embeddings, probs))
        im, pseudo = step(tf.constant(next(batches)))
        history["information_maximization"].append(float(im))
        history["pseudo_label_loss"].append(float(pseudo))
    _check_finite(history, "shot")
    return history
