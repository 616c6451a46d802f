"""The `tftransfer adapt` job: a fitted run adapted to unlabeled target images, written as a new run.

Methods (METHODS): BatchNorm statistics only (adabn, adabn-aligned); the run's head trained further on its frozen
features with target BatchNorm statistics aligned to the source's (source-only, mcc, cdan-e: they need the run's
labeled source data); SHOT (shot: source-free, the run's own head adapted on target features); and `auto`, which
runs the candidates the available data allows and keeps the one a label-free validator trusts (evaluation.validators),
or the unadapted run when none is clearly better. Target labels are never read.

Aligning target statistics to the source needs the source's BatchNorm input statistics: measured from the run's
data when it is there, and kept in the run (SOURCE_STATS_FILE) so a later source-free adaptation has them.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tftransfer.config.commands import AdaptCommandConfig, FeatureRecipe, command_config
from tftransfer.config.experiment import ADAPT_JOB_METHODS, VALIDATOR_NAMES, load_config, save_config
from tftransfer.core.errors import ConfigError, RunDirError
from tftransfer.core.io import write_json
from tftransfer.domain import batchnorm
from tftransfer.domain.adapters import adabn_model, copy_model, source_input_moments
from tftransfer.domain.targets import DomainData, load_source_split, load_unlabeled_domain
from tftransfer.evaluation.inference import predict_outputs, predict_probabilities
from tftransfer.evaluation.validators import Candidate, Choice, choose
from tftransfer.model.classifier import HEAD_LAYER, POOL_LAYER
from tftransfer.model.features import build_feature_extractor
from tftransfer.runs.finished import FinishedRun, load_run
from tftransfer.runs.layout import RunDir, create_run_dir
from tftransfer.training.adaptation.feature_head import (
    FeatureHead,
    list_feature_methods,
    shot,
    train_head,
)

logger = logging.getLogger(__name__)

SOURCE_STATS_FILE = "source_bn_statistics.npz"
NO_ADAPTATION = "none"
BN_METHODS = ("adabn", "adabn-aligned")
SOURCE_FREE_METHODS = ("shot",)
METHODS = ADAPT_JOB_METHODS  # ("auto", *BN_METHODS, *list_feature_methods(), *SOURCE_FREE_METHODS): a test ties them
AUTO_CANDIDATES = ("adabn-aligned", "mcc", "cdan-e", "source-only")  # SHOT minimises the entropy validator itself


@dataclass
class Inputs:
    """What adaptation works from: target pixels, and the run's labeled source splits when they are there."""

    target: np.ndarray
    source_train: DomainData | None = None
    source_val: DomainData | None = None
    source_moments: dict[str, batchnorm.Moments] | None = None


@dataclass
class Outcome:
    """Each candidate's target predictions, the chosen one's model, and what was done."""

    method: str
    model: keras.Model
    probs: dict[str, np.ndarray]
    choice: Choice | None = None
    info: dict[str, Any] = field(default_factory=dict)


# --- the models each method makes -------------------------------------------------------------------------------


def attach_head(model: keras.Model, head: FeatureHead, name: str) -> keras.Model:
    """`model` up to its pooled features, then `head`: one Keras model (pixels in, logits out) that saves and exports
    as any run's model."""
    z = head.embed(model.get_layer(POOL_LAYER).output)
    return keras.Model(model.inputs, head.classifier(z), name=name)


def _copy_layer(layer: keras.layers.Layer, input_dim: int) -> keras.layers.Layer:
    clone = layer.__class__.from_config(layer.get_config())
    clone.build((None, input_dim))
    clone.set_weights(layer.get_weights())
    return clone


def head_of_run(model: keras.Model) -> FeatureHead:
    """Copies of the run's layers after pooling (dropout left out) as a FeatureHead; with no layer between pooling
    and the classifier, an identity-initialised Dense adapter is put there for SHOT to train."""
    names = [layer.name for layer in model.layers]
    start, end = names.index(POOL_LAYER), names.index(HEAD_LAYER)
    width = int(model.get_layer(POOL_LAYER).output.shape[-1])
    transform = []
    for layer in model.layers[start + 1:end]:
        if not isinstance(layer, keras.layers.Dropout):
            transform.append(_copy_layer(layer, width))
            width = int(layer.output.shape[-1])
    if not transform:
        transform = [keras.layers.Dense(width, kernel_initializer="identity", name="shot_adapter")]
        transform[0].build((None, width))
    return FeatureHead(transform, _copy_layer(model.get_layer(HEAD_LAYER), width))


def _features(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    return predict_outputs(build_feature_extractor(model), images, batch_size)


def _probs(head: FeatureHead, features: np.ndarray) -> np.ndarray:
    return head.predict(features)[1]


# --- adaptation in memory ---------------------------------------------------------------------------------------


def _needs(method: str) -> tuple[bool, bool]:
    """(needs source statistics, needs labeled source data)."""
    if method == "adabn":
        return False, False
    return True, method in list_feature_methods() or method == "auto"


def _candidates(method: str, inputs: Inputs) -> list[str]:
    if method != "auto":
        return [method]
    have_source = inputs.source_train is not None
    return [m for m in AUTO_CANDIDATES if have_source or m == "adabn-aligned"] if inputs.source_moments \
        else []


def adapt_in_memory(run: FinishedRun, inputs: Inputs, method: str = METHODS[0], recipe: FeatureRecipe | None = None,
                    validator: str = VALIDATOR_NAMES[0], batch_size: int = 32) -> Outcome:
    """Adapts run.model to inputs.target with `method`; returns the chosen model and every candidate's target
    probabilities (the benchmark scores them against labels the job never has)."""
    if method not in METHODS:
        raise ConfigError(f"unknown adaptation method {method!r}; choose from {', '.join(METHODS)}")
    _check_inputs(method, inputs)
    recipe = recipe or FeatureRecipe()
    started = time.perf_counter()
    moments = None if method == "adabn" else inputs.source_moments
    aligned, _ = adabn_model(run.model, inputs.target, batch_size, source_moments=moments)
    target_features = _features(aligned, inputs.target, batch_size)
    models, probs, info = _run_candidates(run, aligned, target_features, inputs, _candidates(method, inputs),
                                          recipe, batch_size)
    if method != "auto":
        return Outcome(method, models[method], probs, None, _timed(info, started))
    reference = Candidate(NO_ADAPTATION, predict_probabilities(run.model, inputs.target, batch_size))
    probs[NO_ADAPTATION] = reference.target_probs
    models[NO_ADAPTATION] = run.model
    pool = [Candidate(name, probs[name], target_features) for name in models if name != NO_ADAPTATION]
    choice = choose(pool, reference, validator)
    logger.info("adapt auto: chose %s (%s)", choice.chosen, choice.reason)
    return Outcome(choice.chosen, models[choice.chosen], probs, choice, _timed(info, started))


def _timed(info: dict[str, Any], started: float) -> dict[str, Any]:
    return {**info, "seconds": round(time.perf_counter() - started, 2)}


def _check_inputs(method: str, inputs: Inputs) -> None:
    needs_stats, needs_source = _needs(method)
    if needs_stats and inputs.source_moments is None:
        raise RunDirError(f"--method {method}: needs the source's BatchNorm statistics ({SOURCE_STATS_FILE} in the "
                          "run, or the run's training data to measure them), and neither is there")
    if needs_source and method != "auto" and inputs.source_train is None:
        raise RunDirError(f"--method {method}: trains on the run's labeled source data, which is not available; "
                          f"source-free methods: {', '.join(('adabn-aligned', *SOURCE_FREE_METHODS))}")


def _run_candidates(run: FinishedRun, aligned: keras.Model, target_features: np.ndarray, inputs: Inputs,
                    names: Sequence[str], recipe: FeatureRecipe, batch_size: int
                    ) -> tuple[dict[str, keras.Model], dict[str, np.ndarray], dict[str, Any]]:
    models, probs, info = {}, {}, {"histories": {}}
    source = None
    if any(name in list_feature_methods() for name in names):
        source = (_features(run.model, inputs.source_train.images, batch_size), inputs.source_train.labels)
    for name in names:
        if name in BN_METHODS:
            models[name], probs[name] = aligned, _probs(head_of_run(aligned), target_features)
            continue
        if name == "shot":
            head = head_of_run(aligned)
            info["histories"][name] = _summary(shot(head, target_features, recipe))
        else:
            init = head_of_run(aligned) if recipe.head_init == "run" else None
            trained = train_head(name, *source, target_features, len(run.class_names), recipe, init=init)
            head = trained.head
            info["histories"][name] = _summary(trained.history)
        models[name], probs[name] = attach_head(aligned, head, f"{run.model.name}_{name}"), _probs(head,
                                                                                                  target_features)
    return models, probs, info


def _summary(history: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {key: {"first": values[0], "last": values[-1]} for key, values in history.items() if values}


# --- the job ----------------------------------------------------------------------------------------------------


def source_statistics(run: FinishedRun, source_train: DomainData | None, batch_size: int
                      ) -> dict[str, batchnorm.Moments] | None:
    """The run's kept source BatchNorm statistics, else measured on its training images (and kept), else None."""
    path = run.path / SOURCE_STATS_FILE
    if path.is_file():
        return batchnorm.load_moments(path)
    if source_train is None:
        return None
    moments = source_input_moments(run.model, source_train.images, batch_size)
    batchnorm.save_moments(path, moments)
    logger.info("kept the source BatchNorm statistics in %s for source-free adaptation", path)
    return moments


def load_inputs(run: FinishedRun, target: str, method: str, batch_size: int, max_images: int, seed: int) -> Inputs:
    """Target pixels, and the source splits and statistics `method` needs (None where the data is gone)."""
    target_data = load_unlabeled_domain(target, run, batch_size=batch_size, max_images=max_images, seed=seed)
    needs_stats, needs_source = _needs(method)
    kept = (run.path / SOURCE_STATS_FILE).is_file()
    train = None
    if needs_source or (needs_stats and not kept):
        train = load_source_split(run, "train", batch_size=batch_size, max_images=max_images, seed=seed)
    moments = source_statistics(run, train, batch_size) if needs_stats else None
    return Inputs(target_data.images, train, None, moments)


def run_adapt(model_path: str | Path, config: AdaptCommandConfig | str | None = None, *,
              recipe: FeatureRecipe | None = None, **settings: Any) -> Path:
    """`tftransfer adapt`: writes MODEL adapted to the (unlabeled) target images as a new run that export ships.

    Settings come as an AdaptCommandConfig or as its fields by keyword (`target="photos/"`, `method="shot"`; a
    string second argument is the target). `recipe` overrides the whole FeatureRecipe (its steps, shot_steps,
    head_init and seed then come from the settings). The new run (next to MODEL, default name <model>-<method>)
    has the adapted model.keras, the original run's config (with the new name), split and labels, and
    adaptation.json saying what was done and, for auto, every candidate's validator scores and why the choice.
    """
    if isinstance(config, str):
        config, settings = None, {"target": config, **settings}
    cfg = command_config(AdaptCommandConfig, config, settings)
    if not cfg.target:
        raise ConfigError("target: give the target images to adapt to (--target DATA)")
    if cfg.method == "auto" and cfg.validator == "dev":
        # DEV scores a candidate on the source validation split, which adapt does not pass its candidates yet;
        # without it every score is NaN and auto would silently keep the unadapted run.
        raise ConfigError("validator: dev is not available to adapt --method auto yet; use entropy or snd")
    recipe = replace(recipe or FeatureRecipe(), steps=cfg.steps, shot_steps=cfg.shot_steps, head_init=cfg.head_init,
                     seed=cfg.seed)
    run = load_run(model_path)
    inputs = load_inputs(run, cfg.target, cfg.method, cfg.batch_size, cfg.max_images, cfg.seed)
    outcome = adapt_in_memory(run, inputs, cfg.method, recipe, cfg.validator, cfg.batch_size)
    out = _write_run(run, outcome, cfg.name or f"{run.path.name}-{cfg.method}", cfg.overwrite)
    write_json(out.path / "adaptation.json", _record(run, cfg.target, inputs, outcome, cfg.method, recipe,
                                                      cfg.validator))
    logger.info("adapted %s to %s with %s (%d target images): %s", run.path, cfg.target, outcome.method,
                len(inputs.target), out.path)
    return out.path


def _write_run(run: FinishedRun, outcome: Outcome, name: str, overwrite: bool) -> RunDir:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    source_run = run.layout
    out = create_run_dir(run.path.parent, name, overwrite=overwrite)
    save_config(replace(load_config(source_run.config), name=name, runs_dir=str(run.path.parent)), out.config)
    for file in (source_run.split, source_run.labels, run.path / SOURCE_STATS_FILE):
        if file.is_file():
            shutil.copy2(file, out.path / file.name)
    model = outcome.model if outcome.method != NO_ADAPTATION else copy_model(outcome.model)
    model.save(out.model)
    return out


def _record(run: FinishedRun, target: str, inputs: Inputs, outcome: Outcome, method: str, recipe: FeatureRecipe,
            validator: str) -> dict[str, Any]:
    record = {"method": outcome.method, "requested": method, "adapted_from": str(run.path), "target": target,
              "target_images": len(inputs.target),
              "aligned_to_source": outcome.method not in ("adabn", NO_ADAPTATION),
              "source_images": None if inputs.source_train is None else len(inputs.source_train.images),
              "recipe": asdict(recipe), **outcome.info}
    if outcome.choice is not None:
        record["auto"] = {"validator": validator, "chosen": outcome.choice.chosen, "reason": outcome.choice.reason,
                          "scores": outcome.choice.scores}
    return record
