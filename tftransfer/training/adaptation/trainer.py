"""AdaptiveTrainer: a Keras model whose `train_step` adds domain-adaptation and L2-SP losses to the task loss.

It wraps the classifier's own layers (shared, so training it trains the classifier) split at the alignment layer:
`encoder` (inputs -> aligned features) and `classifier` (features -> logits). With a target, every step sees a
source batch and a target batch drawn together ((xs, ys), (xt, target_index)), runs both through the network in
one call, and logs each loss (task, adaptation, the method's own scalars, L2-SP) as a train metric, so `fit`,
callbacks, TensorBoard, checkpoints and tf.distribute keep working. With an `augmenter` (data.augment.placement
model) the training step augments the source and target images itself; inference never augments.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tftransfer.training.adaptation.losses import prediction_entropy
from tftransfer.training.adaptation.methods import AdaptMethod
from tftransfer.training.augment_step import augment_float32
from tftransfer.training.loop import batch_weights, real_rows

logger = logging.getLogger(__name__)


@dataclass
class L2SPSpec:
    """L2-SP (Li et al. 2018): pull fine-tuned weights toward their pretrained values instead of toward zero.

    `reference` maps id(variable) -> its pretrained value, for the backbone variables; the penalty covers those
    that are trainable in the phase (alpha) and the new head's kernels (beta).
    """

    alpha: float
    beta: float
    reference: dict[int, np.ndarray]


def _weighted(losses: tf.Tensor, row_weight: tf.Tensor | None) -> tf.Tensor:
    return losses if row_weight is None else losses * row_weight


def _replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


class AdaptiveTrainer(keras.Model):
    """Trains `classifier(encoder(x))` on source labels plus `weight *` the method's loss on source+target."""

    def __init__(self, encoder: keras.Model | None, classifier: keras.Model, num_classes: int, *,
                 method: AdaptMethod | None = None, weight: float = 1.0, num_target: int = 0,
                 class_weight: dict[int, float] | None = None, label_smoothing: float = 0.0,
                 progress_offset: int = 0, total_steps: int = 1, l2sp: L2SPSpec | None = None,
                 head_variables: Sequence[Any] = (), augmenter: keras.Layer | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoder = encoder
        self.classifier = classifier
        self.method = method
        self.num_classes = num_classes
        self.adapt_weight = float(weight)
        self.label_smoothing = float(label_smoothing)
        self.progress_offset = int(progress_offset)
        self.total_steps = max(int(total_steps), 1)
        weights = np.ones(num_classes, np.float32)
        for index, value in (class_weight or {}).items():
            weights[int(index)] = value
        self._class_weights = tf.constant(weights)
        feature_dim = int(classifier.inputs[0].shape[-1])
        if method is not None:
            method.build_for(feature_dim, num_classes, num_target)
        self.l2sp = l2sp
        self._head_kernels = [v for v in head_variables if len(v.shape) > 1]
        self.trackers = {name: keras.metrics.Mean(name=name) for name in ("loss", "task_loss")}
        if method is not None:
            self.trackers["adapt_loss"] = keras.metrics.Mean(name="adapt_loss")
            for name in method.metric_names:
                self.trackers[name] = keras.metrics.Mean(name=name)
        if l2sp is not None:
            self.trackers["l2_sp_loss"] = keras.metrics.Mean(name="l2_sp_loss")
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        # Tracked after the networks, and weightless: the trainable variables keep their order without it.
        self.augmenter = augmenter
        self.built = True

    @property
    def metrics(self) -> list[keras.metrics.Metric]:  # noqa: D102 - Keras resets these every epoch
        return [*self.trackers.values(), self.accuracy_metric]

    def call(self, x, training=False):  # noqa: D102
        return self._forward(x, training)[1]

    def _forward(self, x, training):
        features = x if self.encoder is None else self.encoder(x, training=training)
        return features, self.classifier(features, training=training)

    def _task_losses(self, labels, logits):
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        one_hot = tf.one_hot(labels, self.num_classes)
        losses = keras.losses.categorical_crossentropy(one_hot, tf.cast(logits, tf.float32), from_logits=True,
                                                       label_smoothing=self.label_smoothing)
        return losses * tf.gather(self._class_weights, labels)

    def _l2sp_penalty(self):
        pairs = [(v, self.l2sp.reference[id(v)]) for v in self.trainable_variables if id(v) in self.l2sp.reference]
        terms = [tf.constant(0.0)]
        if self.l2sp.alpha > 0 and pairs:
            terms.append(0.5 * self.l2sp.alpha * tf.add_n(
                [tf.reduce_sum(tf.square(tf.cast(v, tf.float32) - ref)) for v, ref in pairs]))
        if self.l2sp.beta > 0 and self._head_kernels:
            terms.append(0.5 * self.l2sp.beta * tf.add_n(
                [tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in self._head_kernels]))
        return tf.add_n(terms)

    def train_step(self, data):  # noqa: D102
        # A padded batch (training.loop.pad_partial_batches, several replicas) carries per-row weights last.
        if self.method is not None:
            source, (xt, target_index) = data
            xs, ys, row_weight = source[0], source[1], batch_weights(source, 2)
        else:
            xs, ys, row_weight = data[0], data[1], batch_weights(data, 2)
        n_source = tf.shape(xs)[0]
        values: dict[str, tf.Tensor] = {}
        with tf.GradientTape() as tape:
            if self.method is not None:
                x = tf.concat([xs, xt], 0)
                if self.augmenter is not None:  # one call for both domains: one warp per step, not two
                    x = augment_float32(self.augmenter, x)
                features, logits = self._forward(x, training=True)
                source_logits = logits[:n_source]
                step = tf.cast(self.optimizer.iterations, tf.float32) + float(self.progress_offset)
                adapt_loss, values = self.method.alignment(
                    features[:n_source], features[n_source:], source_logits, logits[n_source:], target_index,
                    step / float(self.total_steps), training=True)
                values["adapt_loss"] = adapt_loss
            else:
                if self.augmenter is not None:
                    xs = augment_float32(self.augmenter, xs)
                _, source_logits = self._forward(xs, training=True)
                adapt_loss = tf.constant(0.0)
            task = tf.reduce_mean(_weighted(self._task_losses(ys, source_logits), row_weight))
            loss = task + self.adapt_weight * adapt_loss
            if self.l2sp is not None:
                values["l2_sp_loss"] = self._l2sp_penalty()
                loss = loss + values["l2_sp_loss"]
            # Each replica's gradients are summed across replicas, so its loss is divided by their number.
            scaled = self.optimizer.scale_loss(loss / float(_replicas()))
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)
        values.update(loss=loss, task_loss=task)
        for name, value in values.items():
            self.trackers[name].update_state(value)
        self.accuracy_metric.update_state(ys, source_logits, sample_weight=real_rows(row_weight))
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):  # noqa: D102 - source validation: the task loss and accuracy only
        x, y, row_weight = data[0], data[1], batch_weights(data, 2)
        logits = self(x, training=False)
        self.trackers["loss"].update_state(tf.reduce_mean(_weighted(self._task_losses(y, logits), row_weight)))
        self.accuracy_metric.update_state(y, logits, sample_weight=real_rows(row_weight))
        return {"loss": self.trackers["loss"].result(), "accuracy": self.accuracy_metric.result()}


class TargetMonitor(keras.callbacks.Callback):
    """Label-free validators on the target after every epoch, and the target accuracy when labels exist.

    Logs `target_entropy` (mean prediction entropy, lower = more confident) and `target_accuracy` into the epoch
    logs (so history.json and TensorBoard show them next to source `val_accuracy` and DANN's
    `domain_accuracy`), and hands fresh predictions to the method at each pseudo-label round start.
    Must come before the callbacks that read the logs.
    """

    def __init__(self, trainer: AdaptiveTrainer, target: tf.data.Dataset, labels: np.ndarray | None, size: int,
                 round_epochs: int = 1) -> None:
        super().__init__()
        self.trainer = trainer
        self.target = target  # batches of (x, index), in order
        self.labels = labels
        self.size = size
        self.round_epochs = max(int(round_epochs), 1)
        self._first_epoch: int | None = None
        self._pending: dict[str, float] = {}
        spec = target.element_spec[0]

        @tf.function(input_signature=[tf.TensorSpec((None, *spec.shape[1:]), spec.dtype)])
        def infer(x):
            return tf.nn.softmax(tf.cast(trainer(x, training=False), tf.float32))

        self._infer = infer

    def predict(self) -> tuple[np.ndarray, np.ndarray]:
        """Softmax probabilities of every target example in index order (zeros for an undecodable one), and
        which examples were seen."""
        out = np.zeros((self.size, self.trainer.num_classes), np.float32)
        seen = np.zeros(self.size, bool)
        for x, i in self.target:
            index = i.numpy()
            out[index] = self._infer(x).numpy()
            seen[index] = True
        return out, seen

    def _round(self, probs: np.ndarray) -> dict[str, float]:
        if self.trainer.method is None:
            return {}
        return self.trainer.method.on_target_probs(probs, self.labels)

    def on_train_begin(self, logs: dict | None = None) -> None:  # noqa: D102
        self._first_epoch = None
        self._pending = self._round(self.predict()[0])

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        if self._first_epoch is None:
            self._first_epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:  # noqa: D102
        probs, seen = self.predict()
        found = target_scores(probs[seen], self.labels[seen] if self.labels is not None else None)
        found.update(self._pending)  # the round that this epoch trained on
        self._pending = {}
        if (epoch + 1 - (self._first_epoch or 0)) % self.round_epochs == 0:
            self._pending = self._round(probs)
        if logs is not None:
            logs.update(found)


def target_scores(probs: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """Mean prediction entropy of target probabilities, and their accuracy when labels are known."""
    entropy = float(prediction_entropy(probs, from_logits=False)) if len(probs) else 0.0
    out = {"target_entropy": entropy}
    if labels is not None and len(labels):
        out["target_accuracy"] = float(np.mean(np.argmax(probs, axis=1) == labels))
    return out
