"""The step driver tftransfer owns: epochs of distributed steps for a compiled Keras model, under any strategy.

`fit_loop(model, train, ...)` takes the arguments `Model.fit` takes in tftransfer (a batched tf.data pipeline,
validation data, epochs, initial_epoch, callbacks, class_weight) and drives the same callback protocol through a
`keras.callbacks.CallbackList` (history, TensorBoard, NaN guard, early stopping, best weights, checkpoints all run
unchanged: on_train_begin/end, on_epoch_begin/end, on_train_batch_begin/end, on_test_begin/end and
`model.stop_training`). Only the driver differs from `Model.fit`; the step is the model's own `train_step`
(the AdaptiveTrainer's source + target step included) run per replica with `strategy.run`:

- the global batch (data.batch_size) is split over all replicas of all workers by
  `strategy.experimental_distribute_dataset`, sharded by data (`AutoShardPolicy.DATA`: every worker reads the
  same pipeline, with the same seeds, and keeps its part of each global batch, so the batches are the same as on
  one machine);
- Keras' losses divide each replica's mean loss by the number of replicas (`scale_loss_for_distribution`) and its
  optimizers sum the gradients over replicas in `apply` (a LossScaleOptimizer under mixed precision scales and
  unscales around it), so a step follows the gradient of the global mean loss;
- epoch logs are the model's metrics read in cross-replica context: their variables are SUM-aggregated
  on-read variables, so `result()` reduces the totals and counts over every replica of every worker; validation
  is the same with `test_step`, after the metrics are reset.

Why not `Model.fit` everywhere: under `MultiWorkerMirroredStrategy` Keras 3.15's fit fails converting a
`PerReplica` value to a tensor (keras-team/keras#20585). The driver is used for multiworker (runtime.loop=auto)
and on request elsewhere; docs/benchmarks.md has its single-machine speed against Model.fit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

LOOPS = ("auto", "keras", "tftransfer")


def is_multiworker(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether `strategy` (default: the current one) spans several worker processes."""
    strategy = strategy or tf.distribute.get_strategy()
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def resolve_loop(requested: str, strategy: tf.distribute.Strategy | None = None) -> str:
    """auto -> tftransfer's driver under multiworker (Model.fit cannot run there), else Keras' Model.fit."""
    if requested != "auto":
        return requested
    return "tftransfer" if is_multiworker(strategy) else "keras"


def distribute(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset) -> Any:
    """The dataset split by data over the strategy's workers and replicas (the global batch split evenly)."""
    options = tf.data.Options()
    # DATA, not AUTO/FILE: tftransfer's pipelines read listed files or arrays, not a file-based reader TF can shard
    # by file, and DATA keeps the global batch order of a single machine (same seed, same shuffle on every worker).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def pad_partial_batches(dataset: tf.data.Dataset, global_batch: int) -> tf.data.Dataset:
    """Every batch padded to `global_batch` rows, with a trailing per-row weight: no example is dropped.

    An element is a tuple of batched tensors ((x, y), (x, y, teacher logits), ...) or, for the adaptive trainer's
    zipped stream, (source tuple, target batch): the source tuple is padded and gets the weights, the target is left
    as it is. Padded rows are zeros with weight 0; the n real rows of a batch weigh global_batch / n, so a loss that
    averages `weight * loss` over the padded batch (Keras' sum_over_batch_size, split evenly over the replicas,
    each dividing by its share) is the mean over the real rows: the step of a single machine on the same batch.
    Metrics ignore the padded rows: the trainers' own count each real row once (real_rows); Keras' compiled ones
    take the loss weights, so within an epoch's metric a padded batch's real rows count global_batch / n times.
    Why pad: a partial batch split over several replicas leaves the last ones little or nothing (a replica's mean
    over nothing is NaN), and dropping it, as before, trained on different data than one machine.
    """
    def pad_rows(tensor: tf.Tensor, missing: tf.Tensor) -> tf.Tensor:
        padded = tf.pad(tensor, [[0, missing]] + [[0, 0]] * (tensor.shape.rank - 1))
        return tf.ensure_shape(padded, [global_batch, *tensor.shape[1:]])

    def pad_source(source: tuple) -> tuple:
        rows = tf.shape(tf.nest.flatten(source)[0])[0]
        missing = global_batch - rows
        weight = tf.fill([rows], tf.cast(global_batch, tf.float32) / tf.cast(rows, tf.float32))
        padded = tf.nest.map_structure(lambda t: pad_rows(t, missing), tuple(source))
        return (*padded, pad_rows(weight, missing))

    def pad(*batch: Any) -> tuple:
        if isinstance(batch[0], tuple):  # (source, target) of the adaptive trainer
            return (pad_source(batch[0]), *batch[1:])
        return pad_source(batch)

    return dataset.map(pad)


def batch_weights(data: tuple, arity: int) -> tf.Tensor | None:
    """The per-row weights pad_partial_batches appended to a batch of `arity` parts, or None when unpadded."""
    return data[arity] if len(data) > arity else None


def real_rows(weights: tf.Tensor | None) -> tf.Tensor | None:
    """1 for the real rows of a padded batch and 0 for the padding: the sample weights of an unweighted metric."""
    return None if weights is None else tf.cast(weights > 0, tf.float32)


def share_from_chief(strategy: tf.distribute.Strategy, value: np.ndarray | None) -> np.ndarray:
    """`value` as computed by the process holding replica 0, on every process (an all-reduce in which the
    others add zeros); the others pass None. With one process it is `value` itself."""
    if not is_multiworker(strategy):
        assert value is not None
        return value
    local = value if holds_first_replica(strategy) else None
    shape = np.zeros(8, np.float64)  # rank and dimensions first: the others do not know them
    if local is not None:
        shape[0], shape[1:1 + local.ndim] = local.ndim, local.shape
    shape = _sum_from_first(strategy, shape)
    dims = tuple(int(d) for d in shape[1:1 + int(shape[0])])
    dtype = value.dtype if value is not None else np.float32
    payload = local.astype(np.float32) if local is not None else np.zeros(dims, np.float32)
    return _sum_from_first(strategy, payload).astype(dtype)


def holds_first_replica(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process holds replica 0 (the chief's first device); always, but under multiworker."""
    if not is_multiworker(strategy):
        return True
    ids = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(ctx.replica_id_in_sync_group))
    return 0 in [int(v) for v in strategy.experimental_local_results(ids)]


def _sum_from_first(strategy: tf.distribute.Strategy, local: np.ndarray) -> np.ndarray:
    """Sum over replicas of `local` on replica 0 and zeros on the others."""
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(local) if ctx.replica_id_in_sync_group == 0 else tf.zeros(local.shape, local.dtype))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None).numpy()


def with_class_weight(dataset: tf.data.Dataset, class_weight: dict[int, float] | None) -> tf.data.Dataset:
    """(x, y) batches with per-example weights from `class_weight`, as Model.fit's class_weight does; (x, y, w)
    batches (padded ones) get their weights multiplied by them."""
    if not class_weight:
        return dataset
    table = np.ones(max(int(k) for k in class_weight) + 1, np.float32)
    for index, value in class_weight.items():
        table[int(index)] = value
    weights = tf.constant(table)

    def add_weights(x: Any, y: Any, w: Any = None) -> tuple[Any, Any, Any]:
        found = tf.gather(weights, tf.reshape(tf.cast(y, tf.int32), [-1]))
        return x, y, found if w is None else found * w

    return dataset.map(add_weights)


def _step_function(model: keras.Model, step: Callable[[Any], Any],
                   strategy: tf.distribute.Strategy) -> Callable[[Any], dict[str, tf.Tensor]]:
    """One distributed step on a distributed batch; its logs averaged over the replicas."""
    @tf.autograph.experimental.do_not_convert
    def on_replica(data: Any) -> Any:
        return step(data)

    if model.jit_compile:  # XLA on each replica's step; the all-reduce stays outside the compiled cluster
        on_replica = tf.function(on_replica, jit_compile=True, reduce_retracing=True)

    @tf.function(reduce_retracing=True)
    def distributed_step(data: Any) -> dict[str, tf.Tensor]:
        outputs = strategy.run(on_replica, args=(data,))
        return {name: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
                for name, value in outputs.items()}

    return distributed_step


def _run_epoch_steps(function: Callable[[Any], dict[str, tf.Tensor]], iterator: Any,
                     on_begin: Callable[[int], None], on_end: Callable[[int, dict], None],
                     stop: Callable[[], bool]) -> dict[str, Any]:
    """Steps until the data ends; every worker ends together (the distributed iterator agrees on it).

    The batch is fetched as an optional outside the step: a step that found the data exhausted inside its graph
    would still have added one to optimizer.iterations (the increment does not wait for the batch).
    """
    logs: dict[str, Any] = {}
    step = 0
    while True:
        batch = iterator.get_next_as_optional()
        if not bool(batch.has_value()):
            break
        on_begin(step)
        logs = function(batch.get_value())
        on_end(step, logs)
        step += 1
        if stop():
            break
    return logs


def _metrics_logs(model: keras.Model) -> dict[str, float]:
    """The model's metrics over every replica (cross-replica reads of SUM on-read variables), as floats."""
    return {name: float(keras.ops.convert_to_numpy(value)) for name, value in model.get_metrics_result().items()}


class _Driver:
    """The compiled step functions and distributed datasets of one fit_loop call."""

    def __init__(self, model: keras.Model, train: tf.data.Dataset, val: tf.data.Dataset | None,
                 strategy: tf.distribute.Strategy) -> None:
        self.model, self.strategy = model, strategy
        self.train = distribute(strategy, train)
        self.val = distribute(strategy, val) if val is not None else None
        self.train_step = _step_function(model, model.train_step, strategy)
        self.test_step = _step_function(model, model.test_step, strategy) if val is not None else None

    def run_train_epoch(self, callbacks: keras.callbacks.CallbackList) -> dict[str, float]:
        model = self.model
        model.reset_metrics()
        _run_epoch_steps(self.train_step, iter(self.train), callbacks.on_train_batch_begin,
                         callbacks.on_train_batch_end, lambda: bool(model.stop_training))
        return _metrics_logs(model)

    def run_validation(self, callbacks: keras.callbacks.CallbackList) -> dict[str, float]:
        assert self.val is not None and self.test_step is not None
        model = self.model
        callbacks.on_test_begin()
        model.reset_metrics()
        _run_epoch_steps(self.test_step, iter(self.val), callbacks.on_test_batch_begin,
                         callbacks.on_test_batch_end, lambda: False)
        logs = _metrics_logs(model)
        callbacks.on_test_end(logs)
        return {f"val_{name}": value for name, value in logs.items()}


def _build(model: keras.Model, train: tf.data.Dataset, strategy: tf.distribute.Strategy) -> None:
    """Creates the optimizer's, compiled loss's and metrics' variables now, in the strategy's scope: a variable
    cannot be created inside strategy.run. (Keras' private symbolic build, which Model.fit runs the same way.)"""
    with strategy.scope():
        model._symbolic_build(data_batch=train.element_spec)  # noqa: SLF001 - TensorSpecs stand for a batch


def fit_loop(model: keras.Model, train: tf.data.Dataset, *, validation_data: tf.data.Dataset | None = None,
             epochs: int = 1, initial_epoch: int = 0, callbacks: Sequence[keras.callbacks.Callback] = (),
             verbose: int = 0, class_weight: dict[int, float] | None = None,
             strategy: tf.distribute.Strategy | None = None, global_batch: int | None = None,
             **unused: Any) -> keras.callbacks.History:
    """Model.fit's epochs and callbacks, driven by tftransfer under `strategy` (default: the current one).

    With `global_batch` and several replicas, every batch (training and validation) is padded to the global batch
    with zero-weight rows (see pad_partial_batches), so no example is dropped and each step equals one machine's.
    Keyword arguments Model.fit takes that a tf.data pipeline makes moot (shuffle) are accepted and ignored.
    """
    strategy = strategy or tf.distribute.get_strategy()
    if global_batch and strategy.num_replicas_in_sync > 1:
        train = pad_partial_batches(train, global_batch)
        if validation_data is not None:
            validation_data = pad_partial_batches(validation_data, global_batch)
    train = with_class_weight(train, class_weight)
    _build(model, train, strategy)
    driver = _Driver(model, train, validation_data, strategy)
    callback_list = keras.callbacks.CallbackList(list(callbacks), add_history=True, add_progbar=verbose != 0,
                                                 verbose=verbose, epochs=epochs, model=model)
    model.stop_training = False
    callback_list.on_train_begin()
    logs: dict[str, float] | None = None
    for epoch in range(initial_epoch, epochs):
        callback_list.on_epoch_begin(epoch)
        epoch_logs = driver.run_train_epoch(callback_list)
        if driver.val is not None:
            epoch_logs.update(driver.run_validation(callback_list))
        callback_list.on_epoch_end(epoch, epoch_logs)
        logs = epoch_logs
        if model.stop_training:
            break
    if epochs > initial_epoch and isinstance(model.optimizer, keras.optimizers.Optimizer):
        model.optimizer.finalize_variable_values(model.trainable_weights)
    callback_list.on_train_end(logs=logs)
    return model.history
