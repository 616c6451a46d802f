"""configure_runtime(): seeds, precision policy, XLA and the distribution strategy, decided once per process.

Batch size under a strategy: `data.batch_size` is the GLOBAL batch, split evenly over the replicas (Keras
distributes the tf.data pipeline). The learning rate is not scaled automatically: when you multiply the global
batch by k (more replicas at the same per-replica batch), the linear scaling rule (Goyal et al. 2017) suggests
multiplying the learning rate by k too, with a warmup (phases.*.warmup_epochs).
"""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from tftransfer.config.experiment import RuntimeConfig
from tftransfer.core.cache import cache_key
from tftransfer.core.errors import ConfigError, TfTransferError
from tftransfer.core.io import read_json, write_json

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
    workers: int = 1  # processes training together (multiworker)
    task: str = ""  # this process's TF_CONFIG task, e.g. "worker 1" (multiworker)
    chief: bool = True  # whether this process writes the run directory (every process but a non-chief worker)
    distribution: Any = field(default=None, repr=False, compare=False)  # the tf.distribute.Strategy

    def __str__(self) -> str:
        """One readable line for logs: 'cpu, float32, XLA off, seed 42, ...' (the repr keeps every field)."""
        device = f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}" if self.device == "gpu" else self.device
        replicas = f"{self.replicas} replica{'s' if self.replicas != 1 else ''}"
        workers = f", {self.workers} workers, this one {self.task}{' (chief)' if self.chief else ''}" \
            if self.workers > 1 else ""
        return (f"{device}, {self.precision}, XLA {'on' if self.jit_compile else 'off'}, seed {self.seed}, "
                f"{'deterministic' if self.deterministic else 'non-deterministic'} ops, strategy {self.strategy} "
                f"({replicas}{workers})")

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


@dataclass(frozen=True)
class WorkerTask:
    """This process's place in a multi-worker cluster, from TF_CONFIG."""

    task_type: str  # "worker" or "chief"
    index: int
    workers: int  # processes in the cluster (chief included)
    has_chief_job: bool = False

    @property
    def is_chief(self) -> bool:
        """The one that writes the run directory, checkpoints and exports (TensorFlow's convention: the chief
        task, or worker 0 when the cluster has no chief)."""
        return self.task_type == "chief" or (self.task_type == "worker" and self.index == 0
                                             and not self.has_chief_job)

    def __str__(self) -> str:
        return f"{self.task_type} {self.index} of {self.workers} processes{' (chief)' if self.is_chief else ''}"


def _config_error(why: str) -> ConfigError:
    return ConfigError(f"TF_CONFIG {why} (expected e.g. {{\"cluster\": {{\"worker\": [\"host1:port\", "
                       f"\"host2:port\"]}}, \"task\": {{\"type\": \"worker\", \"index\": 0}}}})")


def _check_cluster(cluster: Any) -> dict[str, list[str]]:
    if not isinstance(cluster, dict) or not cluster:
        raise _config_error("has no \"cluster\" object")
    for job, addresses in cluster.items():
        if job not in ("worker", "chief"):
            raise _config_error(f"cluster.{job}: only \"worker\" and \"chief\" jobs take part in multi-worker "
                                "training (parameter servers are not supported)")
        if not isinstance(addresses, list) or not addresses:
            raise _config_error(f"cluster.{job} must be a non-empty list of \"host:port\" addresses")
        for address in addresses:
            host, _, port = str(address).rpartition(":")
            if not host or not port.isdigit():
                raise _config_error(f"cluster.{job}: {address!r} is not a \"host:port\" address")
    if len(cluster.get("chief", [])) > 1:
        raise _config_error("cluster.chief lists more than one address; a cluster has one chief")
    if "worker" not in cluster and "chief" not in cluster:
        raise _config_error("cluster has neither a \"chief\" nor a \"worker\" job")
    return cluster


def worker_task(raw: str | None = None) -> WorkerTask:
    """TF_CONFIG (default: the environment's) checked and read; a one-line ConfigError naming what is wrong."""
    raw = os.environ.get("TF_CONFIG", "") if raw is None else raw
    if not raw.strip():
        raise ConfigError("runtime.strategy=multiworker needs the TF_CONFIG environment variable (the cluster's "
                          "addresses and this process's task); see the README's multi-worker section")
    try:
        parsed = json.loads(raw)
    except ValueError as exc:
        raise _config_error(f"is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise _config_error("is not a JSON object")
    cluster = _check_cluster(parsed.get("cluster"))
    task = parsed.get("task")
    if not isinstance(task, dict):
        raise _config_error("has no \"task\" object")
    task_type, index = task.get("type"), task.get("index", 0)
    if task_type not in cluster:
        raise _config_error(f"task.type {task_type!r} is not a job of the cluster ({', '.join(sorted(cluster))})")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[task_type]):
        raise _config_error(f"task.index {index!r} is not an index into cluster.{task_type} "
                            f"({len(cluster[task_type])} addresses)")
    return WorkerTask(task_type, index, sum(len(a) for a in cluster.values()), has_chief_job="chief" in cluster)


def _multiworker() -> tf.distribute.Strategy:
    # Keras 3's Model.fit fails under this strategy (keras-team/keras#20585: "Attempt to convert a value
    # (PerReplica...)"); tftransfer trains it with its own step driver (tftransfer.training.loop).
    task = worker_task()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    logger.info("multi-worker: %s, %d replicas in sync", task, strategy.num_replicas_in_sync)
    return strategy


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
    task = worker_task() if strategy_name == "multiworker" else None
    info = RuntimeInfo(device="gpu" if gpus else "cpu", gpus=gpus, precision=precision, jit_compile=jit,
                       seed=cfg.seed, deterministic=cfg.deterministic, strategy=strategy_name,
                       replicas=distribution.num_replicas_in_sync, workers=task.workers if task else 1,
                       task=f"{task.task_type} {task.index}" if task else "", chief=task.is_chief if task else True,
                       distribution=distribution)
    logger.info("runtime: %s", info)
    return info


# ---------------------------------------------------------------------------------------------------------------
# bf16 inference on CPU (issue 18 item 3): used where a measured probe says it pays, never for training on CPU
# (measured: little gain). Written once here, the rule's thresholds.

BF16_MIN_SPEEDUP = 1.2  # float32 seconds / bf16 seconds on the probe batches
BF16_MAX_PROB_DIFF = 0.05  # largest |p_bf16 - p_float32| over the probe batch's softmax probabilities
BF16_MIN_TOP1_AGREEMENT = 0.99  # share of probe images whose top-1 class is the same
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def has_amx_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU has AMX bf16 tiles (Intel Sapphire Rapids and later): where oneDNN's bf16 kernels pay."""
    return "amx_bf16" in cpu_flags(cpuinfo)


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name from /proc/cpuinfo, else the platform's processor string."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


@dataclass(frozen=True)
class Bf16Verdict:
    """Whether inference (feature extraction, evaluation) runs on a bf16 copy of the model, and why."""

    use_bf16: bool
    reason: str
    float32_seconds: float | None = None  # the probe's timings and agreement, when it was measured
    bf16_seconds: float | None = None
    max_prob_diff: float | None = None
    top1_agreement: float | None = None
    from_cache: bool = False

    @property
    def precision(self) -> str:
        """The inference precision: mixed_bfloat16 or float32."""
        return "mixed_bfloat16" if self.use_bf16 else "float32"

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"precision": self.precision, **asdict(self)}


def bf16_pays(float32_seconds: float, bf16_seconds: float, max_prob_diff: float,
              top1_agreement: float) -> Bf16Verdict:
    """The rule: bf16 when it is at least BF16_MIN_SPEEDUP faster and its probabilities hold (pure)."""
    speedup = float32_seconds / bf16_seconds if bf16_seconds > 0 else 0.0
    measured = dict(float32_seconds=float32_seconds, bf16_seconds=bf16_seconds, max_prob_diff=max_prob_diff,
                    top1_agreement=top1_agreement)
    if speedup < BF16_MIN_SPEEDUP:
        return Bf16Verdict(False, f"bf16 measured {speedup:.2f}x float32's speed (< {BF16_MIN_SPEEDUP}x)", **measured)
    if max_prob_diff > BF16_MAX_PROB_DIFF or top1_agreement < BF16_MIN_TOP1_AGREEMENT:
        return Bf16Verdict(False, f"bf16 is {speedup:.2f}x faster but its predictions moved (max |dp| "
                                  f"{max_prob_diff:.3f} > {BF16_MAX_PROB_DIFF} or top-1 agreement "
                                  f"{top1_agreement:.3f} < {BF16_MIN_TOP1_AGREEMENT})", **measured)
    return Bf16Verdict(True, f"bf16 measured {speedup:.2f}x float32's speed, max |dp| {max_prob_diff:.3f}, "
                             f"top-1 agreement {top1_agreement:.3f}", **measured)


def bf16_verdict_path(cache_dir: Path, backbone: str, image_size: int, cpu: str | None = None) -> Path:
    """Where the probe's verdict for (backbone, image size, CPU model) is cached: it is measured once."""
    key = cache_key({"backbone": backbone, "image_size": image_size, "cpu": cpu or cpu_model(),
                     "tensorflow": tf.__version__})
    return cache_dir / "precision" / f"{backbone}-{image_size}-{key}.json"


def read_bf16_verdict(path: Path) -> Bf16Verdict | None:
    """A cached verdict, or None when there is none (or it cannot be read: it is then measured again)."""
    if not path.is_file():
        return None
    try:
        data = read_json(path)
        data.pop("precision", None)
        return replace(Bf16Verdict(**data), from_cache=True)
    except (OSError, ValueError, TypeError, TfTransferError) as exc:
        logger.warning("bf16 probe verdict %s unreadable (%s): measuring again", path, exc)
        return None


def inference_precision(requested: str, device: str, probe: Callable[[], Bf16Verdict], cache_path: Path,
                        amx: Callable[[], bool] | None = None) -> Bf16Verdict:
    """The inference precision of runtime.precision `requested`: auto on a CPU with AMX runs (or reads) the probe;
    elsewhere float32 with the reason (an explicit precision is the training policy, used as it is)."""
    if requested != "auto":
        return Bf16Verdict(False, f"runtime.precision={requested} set explicitly: inference uses the model's policy")
    if device != "cpu":
        return Bf16Verdict(False, f"runtime.precision=auto on {device}: the training policy serves inference")
    if not (amx or has_amx_bf16)():  # looked up now: a test may replace has_amx_bf16
        return Bf16Verdict(False, "this CPU has no AMX (amx_bf16 not in /proc/cpuinfo flags): bf16 measured slower "
                                  "than float32 for MobileNetV2 without it, float32 kept without probing")
    cached = read_bf16_verdict(cache_path)
    if cached is not None:
        return cached
    verdict = probe()
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_path, {k: v for k, v in verdict.to_dict().items() if k != "from_cache"})
    except (OSError, TfTransferError) as exc:  # an unwritable cache costs a probe per run, not the run
        logger.warning("could not cache the bf16 probe verdict in %s: %s", cache_path, exc)
    return verdict
