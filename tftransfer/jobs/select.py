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
import re
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import yaml

from tftransfer.config.commands import SelectCommandConfig, command_config
from tftransfer.config.experiment import ExperimentConfig, load_config
from tftransfer.core.errors import BackboneError, ConfigError, TfTransferError
from tftransfer.core.io import write_json
from tftransfer.data.pipeline import Datasets, make_split_dataset
from tftransfer.data.sources import Split
from tftransfer.data.specs import source_from_config
from tftransfer.evaluation.transferability import SCORES, score_features
from tftransfer.jobs.fit import feature_cache_spec, prepare_experiment
from tftransfer.model import backbones
from tftransfer.model.classifier import build_inference_fn, get_backbone
from tftransfer.model.cost import model_macs
from tftransfer.model.features import build_feature_extractor
from tftransfer.reporting.select import candidate_label, format_select_markdown, plot_pareto
from tftransfer.runs.layout import RunDir, create_run_dir
from tftransfer.training.phases import phase1_feature_sets

logger = logging.getLogger(__name__)

CANDIDATE_KEYS = ("backbone", "weights", "backbone_kwargs", "image_size")
LATENCY_BATCH = 32


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
    return BackboneCandidate(spec.name, weights, dict(candidate.backbone_kwargs), size)


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


def subsample_data(data: Datasets, max_images: int, seed: int) -> Datasets:
    """The data with at most about `max_images` train + val images (class shares kept); unchanged under it or 0."""
    source = data.source
    total = len(source.train) + (len(source.val) if source.val is not None else 0)
    if not max_images or total <= max_images:
        return data
    rng = np.random.default_rng(seed)
    train = _stratified(source.train, max_images / total, rng)
    val = _stratified(source.val, max_images / total, rng) if source.val is not None else None
    val_ds = make_split_dataset(val, data.image_size, data.batch_size, shuffle=False, cache="none") if val else None
    return replace(data, source=replace(source, train=train, val=val), val=val_ds, train_examples=len(train),
                   val_examples=len(val) if val is not None else 0)


def _latency_ms(infer: Any, pixels: np.ndarray, runs: int) -> float:
    """Median milliseconds of `infer(pixels)` over `runs` calls after a warm-up call."""
    infer(pixels)
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        infer(pixels)
        times.append(1000.0 * (time.perf_counter() - start))
    return float(np.median(times))


def measure_cost(model: keras.Model, infer: Any, image_size: int, latency_runs: int, seed: int) -> dict[str, Any]:
    """Parameters and FLOPs of the backbone, batch-1 and batch-32 latency of pixels -> pooled features."""
    backbone = get_backbone(model)
    macs = model_macs(backbone)
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 255, (LATENCY_BATCH, image_size, image_size, 3)).astype(np.float32)
    batch1 = _latency_ms(infer, pixels[:1], latency_runs)
    batch32 = _latency_ms(infer, pixels, max(2, latency_runs // 4))
    return {"params": int(backbone.count_params()), "macs": macs, "flops": 2 * macs,
            "weights_mb_float32": backbone.count_params() * 4 / 2 ** 20, "latency_batch1_ms": batch1,
            "latency_batch32_ms": batch32, "images_per_second_batch32": LATENCY_BATCH * 1000.0 / batch32}


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


def _score_candidate(candidate: BackboneCandidate, cfg: ExperimentConfig, max_images: int, folds: int,
                     latency_runs: int) -> tuple[dict[str, Any], Datasets]:
    """Features (cached), scores and cost of one candidate: its select.json entry, and the data it saw."""
    started = time.perf_counter()
    exp = prepare_experiment(cfg)
    data = subsample_data(exp.data, max_images, cfg.runtime.seed)
    infer = build_inference_fn(build_feature_extractor(exp.model))
    extract_started = time.perf_counter()
    train_set, val_set = phase1_feature_sets(infer, 1, data, feature_cache_spec(cfg, exp.spec, exp.image_size),
                                             cfg.runtime.seed)
    extract_seconds = time.perf_counter() - extract_started
    sets = [s for s in (train_set, val_set) if s is not None]
    features = np.concatenate([s.features for s in sets])
    labels = np.concatenate([s.labels for s in sets])
    from_cache = all(s.from_cache for s in sets)
    entry: dict[str, Any] = {"backbone": candidate.backbone, "weights": candidate.weights,
                             "backbone_kwargs": dict(candidate.backbone_kwargs), "image_size": exp.image_size,
                             "feature_dim": int(features.shape[1]), "images": int(len(labels)),
                             "available_images": exp.data.train_examples + exp.data.val_examples,
                             "device": f"{exp.info.device.upper()} ({exp.info.precision})",
                             "features_from_cache": from_cache,
                             "extract_seconds": None if from_cache else extract_seconds,
                             "extract_images_per_second": None if from_cache else len(labels) / extract_seconds}
    entry.update(score_features(features, labels, folds=folds, seed=cfg.runtime.seed))
    entry.update(measure_cost(exp.model, infer, exp.image_size, latency_runs, cfg.runtime.seed))
    entry["seconds"] = time.perf_counter() - started
    return entry, data


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
             settings: dict[str, Any]) -> tuple[list[BackboneCandidate], list[ExperimentConfig]]:
    """Every check that needs no images: the criterion, the candidates, their fit configs."""
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
    source_from_config(configs[0].data)  # a data error now, before the run folder exists
    return found, configs


def _run_one(candidate: BackboneCandidate, cfg: ExperimentConfig, index: int, total: int, max_images: int,
             folds: int, latency_runs: int) -> tuple[dict[str, Any], Datasets | None]:
    """One candidate, its errors named after it; one that cannot be built is an entry with its `error`."""
    label = candidate_label(vars(candidate))
    logger.info("select %d/%d: %s", index + 1, total, label)
    try:
        entry, seen = _score_candidate(candidate, cfg, max_images, folds, latency_runs)
    except BackboneError as exc:  # this candidate cannot be built (e.g. a weights file of another alpha): the
        logger.error("candidate %d (%s) left out: %s", index + 1, label, exc)  # others are still compared
        return {**vars(candidate), "error": str(exc)}, None
    except TfTransferError as exc:
        raise type(exc)(f"candidate {index + 1} ({label}): {exc}") from None
    finally:
        keras.backend.clear_session()
    logger.info("  %s: logme %.4f, h_score %.3f, probe %.1f%% +- %.1f%%, %.1f ms (batch 1), %.1f s", label,
                entry["logme"], entry["h_score"], 100 * entry["probe_accuracy"], 100 * entry["probe_accuracy_std"],
                entry["latency_batch1_ms"], entry["seconds"])
    return entry, seen


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
    found, configs = _prepare(data, candidates, cfg.weights, cfg.image_size, rank_by, fit_config, overrides)
    run = create_run_dir(cfg.runs_dir, cfg.name or default_select_name(data))
    entries, seen = [], None
    for i, (candidate, fit_cfg) in enumerate(zip(found, configs)):
        if cfg.budget_seconds and i > 0 and time.perf_counter() - started >= cfg.budget_seconds:
            entries.append({**vars(candidate), "skipped": f"budget of {cfg.budget_seconds:g} s spent"})
            continue
        entry, data_seen = _run_one(candidate, fit_cfg, i, len(found), cfg.max_images, cfg.folds, cfg.latency_runs)
        entries.append(entry)
        seen = data_seen or seen
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


def _write_report(run: RunDir, entries: list[dict[str, Any]], recommendation: dict | None, seen: Datasets | None,
                  data: str, rank_by: str, folds: int, max_images: int, started: float) -> dict[str, Any]:
    """select.json, select.png and select.md in the run folder; returns select.json's content."""
    info = {"spec": data, "classes": 0, "train_images": 0, "val_images": 0, "images": 0, "available_images": 0,
            "subsampled": False, "max_images": max_images}
    if seen is not None:
        train, val = seen.source.train, seen.source.val
        info.update(classes=len(seen.class_names), class_names=seen.class_names, train_images=len(train),
                    val_images=len(val) if val is not None else 0,
                    available_images=max(e.get("available_images", 0) for e in entries))
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
