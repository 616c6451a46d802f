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

from tftransfer.errors import DataError, RunDirError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_MAX_IMAGES = 2000


@dataclass
class LoadedRun:
    """A fitted run: its Keras model, class names, input size and data settings."""

    path: Path
    model: Any
    class_names: list[str]
    image_size: int
    data_config: Any | None  # config.DataConfig of the run, None when config.yaml cannot be read


@dataclass
class DomainData:
    """One domain's images in memory (float32 [N, S, S, 3] in [0, 255]) with labels in the model's class ids."""

    spec: str
    split: str
    images: np.ndarray
    labels: np.ndarray | None
    files: list[str]
    skipped: list[tuple[str, str]]
    listed: int

    @property
    def labeled(self) -> bool:  # noqa: D102
        return self.labels is not None


@dataclass
class DomainResult:
    """Where the report went, and its content (domain.json)."""

    out_dir: Path
    report: dict[str, Any]


# --- loading ---------------------------------------------------------------------------------------------------


def load_run(path: str | Path) -> LoadedRun:
    """A run directory (or its model.keras) as a LoadedRun; RunDirError when it is not a finished run."""
    from tftransfer.config import load_config
    from tftransfer.errors import ConfigError
    from tftransfer.predict import is_saved_model_dir, load_run_model, read_labels, run_image_size
    from tftransfer.workdir import RunDir

    path = Path(path)
    if path.is_file() and path.suffix == ".keras":
        path = path.parent
    if not path.is_dir():
        raise RunDirError(f"model not found: {path} (pass a run directory, runs/<name>)")
    if is_saved_model_dir(path):
        raise RunDirError(f"{path} is an exported SavedModel; the domain report needs the run directory it came "
                          "from (runs/<name>), whose Keras model exposes features and BatchNorm layers")
    run = RunDir(path)
    model = load_run_model(path)
    names = read_labels(run.labels)
    if int(model.output_shape[-1]) != len(names):
        raise RunDirError(f"{run.labels} lists {len(names)} classes but {run.model} outputs {model.output_shape[-1]}")
    data_config = None
    if run.config.is_file():
        try:
            data_config = load_config(run.config).data
        except ConfigError as exc:
            logger.warning("cannot read the data settings of %s: %s", path, exc)
    return LoadedRun(path=path, model=model, class_names=names, image_size=run_image_size(path),
                     data_config=data_config)


def _held_out(source: Any) -> tuple[Any, str]:
    """The test split, else the validation split, else everything (with a warning)."""
    from tftransfer.evaluate import select_split

    for name in ("test", "val"):
        split = getattr(source, name, None)
        if split is not None and len(split) > 0:
            return split, name
    logger.warning("%s has no held-out split: the source examples include the images the model was trained on, "
                   "so source accuracy is optimistic", source.root)
    return select_split(source, "all")


def _read_pixels(split: Any, image_size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded, resized pixels of a split and the indices of the examples TensorFlow could decode."""
    from tftransfer.predict import make_indexed_dataset

    index, pixels = [], []
    dataset = make_indexed_dataset(image_size, batch_size, paths=split.paths,
                                   images=split.images if split.paths is None else None)
    for idx, batch in dataset:
        index.append(idx.numpy())
        pixels.append(batch.numpy().astype(np.float32))
    if not pixels:
        return np.zeros((0, image_size, image_size, 3), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(pixels), np.concatenate(index)


def _cap(split: Any, max_images: int, seed: int, what: str) -> Any:
    if max_images and len(split) > max_images:
        logger.warning("%s: using a random %d of its %d images (max_images)", what, max_images, len(split))
        return split.subset(np.sort(np.random.default_rng(seed).choice(len(split), max_images, replace=False)))
    return split


def load_labeled_domain(spec: str, run: LoadedRun, *, held_out: bool, batch_size: int, max_images: int,
                        seed: int, what: str) -> DomainData:
    """A labeled data spec (folder, manifest, tfds:, builtin:) with labels mapped onto the model's classes.

    held_out: the run's own held-out split of the data (its val_split/test_split settings), else every example.
    """
    from tftransfer.data.sources import load_source
    from tftransfer.evaluate import align_classes, select_split

    cfg = run.data_config
    if held_out:
        source = load_source(spec, cfg.val_split if cfg else 0.2, False, cfg.tfds_data_dir if cfg else "",
                             test_split=getattr(cfg, "test_split", 0.0), stratify=getattr(cfg, "stratify", False))
        split, name = _held_out(source)
    else:
        source = load_source(spec, 0.0, False, cfg.tfds_data_dir if cfg else "", test_split=0.0)
        split, name = select_split(source, "all")
    mapping = align_classes(run.class_names, source.class_names, f"{what} {spec}")
    split = _cap(split, max_images, seed, f"{what} {spec}")
    images, index = _read_pixels(split, run.image_size, batch_size)
    if len(images) == 0:
        raise DataError(f"{what} {spec}: none of its {len(split)} images could be decoded")
    labels = mapping[np.asarray(split.labels, np.int64)[index]]
    files = [split.keys[i] for i in index]
    return DomainData(spec=spec, split=name, images=images, labels=labels, files=files,
                      skipped=list(source.skipped), listed=len(split))


def load_unlabeled_domain(spec: str, run: LoadedRun, *, batch_size: int, max_images: int, seed: int,
                          what: str = "target") -> DomainData:
    """Every image file under a folder (any layout, labels ignored), or the examples of any other data spec."""
    from tftransfer.adapt.data import unlabeled_folder
    from tftransfer.data.sources import load_source
    from tftransfer.evaluate import select_split

    if Path(spec).is_dir():
        split, skipped = unlabeled_folder(spec, what)
    else:
        source = load_source(spec, 0.0, False, run.data_config.tfds_data_dir if run.data_config else "")
        split, _ = select_split(source, "all")
        skipped = list(source.skipped)
    split = _cap(split, max_images, seed, f"{what} {spec}")
    images, index = _read_pixels(split, run.image_size, batch_size)
    if len(images) == 0:
        raise DataError(f"{what} {spec}: none of its {len(split)} images could be decoded")
    return DomainData(spec=spec, split="all", images=images, labels=None, files=[split.keys[i] for i in index],
                      skipped=skipped, listed=len(split))


# --- computing -------------------------------------------------------------------------------------------------


def features_and_probs(model: Any, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled backbone features (as the phase-1 cache) and softmax probabilities, from one pass."""
    from tftransfer.domain.adapters import batches_of
    from tftransfer.evaluate import stable_softmax
    from tftransfer.features import build_feature_extractor, build_head_model

    extractor, head = build_feature_extractor(model), build_head_model(model)
    feats = [np.asarray(extractor.predict_on_batch(b), np.float32) for b in batches_of(images, batch_size)]
    features = np.concatenate(feats)
    logits = np.concatenate([np.asarray(head.predict_on_batch(f)) for f in batches_of(features, 4 * batch_size)])
    return features, stable_softmax(logits)


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
    from tftransfer.domain.shift import prediction_signals
    from tftransfer.evaluate import classification_metrics

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


def _adaptation(run: LoadedRun, methods: Sequence[str], target: DomainData, source: DomainData,
                target_probs: np.ndarray, source_probs: np.ndarray, target_baseline: dict | None,
                source_baseline: dict, batch_size: int, seed: int, self_check: bool) -> dict[str, Any]:
    """Source-only vs each method on the target; with self_check, each method adapted to the source itself."""
    from tftransfer.domain.adapters import adapt

    names = run.class_names
    out: dict[str, Any] = {"source-only": _method_entry(target_probs, target.labels, names, target_probs,
                                                        target_baseline)}
    out["source-only"]["seconds"] = 0.0
    for method in methods:
        logger.info("adaptation: %s on %d target images", method, len(target.images))
        result = adapt(method, run.model, target.images, batch_size=batch_size, seed=seed,
                       reference_probs=target_probs, source_images=source.images)
        entry = _method_entry(result.probs, target.labels, names, target_probs, target_baseline)
        entry.update(seconds=result.seconds, info=result.info)
        if self_check:
            # The method "adapted" to the source data itself: a model that only changes when the domain does
            # keeps its source accuracy; one that loses it here will not be trusted on the target either.
            own = adapt(method, run.model, source.images, batch_size=batch_size, seed=seed,
                        reference_probs=source_probs, source_images=source.images)
            acc = float(np.mean(own.probs.argmax(1) == source.labels))
            entry["source_self_check"] = {"accuracy": acc, "accuracy_change": acc - source_baseline["accuracy"]}
        out[method] = entry
    return out


def _corruption_suite(run: LoadedRun, source: DomainData, names: Sequence[str], severities: Sequence[int],
                      batch_size: int, seed: int, methods: Sequence[str],
                      adapt_severities: Sequence[int]) -> dict[str, Any]:
    """Accuracy of the model (and of each adapter at adapt_severities) on the source under each corruption."""
    import tensorflow as tf

    from tftransfer.domain import corruptions
    from tftransfer.domain.adapters import adapt, predict_probs

    labels = source.labels
    clean_probs = predict_probs(run.model, source.images, batch_size)
    clean_acc = float(np.mean(clean_probs.argmax(1) == labels))
    examples = tf.data.Dataset.from_tensor_slices((source.images, labels))
    results: dict[str, Any] = {}
    adapted: dict[str, Any] = {}
    for name in names:
        corruption = corruptions.get_corruption(name)
        accs = []
        for severity in severities:
            ds = corruptions.corrupt_dataset(examples, name, severity, seed).batch(batch_size)
            images = np.concatenate([x.numpy() for x, _ in ds])
            probs = predict_probs(run.model, images, batch_size)
            accs.append(float(np.mean(probs.argmax(1) == labels)))
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


def run_domain(model: str | Path, source: str | None = None, target: str | None = None, *,
               target_unlabeled: bool = False, corruptions: str | Sequence[str] = (),
               severities: Sequence[int] = (1, 2, 3, 4, 5), adapt: str | Sequence[str] = (),
               adapt_severities: Sequence[int] = (), out_dir: str | Path | None = None, batch_size: int | None = None,
               max_images: int = DEFAULT_MAX_IMAGES, seed: int = 0, folds: int = 5, permutations: int = 1000,
               tsne: bool = False, self_check: bool = True) -> DomainResult:
    """The domain report of a run directory; see the module docstring.

    source defaults to the run's own data (its held-out split); target is labeled unless target_unlabeled. Without
    a target, only the corruption suite runs. `adapt` methods (adapters.list_adapters) need a target, or
    adapt_severities to run on corrupted source images.
    """
    from tftransfer.domain import adapters as adapters_mod
    from tftransfer.domain import corruptions as corruptions_mod
    from tftransfer.domain import report as report_mod
    from tftransfer.domain import shift
    from tftransfer.workdir import write_json

    started = time.perf_counter()
    timings: dict[str, float] = {}
    corruption_names = corruptions_mod.resolve_corruptions(corruptions) if corruptions else []
    methods = adapters_mod.resolve_adapters(adapt) if adapt else []
    bad = [s for s in severities if s not in corruptions_mod.SEVERITIES]
    if bad or any(s not in severities for s in adapt_severities):
        raise DataError(f"severities must be among {list(corruptions_mod.SEVERITIES)} (adapt severities among the "
                        f"evaluated ones); got {list(severities)} / {list(adapt_severities)}")
    if target is None and not corruption_names:
        raise DataError("nothing to measure: give a target (--target) and/or corruptions (--corruptions all)")
    if methods and target is None and not adapt_severities:
        raise DataError("adaptation needs target images: give --target, or adapt severities for corrupted source")

    run = load_run(model)
    if methods:
        # Fail now, not after minutes of feature extraction: every method here adapts BatchNorm.
        from tftransfer.domain.batchnorm import require_batchnorm

        require_batchnorm(run.model, f"--adapt {','.join(methods)}")
    batch_size = int(batch_size or (run.data_config.batch_size if run.data_config else 32))
    source_spec = source or (run.data_config.path if run.data_config else "")
    if not source_spec:
        raise DataError(f"no source data: {run.path}/config.yaml names none; pass --source")

    t0 = time.perf_counter()
    try:
        src = load_labeled_domain(source_spec, run, held_out=True, batch_size=batch_size, max_images=max_images,
                                  seed=seed, what="source")
    except DataError as exc:
        if source:
            raise
        raise DataError(f"{exc} (the run's own data, from its config.yaml; pass --source)") from None
    tgt = None
    if target is not None:
        if target_unlabeled:
            tgt = load_unlabeled_domain(target, run, batch_size=batch_size, max_images=max_images, seed=seed)
        else:
            tgt = load_labeled_domain(target, run, held_out=False, batch_size=batch_size, max_images=max_images,
                                      seed=seed, what="target")
        if len(tgt.images) <= batch_size:
            raise DataError(f"target {target}: {len(tgt.images)} usable images make fewer than 2 batches of "
                            f"{batch_size}; the shift measures and adaptation need more images (or a smaller "
                            "--batch-size)")
    timings["load_data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    src_feat, src_probs = features_and_probs(run.model, src.images, batch_size)
    from tftransfer.evaluate import classification_metrics

    names = run.class_names
    src_metrics = classification_metrics(src.labels, src_probs, names)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": {"run_dir": str(run.path), "image_size": run.image_size, "class_names": names,
                  "num_classes": len(names), "batch_size": batch_size, "seed": seed},
        "source": {"data": source_spec, "split": src.split, "examples": int(len(src.images)),
                   "skipped_files": len(src.skipped), "metrics": src_metrics,
                   "signals": shift.prediction_signals(src_probs, names)},
    }
    tgt_feat = tgt_probs = tgt_metrics = None
    if tgt is not None:
        tgt_feat, tgt_probs = features_and_probs(run.model, tgt.images, batch_size)
        timings["features"] = time.perf_counter() - t0
        report["target"] = {"data": target, "labeled": tgt.labeled, "split": tgt.split,
                            "examples": int(len(tgt.images)), "skipped_files": len(tgt.skipped),
                            "signals": shift.prediction_signals(tgt_probs, names, reference_probs=src_probs)}
        if tgt.labeled:
            tgt_metrics = classification_metrics(tgt.labels, tgt_probs, names)
            report["target"]["metrics"] = tgt_metrics
            report["drop"] = _drop(src_metrics, tgt_metrics, names)
        t0 = time.perf_counter()
        report["shift"] = shift.feature_shift(src_feat, tgt_feat, folds=folds, permutations=permutations, seed=seed)
        timings["shift"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        from tftransfer.domain.adapters import batches_of
        from tftransfer.domain.batchnorm import batchnorm_layers, get_backbone

        if batchnorm_layers(get_backbone(run.model)):
            report["batchnorm_drift"] = shift.batchnorm_drift(run.model, batches_of(tgt.images, batch_size),
                                                              batches_of(src.images, batch_size))
        timings["batchnorm_drift"] = time.perf_counter() - t0
        if methods:
            t0 = time.perf_counter()
            report["adaptation"] = _adaptation(
                run, methods, tgt, src, tgt_probs, src_probs,
                _labeled_summary(tgt_metrics) if tgt_metrics else None, _labeled_summary(src_metrics), batch_size,
                seed, self_check)
            timings["adaptation"] = time.perf_counter() - t0
    if corruption_names:
        t0 = time.perf_counter()
        report["corruptions"] = _corruption_suite(run, src, corruption_names, list(severities), batch_size, seed,
                                                  methods, list(adapt_severities))
        timings["corruptions"] = time.perf_counter() - t0

    out = Path(out_dir) if out_dir is not None else run.path / "domain"
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
    return DomainResult(out_dir=out, report=report)


# --- adapt: an adapted model as a new run ----------------------------------------------------------------------

SAVEABLE_ADAPTERS = ("adabn", "adabn-aligned")  # the methods that change only stored statistics: a plain model


def run_adapt(model_path: str | Path, target: str, method: str = "adabn", name: str | None = None,
              overwrite: bool = False, batch_size: int = 32, max_images: int = DEFAULT_MAX_IMAGES,
              seed: int = 0) -> Path:
    """`tftransfer adapt`: writes MODEL adapted to the (unlabeled) target images as a new run that export ships.

    The new run (next to MODEL, default name <model>-<method>) has the adapted model.keras, the original run's
    config (with the new name), split and labels, and adaptation.json saying what was done.
    """
    import re
    import shutil
    from dataclasses import replace

    from tftransfer.config import load_config, save_config
    from tftransfer.domain.adapters import adabn_model
    from tftransfer.errors import ConfigError
    from tftransfer.workdir import RunDir, create_run_dir, write_json

    if method not in SAVEABLE_ADAPTERS:
        raise ConfigError(f"--method {method!r}: adapt writes a model only for {', '.join(SAVEABLE_ADAPTERS)} "
                          "(TENT and bn-batch adapt per batch at prediction time; compare them with `domain`)")
    run = load_run(model_path)
    source_run = RunDir(run.path)
    target_data = load_unlabeled_domain(target, run, batch_size=batch_size, max_images=max_images, seed=seed)
    source_images = None
    if method == "adabn-aligned":
        if run.data_config is None:
            raise RunDirError(f"{source_run.config}: needed to find the source data for adabn-aligned")
        source_images = load_labeled_domain(run.data_config.path, run, held_out=True, batch_size=batch_size,
                                            max_images=max_images, seed=seed, what="source").images
    adapted, info = adabn_model(run.model, target_data.images, batch_size, source_images=source_images)
    new_name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{run.path.name}-{method}")
    out = create_run_dir(run.path.parent, new_name, overwrite=overwrite)
    cfg = replace(load_config(source_run.config), name=new_name, runs_dir=str(run.path.parent))
    save_config(cfg, out.config)
    for file in (source_run.split, source_run.labels):
        if file.is_file():
            shutil.copy2(file, out.path / file.name)
    adapted.save(out.model)
    write_json(out.path / "adaptation.json", {
        "method": method, "adapted_from": str(run.path), "target": target, "target_images": len(target_data.images),
        "target_skipped": len(target_data.skipped), "aligned_to_source": source_images is not None,
        "source_images": None if source_images is None else len(source_images),
        "info": {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}})
    logger.info("adapted %s to %s with %s (%d target images): %s", run.path, target, method,
                len(target_data.images), out.path)
    return out.path
