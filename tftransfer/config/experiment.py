"""The experiment config: frozen dataclasses, loaded from YAML plus `key=value` overrides, strictly validated.

The dataclass defaults are the library's defaults; configs/base.yaml is generated from them and their help texts
(tftransfer.config.base_yaml), and a test fails when it is stale.
Every problem is a ConfigError that names the offending key, e.g. `phases.head.learning_rate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from tftransfer.core.errors import ConfigError


def _opt(default: Any, help: str, *, min: float | None = None, max: float | None = None,  # noqa: A002
         choices: Sequence[Any] | None = None, min_exclusive: bool = False, max_exclusive: bool = False) -> Any:
    """A dataclass field carrying its documentation and validation range."""
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None,
            "min_exclusive": min_exclusive, "max_exclusive": max_exclusive}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# The public name of _opt, for the other config modules (tftransfer.config.commands).
opt = _opt


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation, applied to training batches only."""

    preset: str = _opt("custom", "custom = the keys below; none = no augmentation; light = flip, small rotation, "
                                 "zoom, shift, brightness, contrast; randaugment = flip + RandAugment (2 random ops)",
                       choices=("custom", "none", "light", "randaugment"))
    flip: bool = _opt(True, "random horizontal flips")
    rotation: float = _opt(0.0, "max random rotation as a fraction of a full turn", min=0.0, max=0.5)
    zoom: float = _opt(0.0, "max random zoom in/out as a fraction of the size", min=0.0, max=0.9)
    translation: float = _opt(0.0, "max random shift as a fraction of the size", min=0.0, max=0.5)
    contrast: float = _opt(0.0, "max random contrast change factor", min=0.0, max=1.0)
    brightness: float = _opt(0.0, "max random brightness change as a fraction of the 0-255 range", min=0.0, max=1.0)
    placement: str = _opt("auto", "where augmentation runs: pipeline = the tf.data pipeline on the CPU; model = "
                                  "inside the training step (on the GPU, XLA-compiled with runtime.jit); auto = "
                                  "model on a GPU, else pipeline", choices=("auto", "pipeline", "model"))


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are batched."""

    path: str = _opt("", "an image folder (class subfolders, optionally train/ val/ test/ inside), a .csv/.jsonl "
                         "manifest (path,label[,split][,domain]; #domain=NAME selects rows), an .npz (x, y), "
                         "tfds:<name> or builtin:digits")
    tfds_data_dir: str = _opt("", "TFDS data_dir holding already-downloaded data sets (default ~/tensorflow_datasets)")
    val_split: float = _opt(0.2, "fraction held out for validation when the data has no val/ folder",
                            min=0.0, max=0.9)
    test_split: float = _opt(0.0, "fraction held out for testing when the data has no test/ folder (hash-based, "
                                  "like val_split)", min=0.0, max=0.9)
    stratify: bool = _opt(False, "give every class its exact val/test share (hash order within each class)")
    batch_size: int = _opt(32, "images per batch", min=1)
    image_size: int = _opt(0, "square input size in pixels; 0 = the backbone's default", min=0)
    cache: str = _opt("memory", "cache decoded, resized images: memory, none, or a folder for tf.data cache files "
                                "(data larger than RAM)")
    shuffle_buffer: int = _opt(2048, "shuffle buffer size (examples)", min=1)
    strict: bool = _opt(False, "treat any unreadable or non-image file as an error instead of skipping it")
    allow_outside_paths: bool = _opt(False, "manifests: accept rows whose path leads outside the manifest's folder "
                                            "(../, absolute paths elsewhere); refused by default")
    class_weight: str = _opt("none", "auto = weight the loss by inverse class frequency", choices=("none", "auto"))
    balanced_sampling: bool = _opt(False, "draw training examples with equal probability per class")
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and the new classification head."""

    backbone: str = _opt("mobilenetv2", "a name from `tftransfer backbones`")
    weights: str = _opt("imagenet", "imagenet, none, or a path to a local .h5/.weights.h5/.keras file")
    backbone_kwargs: dict = _opt({}, "extra keras.applications constructor arguments, e.g. {alpha: 0.5}")
    pooling: str = _opt("avg", "global pooling of the backbone's feature map", choices=("avg", "max"))
    dropout: float = _opt(0.2, "dropout rate before the Dense head", min=0.0, max=0.95)
    bottleneck: int = _opt(0, "units of a Dense+ReLU layer between pooling and the head (0 = none); domain "
                              "alignment (adapt.method) acts on its output, so it can work while the backbone "
                              "is frozen", min=0)


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase: optimizer, schedule and stopping."""

    epochs: int = _opt(5, "epochs in this phase (0 skips it)", min=0)
    learning_rate: float = _opt(1e-3, "peak learning rate", min=0.0, min_exclusive=True)
    optimizer: str = _opt("adam", "optimizer", choices=("adam", "adamw", "sgd"))
    momentum: float = _opt(0.9, "SGD momentum", min=0.0, max=1.0)
    nesterov: bool = _opt(False, "Nesterov momentum for SGD")
    weight_decay: float = _opt(0.0, "decoupled weight decay (adamw, sgd)", min=0.0)
    schedule: str = _opt("constant", "learning-rate schedule after warmup", choices=("constant", "cosine", "step"))
    warmup_epochs: float = _opt(0.0, "linear warmup length in epochs", min=0.0)
    decay_rate: float = _opt(0.1, "step schedule: multiply the rate by this every decay_epochs",
                             min=0.0, max=1.0, min_exclusive=True)
    decay_epochs: float = _opt(10.0, "step schedule: epochs between decays", min=0.0, min_exclusive=True)
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss", min=0.0, max=0.5)
    early_stopping_patience: int = _opt(0, "stop after this many epochs without val_loss improvement (0 = off)",
                                        min=0)
    restore_best: bool = _opt(True, "end the phase with the weights of its best val_loss epoch")


@dataclass(frozen=True)
class HeadConfig(PhaseConfig):
    """Phase 1: train the new head on the frozen backbone."""

    feature_cache: bool = _opt(True, "compute pooled backbone features once and train the head on them "
                                     "(cached on disk; reused by later runs on the same data)")
    feature_cache_views: int = _opt(1, "views per training image in the feature cache: the clean image plus "
                                       "views-1 augmented ones (1 = phase 1 trains without augmentation)", min=1)


def _finetune_defaults() -> FinetuneConfig:
    return FinetuneConfig(learning_rate=1e-5, schedule="cosine", warmup_epochs=1.0)


@dataclass(frozen=True)
class FinetuneConfig(PhaseConfig):
    """Phase 2: unfreeze the top blocks of the backbone and train at a low rate."""

    unfreeze_blocks: int = _opt(2, "whole backbone blocks to unfreeze from the top (0 skips phase 2; more than "
                                   "the backbone has, e.g. 1000, unfreezes all)", min=0)
    l2_sp_alpha: float = _opt(0.0, "L2-SP (Li et al. 2018): alpha/2 * squared distance of the unfrozen backbone "
                                   "weights to their pretrained values, added to the loss (0 = off)", min=0.0)
    l2_sp_beta: float = _opt(0.0, "L2-SP: beta/2 * squared norm of the new head's weights (0 = off)", min=0.0)
    activation_cache: str = _opt("auto", "compute the frozen lower blocks' output (the input of the first unfrozen "
                                         "block) once per image and view, and train the top blocks and head on "
                                         "it; auto = on where it applies (no pruning, distillation, target or "
                                         "L2-SP, not multiworker, a clean cut, within activation_cache_max_mb)",
                                 choices=("auto", "on", "off"))
    activation_cache_views: int = _opt(4, "augmented views per training image in the activation cache; epoch e "
                                          "trains on view e % views", min=1)
    activation_cache_clean_view: bool = _opt(False, "make the cache's first view the un-augmented image")
    activation_cache_max_mb: float = _opt(1024.0, "largest activation cache (train views in float16 plus val in "
                                                  "float32) kept in memory and on disk", min=0.0)


@dataclass(frozen=True)
class PhasesConfig:
    """Phase 1 trains the head on a frozen backbone; phase 2 fine-tunes the top blocks."""

    head: HeadConfig = field(default_factory=HeadConfig)
    finetune: FinetuneConfig = field(default_factory=_finetune_defaults)


@dataclass(frozen=True)
class RuntimeConfig:
    """Process-wide settings, applied once before anything is built."""

    seed: int = _opt(42, "seed for Python, NumPy, TensorFlow and shuffling", min=0)
    precision: str = _opt("auto", "auto = mixed_float16 on a GPU with compute capability >= 7, float32 on CPU "
                          "(inference in bf16 on a CPU with AMX where a cached probe measured it pays)",
                          choices=("auto", "float32", "mixed_float16", "mixed_bfloat16"))
    jit: str = _opt("auto", "XLA compilation; auto = on for GPU only (XLA is ~10x slower on CPU here)",
                    choices=("auto", "on", "off"))
    deterministic: bool = _opt(False, "deterministic ops and data order (slower; for tests and debugging)")
    cache_dir: str = _opt("", "feature cache folder (default $TFTRANSFER_CACHE or ~/.cache/tftransfer)")
    strategy: str = _opt("auto", "tf.distribute strategy; auto = multiworker under TF_CONFIG, tpu with TPU_NAME, "
                                 "mirrored over several GPUs, else default",
                         choices=("auto", "default", "mirrored", "multiworker", "tpu"))
    loop: str = _opt("auto", "training step driver: keras = Model.fit, tftransfer = tftransfer's own loop "
                             "(training.loop); auto = tftransfer under multiworker, keras otherwise",
                     choices=("auto", "keras", "tftransfer"))
    cpu_replicas: int = _opt(0, "split the CPU into this many logical devices (to try mirrored training "
                                "without GPUs); 0 = no split", min=0)


@dataclass(frozen=True)
class ExportConfig:
    """The TF Serving export written at the end of `fit`."""

    enabled: bool = _opt(True, "export a SavedModel after training")
    dir: str = _opt("saved_models", "export root; the model goes to <dir>/<name>/<version>/")
    top_k: int = _opt(5, "classes returned per image by the serving signature", min=1)
    max_pixels: int = _opt(50_000_000, "serving_default refuses (flags, never fails the batch) an image whose "
                                       "header declares more pixels than this, before decoding it", min=1)
    parity_tolerance: float = _opt(1e-4, "max abs probability difference allowed between export and Keras model",
                                   min=0.0)
    min_gain_over_chance: float = _opt(0.05, "a model whose validation accuracy is below the majority-class rate "
                                             "plus this is not published", min=0.0, max=1.0)
    max_regression: float = _opt(0.0, "a model this much (or more) below the newest version's validation accuracy "
                                      "on the same split is not published", min=0.0, max=1.0)


# Mirrors tftransfer.training.adaptation.methods.METHODS (config must not import TensorFlow; a test ties them).
ADAPT_METHODS = ("none", "dann", "coral", "mmd", "pseudo-label")
# `tftransfer adapt --method`, first the default; mirrors tftransfer.jobs.adapt's BatchNorm methods, the feature
# methods of training.adaptation.feature_head and SHOT (a test ties them).
ADAPT_JOB_METHODS = ("auto", "adabn", "adabn-aligned", "source-only", "mcc", "cdan-e", "shot")
# Mirrors tftransfer.evaluation.validators.VALIDATORS, first the default.
VALIDATOR_NAMES = ("entropy", "snd", "dev")


@dataclass(frozen=True)
class AdaptConfig:
    """Training-time domain adaptation with unlabeled target images (labels, if any, only evaluate)."""

    target: str = _opt("", "target-domain data spec (folder, manifest#domain=NAME, ...); its labels are never "
                           "trained on, only reported")
    method: str = _opt("none", "none, dann (gradient reversal + domain classifier), coral (Deep CORAL), mmd "
                               "(multi-kernel MMD, DAN), pseudo-label (confident target predictions in rounds)",
                       choices=ADAPT_METHODS)
    weight: float = _opt(1.0, "trade-off of the adaptation loss against the task loss", min=0.0)
    discriminator_units: int = _opt(256, "dann: hidden units of the two-layer domain classifier", min=1)
    pseudo_threshold: float = _opt(0.9, "pseudo-label: minimum softmax confidence of a selected target image",
                                   min=0.0, max=1.0)
    pseudo_max_per_class: int = _opt(0, "pseudo-label: cap on selected images per predicted class (0 = class-"
                                        "balanced: at most 2x the rarest selected class)", min=0)
    pseudo_round_epochs: int = _opt(1, "pseudo-label: epochs per round (labels are re-drawn at each round's start)",
                                    min=1)
    max_target_images: int = _opt(0, "use at most this many target images (random, seeded); 0 = all", min=0)


# Mirrors tftransfer.training.pruning.PRUNABLE_LAYERS (config must not import Keras; a test ties them).
PRUNABLE_LAYER_KINDS = ("conv", "dense", "depthwise")
# Mirror tftransfer.training.pruning.PRUNE_SCORES and PRUNE_ALLOCATIONS (a test ties them).
PRUNE_SCORE_NAMES = ("folded", "magnitude")
PRUNE_ALLOCATION_NAMES = ("uniform", "global")


@dataclass(frozen=True)
class PruneConfig:
    """Magnitude pruning during phase 2 (Zhu & Gupta 2017): the smallest weights of the kernels it trains are zeroed
    on a polynomial schedule and kept at zero; the exported weights are ordinary, with zeros in them."""

    target_sparsity: float = _opt(0.0, "fraction of each pruned kernel's weights set to zero by the end of the "
                                       "schedule (0 = no pruning); only kernels phase 2 trains are pruned, so "
                                       "phases.finetune.unfreeze_blocks=1000 prunes the whole backbone",
                                  min=0.0, max=1.0, max_exclusive=True)
    initial_sparsity: float = _opt(0.0, "sparsity at the schedule's first step", min=0.0, max=1.0,
                                   max_exclusive=True)
    begin_fraction: float = _opt(0.0, "where in phase 2 (fraction of its steps) pruning starts", min=0.0, max=1.0)
    end_fraction: float = _opt(0.75, "where in phase 2 the target sparsity is reached (the rest fine-tunes with "
                                     "the final masks)", min=0.0, max=1.0)
    frequency: int = _opt(0, "optimizer steps between mask updates (0 = 1/16 of the schedule's length)", min=0)
    power: float = _opt(3.0, "exponent of the polynomial schedule (3 in Zhu & Gupta)", min=1.0)
    layers: tuple[str, ...] = _opt(("conv", "dense"), "kinds of layer whose kernels are pruned: conv (incl. 1x1), "
                                                      "dense, depthwise (the output layer never is; biases and "
                                                      "BatchNorm never are)", choices=PRUNABLE_LAYER_KINDS)
    min_weights: int = _opt(4096, "kernels with fewer weights stay dense (MobileNetV2's stem and small 1x1 "
                                  "projections collapse when pruned at the rate of the big kernels; 0 = prune all)",
                            min=0)
    score: str = _opt("magnitude", "what ranks a weight: magnitude = |w|; folded = |w * gamma / sqrt(var + eps)| "
                                   "of the BatchNorm right after its layer (what the frozen layer multiplies by; |w| "
                                   "where none follows), better than magnitude with uniform allocation, much worse "
                                   "with global (docs/benchmarks.md)", choices=PRUNE_SCORE_NAMES)
    allocation: str = _opt("global", "how the target is spread: global = one score threshold over all pruned "
                                     "kernels together (the big late 1x1 kernels lose most); uniform = every "
                                     "pruned kernel at the target sparsity",
                           choices=PRUNE_ALLOCATION_NAMES)

    def __post_init__(self) -> None:
        if self.end_fraction < self.begin_fraction:
            raise ConfigError(f"prune.end_fraction {self.end_fraction} is before prune.begin_fraction "
                              f"{self.begin_fraction}")
        if self.target_sparsity and self.initial_sparsity > self.target_sparsity:
            raise ConfigError(f"prune.initial_sparsity {self.initial_sparsity} is above prune.target_sparsity "
                              f"{self.target_sparsity}")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015) from a finished teacher run; off while `teacher` is empty."""

    teacher: str = _opt("", "the teacher: a finished run directory (runs/<name>) whose classes are the data's; "
                            "empty = no distillation")
    alpha: float = _opt(0.7, "weight of the soft loss T^2 KL(teacher_T || student_T); the hard-label "
                             "cross-entropy gets 1 - alpha", min=0.0, max=1.0)
    temperature: float = _opt(4.0, "softmax temperature T of the soft targets", min=0.0, min_exclusive=True)
    views: int = _opt(4, "fixed views per training image, each with its teacher prediction computed once and "
                         "cached: the clean image plus views-1 seeded augmented ones (both phases train on them; "
                         "phase 2 draws one of them per image per epoch)", min=1)
    unlabeled: str = _opt("", "a folder of unlabeled images (any layout) the teacher labels; they add only the "
                              "soft loss")
    max_unlabeled: int = _opt(0, "use at most this many unlabeled images (random, seeded); 0 = all", min=0)
    baseline: str = _opt("", "a run of the same student trained without the teacher, compared in summary.md")


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one `tftransfer fit` run needs."""

    name: str = _opt("", "run name; runs/<name>/ and saved_models/<name>/ (default: <backbone>_<data>)")
    runs_dir: str = _opt("runs", "where run directories are created")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# ---------------------------------------------------------------------------------------------------------------
# Loading and validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Converts a YAML/override value to the field type, or raises ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "1e-5" (no dot) as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
    elif tp is tuple or origin is tuple:
        return _coerce_tuple(value, tp, key)
    else:
        raise ConfigError(f"{key}: unsupported config type {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce_tuple(value: Any, tp: Any, key: str) -> tuple[Any, ...]:
    """A homogeneous `tuple[X, ...]` from a list, a tuple or a comma-separated string ("1,3,5", "" = empty), each
    item coerced to X (the key names the item)."""
    args = typing.get_args(tp)
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
    if not args:
        return tuple(value)
    return tuple(_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))


def _check_range(value: Any, f: dataclasses.Field, key: str) -> None:
    meta = f.metadata
    if value is None:
        return
    if isinstance(value, tuple):  # a tuple[X, ...] field: its range and choices hold for each item
        for i, item in enumerate(value):
            _check_range(item, f, f"{key}[{i}]")
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None:
        if meta.get("min_exclusive") and not value > lo:
            raise ConfigError(f"{key}: must be > {lo}, got {value}")
        if not meta.get("min_exclusive") and value < lo:
            raise ConfigError(f"{key}: must be >= {lo}, got {value}")
    if hi is not None:
        if meta.get("max_exclusive") and not value < hi:
            raise ConfigError(f"{key}: must be < {hi}, got {value}")
        if not meta.get("max_exclusive") and value > hi:
            raise ConfigError(f"{key}: must be <= {hi}, got {value}")


def _unknown_key_error(key: str, known: Sequence[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _build(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a mapping, recursing into nested dataclasses; strict about keys and types."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key_error(f"{prefix}{key}", list(fields))
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            base = dataclasses.asdict(getattr(defaults, name))
            sub = data.get(name, {})
            if sub is not None and not isinstance(sub, Mapping):
                raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} keys, got {sub!r}")
            kwargs[name] = _build(tp, _deep_merge(base, sub or {}), prefix=f"{key}.")
        elif name in data:
            value = data[name]
            if isinstance(value, bool) and tp is str and {"on", "off"} <= set(f.metadata.get("choices") or ()):
                value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
            value = _coerce(value, tp, key)
            _check_range(value, f, key)
            kwargs[name] = value
    return cls(**kwargs)


def build_config(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """A config dataclass from a mapping, as strictly as load_config: an unknown key or a bad type or value is a
    ConfigError naming the key (after `prefix`). Keys left out keep their defaults."""
    return _build(cls, data, prefix)


def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses `a.b.c=value` into (["a", "b", "c"], value), the value read as YAML (so 3, true, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
    return key.split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    return data


ALL_BLOCKS = 1000  # unfreeze_blocks above a backbone's block count unfreezes every block

# Named fine-tuning recipes: dotted config values applied under the config file, flags and --set (which win).
RECIPES: dict[str, dict[str, Any]] = {
    # Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features": train the head to convergence first (cheap
    # on cached features), then fine-tune the whole backbone at a low rate, so a random head never distorts it.
    "lp-ft": {"phases.head.epochs": 30, "phases.head.restore_best": True,
              "phases.finetune.unfreeze_blocks": ALL_BLOCKS, "phases.finetune.learning_rate": 1e-5,
              "phases.finetune.schedule": "cosine", "phases.finetune.warmup_epochs": 1.0},
    # The baseline LP-FT improves on: a random head and the whole backbone trained together from the start.
    "ft": {"phases.head.epochs": 0, "phases.finetune.unfreeze_blocks": ALL_BLOCKS,
           "phases.finetune.learning_rate": 1e-5, "phases.finetune.schedule": "cosine",
           "phases.finetune.warmup_epochs": 1.0},
    # Linear probe: the head alone on the frozen backbone.
    "lp": {"phases.head.epochs": 30, "phases.finetune.epochs": 0},
    # LP-FT with L2-SP (Li et al. 2018): the fine-tuned weights are pulled toward their pretrained values.
    "lp-ft-l2sp": {"phases.head.epochs": 30, "phases.head.restore_best": True,
                   "phases.finetune.unfreeze_blocks": ALL_BLOCKS, "phases.finetune.learning_rate": 1e-5,
                   "phases.finetune.schedule": "cosine", "phases.finetune.warmup_epochs": 1.0,
                   "phases.finetune.l2_sp_alpha": 0.01, "phases.finetune.l2_sp_beta": 0.01},
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                values: Mapping[str, Any] | None = None, recipe: str | None = None) -> ExperimentConfig:
    """Loads an ExperimentConfig: defaults <- `recipe` <- YAML file <- `values` (dotted keys) <- overrides."""
    tree: dict[str, Any] = {}
    if recipe:
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
        for dotted, value in RECIPES[recipe].items():
            _set_path(tree, dotted.split("."), value)
    if path is not None:
        tree = _deep_merge(tree, read_yaml(path))
    source = f"{path}: " if path is not None else ""
    for dotted, value in (values or {}).items():
        _set_path(tree, dotted.split("."), value)
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(tree, keys, value)
    try:
        return _build(ExperimentConfig, tree)
    except ConfigError as exc:
        raise ConfigError(f"{source}{exc}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return [_plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for YAML, JSON and TensorBoard hparams): a tuple field is a list,
    as YAML reads it back."""
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Writes the resolved config as YAML that load_config reads back to an equal config."""
    path = Path(path)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; dict-valued leaves that are not sections stay whole."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value) and key != "backbone_kwargs":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
