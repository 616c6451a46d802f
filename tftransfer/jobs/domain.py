"""The `tftransfer domain` job: how a fitted run fares on another domain, why, and what cheap adaptation buys.

run_domain() loads a run, its source data (the run's held-out split by default) and a target (labeled or not),
computes pooled features and predictions once per domain, then the label-free shift measures (shift.py), the
BatchNorm drift, the corruption suite on the source (corruptions.py) and the adapters (adapters.py), and writes
domain.json, domain.md and plots (report.py) into runs/<name>/domain/.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tftransfer.config.commands import DomainCommandConfig, command_config
from tftransfer.config.experiment import DataConfig
from tftransfer.core.errors import DataError, RunDirError
from tftransfer.core.io import same_path, versioned_dir, write_json
from tftransfer.core.progress import Tracker, track
from tftransfer.domain import adapters as adapters_mod
from tftransfer.domain import corruptions, shift
from tftransfer.domain import corruptions as corruptions_mod
from tftransfer.domain.adapters import adapt
from tftransfer.domain.batchnorm import batchnorm_layers, get_backbone, require_batchnorm
from tftransfer.domain.shift import prediction_signals
from tftransfer.domain.targets import DomainData, load_labeled_domain, load_unlabeled_domain
from tftransfer.evaluation.inference import batches_of, features_and_probs, predict_probabilities
from tftransfer.evaluation.metrics import classification_metrics
from tftransfer.reporting import domain as report_mod
from tftransfer.runs.finished import FinishedRun, load_run
from tftransfer.runs.layout import RunDir

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_MAX_IMAGES = DomainCommandConfig.max_images  # jobs.adapt subsamples as the domain report does


@dataclass
class DomainResult:
    """Where the report went, and its content (domain.json)."""

    out_dir: Path
    report: dict[str, Any]


def _labeled_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "log_loss", "num_examples")}


def _drop(source: dict[str, Any], target: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """Source minus target for the headline metrics, and per-class recall, largest loss first."""
    per_class = []
    for name in class_names:
        s, t = source["per_class"][name], target["per_class"][name]
        if s["support"] and t["support"]:
            per_class.append({"class": name, "source_recall": s["recall"], "target_recall": t["recall"],
                              "drop": s["recall"] - t["recall"], "source_support": s["support"],
                              "target_support": t["support"]})
    per_class.sort(key=lambda r: r["drop"], reverse=True)
    return {"accuracy": source["accuracy"] - target["accuracy"], "macro_f1": source["macro_f1"] - target["macro_f1"],
            "balanced_accuracy": source["balanced_accuracy"] - target["balanced_accuracy"],
            "ece_increase": target["ece"] - source["ece"], "per_class_recall": per_class}


def _method_entry(probs: np.ndarray, labels: np.ndarray | None, class_names: Sequence[str],
                  baseline_probs: np.ndarray, baseline: dict[str, Any] | None) -> dict[str, Any]:
    """One method's target results: metrics with labels, and always the label-free signals against source-only."""

    entry: dict[str, Any] = {"signals": prediction_signals(probs, class_names, reference_probs=baseline_probs)}
    # Share of images whose predicted class the method changed: large values deserve suspicion without labels.
    entry["changed_predictions"] = float(np.mean(probs.argmax(1) != baseline_probs.argmax(1)))
    if labels is not None:
        metrics = _labeled_summary(classification_metrics(labels, probs, class_names))
        entry.update(metrics)
        if baseline is not None:
            entry["accuracy_change"] = metrics["accuracy"] - baseline["accuracy"]
            entry["hurts"] = bool(metrics["accuracy"] < baseline["accuracy"])
    return entry


def _adaptation(run: FinishedRun, methods: Sequence[str], target: DomainData, source: DomainData,
                target_probs: np.ndarray, source_probs: np.ndarray, target_baseline: dict | None,
                source_baseline: dict, batch_size: int, seed: int, self_check: bool) -> dict[str, Any]:
    """Source-only vs each method on the target; with self_check, each method adapted to the source itself."""

    names = run.class_names
    out: dict[str, Any] = {"source-only": _method_entry(target_probs, target.labels, names, target_probs,
                                                        target_baseline)}
    out["source-only"]["seconds"] = 0.0
    with track("adaptation", len(methods) * (2 if self_check else 1), "adaptations") as progress:
        for method in methods:
            logger.info("adaptation: %s on %d target images", method, len(target.images))
            result = adapt(method, run.model, target.images, batch_size=batch_size, seed=seed,
                           reference_probs=target_probs, source_images=source.images)
            progress.advance()
            entry = _method_entry(result.probs, target.labels, names, target_probs, target_baseline)
            entry.update(seconds=result.seconds, info=result.info)
            if self_check:
                # The method "adapted" to the source data itself: a model that only changes when the domain does
                # keeps its source accuracy; one that loses it here will not be trusted on the target either.
                own = adapt(method, run.model, source.images, batch_size=batch_size, seed=seed,
                            reference_probs=source_probs, source_images=source.images)
                progress.advance()
                acc = float(np.mean(own.probs.argmax(1) == source.labels))
                entry["source_self_check"] = {"accuracy": acc,
                                              "accuracy_change": acc - source_baseline["accuracy"]}
            out[method] = entry
    return out


def _corruption_suite(run: FinishedRun, source: DomainData, names: Sequence[str], severities: Sequence[int],
                      batch_size: int, seed: int, methods: Sequence[str],
                      adapt_severities: Sequence[int]) -> dict[str, Any]:
    """Accuracy of the model (and of each adapter at adapt_severities) on the source under each corruption."""
    import tensorflow as tf


    labels = source.labels
    clean_probs = predict_probabilities(run.model, source.images, batch_size)
    clean_acc = float(np.mean(clean_probs.argmax(1) == labels))
    examples = tf.data.Dataset.from_tensor_slices((source.images, labels))
    results: dict[str, Any] = {}
    adapted: dict[str, Any] = {}
    progress = Tracker("corruptions", len(names) * len(severities), "corrupted passes")
    for name in names:
        corruption = corruptions.get_corruption(name)
        accs = []
        for severity in severities:
            ds = corruptions.corrupt_dataset(examples, name, severity, seed).batch(batch_size)
            images = np.concatenate([x.numpy() for x, _ in ds])
            probs = predict_probabilities(run.model, images, batch_size)
            accs.append(float(np.mean(probs.argmax(1) == labels)))
            progress.advance()
            if severity in adapt_severities:
                for method in methods:
                    res = adapt(method, run.model, images, batch_size=batch_size, seed=seed, reference_probs=probs,
                                source_images=source.images)
                    row = adapted.setdefault(method, {}).setdefault(name, {})
                    row[str(severity)] = {"accuracy": float(np.mean(res.probs.argmax(1) == labels)),
                                          "source_only": accs[-1]}
        errors = [1.0 - a for a in accs]
        mean_error = float(np.mean(errors))
        results[name] = {"family": corruption.family, "accuracy": accs, "error": errors,
                         "mean_accuracy": float(np.mean(accs)), "mean_error": mean_error,
                         # Hendrycks & Dietterich's relative corruption error, without their AlexNet normaliser.
                         "relative_error": mean_error - (1.0 - clean_acc),
                         "error_ratio": mean_error / (1.0 - clean_acc) if clean_acc < 1.0 else None}
    progress.finish()
    mean_acc = float(np.mean([r["mean_accuracy"] for r in results.values()]))
    out: dict[str, Any] = {"clean": {"accuracy": clean_acc, "error": 1.0 - clean_acc}, "severities": list(severities),
                           "seed": seed, "examples": int(len(labels)), "results": results,
                           "mean": {"accuracy": mean_acc, "error": 1.0 - mean_acc,
                                    "relative_error": float(np.mean([r["relative_error"] for r in results.values()]))}}
    if adapted:
        out["adaptation"] = adapted
    return out


def _feature_map(source_features: np.ndarray, target_features: np.ndarray | None, tsne: bool,
                 seed: int) -> dict[str, np.ndarray]:
    """2-D embeddings of source (+ target) features: PCA always, t-SNE on request."""
    from sklearn.decomposition import PCA

    stacked = source_features if target_features is None else np.concatenate([source_features, target_features])
    maps = {"pca": PCA(n_components=2, random_state=seed).fit_transform(stacked)}
    if tsne:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(stacked) - 1) // 3)))
        maps["tsne"] = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(
            stacked)
    return maps


def run_domain(model: str | Path, config: DomainCommandConfig | None = None, **settings: Any) -> DomainResult:
    """The domain report of a run directory; see the module docstring.

    Settings come as a DomainCommandConfig or as its fields by keyword (`target="photos/"`, `adapt="all"`); an
    unknown or ill-typed one is a ConfigError naming it. source defaults to the run's own data (its held-out
    split); target is labeled unless target_unlabeled. Without a target, only the corruption suite runs. `adapt`
    methods (adapters.list_adapters) need a target, or adapt_severities to run on corrupted source images.
    """
    cfg = command_config(DomainCommandConfig, config, settings)
    source, target, seed = cfg.source, cfg.target, cfg.seed
    started = time.perf_counter()
    timings: dict[str, float] = {}
    corruption_names = corruptions_mod.resolve_corruptions(cfg.corruptions) if cfg.corruptions else []
    methods = adapters_mod.resolve_adapters(cfg.adapt) if cfg.adapt else []
    _check_request(target, corruption_names, methods, cfg.severities, cfg.adapt_severities)

    run = load_run(model)
    if methods:
        # Fail now, not after minutes of feature extraction: every method here adapts BatchNorm.

        require_batchnorm(run.model, f"--adapt {','.join(methods)}")
    batch_size = int(cfg.batch_size or (run.data_config.batch_size if run.data_config else DataConfig.batch_size))
    source_spec = source or (run.data_config.path if run.data_config else "")
    if not source_spec:
        raise DataError(f"no source data: {run.path}/config.yaml names none; pass --source")

    t0 = time.perf_counter()
    src = _load_source(run, source_spec, source is not None, batch_size, cfg.max_images, seed)
    tgt = _load_target(run, target, cfg.target_unlabeled, batch_size, cfg.max_images, seed) \
        if target is not None else None
    timings["load_data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    src_feat, src_probs = features_and_probs(run.model, src.images, batch_size)
    report = _report_head(run, src, source_spec, src_probs, batch_size, seed)
    tgt_feat = tgt_probs = None
    if tgt is not None:
        tgt_feat, tgt_probs = features_and_probs(run.model, tgt.images, batch_size)
        timings["features"] = time.perf_counter() - t0
        report.update(_target_sections(run, target, tgt, tgt_feat, tgt_probs, src, src_feat, src_probs,
                                       report["source"]["metrics"], methods, batch_size, seed, cfg.folds,
                                       cfg.permutations, cfg.self_check, timings))
    if corruption_names:
        t0 = time.perf_counter()
        report["corruptions"] = _corruption_suite(run, src, corruption_names, list(cfg.severities), batch_size, seed,
                                                  methods, list(cfg.adapt_severities))
        timings["corruptions"] = time.perf_counter() - t0

    out = domain_output_dir(cfg.out_dir if cfg.out_dir is not None else run.path / "domain")
    _write_report(report, out, src, tgt, src_feat, tgt_feat, tgt_probs, cfg.tsne, seed, timings, started)
    return DomainResult(out_dir=out, report=report)


def domain_output_dir(wanted: Path) -> Path:
    """`wanted`, or the next free wanted-2, wanted-3, ... when it holds an earlier report (never replaced); a run
    directory itself is refused (its own files are not a report's)."""
    if RunDir(wanted).config.is_file():
        raise RunDirError(f"{wanted} is a run directory; give another --out (the default is RUN/domain)")
    out = versioned_dir(wanted, lambda folder: (folder / report_mod.DOMAIN_JSON).exists())
    if out != wanted:
        logger.info("%s holds an earlier domain report, kept; writing this one to %s", wanted, out)
    return out


def _check_request(target: str | None, corruption_names: Sequence[str], methods: Sequence[str],
                   severities: Sequence[int], adapt_severities: Sequence[int]) -> None:
    """A DataError for a request that cannot run, before anything is loaded."""
    bad = [s for s in severities if s not in corruptions_mod.SEVERITIES]
    if bad or any(s not in severities for s in adapt_severities):
        raise DataError(f"severities must be among {list(corruptions_mod.SEVERITIES)} (adapt severities among the "
                        f"evaluated ones); got {list(severities)} / {list(adapt_severities)}")
    if target is None and not corruption_names:
        raise DataError("nothing to measure: give a target (--target) and/or corruptions (--corruptions all)")
    if methods and target is None and not adapt_severities:
        raise DataError("adaptation needs target images: give --target, or adapt severities for corrupted source")


def _load_source(run: FinishedRun, source_spec: str, given: bool, batch_size: int, max_images: int,
                 seed: int) -> DomainData:
    """The labeled source images: the run's held-out split of its own data, or every image of other data (its
    training images are not in it, so nothing needs holding out); when not `given`, an error names the config."""
    own = run.data_config.path if run.data_config else ""
    held_out = not given or bool(own and same_path(source_spec, own))
    try:
        src = load_labeled_domain(source_spec, run, held_out=held_out, batch_size=batch_size,
                                  max_images=max_images, seed=seed, what="source")
    except DataError as exc:
        if given:
            raise
        raise DataError(f"{exc} (the run's own data, from its config.yaml; pass --source)") from None
    logger.info("source: %d images of %s (%s)", len(src.images), source_spec,
                f"the run's held-out {src.split} split" if held_out else "all of it: not the run's training data")
    return src


def _load_target(run: FinishedRun, target: str, unlabeled: bool, batch_size: int, max_images: int,
                 seed: int) -> DomainData:
    """The target images, labeled or not; at least two batches of them."""
    if unlabeled:
        tgt = load_unlabeled_domain(target, run, batch_size=batch_size, max_images=max_images, seed=seed)
    else:
        tgt = load_labeled_domain(target, run, held_out=False, batch_size=batch_size, max_images=max_images,
                                  seed=seed, what="target")
    if len(tgt.images) <= batch_size:
        raise DataError(f"target {target}: {len(tgt.images)} usable images make fewer than 2 batches of "
                        f"{batch_size}; the shift measures and adaptation need more images (or a smaller "
                        "--batch-size)")
    return tgt


def _report_head(run: FinishedRun, src: DomainData, source_spec: str, src_probs: np.ndarray, batch_size: int,
                 seed: int) -> dict[str, Any]:
    """domain.json's model and source sections."""
    names = run.class_names
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"run_dir": str(run.path), "image_size": run.image_size, "class_names": names,
                  "num_classes": len(names), "batch_size": batch_size, "seed": seed},
        "source": {"data": source_spec, "split": src.split, "examples": int(len(src.images)),
                   "skipped_files": len(src.skipped), "metrics": classification_metrics(src.labels, src_probs, names),
                   "signals": shift.prediction_signals(src_probs, names)},
    }


def _target_sections(run: FinishedRun, target: str, tgt: DomainData, tgt_feat: np.ndarray, tgt_probs: np.ndarray,
                     src: DomainData, src_feat: np.ndarray, src_probs: np.ndarray, src_metrics: dict[str, Any],
                     methods: Sequence[str], batch_size: int, seed: int, folds: int, permutations: int,
                     self_check: bool, timings: dict[str, float]) -> dict[str, Any]:
    """domain.json's target, drop, shift, batchnorm_drift and adaptation sections; their timings go in `timings`."""
    names = run.class_names
    sections: dict[str, Any] = {
        "target": {"data": target, "labeled": tgt.labeled, "split": tgt.split, "examples": int(len(tgt.images)),
                   "skipped_files": len(tgt.skipped),
                   "signals": shift.prediction_signals(tgt_probs, names, reference_probs=src_probs)}}
    tgt_metrics = None
    if tgt.labeled:
        tgt_metrics = classification_metrics(tgt.labels, tgt_probs, names)
        sections["target"]["metrics"] = tgt_metrics
        sections["drop"] = _drop(src_metrics, tgt_metrics, names)
    t0 = time.perf_counter()
    sections["shift"] = shift.feature_shift(src_feat, tgt_feat, folds=folds, permutations=permutations, seed=seed)
    timings["shift"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    if batchnorm_layers(get_backbone(run.model)):
        sections["batchnorm_drift"] = shift.batchnorm_drift(run.model, batches_of(tgt.images, batch_size),
                                                            batches_of(src.images, batch_size))
    timings["batchnorm_drift"] = time.perf_counter() - t0
    if methods:
        t0 = time.perf_counter()
        sections["adaptation"] = _adaptation(
            run, methods, tgt, src, tgt_probs, src_probs, _labeled_summary(tgt_metrics) if tgt_metrics else None,
            _labeled_summary(src_metrics), batch_size, seed, self_check)
        timings["adaptation"] = time.perf_counter() - t0
    return sections


def _write_report(report: dict[str, Any], out: Path, src: DomainData, tgt: DomainData | None,
                  src_feat: np.ndarray, tgt_feat: np.ndarray | None, tgt_probs: np.ndarray | None, tsne: bool,
                  seed: int, timings: dict[str, float], started: float) -> None:
    """The plots, domain.json (with the timings) and domain.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    maps = _feature_map(src_feat, tgt_feat, tsne, seed)
    plots = report_mod.write_plots(report, out, maps=maps, source_labels=src.labels,
                                   target_labels=tgt.labels if tgt is not None else None,
                                   target_predicted=tgt_probs.argmax(1) if tgt_probs is not None else None)
    report["plots"] = [p.name for p in plots]
    timings["plots"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    report["timings"] = timings
    write_json(out / report_mod.DOMAIN_JSON, report)
    report_mod.write_markdown(report, out)
    logger.info("domain report: %s (%.0f s)", out / report_mod.DOMAIN_MD, timings["total"])
