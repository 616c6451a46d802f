"""The settings of the commands other than fit: one frozen dataclass each, strict like the experiment config.

Every default, range and choice of `tftransfer export`, `predict`, `evaluate`, `domain`, `adapt` and `select` is written
once, in a field below with experiment.py's `opt(default, help, min=, max=, choices=)` metadata; the job takes the
dataclass (or its fields as keywords), and the Click options in tftransfer/cli.py are generated from these fields
(a test keeps them equal). Building one (`command_config`) is as strict as load_config: an unknown key or a bad type,
range or choice names the key. No TensorFlow here: --help and a bad setting come back without it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

from tftransfer.config.experiment import ADAPT_JOB_METHODS, VALIDATOR_NAMES, build_config, opt
from tftransfer.core.errors import ConfigError

# A picture a few pixels wide carries no content a classifier can use (a 1x1 image upsampled to 224 px is one
# flat colour), so its "prediction" would be noise presented as an answer. tftransfer.data.files imports it.
MIN_IMAGE_SIDE = 8

# Mirrors tftransfer.data.selection.SPLIT_SELECTORS (a test ties the two), first the default.
SPLIT_NAMES = ("auto", "all", "train", "val", "test")

# Mirrors tftransfer.evaluation.transferability.SCORES (that module imports scikit-learn), first the default; a test
# ties the two.
SELECT_SCORE_NAMES = ("logme", "h_score", "probe_accuracy")

# Mirrors tftransfer.serving.tflite.TFLITE_MODES (that module imports TensorFlow); a test ties the two.
TFLITE_MODE_NAMES = ("float32", "float16", "dynamic", "int8", "int8-uint8")


@dataclass(frozen=True)
class ExportCommandConfig:
    """`tftransfer export RUN`: the next SavedModel version of a finished run, checked, optionally TFLite."""

    tflite: str | None = opt(None, "Also write model_<mode>.tflite, the labels inside; int8 and int8-uint8 (full "
                                   "integer, uint8 input and output) calibrate on training images.",
                             choices=TFLITE_MODE_NAMES)
    model_dir: Path | None = opt(None, "Model folder to write versions into (default: <export.dir>/<name> of the "
                                       "run's config).")
    version: int | None = opt(None, "Write exactly this version (an existing one is an error; default: the next "
                                    "free number).", min=1)
    top_k: int | None = opt(None, "Classes per image in the outputs (default: the run's).", min=1)
    parity_images: int = opt(32, "Validation images the parity check compares export and model.keras on.", min=1)
    representative_images: int = opt(100, "Training images that calibrate an int8 TFLite model.", min=1)
    batch_size: int = opt(32, "Batch size of the TFLite accuracy comparison.", min=1)
    force: bool = opt(False, "Publish even when the export gate refuses the model (below chance plus margin, or "
                             "worse than the newest version on the same split).")


@dataclass(frozen=True)
class LrFindCommandConfig:
    """`tftransfer lr-find`: the learning-rate range test of fit's experiment, a suggested rate per phase."""

    phases: tuple[str, ...] = opt(("head", "finetune"), "Phase(s) to test, separated by commas.",
                                  choices=("head", "finetune"))
    steps: int = opt(100, "Optimizer steps of the exponential learning-rate ramp.", min=10)
    min_lr: float = opt(1e-7, "Lowest learning rate of the ramp.", min=0.0, min_exclusive=True)
    max_lr: float = opt(1.0, "Highest learning rate of the ramp.", min=0.0, min_exclusive=True)

    def __post_init__(self) -> None:
        if self.min_lr >= self.max_lr:
            raise ConfigError(f"min_lr (--min-lr) {self.min_lr:g} must be below max_lr (--max-lr) {self.max_lr:g}")


@dataclass(frozen=True)
class CompressReportCommandConfig:
    """`tftransfer compress-report MODEL...`: accuracy, parameters, size and latency of runs, exports and TFLite
    files on the same images, as JSON, Markdown and an accuracy-latency plot."""

    data: str = opt("", "Images every model is scored on (default: the first run's own data).")
    split: str = opt("val", "Split of the data (val: the run's validation split, drawn with its fractions).",
                     choices=SPLIT_NAMES)
    tflite: tuple[str, ...] = opt((), "Also convert each run's model to these TFLite modes (comma-separated) and "
                                      "report them; an export's model_*.tflite files are reported anyway.",
                                  choices=TFLITE_MODE_NAMES)
    output: Path = opt(Path("compress_report"), "Folder of compress_report.json, compress_report.md, pareto.png "
                                                "and the converted .tflite files.")
    max_images: int = opt(0, "Score at most this many images, spread over the split (0 = all).", min=0)
    latency_runs: int = opt(20, "Timed calls per batch size (after one warm-up call).", min=1)
    batch_size: int = opt(32, "Batch size of the accuracy pass and of the second latency figure.", min=1)
    threads: int = opt(0, "TFLite interpreter threads (0 = one per CPU core, as TensorFlow uses).", min=0)
    representative_images: int = opt(100, "Training images that calibrate an int8 conversion.", min=1)


@dataclass(frozen=True)
class PredictCommandConfig:
    """`tftransfer predict MODEL IMAGES...`: top-k classes of image files with a run or an exported SavedModel."""

    top_k: int = opt(3, "Classes listed per image.", min=1)
    batch_size: int = opt(32, "Images per batch.", min=1)
    image_size: int | None = opt(None, "Input size, only for a SavedModel without model_card.json.", min=1)
    min_side: int = opt(MIN_IMAGE_SIDE, "Skip images narrower or shorter than this many pixels.", min=1)


@dataclass(frozen=True)
class EvaluateCommandConfig:
    """`tftransfer evaluate MODEL --data DATA`: metrics.json, summary.md and plots of a run or an export on DATA."""

    split: str = opt(SPLIT_NAMES[0], "auto: the data's own test split, else its own val split (val/ folder), else "
                                     "all examples.", choices=SPLIT_NAMES)
    val_split: float | None = opt(None, "Hash split fraction for --split val/train on data without a val folder "
                                        "(default: the run's).", min=0.0, max=1.0, max_exclusive=True)
    test_split: float | None = opt(None, "Hash split fraction for --split test on data without a test folder "
                                         "(default: the run's).", min=0.0, max=1.0, max_exclusive=True)
    output: Path | None = opt(None, "Output folder (default: RUN/eval/<data>-<split>, or "
                                    "evaluations/<name>-v<version>/...); when it holds an earlier evaluation, "
                                    "the next free <folder>-2, <folder>-3, ... (never a run's own folder).")
    overwrite: bool = opt(False, "Replace an earlier evaluation in the output folder instead of writing the next "
                                 "numbered one.")
    top_k: int = opt(5, "k of top-k accuracy.", min=1)
    mistakes: int = opt(10, "How many of the most confident mistakes to list.", min=0)
    temperature: bool = opt(True, "Fit temperature scaling on validation data and report ECE/NLL before and after.")
    batch_size: int = opt(32, "Images per batch.", min=1)
    image_size: int | None = opt(None, "Input size, only for a SavedModel without model_card.json.", min=1)
    tfds_data_dir: str = opt("", "TFDS data_dir for tfds:<name> data.")
    latency_runs: int = opt(20, "Batch-1 predictions timed for the latency figures (0 = none).", min=0)
    ece_bins: int = opt(15, "Confidence bins of the expected calibration error.", min=1)


@dataclass(frozen=True)
class DomainCommandConfig:
    """`tftransfer domain MODEL`: shift measures, corruptions and cheap adaptation of a run on another domain."""

    source: str | None = opt(None, "Source data (default: the run's own data, its held-out split).")
    target: str | None = opt(None, "Target data: image folder, manifest (#domain=NAME), tfds:<name>, builtin:<name>.")
    target_unlabeled: bool = opt(False, "Ignore target labels (a folder may then hold images in any layout).")
    corruptions: tuple[str, ...] = opt((), "Corruption suite on the source: all, or names separated by commas.")
    severities: tuple[int, ...] = opt((1, 2, 3, 4, 5), "Corruption severities to evaluate.")
    adapt: tuple[str, ...] = opt((), "Adaptation methods on the target: adabn,adabn-aligned,bn-batch,tent or all.")
    adapt_severities: tuple[int, ...] = opt((), "Also run the --adapt methods on corrupted source images at these "
                                                "severities, e.g. 3,5.")
    out_dir: Path | None = opt(None, "Output folder (default: MODEL/domain); when it holds an earlier report, the "
                                     "next free <folder>-2, <folder>-3, ...")
    batch_size: int | None = opt(None, "Batch size (default: the run's).", min=1)
    max_images: int = opt(2000, "Random subsample of each domain above this many images (0: all).", min=0)
    permutations: int = opt(1000, "Permutations of the MMD test.", min=1)
    folds: int = opt(5, "Cross-validation folds of the proxy A-distance.", min=2)
    tsne: bool = opt(False, "Also draw a t-SNE map of the features (slower than PCA).")
    self_check: bool = opt(True, "Also adapt each method to the source itself and report its source accuracy.")
    seed: int = opt(0, "Seed of the subsamples and of every randomised measure.", min=0)


HEAD_INITS = ("run", "new")


@dataclass(frozen=True)
class FeatureRecipe:
    """Feature-level adaptation (tftransfer.training.adaptation.feature_head); the defaults are the measured recipe
    (docs/benchmarks.md)."""

    steps: int = opt(400, "Training steps of source-only, mcc and cdan-e (32 source + 32 target features each).",
                     min=1)
    batch_size: int = opt(32, "Source and target features per step, each.", min=1)
    learning_rate: float = opt(0.01, "Nesterov SGD rate lr0, annealed as lr0 (1 + 10p)^-0.75.", min=0.0,
                               min_exclusive=True)
    momentum: float = opt(0.9, "SGD momentum.", min=0.0, max=1.0)
    weight_decay: float = opt(5e-4, "Weight decay.", min=0.0)
    bottleneck: int = opt(256, "Width of a new head's bottleneck (head_init new).", min=1)
    weight: float = opt(1.0, "Trade-off of the adaptation loss against the source loss.", min=0.0)
    mcc_temperature: float = opt(2.5, "MCC's softmax temperature.", min=0.0, min_exclusive=True)
    discriminator_units: int = opt(256, "cdan-e: hidden units of the two-layer domain classifier.", min=1)
    shot_steps: int = opt(300, "SHOT's training steps on the target features.", min=1)
    shot_pseudo_weight: float = opt(0.3, "SHOT: weight of the centroid pseudo-label loss.", min=0.0)
    head_init: str = opt(HEAD_INITS[0], "run: continue from the fitted run's own head (the source hypothesis); "
                                        "new: a fresh bottleneck head.", choices=HEAD_INITS)
    seed: int = opt(0, "Seed of the head's initialisation and batch order.", min=0)


@dataclass(frozen=True)
class AdaptCommandConfig:
    """`tftransfer adapt MODEL --target DATA`: the run adapted to unlabeled target images, written as a new run."""

    target: str = opt("", "Target images (labels not used): a folder, manifest, tfds:, builtin:.")
    method: str = opt(ADAPT_JOB_METHODS[0], "auto: run the candidates and keep the one the --validator trusts (or "
                                            "none); adabn: target BatchNorm statistics; adabn-aligned: target "
                                            "statistics mapped onto the source's; source-only, mcc, cdan-e: the "
                                            "run's head trained further on aligned features (needs the run's source "
                                            "data); shot: source-free SHOT.", choices=ADAPT_JOB_METHODS)
    validator: str = opt(VALIDATOR_NAMES[0], "Label-free score that --method auto chooses by.",
                         choices=VALIDATOR_NAMES)
    name: str | None = opt(None, "Name of the new run (default: <model>-<method>), next to MODEL.")
    overwrite: bool = opt(False, "Replace an existing run of that name (the old one is kept aside).")
    max_images: int = opt(2000, "Random subsample of the target (and of the source) above this many images.", min=1)
    batch_size: int = opt(32, "Images per batch of the feature and BatchNorm passes.", min=1)
    seed: int = opt(0, "Seed of the subsamples and of the adapted head.", min=0)
    steps: int = opt(FeatureRecipe.steps, "Training steps of source-only, mcc and cdan-e.", min=1)
    shot_steps: int = opt(FeatureRecipe.shot_steps, "Training steps of shot.", min=1)
    head_init: str = opt(FeatureRecipe.head_init, "run: continue from the fitted run's head; new: a fresh head.",
                         choices=HEAD_INITS)


@dataclass(frozen=True)
class SelectCommandConfig:
    """`tftransfer select --data DATA --candidates ...`: candidate backbones ranked by transferability and cost."""

    weights: str = opt("imagenet", "Weights of the named candidates: imagenet, none or a file (a YAML entry sets its "
                                   "own).")
    image_size: int = opt(0, "Input size of the named candidates without @SIZE (0: each backbone's default).", min=0)
    rank_by: str = opt(SELECT_SCORE_NAMES[0], "Score the table is sorted by and the pick made on.",
                       choices=SELECT_SCORE_NAMES)
    folds: int = opt(5, "Cross-validation folds of the linear probe.", min=2)
    max_images: int = opt(1000, "Class-stratified subsample of the train + val images above this many (0: all).",
                          min=0)
    budget_seconds: float = opt(0.0, "Start no further candidate after this many seconds; the rest are listed as "
                                     "skipped (0: none).", min=0.0)
    fit_config: Path | None = opt(None, "A fit config whose data and runtime settings (split, seed, cache) select "
                                        "uses.")
    name: str | None = opt(None, "Output folder <runs-dir>/<name>/ (default select_<data>); never overwritten.")
    runs_dir: Path = opt(Path("runs"), "Where the output folder is made.")
    batch_size: int = opt(32, "Images per batch of the feature pass.", min=1)
    seed: int = opt(42, "Seed of the subsample, the data split and the probe's folds.", min=0)
    cache_dir: str = opt("", "Cache folder of the features (default: runtime.cache_dir, TFTRANSFER_CACHE).")
    latency_runs: int = opt(10, "Timed batch-1 calls per candidate (batch 32: a quarter as many, at least 2).",
                            min=1)


C = TypeVar("C")


def command_config(cls: type[C], config: C | None = None, settings: Mapping[str, Any] | None = None) -> C:
    """`config`, or a `cls` built from keyword `settings`; either way checked as strictly as load_config does (a
    ConfigError names the unknown key, or the key whose type, range or choice is wrong)."""
    if config is not None:
        if settings:
            raise TypeError(f"pass a {cls.__name__} or keyword settings, not both (got {', '.join(settings)})")
        if not isinstance(config, cls):
            raise TypeError(f"expected a {cls.__name__}, got {type(config).__name__}")
        # A dataclass built directly skipped validation: check (and coerce) every field now.
        settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return build_config(cls, dict(settings or {}))


@dataclass(frozen=True)
class SettingSpec:
    """What a command-line option needs to know about one config field."""

    name: str
    type: type  # bool, int, float, str or Path; for a tuple[X, ...] field, X
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    min: float | None
    max: float | None
    min_exclusive: bool
    max_exclusive: bool
    optional: bool  # None is allowed (and means "decided at run time")
    multiple: bool  # a tuple[X, ...] field


def setting_specs(cls: type) -> dict[str, SettingSpec]:
    """The SettingSpec of every field of a command config dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    specs = {}
    for f in dataclasses.fields(cls):
        tp, optional, multiple = hints[f.name], False, False
        if typing.get_origin(tp) in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp, optional = args[0], len(args) < len(typing.get_args(tp))
        if typing.get_origin(tp) is tuple:
            tp, multiple = typing.get_args(tp)[0], True
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        meta = f.metadata
        specs[f.name] = SettingSpec(f.name, tp, default, meta.get("help", ""), meta.get("choices"), meta.get("min"),
                                    meta.get("max"), bool(meta.get("min_exclusive")),
                                    bool(meta.get("max_exclusive")), optional, multiple)
    return specs
