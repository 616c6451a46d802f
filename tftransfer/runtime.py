"""configure_runtime(): seeds, precision policy and XLA, decided once per process from the hardware."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import keras
import tensorflow as tf

from tftransfer.config import RuntimeConfig

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

    def to_dict(self) -> dict:  # noqa: D102
        return asdict(self)


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


def configure_runtime(cfg: RuntimeConfig) -> RuntimeInfo:
    """Applies seeds, the global dtype policy and determinism; returns what was chosen."""
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    capability = _gpu_compute_capability()
    precision = resolve_precision(cfg.precision, capability)
    keras.mixed_precision.set_global_policy(precision)
    jit = resolve_jit(cfg.jit, capability is not None)
    gpus = len(tf.config.list_physical_devices("GPU"))
    info = RuntimeInfo(device="gpu" if gpus else "cpu", gpus=gpus, precision=precision, jit_compile=jit,
                       seed=cfg.seed, deterministic=cfg.deterministic)
    logger.info("runtime: %s", info)
    return info
