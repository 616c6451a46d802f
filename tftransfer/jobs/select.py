"""`tftransfer select`: rank candidate backbones on the user's own data by expected accuracy and by cost.

For each candidate (backbone, weights, constructor arguments, input size) the pooled features of the data's train
and val images are computed once, through the same feature cache and under the same cache key as phase 1 of
`tftransfer fit` (so fitting the pick afterwards reads them back), then scored by every transferability score in
tftransfer.evaluation.transferability (LogME, H-score, a k-fold linear probe). Cost: parameters, FLOPs from the
Keras graph, the feature pass's images/s, batch-1 and batch-32 latency. The run folder (runs/<name>/, never
overwritten) gets select.json, select.md and select.png (probe accuracy against latency, the Pareto front marked).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
import yaml

from tftransfer.config.commands import SelectCommandConfig, command_config
from tftransfer.config.experiment import ExperimentConfig, load_config
from tftransfer.core.cache import cache_key
from tftransfer.core.errors import BackboneError, ConfigError, TfTransferError
from tftransfer.core.io import write_json
from tftransfer.data.pipeline import make_datasets
from tftransfer.data.sources import DataSource, Split
from tftransfer.data.specs import source_from_config
from tftransfer.evaluation.metrics import time_calls
from tftransfer.evaluation.transferability import SCORES, score_features
from tftransfer.jobs.fit import feature_cache_spec
from tftransfer.model import backbones
from tftransfer.model.classifier import build_inference_fn, build_model, get_backbone
from tftransfer.model.cost import folded_params, model_macs
from tftransfer.model.features import build_feature_extractor
from tftransfer.reporting.select import candidate_label, format_select_markdown, plot_pareto
from tftransfer.runs.layout import RunDir, create_run_dir
from tftransfer.runtime import RuntimeInfo, configure_runtime
from tftransfer.training.phases import FeatureCacheSpec, cached_clean_feature_sets, phase1_feature_sets

logger = logging.getLogger(__name__)

CANDIDATE_KEYS = ("backbone", "weights", "backbone_kwargs", "image_size")
LATENCY_BATCH = 32
COST_VERSION = 1  # bump when measure_cost measures differently: older cached costs are then measured again


@dataclass(frozen=True)
class BackboneCandidate:
    """One backbone to compare: a name from `tftransfer backbones`, its weights, constructor arguments and size
    (0: the backbone's default)."""

    backbone: str
    weights: str = "imagenet"
    backbone_kwargs: dict = field(default_factory=dict)
    image_size: int = 0


# ---------------------------------------------------------------------------------------------------------------
# Candidates: a comma-separated list of names, or a YAML list of {backbone, weights, backbone_kwargs, image_size}


def _entry_from_mapping(entry: Any, where: str, base: Path | None) -> BackboneCandidate:
    if isinstance(entry, str):
        entry = {"backbone": entry}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(CANDIDATE_KEYS)}, got {entry!r}")
    unknown = sorted(set(map(str, entry)) - set(CANDIDATE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {', '.join(map(repr, unknown))}; a candidate takes "
                          f"{', '.join(CANDIDATE_KEYS)}")
    if not isinstance(entry.get("backbone"), str) or not entry["backbone"].strip():
        raise ConfigError(f"{where}.backbone: a backbone name is required (see `tftransfer backbones`)")
    weights = entry.get("weights", "imagenet")
    if not isinstance(weights, str) or not weights.strip():
        raise ConfigError(f"{where}.weights: expected imagenet, none or a weights file, got {weights!r}")
    if weights.lower() not in ("imagenet", "none") and base is not None and not Path(weights).is_absolute():
        weights = str(base / weights) if (base / weights).is_file() else weights  # relative to the YAML file
    kwargs = entry.get("backbone_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"{where}.backbone_kwargs: expected a mapping such as {{alpha: 0.35}}, got {kwargs!r}")
    size = entry.get("image_size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigError(f"{where}.image_size: expected a positive integer (0: the backbone's default), got "
                          f"{size!r}")
    return BackboneCandidate(entry["backbone"].strip(), weights.strip(), dict(kwargs), size)


def _read_candidates_yaml(path: Path) -> list[BackboneCandidate]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the candidates: {exc}") from None
    if isinstance(data, Mapping) and set(data) == {"candidates"}:
        data = data["candidates"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected a non-empty list of candidates ({{backbone, weights, "
                          "backbone_kwargs, image_size}} each)")
    return [_entry_from_mapping(e, f"{path}: candidates[{i}]", path.parent) for i, e in enumerate(data)]


def _from_names(text: str, weights: str, image_size: int) -> list[BackboneCandidate]:
    """'mobilenetv2,efficientnetb0@224' -> candidates (NAME@SIZE sets that candidate's size)."""
    found = []
    for i, item in enumerate(p.strip() for p in text.split(",")):
        name, _, size = item.partition("@")
        if not name:
            raise ConfigError(f"--candidates: entry {i + 1} of {text!r} is empty")
        if size and not size.isdigit():
            raise ConfigError(f"--candidates: {item!r}: the size after @ must be an integer number of pixels")
        found.append(BackboneCandidate(name, weights, {}, int(size) if size else image_size))
    return found


def parse_candidates(candidates: str | Path | Sequence[Any], weights: str = "imagenet",
                     image_size: int = 0) -> list[BackboneCandidate]:
    """Candidates from a comma-separated string of names (`weights` and `image_size` for each), a YAML file, or a
    list of names, mappings or BackboneCandidate; each is checked (name, size, weights file) before any work."""
    if isinstance(candidates, Path) or (isinstance(candidates, str) and candidates.strip().endswith((".yaml", ".yml"))):
        path = Path(candidates)
        if not path.is_file():
            raise ConfigError(f"--candidates: file not found: {path}")
        found, where = _read_candidates_yaml(path), str(path)
    elif isinstance(candidates, str):
        found, where = _from_names(candidates, weights, image_size), "--candidates"
    else:
        found = [c if isinstance(c, BackboneCandidate) else _from_names(c, weights, image_size)[0]
                 if isinstance(c, str) else _entry_from_mapping(c, f"candidates[{i}]", None)
                 for i, c in enumerate(candidates)]
        where = "candidates"
    if not found:
        raise ConfigError(f"{where}: no candidates given")
    return [_checked(c, f"{where}: candidate {i + 1} ({c.backbone})") for i, c in enumerate(found)]


def _checked(candidate: BackboneCandidate, where: str) -> BackboneCandidate:
    """The candidate with its backbone's canonical name and its size resolved; errors name `where`."""
    try:
        spec = backbones.get_backbone_spec(candidate.backbone)
        size = candidate.image_size or spec.default_size
        backbones.validate_image_size(spec, size)
    except BackboneError as exc:
        raise BackboneError(f"{where}: {exc}") from None
    weights = candidate.weights
    if weights.lower() in ("imagenet", "none"):
        weights = weights.lower()
    elif not Path(weights).expanduser().is_file():
        raise ConfigError(f"{where}: weights file not found: {weights} (imagenet, none or a .h5/.weights.h5/.keras "
                          "file)")
    kwargs = dict(candidate.backbone_kwargs)
    alpha = backbones.alpha_from_weights_name(spec, None if weights == "none" else weights, kwargs)
    if alpha is not None:  # as fit does, so the recommended fit command builds what was scored
        kwargs["alpha"] = alpha
    return BackboneCandidate(spec.name, weights, kwargs, size)


# ---------------------------------------------------------------------------------------------------------------
# One candidate: features through the feature cache, scores, cost


def _stratified(split: Split, keep: float, rng: np.random.Generator) -> Split:
    """About `keep` of the split's examples, the same share of every class (at least 2 each), in source order."""
    labels = np.asarray(split.labels)
    chosen = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        take = min(len(rows), max(2, int(round(len(rows) * keep))))
        chosen.append(rng.choice(rows, take, replace=False))
    return split.subset(np.sort(np.concatenate(chosen)))


def subsample_source(source: DataSource, max_images: int, seed: int) -> DataSource:
    """The data with at most about `max_images` train + val images (class shares kept); unchanged under it or 0."""
    total = len(source.train) + (len(source.val) if source.val is not None else 0)
    if not max_images or total <= max_images:
        return source
    rng = np.random.default_rng(seed)
    train = _stratified(source.train, max_images / total, rng)
    val = _stratified(source.val, max_images / total, rng) if source.val is not None else None
    return replace(source, train=train, val=val)


def _latency_ms(infer: Any, pixels: np.ndarray, runs: int) -> float:
    """Median milliseconds of `infer(pixels)` over `runs` calls after a warm-up call."""
    return float(np.median(time_calls(infer, [pixels], max(runs, 1))))


def measure_cost(model: keras.Model, infer: Any, image_size: int, latency_runs: int, seed: int) -> dict[str, Any]:
    """Parameters, FLOPs and converted sizes of the backbone, batch-1 and batch-32 latency of pixels -> pooled
    features. The sizes are estimates from the weights (no file is written): float32 variables for the SavedModel
    (its graph adds a few MB), BatchNormalization folded for TFLite (docs/benchmarks.md compares both with files)."""
    backbone = get_backbone(model)
    macs = model_macs(backbone)
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 255, (LATENCY_BATCH, image_size, image_size, 3)).astype(np.float32)
    batch1 = _latency_ms(infer, pixels[:1], latency_runs)
    batch32 = _latency_ms(infer, pixels, max(2, latency_runs // 4))
    params = int(backbone.count_params())
    return {"params": params, "macs": macs, "flops": 2 * macs, "weights_mb_float32": params * 4 / 2 ** 20,
            "saved_model_variables_mb_estimate": params * 4 / 2 ** 20,
            "tflite_float32_mb_estimate": folded_params(backbone) * 4 / 2 ** 20,
            "latency_batch1_ms": batch1, "latency_batch32_ms": batch32,
            "images_per_second_batch32": LATENCY_BATCH * 1000.0 / batch32,
            "cost_measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _cost_cache_path(cache: FeatureCacheSpec, info: RuntimeInfo, latency_runs: int) -> Path:
    """Where a candidate's measured cost is kept: keyed like its features, plus this machine and the timing
    settings, so a warm select re-reads what the cold one measured here instead of rebuilding the backbone."""
    parts = {**cache.key_parts, "what": f"select cost {COST_VERSION}", "host": platform.node(),
             "cpus": os.cpu_count(), "device": info.device, "precision": info.precision, "gpus": info.gpus,
             "latency_runs": latency_runs, "latency_batch": LATENCY_BATCH, "tensorflow": tf.__version__}
    return cache.cache_dir / "select-cost" / f"{cache_key(parts)}.json"


def _read_cost(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as exc:  # a damaged entry is measured again, not fatal
        logger.warning("ignoring unreadable cost cache %s: %s", path, exc)
        return None


def _build_and_measure(cfg: ExperimentConfig, spec: backbones.BackboneSpec, image_size: int, source: DataSource,
                       cache: FeatureCacheSpec, features: Any, cost: dict | None,
                       latency_runs: int) -> tuple[Any, dict[str, Any], float | None]:
    """Builds the candidate (as fit does: runtime first, then the model) for what the caches lack: its features,
    its cost. Returns the feature sets, the cost, and the seconds of the feature pass (None when cached)."""
    info = configure_runtime(cfg.runtime)
    weights = None if cfg.model.weights.lower() == "none" else cfg.model.weights
    with info.scope():
        backbone = backbones.build_backbone(spec, image_size, weights, **cfg.model.backbone_kwargs)
        model = build_model(cfg.model, spec, len(source.class_names), image_size, backbone=backbone)
    infer = build_inference_fn(build_feature_extractor(model))
    extract_seconds = None
    if features is None:
        data = make_datasets(cfg.data, source, image_size, seed=cfg.runtime.seed, has_gpu=info.device == "gpu")
        started = time.perf_counter()
        features = phase1_feature_sets(infer, 1, data, cache, cfg.runtime.seed)
        extract_seconds = time.perf_counter() - started
    if cost is None:
        cost = measure_cost(model, infer, image_size, latency_runs, cfg.runtime.seed)
    return features, cost, extract_seconds


def _score_candidate(candidate: BackboneCandidate, cfg: ExperimentConfig, source: DataSource, info: RuntimeInfo,
                     folds: int, latency_runs: int) -> dict[str, Any]:
    """Features, scores and cost of one candidate (its select.json entry). Features and cost come from the caches
    when a select or fit before measured them: a warm candidate builds no model at all."""
    started = time.perf_counter()
    spec = backbones.get_backbone_spec(candidate.backbone)
    image_size = candidate.image_size
    cache = feature_cache_spec(cfg, spec, image_size)
    features = cached_clean_feature_sets(source, cache, cfg.runtime.seed)
    cost_path = _cost_cache_path(cache, info, latency_runs)
    cost = _read_cost(cost_path)
    cost_from_cache = cost is not None
    extract_seconds = None
    if features is None or cost is None:
        features, cost, extract_seconds = _build_and_measure(cfg, spec, image_size, source, cache, features, cost,
                                                             latency_runs)
    if not cost_from_cache:
        cost_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(cost_path, cost)
    sets = [s for s in features if s is not None]
    vectors = np.concatenate([s.features for s in sets])
    labels = np.concatenate([s.labels for s in sets])
    entry: dict[str, Any] = {"backbone": candidate.backbone, "weights": candidate.weights,
                             "backbone_kwargs": dict(candidate.backbone_kwargs), "image_size": image_size,
                             "feature_dim": int(vectors.shape[1]), "images": int(len(labels)),
                             "device": f"{info.device.upper()} ({info.precision})",
                             "features_from_cache": extract_seconds is None,
                             "extract_seconds": extract_seconds,
                             "extract_images_per_second": len(labels) / extract_seconds if extract_seconds else None,
                             "cost_from_cache": cost_from_cache}
    entry.update(score_features(vectors, labels, folds=folds, seed=cfg.runtime.seed))
    entry.update(cost)
    entry["seconds"] = time.perf_counter() - started
    return entry


def candidate_config(candidate: BackboneCandidate, data: str, base: ExperimentConfig | None,
                     settings: Mapping[str, Any]) -> ExperimentConfig:
    """The fit config of a candidate: the base config's data and runtime settings, the candidate's model."""
    values = {"data.path": data, "model.backbone": candidate.backbone, "model.weights": candidate.weights,
              "model.backbone_kwargs": dict(candidate.backbone_kwargs), "data.image_size": candidate.image_size,
              "export.enabled": False, **settings}
    cfg = base if base is not None else load_config()
    try:
        return load_config(None, values={**_flat(cfg), **values})
    except ConfigError as exc:
        raise ConfigError(f"candidate {candidate.backbone}: {exc}") from None


def _flat(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config's data and runtime keys as dotted values (what decides the split and the cached features)."""
    found = {}
    for section in ("data", "runtime"):
        for key, value in vars(getattr(cfg, section)).items():
            if key != "augment":
                found[f"{section}.{key}"] = value
    return found


# ---------------------------------------------------------------------------------------------------------------
# Ranking, Pareto front, recommendation


def rank_candidates(entries: list[dict[str, Any]], rank_by: str) -> None:
    """Sets each scored entry's `rank` (1 = best `rank_by`, ties to the lower latency) and `pareto` (no other
    candidate has both a higher probe accuracy and a lower batch-1 latency); sorts `entries` by rank in place."""
    scored = [e for e in entries if e.get(rank_by) is not None and np.isfinite(e[rank_by])]
    scored.sort(key=lambda e: (-e[rank_by], e.get("latency_batch1_ms") or 0.0))
    for rank, entry in enumerate(scored, start=1):
        entry["rank"] = rank
    for entry in scored:
        acc, lat = entry.get("probe_accuracy"), entry.get("latency_batch1_ms")
        entry["pareto"] = acc is not None and lat is not None and not any(
            o is not entry and o.get("probe_accuracy") is not None and o.get("latency_batch1_ms") is not None
            and o["probe_accuracy"] >= acc and o["latency_batch1_ms"] <= lat
            and (o["probe_accuracy"] > acc or o["latency_batch1_ms"] < lat) for o in scored)
    rest = [e for e in entries if e not in scored]
    entries[:] = scored + rest


def fit_command(entry: dict[str, Any], data: str, config: str | Path | None) -> str:
    """The exact `tftransfer fit` command line that trains a candidate on the same data."""
    words = ["tftransfer", "fit"] + (["--config", str(config)] if config else [])
    words += ["--data", data, "--backbone", entry["backbone"], "--weights", entry["weights"],
              "--image-size", str(entry["image_size"])]
    if entry.get("backbone_kwargs"):
        words += ["--set", f"model.backbone_kwargs={json.dumps(entry['backbone_kwargs'])}"]
    return shlex.join(words)


def recommend(entries: list[dict[str, Any]], rank_by: str, data: str, config: str | Path | None) -> dict | None:
    """The rank-1 candidate, why, and the command that trains it; None when nothing was scored."""
    best = next((e for e in entries if e.get("rank") == 1), None)
    if best is None:
        return None
    acc = best.get("probe_accuracy")
    probe = f", probe accuracy {acc:.1%} +- {best['probe_accuracy_std']:.1%}" if acc is not None else ""
    text = (f"{candidate_label(best)}: best {rank_by} ({best[rank_by]:.4g}{probe}, "
            f"{best['latency_batch1_ms']:.1f} ms per image at batch 1, {best['params'] / 1e6:.2f} M parameters)")
    faster = [e for e in entries if e.get("pareto") and e is not best and acc is not None
              and e["latency_batch1_ms"] < best["latency_batch1_ms"]
              and e["probe_accuracy"] >= acc - best["probe_accuracy_std"]]
    if faster:
        quick = min(faster, key=lambda e: e["latency_batch1_ms"])
        text += (f"; {candidate_label(quick)} is {best['latency_batch1_ms'] / quick['latency_batch1_ms']:.1f}x "
                 f"faster within one std of its probe accuracy")
    return {"candidate": candidate_label(best), "text": text, "fit_command": fit_command(best, data, config)}


# ---------------------------------------------------------------------------------------------------------------
# The job


@dataclass
class SelectResult:
    """Where select wrote its page, the ranked candidates and the pick."""

    run_dir: Path
    candidates: list[dict[str, Any]]
    recommendation: dict[str, Any] | None
    report: dict[str, Any]


def default_select_name(data: str) -> str:
    """select_<data name>, safe as a folder name."""
    name = Path(data.rstrip("/").split(":")[-1]).name or "data"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"select_{name}")


def _prepare(data: str, candidates: Any, weights: str, image_size: int, rank_by: str, config: str | Path | None,
             settings: dict[str, Any]) -> tuple[list[BackboneCandidate], list[ExperimentConfig], DataSource]:
    """Every check before the run folder exists: the criterion, the candidates, their fit configs, the data (listed
    once: every candidate's config has the same data settings)."""
    if rank_by not in SCORES:
        raise ConfigError(f"--rank-by: unknown score {rank_by!r}; one of {', '.join(SCORES)}")
    if not data:
        raise ConfigError("--data: give the labelled images to select on")
    found = parse_candidates(candidates, weights=weights, image_size=image_size)
    seen = set()
    for c in found:
        key = json.dumps([c.backbone, c.weights, c.backbone_kwargs, c.image_size], sort_keys=True, default=str)
        if key in seen:
            raise ConfigError(f"candidates: {c.backbone} with weights {c.weights} at {c.image_size} px is listed "
                              "twice")
        seen.add(key)
    base = load_config(config) if config else None
    configs = [candidate_config(c, data, base, settings) for c in found]
    source = source_from_config(configs[0].data)  # a data error now, before the run folder exists
    return found, configs, source


def _run_one(candidate: BackboneCandidate, cfg: ExperimentConfig, index: int, total: int, source: DataSource,
             info: RuntimeInfo, folds: int, latency_runs: int) -> dict[str, Any]:
    """One candidate, its errors named after it; one that cannot be built is an entry with its `error`."""
    label = candidate_label(vars(candidate))
    logger.info("select %d/%d: %s", index + 1, total, label)
    try:
        entry = _score_candidate(candidate, cfg, source, info, folds, latency_runs)
    except BackboneError as exc:  # this candidate cannot be built (e.g. a weights file of another alpha): the
        logger.error("candidate %d (%s) left out: %s", index + 1, label, exc)  # others are still compared
        return {**vars(candidate), "error": str(exc)}
    except TfTransferError as exc:
        raise type(exc)(f"candidate {index + 1} ({label}): {exc}") from None
    finally:
        keras.backend.clear_session()
    logger.info("  %s: logme %.4f, h_score %.3f, probe %.1f%% +- %.1f%%, %.1f ms (batch 1), %.1f s", label,
                entry["logme"], entry["h_score"], 100 * entry["probe_accuracy"], 100 * entry["probe_accuracy_std"],
                entry["latency_batch1_ms"], entry["seconds"])
    return entry


def run_select(data: str, candidates: str | Path | Sequence[Any], config: SelectCommandConfig | None = None,
               **settings: Any) -> SelectResult:
    """`tftransfer select`: every candidate's transferability scores and cost on `data`, ranked by `rank_by`.

    `candidates` is a comma-separated string of names (NAME or NAME@SIZE; `weights` and `image_size` apply to
    them), a YAML file (a list of {backbone, weights, backbone_kwargs, image_size}) or a list of names, mappings or
    BackboneCandidate. Settings come as a SelectCommandConfig or as its fields by keyword (`rank_by="h_score"`);
    an unknown or ill-typed one is a ConfigError naming it. Its `fit_config` is a fit config whose data and runtime
    settings (split, seed, cache) select uses, so `tftransfer fit` with it reuses the features. Candidates not
    started within `budget_seconds` (0: no limit) are listed as skipped; `max_images` (0: all) caps the train + val
    images, class shares kept.
    """
    cfg = command_config(SelectCommandConfig, config, settings)
    started = time.perf_counter()
    rank_by, fit_config = cfg.rank_by, cfg.fit_config
    overrides = {"data.batch_size": cfg.batch_size, "runtime.seed": cfg.seed, "runs_dir": str(cfg.runs_dir)}
    if cfg.cache_dir:
        overrides["runtime.cache_dir"] = cfg.cache_dir
    found, configs, full = _prepare(data, candidates, cfg.weights, cfg.image_size, rank_by, fit_config, overrides)
    source = subsample_source(full, cfg.max_images, cfg.seed)
    _log_data(full, source)
    run = create_run_dir(cfg.runs_dir, cfg.name or default_select_name(data))
    info = configure_runtime(configs[0].runtime)
    entries = []
    for i, (candidate, fit_cfg) in enumerate(zip(found, configs)):
        if cfg.budget_seconds and i > 0 and time.perf_counter() - started >= cfg.budget_seconds:
            entries.append({**vars(candidate), "skipped": f"budget of {cfg.budget_seconds:g} s spent"})
            continue
        entries.append(_run_one(candidate, fit_cfg, i, len(found), source, info, cfg.folds, cfg.latency_runs))
    seen = (full, source) if any("logme" in e for e in entries) else None
    rank_candidates(entries, rank_by)
    recommendation = recommend(entries, rank_by, data, fit_config)
    report = _write_report(run, entries, recommendation, seen, data, rank_by, cfg.folds, cfg.max_images, started)
    if seen is None and any(e.get("error") for e in entries):
        first = next(e for e in entries if e.get("error"))
        raise BackboneError(f"no candidate could be built ({run.path / 'select.json'} lists why); "
                            f"{candidate_label(first)}: {first['error']}")
    if recommendation:
        logger.info("recommendation: %s\n  %s", recommendation["text"], recommendation["fit_command"])
    return SelectResult(run.path, entries, recommendation, report)


def _log_data(full: DataSource, source: DataSource) -> None:
    val = len(source.val) if source.val is not None else 0
    logger.info("data: %d train / %d val examples, %d classes (%s)%s", len(source.train), val,
                len(source.class_names), full.split_method,
                f", a class-stratified subsample of {len(full.train) + (len(full.val) if full.val else 0)}"
                if source is not full else "")


def _write_report(run: RunDir, entries: list[dict[str, Any]], recommendation: dict | None,
                  seen: tuple[DataSource, DataSource] | None,
                  data: str, rank_by: str, folds: int, max_images: int, started: float) -> dict[str, Any]:
    """select.json, select.png and select.md in the run folder; returns select.json's content."""
    info = {"spec": data, "classes": 0, "train_images": 0, "val_images": 0, "images": 0, "available_images": 0,
            "subsampled": False, "max_images": max_images}
    if seen is not None:
        full, source = seen
        train, val = source.train, source.val
        info.update(classes=len(source.class_names), class_names=source.class_names, train_images=len(train),
                    val_images=len(val) if val is not None else 0,
                    available_images=len(full.train) + (len(full.val) if full.val is not None else 0))
        info["images"] = info["train_images"] + info["val_images"]
        info["subsampled"] = info["images"] < info["available_images"]
    devices = sorted({e["device"] for e in entries if e.get("device")})
    report: dict[str, Any] = {"schema_version": 1, "data": info, "rank_by": rank_by, "folds": folds,
                              "device": f"measured on {', '.join(devices) or 'nothing'}", "candidates": entries,
                              "recommendation": recommendation, "run_dir": str(run.path)}
    try:
        plot = plot_pareto(entries, run.path / "select.png")
        report["plot"] = plot.name if plot is not None else None
    except Exception:  # noqa: BLE001  (a plotting failure must not cost the scores)
        logger.exception("could not draw %s", run.path / "select.png")
        report["plot"] = None
    report["seconds"] = time.perf_counter() - started
    write_json(run.path / "select.json", report)
    (run.path / "select.md").write_text(format_select_markdown(report))
    return report
