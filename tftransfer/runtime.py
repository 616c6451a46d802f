"""configure_runtime(): seeds, precision policy, XLA and the distribution strategy, decided once per process.

Batch size under a strategy: `data.batch_size` is the GLOBAL batch, split evenly over the replicas (Keras
distributes the tf.data pipeline). The learning rate is not scaled automatically: when you multiply the global
batch by k (more replicas at the same per-replica batch), the linear scaling rule (Goyal et al. 2017) suggests
multiplying the learning rate by k too, with a warmup (phases.*.warmup_epochs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import keras
import tensorflow as tf

from tftransfer.config.experiment import RuntimeConfig
from tftransfer.core.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeInfo:
    """The resolved runtime choices, saved with every run."""

    device: str
    gpus: int
    precision: str
    jit_compile: bool
    seed: int
    deterministic: bool
    strategy: str = "default"
    replicas: int = 1
    distribution: Any = field(default=None, repr=False, compare=False)  # the tf.distribute.Strategy

    def __str__(self) -> str:
        """One readable line for logs: 'cpu, float32, XLA off, seed 42, ...' (the repr keeps every field)."""
        device = f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}" if self.device == "gpu" else self.device
        replicas = f"{self.replicas} replica{'s' if self.replicas != 1 else ''}"
        return (f"{device}, {self.precision}, XLA {'on' if self.jit_compile else 'off'}, seed {self.seed}, "
                f"{'deterministic' if self.deterministic else 'non-deterministic'} ops, strategy {self.strategy} "
                f"({replicas})")

    def to_dict(self) -> dict:  # noqa: D102
        # Not dataclasses.asdict: it would deep-copy the strategy, which TensorFlow forbids.
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "distribution"}

    def scope(self) -> Any:
        """The strategy's scope: build and compile models inside it."""
        return (self.distribution or tf.distribute.get_strategy()).scope()


def _gpu_compute_capability() -> tuple[int, int] | None:
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(gpus[0])
    return details.get("compute_capability", (0, 0))


def resolve_precision(requested: str, capability: tuple[int, int] | None) -> str:
    """auto -> mixed_float16 on GPUs with tensor cores (compute capability >= 7.0), else float32."""
    if requested != "auto":
        return requested
    if capability is not None and capability >= (7, 0):
        return "mixed_float16"
    return "float32"


def resolve_jit(requested: str, has_gpu: bool) -> bool:
    """auto -> XLA on GPU only: measured on this project's CPU machine, XLA made MobileNetV2 training ~10x slower."""
    if requested == "auto":
        return has_gpu
    return requested == "on"


def set_op_determinism(enabled: bool) -> None:
    """Switches TensorFlow's op determinism on or off: process-wide, so a later run in the same process (the Python
    API) with runtime.deterministic=false is not left deterministic, and XLA-less, by an earlier one."""
    if enabled:
        tf.config.experimental.enable_op_determinism()
        return
    from tensorflow.python.framework import config as tf_config  # TF has no public switch back off

    if tf_config.is_op_determinism_enabled():
        tf_config.disable_op_determinism()


def resolve_augment_placement(requested: str, has_gpu: bool, compilable: bool = True) -> str:
    """auto -> model on GPU (the augmenter runs in the training step there, freeing the CPU pipeline), else
    pipeline (on a CPU the step and the pipeline share the same cores, and the pipeline overlaps with the step).

    An augmenter XLA cannot compile (`compilable` False: Keras' RandAugment) stays in the pipeline under auto,
    where it would otherwise switch XLA off for the whole training step.
    """
    if requested == "auto":
        return "model" if has_gpu and compilable else "pipeline"
    return requested


def resolve_strategy(requested: str, gpus: int) -> str:
    """auto -> multiworker under TF_CONFIG, a TPU when TPU_NAME is set, mirrored over local GPUs, else default."""
    if requested != "auto":
        return requested
    if os.environ.get("TF_CONFIG"):
        return "multiworker"
    if os.environ.get("TPU_NAME"):
        return "tpu"
    return "mirrored" if gpus > 1 else "default"


def _mirrored() -> tf.distribute.Strategy:
    # All local GPUs; without GPUs, every logical CPU device (runtime.cpu_replicas splits the CPU into several).
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)


def _tpu() -> tf.distribute.Strategy:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", ""))
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _multiworker() -> tf.distribute.Strategy:
    # Checked on Keras 3.15.1 / TF 2.21 with 2 local workers: Model.fit under MultiWorkerMirroredStrategy fails
    # with "Attempt to convert a value (PerReplica...)"; upstream keras-team/keras#20585, tensorflow#72388.
    raise ConfigError("runtime.strategy=multiworker: Keras 3's Model.fit does not work with TensorFlow's "
                      "MultiWorkerMirroredStrategy (keras-team/keras#20585, still open in Keras "
                      f"{keras.__version__}); train on one machine with runtime.strategy=mirrored (all local GPUs)"
                      + ("; TF_CONFIG is set, which makes strategy=auto choose multiworker: unset it or set "
                         "runtime.strategy" if os.environ.get("TF_CONFIG") else ""))


STRATEGIES: dict[str, Callable[[], tf.distribute.Strategy]] = {
    "default": tf.distribute.get_strategy,
    "mirrored": _mirrored,
    "multiworker": _multiworker,
    "tpu": _tpu,
}


def _split_cpu(replicas: int) -> None:
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError:  # already initialised: keep what is there
        logger.warning("runtime.cpu_replicas=%d ignored: TensorFlow's devices were already initialised", replicas)


def configure_runtime(cfg: RuntimeConfig) -> RuntimeInfo:
    """Applies the strategy, seeds, the global dtype policy and determinism; returns what was chosen.

    Call it before any other TensorFlow work: logical CPU devices and multi-worker collectives can only be set up
    while the runtime is fresh.
    """
    gpus = len(tf.config.list_physical_devices("GPU"))
    if cfg.cpu_replicas > 1 and not gpus:
        _split_cpu(cfg.cpu_replicas)
    strategy_name = resolve_strategy(cfg.strategy, gpus)
    distribution = STRATEGIES[strategy_name]()
    keras.utils.set_random_seed(cfg.seed)
    set_op_determinism(cfg.deterministic)
    capability = _gpu_compute_capability()
    precision = resolve_precision(cfg.precision, capability)
    keras.mixed_precision.set_global_policy(precision)
    jit = resolve_jit(cfg.jit, capability is not None)
    info = RuntimeInfo(device="gpu" if gpus else "cpu", gpus=gpus, precision=precision, jit_compile=jit,
                       seed=cfg.seed, deterministic=cfg.deterministic, strategy=strategy_name,
                       replicas=distribution.num_replicas_in_sync, distribution=distribution)
    logger.info("runtime: %s", info)
    return info
