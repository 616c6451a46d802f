"""Human-readable outputs of a run: summary.md from metrics.json, and the PNG plots it links to."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Figure + savefig need no pyplot, so importing this module never touches the user's matplotlib backend.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tftransfer.reporting.markdown import table

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SUMMARY_FILE = "summary.md"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability.png"
HISTORY_PNG = "history.png"
# Order in which summary.md links the plots that exist in the run directory.
PLOT_FILES = (
    (HISTORY_PNG, "Training history"),
    (CONFUSION_MATRIX_PNG, "Confusion matrix"),
    (RELIABILITY_PNG, "Reliability diagram"),
    ("train_batch.png", "A training batch, augmented as in training"),
    ("top_losses.png", "Most confident mistakes"),
)

_NA = "n/a"
_MAX_LISTED_BLOCKS = 6


# --- number formatting -------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _pct(value: Any) -> str:
    """0.9341 -> '93.4%'."""
    if not _is_number(value) or not math.isfinite(value):
        return _NA
    return f"{100.0 * float(value):.1f}%"


def _num(value: Any, digits: int = 3) -> str:
    if not _is_number(value) or not math.isfinite(value):
        return _NA
    return f"{float(value):.{digits}f}"


def _int(value: Any) -> str:
    """2562 -> '2,562'."""
    if not _is_number(value):
        return _NA
    return f"{int(value):,}"


def _sci(value: Any) -> str:
    """Tiny differences such as parity errors: 2.1e-07."""
    if not _is_number(value) or not math.isfinite(value):
        return _NA
    return f"{float(value):.2g}" if float(value) != 0 else "0"


def _lr(value: Any) -> str:
    if not _is_number(value):
        return _NA
    return f"{float(value):.3g}"


def _seconds(value: Any) -> str:
    if not _is_number(value) or not math.isfinite(value):
        return _NA
    return f"{float(value):.1f} s"


def _rate(value: Any) -> str:
    if not _is_number(value) or not math.isfinite(value):
        return _NA
    return f"{float(value):.1f}"


def _text(value: Any) -> str:
    """Table-safe text: a '|' would split the cell and a newline would end the row."""
    if value is None or value == "":
        return _NA
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> list[str]:
    return table(header, rows, align, escape=False)  # cells come through _text, already escaped


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _blocks(blocks: Any) -> str:
    if not blocks:
        return "none"
    if not isinstance(blocks, (list, tuple)):
        return _text(blocks)
    names = [_text(b) for b in blocks]
    if len(names) > _MAX_LISTED_BLOCKS:
        # Full-backbone fine-tuning lists dozens of blocks; the ends say which part of the network moved.
        return f"{', '.join(names[:3])}, ..., {', '.join(names[-2:])} ({len(names)} blocks)"
    return ", ".join(names)


# --- Markdown ----------------------------------------------------------------------------------------------


def _run_section(metrics: Mapping[str, Any]) -> list[str]:
    run = _mapping(metrics.get("run"))
    timings = _mapping(metrics.get("timings"))
    class_names = run.get("class_names")
    num_classes = run.get("num_classes")
    if num_classes is None and isinstance(class_names, list):
        num_classes = len(class_names)
    classes = _int(num_classes)
    if isinstance(class_names, list) and class_names:
        classes += ": " + ", ".join(_text(n) for n in class_names)
    image_size = run.get("image_size")
    versions = ", ".join(
        f"{label} {_text(run.get(key))}"
        for label, key in (
            ("tftransfer", "tftransfer_version"),
            ("TensorFlow", "tensorflow_version"),
            ("Keras", "keras_version"),
        )
        if run.get(key)
    )
    rows = [
        ["Backbone", _text(run.get("backbone"))],
        ["Weights", _text(run.get("weights"))],
        ["Image size", f"{_int(image_size)} x {_int(image_size)}" if _is_number(image_size) else _NA],
        ["Classes", classes],
        ["Train examples", _int(run.get("train_examples"))],
        ["Validation examples", _int(run.get("val_examples"))],
        ["Run directory", _text(run.get("run_dir"))],
        ["Created", _text(run.get("created"))],
        ["Versions", versions or _NA],
        ["Total time", _seconds(timings.get("total_seconds"))],
    ]
    return ["## Run", "", *_table(["Setting", "Value"], rows), ""]


def _phases_section(metrics: Mapping[str, Any]) -> list[str]:
    phases = [p for p in metrics.get("phases") or [] if isinstance(p, Mapping)]
    lines = ["## Training phases", ""]
    if not phases:
        return [*lines, "No training phase was run.", ""]
    header = [
        "Phase",
        "Epochs",
        "Best epoch",
        "Trainable params",
        "Unfrozen blocks",
        "LR",
        "Seconds",
        "Images/s",
        "Val accuracy",
        "Val macro-F1",
    ]
    rows = []
    for phase in phases:
        val = _mapping(phase.get("val"))
        rows.append(
            [
                _text(phase.get("name")),
                _int(phase.get("epochs_run")),
                _int(phase.get("best_epoch")),
                _int(phase.get("trainable_params")),
                _blocks(phase.get("unfrozen_blocks")),
                _lr(phase.get("learning_rate")),
                _rate(phase.get("seconds")),
                _rate(phase.get("train_images_per_second")),
                _pct(val.get("accuracy")),
                _num(val.get("macro_f1")),
            ]
        )
    align = ["---", "---:", "---:", "---:", "---", "---:", "---:", "---:", "---:", "---:"]
    return [*lines, *_table(header, rows, align), "", *_activation_cache_lines(phases)]


def _activation_cache_lines(phases: Sequence[Mapping[str, Any]]) -> list[str]:
    """Whether phase 2 trained on cached trunk activations, and why (or why not)."""
    lines = []
    for phase in phases:
        cache = phase.get("activation_cache")
        if not isinstance(cache, Mapping):
            continue
        if cache.get("used"):
            lines.append(f"Phase {_text(phase.get('name'))} trained on cached activations "
                         f"({_int(cache.get('views'))} views, {_text(cache.get('reason'))}"
                         f"{', read from the cache' if cache.get('from_cache') else ''}).")
        else:
            lines.append(f"Phase {_text(phase.get('name'))} trained on images: {_text(cache.get('reason'))}.")
    return [*lines, ""] if lines else []


def _confusion_lines(cm: Any, class_names: Sequence[str]) -> list[str]:
    if not isinstance(cm, list) or not cm or not all(isinstance(row, list) for row in cm):
        return []
    size = len(cm)
    names = [_text(n) for n in class_names] if len(class_names) == size else [str(i) for i in range(size)]
    header = ["true \\ predicted", *names]
    rows = []
    for i, row in enumerate(cm):
        # Bold diagonal so the correct predictions stand out in a wide table.
        cells = [f"**{_int(v)}**" if i == j else _int(v) for j, v in enumerate(row)]
        rows.append([f"**{names[i]}**", *cells])
    return [
        "### Confusion matrix",
        "",
        "Rows are true classes, columns are predicted classes.",
        "",
        *_table(header, rows, ["---", *["---:"] * size]),
        "",
    ]


def _classification_lines(val: Mapping[str, Any], fallback_names: Sequence[str],
                          extra_rows: Sequence[Sequence[str]] = ()) -> list[str]:
    """Metric table, per-class table and confusion matrix of one `evaluate.classification_metrics` dict."""
    top_k = _mapping(val.get("top_k_accuracy"))
    k = top_k.get("k")
    rows = [
        ["Examples", _int(val.get("num_examples"))],
        ["Accuracy", _pct(val.get("accuracy"))],
        ["Balanced accuracy", _pct(val.get("balanced_accuracy"))],
        ["Macro-F1", _num(val.get("macro_f1"))],
        [f"Top-{_int(k)} accuracy" if _is_number(k) else "Top-k accuracy", _pct(top_k.get("value"))],
        ["Log loss", _num(val.get("log_loss"), 4)],
        ["ECE (expected calibration error)", _num(val.get("ece"), 4)],
        ["Mean confidence", _pct(val.get("mean_confidence"))],
        *[list(row) for row in extra_rows],
    ]
    lines = [*_table(["Metric", "Value"], rows, ["---", "---:"]), ""]

    per_class = _mapping(val.get("per_class"))
    if per_class:
        pc_rows = []
        for name, scores in per_class.items():
            scores = _mapping(scores)
            pc_rows.append(
                [
                    _text(name),
                    _num(scores.get("precision")),
                    _num(scores.get("recall")),
                    _num(scores.get("f1")),
                    _int(scores.get("support")),
                ]
            )
        lines += [
            "### Per-class",
            "",
            *_table(
                ["Class", "Precision", "Recall", "F1", "Support"], pc_rows, ["---", "---:", "---:", "---:", "---:"]
            ),
            "",
        ]
    names = val.get("class_names") or list(fallback_names) or list(per_class)
    lines += _confusion_lines(val.get("confusion_matrix"), [str(n) for n in names])
    return lines


def _final_section(metrics: Mapping[str, Any]) -> list[str]:
    final = _mapping(metrics.get("final"))
    val = final.get("val")
    lines = ["## Final validation", ""]
    if not isinstance(val, Mapping):
        return [*lines, "No validation data: final metrics are not available.", ""]
    extra = []
    if final.get("eval_images_per_second") is not None:
        extra.append(["Evaluation images/s", _rate(final.get("eval_images_per_second"))])
    names = _mapping(metrics.get("run")).get("class_names") or []
    return [*lines, *_classification_lines(val, names, extra)]


def _export_section(metrics: Mapping[str, Any]) -> list[str]:
    lines = ["## Export", ""]
    export = metrics.get("export")
    if not isinstance(export, Mapping):
        return [*lines, "Export disabled: no SavedModel was written.", ""]
    ok = export.get("parity_ok")
    status = "OK" if ok is True else "**FAILED**" if ok is False else _NA
    rows = [
        ["Path", _text(export.get("path"))],
        ["Version", _int(export.get("version"))],
        ["Parity max abs diff", _sci(export.get("parity_max_abs_diff"))],
        ["Parity tolerance", _sci(export.get("parity_tolerance"))],
        ["Parity", status],
    ]
    lines += [*_table(["Item", "Value"], rows), ""]
    if ok is False:
        lines += [
            (
                "The exported model's outputs differ from the trained model's by more than the tolerance: it was "
                "not published as a version (TF Serving does not see it; it is kept at the path above)."
                if export.get("published") is False else
                "The exported model's outputs differ from the trained model's by more than the tolerance: "
                "do not serve it before finding out why."
            ),
            "",
        ]
    return lines


def _plots_section(run_dir: Path | None) -> list[str]:
    if run_dir is None:
        return []
    present = [(name, title) for name, title in PLOT_FILES if (Path(run_dir) / name).is_file()]
    if not present:
        return []
    lines = ["## Plots", ""]
    for name, title in present:
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return lines


def render_summary_markdown(metrics: Mapping[str, Any], *, run_dir: Path | None = None) -> str:
    """Renders a run's metrics.json dict as Markdown.

    Missing optional parts (export, a skipped phase, no validation data) render as a sentence instead of
    failing. With `run_dir`, plots that exist there are linked by relative path.
    """
    metrics = _mapping(metrics)
    version = metrics.get("schema_version")
    if version is not None and version != SCHEMA_VERSION:
        logger.warning(
            "metrics schema_version %r, expected %d; rendering what is recognisable", version, SCHEMA_VERSION
        )
    name = _mapping(metrics.get("run")).get("name")
    lines = [f"# Run summary: {_text(name) if name else 'unnamed run'}", ""]
    lines += _run_section(metrics)
    lines += _phases_section(metrics)
    lines += _final_section(metrics)
    lines += _adapt_section(metrics)
    lines += _distill_section(metrics)
    lines += _pruning_section(metrics)
    lines += _export_section(metrics)
    lines += _plots_section(run_dir)
    return "\n".join(lines).rstrip("\n") + "\n"


def _adapt_section(metrics: Mapping[str, Any]) -> list[str]:
    """Target-domain results of a run trained with --target: final accuracy, and how label-free model selection
    rules would have chosen against the truth."""
    adapt = metrics.get("adapt")
    if not isinstance(adapt, Mapping):
        return []
    final = _mapping(adapt.get("final"))
    labels = "used only to score" if adapt.get("labeled") else "absent"
    lines = ["## Target domain", "",
             f"Target `{_text(adapt.get('target'))}`: {_int(adapt.get('target_examples'))} images, adaptation "
             f"`{_text(adapt.get('method'))}`; target labels were {labels}.", ""]
    if final:
        lines += [f"Final target accuracy **{_pct(final.get('accuracy'))}**, "
                  f"macro-F1 {_num(final.get('macro_f1'), 4)}.", ""]
    selection = _mapping(adapt.get("selection"))
    if selection:
        rows = [[_text(rule), _int(entry.get("epoch")), _text(entry.get("phase")), _pct(entry.get("target_accuracy"))]
                for rule, entry in ((r, _mapping(e)) for r, e in selection.items())]
        lines += ["Which epoch each model-selection rule picks, and the target accuracy there:", "",
                  *_table(["Rule", "Epoch", "Phase", "Target accuracy"], rows), ""]
    return lines


def _pruning_section(metrics: Mapping[str, Any]) -> list[str]:
    """A pruned phase: its schedule, and the measured sparsity of every kernel it pruned."""
    lines: list[str] = []
    for phase in (p for p in metrics.get("phases") or [] if isinstance(p, Mapping)):
        prune = phase.get("pruning")
        if not isinstance(prune, Mapping):
            continue
        # score/allocation/min_weights: absent in metrics written before they existed
        how = (f" ({_text(prune.get('score'))} score, {_text(prune.get('allocation'))} allocation, kernels of at "
               f"least {_int(prune.get('min_weights'))} weights)") if "score" in prune else ""
        lines += [f"## Pruning (phase {_text(phase.get('name'))})", "",
                  f"Magnitude pruning{how}, polynomial schedule (power {_num(prune.get('power'))}) from step "
                  f"{_int(prune.get('begin_step'))} to {_int(prune.get('end_step'))}, masks updated every "
                  f"{_int(prune.get('frequency'))} steps, target {_pct(prune.get('target_sparsity'))}: "
                  f"{_int(prune.get('zeros'))} of {_int(prune.get('pruned_weights'))} weights of "
                  f"{_int(prune.get('pruned_kernels'))} kernels are zero (**{_pct(prune.get('sparsity'))}**).", ""]
        rows = [[_text(row.get("layer")), _text(row.get("kind")), _int(row.get("weights")), _pct(row.get("sparsity"))]
                for row in (_mapping(r) for r in prune.get("layers") or [])]
        lines += [*_table(["Layer", "Kind", "Weights", "Sparsity"], rows, ["---", "---", "---:", "---:"]), ""]
    return lines


def _distill_section(metrics: Mapping[str, Any]) -> list[str]:
    """A distilled run: the teacher, the settings, and teacher vs student vs the no-teacher baseline on val."""
    distill = metrics.get("distill")
    if not isinstance(distill, Mapping):
        return []
    teacher = _mapping(distill.get("teacher"))
    unlabeled = distill.get("unlabeled_images") or 0
    lines = ["## Distillation", "",
             f"Teacher `{_text(teacher.get('path'))}` ({_text(teacher.get('backbone'))} at "
             f"{_int(teacher.get('image_size'))} px; its own val accuracy {_pct(teacher.get('val_accuracy'))}). "
             f"alpha {_num(distill.get('alpha'))}, temperature {_num(distill.get('temperature'))}, "
             f"{_int(distill.get('views'))} fixed views per image with the teacher's logits computed once"
             f"{' (read from the cache)' if distill.get('views_from_cache') else ''}; "
             f"{_int(distill.get('train_images'))} labelled training images"
             + (f" and {_int(unlabeled)} unlabeled ones (`{_text(distill.get('unlabeled'))}`)" if unlabeled else "")
             + ".", ""]
    rows = []
    for label, key in (("Teacher", None), ("Student (distilled)", "student"),
                       ("Baseline (same student, no teacher)", "baseline")):
        entry = _mapping(_mapping(teacher).get("here")) if key is None else _mapping(distill.get(key))
        if entry:
            rows.append([label, _pct(entry.get("accuracy")), _pct(entry.get("agreement_with_teacher")),
                         _num(entry.get("kl_to_teacher"), 4)])
    if rows:
        lines += ["On this run's validation images:", "",
                  *_table(["Model", "Val accuracy", "Top-1 agreement with teacher", "KL(teacher || model)"], rows),
                  ""]
    if not distill.get("baseline"):
        lines += ["No baseline: `tftransfer distill --train-baseline` (or `--baseline RUN`) adds the same student "
                  "trained without the teacher.", ""]
    return lines


def _write_markdown(folder: Path, render: Callable[[Path], str]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SUMMARY_FILE
    path.write_text(render(folder), encoding="utf-8")  # rendered after mkdir: it links the plots already there
    logger.info("wrote %s", path)
    return path


def write_summary(metrics: Mapping[str, Any], run_dir: Path) -> Path:
    """Writes run_dir/summary.md (linking plots already in run_dir) and returns its path."""
    return _write_markdown(run_dir, lambda folder: render_summary_markdown(metrics, run_dir=folder))


# --- evaluation summaries ----------------------------------------------------------------------------------


def _evaluation_setup(result: Mapping[str, Any]) -> list[str]:
    model = _mapping(result.get("model"))
    data = _mapping(result.get("data"))
    names = model.get("class_names") if isinstance(model.get("class_names"), list) else []
    size = model.get("image_size")
    skipped = data.get("skipped_files")
    rows = [
        ["Model", f"{_text(model.get('path'))} ({_text(model.get('kind'))})"],
        ["Input size", f"{_int(size)} x {_int(size)}" if _is_number(size) else _NA],
        ["Classes", f"{len(names)}: " + ", ".join(_text(n) for n in names) if names else _NA],
        ["Data", _text(data.get("spec"))],
        ["Split", f"{_text(data.get('split'))} ({_text(data.get('split_method'))})"],
        ["Examples evaluated", _int(data.get("num_examples"))],
        ["Files skipped when listing", _int(len(skipped)) if isinstance(skipped, list) else _NA],
        ["Created", _text(result.get("created"))],
    ]
    return ["## Model and data", "", *_table(["Item", "Value"], rows), ""]


def _calibration_section(result: Mapping[str, Any]) -> list[str]:
    calibration = result.get("calibration")
    lines = ["## Calibration: temperature scaling", ""]
    if not isinstance(calibration, Mapping):
        return [*lines, "Temperature scaling was not run.", ""]
    before, after = _mapping(calibration.get("before")), _mapping(calibration.get("after"))
    rows = [
        ["ECE", _num(before.get("ece"), 4), _num(after.get("ece"), 4)],
        ["Log loss (NLL)", _num(before.get("log_loss"), 4), _num(after.get("log_loss"), 4)],
        ["Mean confidence", _pct(before.get("mean_confidence")), _pct(after.get("mean_confidence"))],
    ]
    temperature = calibration.get("temperature")
    lines += [
        f"Temperature **{_num(temperature)}** fitted on {_text(calibration.get('fitted_on'))} "
        f"({_int(calibration.get('fit_examples'))} examples). Dividing the logits by it changes confidences, "
        "never the predicted class, so accuracy is the same before and after.",
        "",
        *_table(["Metric", "Before", "After"], rows, ["---", "---:", "---:"]),
        "",
    ]
    if calibration.get("in_sample"):
        lines += ["The temperature was fitted on the evaluated examples themselves, so the 'after' figures are "
                  "optimistic.", ""]
    return lines


def _speed_section(result: Mapping[str, Any]) -> list[str]:
    timing = _mapping(result.get("timing"))
    latency = _mapping(timing.get("latency"))
    rows = [
        [f"Throughput, batches of {_int(timing.get('batch_size'))} (decode + resize + model)",
         f"{_rate(timing.get('images_per_second'))} images/s"],
        ["Latency per image, batch 1: median", f"{_num(latency.get('p50_ms'), 2)} ms"],
        ["Latency per image, batch 1: 95th percentile", f"{_num(latency.get('p95_ms'), 2)} ms"],
        ["Latency per image, batch 1: mean",
         f"{_num(latency.get('mean_ms'), 2)} ms ({_int(latency.get('runs'))} runs)"],
    ]
    return ["## Speed", "", *_table(["Measure", "Value"], rows, ["---", "---:"]), ""]


def _mistakes_section(result: Mapping[str, Any]) -> list[str]:
    mistakes = [m for m in result.get("mistakes") or [] if isinstance(m, Mapping)]
    lines = ["## Most confident mistakes", ""]
    if not mistakes:
        return [*lines, "No mistakes." if result.get("mistakes") == [] else "Not listed.", ""]
    rows = [
        [str(i + 1), _text(m.get("file")), _text(m.get("true")), _text(m.get("predicted")),
         _pct(m.get("confidence")), _pct(m.get("true_class_probability"))]
        for i, m in enumerate(mistakes)
    ]
    header = ["#", "File", "True", "Predicted", "Confidence", "P(true class)"]
    return [*lines, *_table(header, rows, ["---:", "---", "---", "---", "---:", "---:"]), ""]


def _skipped_section(result: Mapping[str, Any]) -> list[str]:
    skipped = [s for s in _mapping(result.get("data")).get("skipped_files") or [] if isinstance(s, Mapping)]
    if not skipped:
        return []
    rows = [[_text(s.get("file")), _text(s.get("reason"))] for s in skipped]
    return ["## Skipped files", "", *_table(["File", "Reason"], rows), ""]


def render_evaluation_markdown(result: Mapping[str, Any], *, out_dir: Path | None = None) -> str:
    """Renders an evaluation's metrics.json dict (see docs/metrics_schema.md) as Markdown.

    Like `render_summary_markdown`, missing parts render as a sentence; plots in `out_dir` are linked.
    """
    result = _mapping(result)
    model = _mapping(result.get("model"))
    data = _mapping(result.get("data"))
    title = f"# Evaluation: {_text(model.get('name') or model.get('path'))} on {_text(data.get('name'))}"
    lines = [title + (f" ({_text(data.get('split'))})" if data.get("split") else ""), ""]
    lines += _evaluation_setup(result)
    metrics = result.get("metrics")
    lines += ["## Metrics", ""]
    if isinstance(metrics, Mapping):
        names = model.get("class_names") if isinstance(model.get("class_names"), list) else []
        lines += _classification_lines(metrics, names)
    else:
        lines += ["No metrics.", ""]
    lines += _calibration_section(result)
    lines += _speed_section(result)
    lines += _mistakes_section(result)
    lines += _skipped_section(result)
    lines += _plots_section(out_dir)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_evaluation_summary(result: Mapping[str, Any], out_dir: Path) -> Path:
    """Writes out_dir/summary.md for an evaluation (linking plots already in out_dir) and returns its path."""
    return _write_markdown(out_dir, lambda folder: render_evaluation_markdown(result, out_dir=folder))


def write_tensorboard_images(log_dir: Path, images: Mapping[str, Path], step: int = 0,
                             scalars: Mapping[str, float] | None = None) -> Path:
    """Logs PNG files as TensorBoard images (tag = file stem) and optional scalars to an event file in log_dir."""
    import tensorflow as tf  # only here: the rest of this module needs no TensorFlow

    log_dir = Path(log_dir)
    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default():
        for name, path in images.items():
            pixels = tf.io.decode_png(Path(path).read_bytes(), channels=4)
            tf.summary.image(Path(name).stem, pixels[None], step=step)
        for name, value in (scalars or {}).items():
            if _is_number(value) and math.isfinite(value):
                tf.summary.scalar(name, float(value), step=step)
    writer.flush()
    writer.close()
    logger.info("wrote TensorBoard images %s to %s", sorted(Path(n).stem for n in images), log_dir)
    return log_dir


# --- plots -------------------------------------------------------------------------------------------------


def save_figure(fig: Figure, path: Path) -> Path:
    """Writes a matplotlib Figure as PNG (creating the folder) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    logger.info("wrote %s", path)
    return path


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: Path,
    normalize: bool = True,
) -> Path:
    """Saves the confusion matrix (rows true, columns predicted) as a PNG; `normalize` divides each row by its total.

    The figure grows with the number of classes and x labels are rotated, so 30+ classes stay legible.
    """
    counts = np.asarray(cm, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"confusion matrix must be square and non-empty; got shape {counts.shape}")
    n = counts.shape[0]
    if len(class_names) != n:
        raise ValueError(f"confusion matrix is {n} x {n} but there are {len(class_names)} class names")
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        # A class with no true examples has an all-zero row; leave it at 0 rather than divide by zero.
        values = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    else:
        values = counts

    side = max(5.0, 0.45 * n + 3.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)

    label_size = 10 if n <= 10 else 8 if n <= 25 else 7
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(
        [str(c) for c in class_names],
        rotation=45 if n <= 10 else 90,
        ha="right" if n <= 10 else "center",
        fontsize=label_size,
    )
    ax.set_yticklabels([str(c) for c in class_names], fontsize=label_size)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title("Confusion matrix" + (" (counts; colour and % of the true class's row)" if normalize
                                       else " (counts)"))

    if n <= 40:
        cell_size = 10 if n <= 10 else 7 if n <= 20 else 6
        for i in range(n):
            for j in range(n):
                if counts[i, j] == 0:
                    continue  # blank zeros keep large matrices readable
                # The count and, normalised, its share of the row: 0.50 alone hides whether it is 1 of 2 or 50 of 100.
                text = f"{int(counts[i, j])}"
                if normalize:
                    text += f"\n{values[i, j]:.0%}" if n <= 15 else ""
                color = "white" if values[i, j] > 0.5 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=cell_size)
    return save_figure(fig, path)


def _reliability_bins(curve: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, list, list, list[int], Any]:
    """A reliability curve's counts, edges, confidence and accuracy per bin, the non-empty bins, and its ECE."""
    try:
        counts = np.asarray(curve["count"], dtype=np.int64)
        bins = int(curve.get("bins", len(counts)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("curve must be reliability_curve output with 'count', 'confidence' and 'accuracy'") from exc
    edges_in = curve.get("edges")
    edges = np.asarray(np.linspace(0.0, 1.0, bins + 1) if edges_in is None else edges_in, dtype=np.float64)
    conf = list(curve.get("confidence") or [])
    acc = list(curve.get("accuracy") or [])
    if not (len(counts) == len(conf) == len(acc) == bins == len(edges) - 1):
        raise ValueError("curve lists 'count', 'confidence', 'accuracy' and 'edges' have inconsistent lengths")
    filled = [k for k in range(bins) if counts[k] > 0 and conf[k] is not None and acc[k] is not None]
    ece = curve.get("ece")
    if ece is None and counts.sum() > 0:
        ece = sum(abs(acc[k] - conf[k]) * counts[k] for k in filled) / counts.sum()
    return counts, edges, conf, acc, filled, ece


def plot_reliability_diagram(curve: Mapping[str, Any], path: Path) -> Path:
    """Saves a reliability diagram from `evaluate.reliability_curve` output: per-bin accuracy vs. confidence.

    The diagonal is perfect calibration; a lower panel shows how many examples each bin holds.
    """
    counts, edges, conf, acc, filled, ece = _reliability_bins(curve)
    fig = Figure(figsize=(6.0, 7.0))
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax = fig.add_subplot(grid[0])
    hist = fig.add_subplot(grid[1], sharex=ax)
    left = edges[:-1]
    width = np.diff(edges)
    ax.bar(
        left[filled],
        [acc[k] for k in filled],
        width=width[filled],
        align="edge",
        color="tab:blue",
        edgecolor="black",
        linewidth=0.5,
        label="Accuracy",
    )
    # Gap between mean confidence and accuracy: the quantity ECE averages.
    gap_bottom = [min(acc[k], conf[k]) for k in filled]
    gap_height = [abs(conf[k] - acc[k]) for k in filled]
    ax.bar(
        left[filled],
        gap_height,
        bottom=gap_bottom,
        width=width[filled],
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="Gap to confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="Perfect calibration")
    ax.plot(
        [conf[k] for k in filled],
        [acc[k] for k in filled],
        marker="o",
        color="black",
        linewidth=1,
        markersize=3,
        label="Bin (mean confidence, accuracy)",
    )
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("Accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ece_text = f"{float(ece):.4f}" if _is_number(ece) else _NA
    ax.set_title(f"Reliability diagram (ECE = {ece_text})")
    ax.tick_params(labelbottom=False)

    hist.bar(left, counts, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
    hist.set_xlabel("Confidence (max probability)")
    hist.set_ylabel("Examples")
    return save_figure(fig, path)


def _history_groups(history: Mapping[str, Sequence[float]]) -> list[tuple[str, list[str]]]:
    """Groups Keras history keys into panels: ('loss', ['loss', 'val_loss']), ('accuracy', [...]), ..."""
    groups: dict[str, list[str]] = {}
    for key in history:
        base = key.removeprefix("val_")
        groups.setdefault(base, []).append(key)
    # Loss first, then accuracy-like metrics, then anything else in the order Keras logged it.
    order = sorted(groups, key=lambda b: (b != "loss", "acc" not in b))
    return [(base, sorted(groups[base], key=lambda k: k.startswith("val_"))) for base in order]


def plot_history(
    history: Mapping[str, Sequence[float]],
    path: Path,
    phase_boundaries: Sequence[int] = (),
) -> Path:
    """Saves loss/accuracy (train and val) curves over the epochs of all phases, concatenated.

    `phase_boundaries` holds the number of epochs run before each later phase starts (e.g. `[5]` when the
    head phase ran 5 epochs); a vertical line is drawn between those epochs.
    """
    series = {k: [float("nan") if v is None else float(v) for v in vals] for k, vals in history.items() if len(vals)}
    if not series:
        raise ValueError("history is empty: nothing to plot")
    groups = _history_groups(series)
    fig = Figure(figsize=(7.0, 3.0 * len(groups)))
    axes = [fig.add_subplot(len(groups), 1, i + 1) for i in range(len(groups))]
    for ax, (base, keys) in zip(axes, groups):
        for key in keys:
            values = series[key]
            epochs = np.arange(1, len(values) + 1)
            ax.plot(
                epochs,
                values,
                marker="o",
                markersize=3,
                linestyle="--" if key.startswith("val_") else "-",
                label="validation" if key.startswith("val_") else "schedule" if base in ("learning_rate", "lr")
                else "train",
            )
        if base in ("learning_rate", "lr"):
            ax.set_yscale("log")  # schedules span orders of magnitude
        for i, boundary in enumerate(phase_boundaries):
            ax.axvline(boundary + 0.5, color="gray", linestyle=":", label="next phase starts" if i == 0 else None)
        ax.set_ylabel(base.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("Epoch (all phases)")
    axes[0].set_title("Training history")
    for ax in axes:
        # Integer epochs only: fractional ticks on a 3-epoch run read as a bug.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(fig, path)
