"""The domain report for people: domain.md from domain.json, and its plots (feature map, corruptions, BN drift)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tftransfer.reporting import run_summary as run_report
from tftransfer.reporting.markdown import table
from tftransfer.reporting.run_summary import save_figure

logger = logging.getLogger(__name__)

DOMAIN_JSON = "domain.json"
DOMAIN_MD = "domain.md"
FEATURE_MAP_PNG = "feature_map_{method}.png"
CORRUPTIONS_PNG = "corruption_accuracy.png"
DRIFT_PNG = "batchnorm_drift.png"
TARGET_CONFUSION_PNG = "target_confusion_matrix.png"
_NA = "n/a"
_TOP_ROWS = 10
# A method adapted to the source itself that loses more than this much source accuracy is flagged.
SELF_CHECK_TOLERANCE = 0.02


# --- formatting ------------------------------------------------------------------------------------------------


def _ok(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and \
        math.isfinite(float(value))


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f}%" if _ok(value) else _NA


def _pts(value: Any) -> str:
    """A change in percentage points, signed."""
    return f"{100 * float(value):+.1f}" if _ok(value) else _NA


def _num(value: Any, digits: int = 3) -> str:
    return f"{float(value):.{digits}f}" if _ok(value) else _NA


def _sig(value: Any) -> str:
    return f"{float(value):.3g}" if _ok(value) else _NA


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    return [*table(header, rows, align), ""]


# --- markdown --------------------------------------------------------------------------------------------------


def _headline(report: Mapping[str, Any]) -> list[str]:
    lines = []
    src = report["source"]["metrics"]
    tgt = report.get("target")
    if tgt and tgt.get("metrics"):
        drop = report["drop"]["accuracy"]
        lines.append(f"- Accuracy {_pct(src['accuracy'])} on the source, {_pct(tgt['metrics']['accuracy'])} on the "
                     f"target ({_pts(-drop)} points).")
    shift = report.get("shift")
    if shift:
        mmd = shift["mmd"]
        verdict = "a shift is detected" if mmd["shift_detected"] else "no shift is detected at the 5% level"
        lines.append(f"- MMD permutation test: p = {_sig(mmd['p_value'])} ({mmd['permutations']} permutations): "
                     f"{verdict}. Proxy A-distance {_num(shift['proxy_a_distance']['value'], 2)} (0: the domains "
                     "look alike, 2: a linear classifier tells every image's domain).")
    adaptation = report.get("adaptation") or {}
    if tgt and tgt.get("metrics") and len(adaptation) > 1:
        best = max(adaptation.items(), key=lambda kv: kv[1].get("accuracy", -1))
        lines.append(f"- Best on the target: {best[0]} ({_pct(best[1].get('accuracy'))}); methods that lose accuracy "
                     "against source-only: "
                     + (", ".join(k for k, v in adaptation.items() if v.get("hurts")) or "none") + ".")
    corr = report.get("corruptions")
    if corr:
        lines.append(f"- Corruption suite: clean accuracy {_pct(corr['clean']['accuracy'])}, mean over "
                     f"{len(corr['results'])} corruptions x severities {corr['severities']}: "
                     f"{_pct(corr['mean']['accuracy'])}.")
    return ["## In short", "", *lines, ""] if lines else []


def _data_section(report: Mapping[str, Any]) -> list[str]:
    rows = [["Source", report["source"]["data"], report["source"]["split"], report["source"]["examples"], "yes"]]
    tgt = report.get("target")
    if tgt:
        rows.append(["Target", tgt["data"], tgt["split"], tgt["examples"], "yes" if tgt["labeled"] else "no"])
    model = report["model"]
    return ["## Data", "", f"Model: `{model['run_dir']}` ({model['num_classes']} classes, {model['image_size']} px, "
            f"batch {model['batch_size']}).", "",
            *_table(["Domain", "Data", "Split", "Images", "Labels"], rows)]


def _accuracy_section(report: Mapping[str, Any]) -> list[str]:
    tgt = report.get("target") or {}
    if not tgt.get("metrics"):
        return []
    s, t = report["source"]["metrics"], tgt["metrics"]
    rows = [[label, fmt(s[key]), fmt(t[key]), _pts(t[key] - s[key]) if fmt is _pct else _num(t[key] - s[key], 4)]
            for label, key, fmt in (("Accuracy", "accuracy", _pct), ("Balanced accuracy", "balanced_accuracy", _pct),
                                    ("Macro-F1", "macro_f1", _pct), ("ECE", "ece", lambda v: _num(v, 4)))]
    lines = ["## Accuracy: source vs target", "", *_table(["Metric", "Source", "Target", "Change"], rows,
                                                          "--- ---: ---: ---:")]
    per_class = report["drop"]["per_class_recall"][:_TOP_ROWS]
    if per_class:
        lines += ["### Classes that lose most", "", *_table(
            ["Class", "Source recall", "Target recall", "Change (points)", "Target images"],
            [[r["class"], _pct(r["source_recall"]), _pct(r["target_recall"]), _pts(-r["drop"]), r["target_support"]]
             for r in per_class], "--- ---: ---: ---: ---:")]
    return lines


def _shift_section(report: Mapping[str, Any]) -> list[str]:
    shift = report.get("shift")
    if not shift:
        return []
    a, mmd, coral = shift["proxy_a_distance"], shift["mmd"], shift["coral"]
    rows = [["Proxy A-distance", f"{_num(a['value'], 3)} +- {_num(a['std'], 3)}",
             f"logistic-regression domain classifier, {a['k']}-fold held-out error {_num(a['error'], 3)} on "
             f"{a['per_domain']} images per domain; 0 = indistinguishable, 2 = separable"],
            ["MMD^2 (unbiased)", _sig(mmd["mmd2"]), f"Gaussian kernel, median bandwidth {_sig(mmd['bandwidth'])}"],
            ["MMD p-value", _sig(mmd["p_value"]), f"{mmd['permutations']} permutations; below 0.05: the features of "
             "the two domains differ"],
            ["CORAL distance", _sig(coral["value"]), f"relative covariance difference {_num(coral['relative'], 3)}"]]
    return ["## Shift in feature space", "", "On the pooled backbone features (the vectors the head sees).", "",
            *_table(["Measure", "Value", "Meaning"], rows, "--- ---: ---")]


def _signals_section(report: Mapping[str, Any]) -> list[str]:
    tgt = report.get("target")
    if not tgt:
        return []
    s, t = report["source"]["signals"], tgt["signals"]
    rows = [["Mean confidence", _pct(s["mean_confidence"]), _pct(t["mean_confidence"])],
            ["Mean entropy (nats)", _num(s["mean_entropy"]), _num(t["mean_entropy"])],
            ["Prediction diversity (1 = all classes evenly)", _num(s["prediction_diversity"]),
             _num(t["prediction_diversity"])],
            ["Predicted class distribution vs source's (total variation)", "0", _num(t["distribution_tv"])]]
    return ["## Label-free signals", "", "Computed from predictions only; they move when the target is shifted.", "",
            *_table(["Signal", "Source", "Target"], rows, "--- ---: ---:")]


def _drift_section(report: Mapping[str, Any]) -> list[str]:
    drift = report.get("batchnorm_drift")
    if not drift:
        return []
    rows = [[r["depth"], r["layer"], _sig(r["target"]["kl"]), _sig(r.get("source", {}).get("kl")),
             _sig(r.get("target_vs_source", {}).get("kl")), _num(r["target"]["mean_shift"], 2)]
            for r in drift[:_TOP_ROWS]]
    return ["## Where the shift lives: BatchNorm drift", "",
            "Per BatchNorm layer, the exact statistics of its input over the data against the statistics it normalises "
            "with (mean per-channel KL divergence of Gaussians). The stored statistics come from the backbone's "
            "pre-training, so the source drifts too; the last KL column compares target with source directly. "
            f"Top {min(_TOP_ROWS, len(drift))} of {len(drift)} layers, by target drift:", "",
            *_table(["Depth", "Layer", "KL target vs stored", "KL source vs stored", "KL target vs source",
                     "Mean shift (stored std)"], rows, "---: --- ---: ---: ---: ---:")]


def _adaptation_section(report: Mapping[str, Any]) -> list[str]:
    adaptation = report.get("adaptation")
    if not adaptation:
        return []
    labeled = bool((report.get("target") or {}).get("labeled"))
    header = ["Method"]
    if labeled:
        header += ["Target accuracy", "Change (points)", "Macro-F1", "ECE"]
    header += ["Mean confidence", "Mean entropy", "Diversity", "Changed predictions", "Source self-check", "Seconds",
               "Verdict"]
    rows = []
    for name, e in adaptation.items():
        sig = e["signals"]
        row = [name]
        if labeled:
            row += [_pct(e.get("accuracy")), _pts(e.get("accuracy_change")), _pct(e.get("macro_f1")),
                    _num(e.get("ece"), 4)]
        check = e.get("source_self_check")
        suspect = check is not None and check["accuracy_change"] < -SELF_CHECK_TOLERANCE
        verdict = "baseline" if name == "source-only" else (
            "**hurts**" if e.get("hurts") else "helps" if labeled and e.get("accuracy_change", 0) > 0 else
            "no change" if labeled else "**suspect**: loses source accuracy" if suspect else
            "unknown without labels")
        row += [_pct(sig["mean_confidence"]), _num(sig["mean_entropy"]), _num(sig["prediction_diversity"]),
                _pct(e["changed_predictions"]), _pts(check["accuracy_change"]) if check else _NA,
                _num(e.get("seconds"), 1), verdict]
        if (e.get("info") or {}).get("collapsed"):
            row[-1] += " (collapsed: fell back)"
        rows.append(row)
    lines = ["## Cheap adaptation", "",
             "Each method adapts to the unlabeled target images and is scored on them. *Source self-check*: the "
             "method adapted to the source's own images, change in source accuracy (points); a method that loses "
             "accuracy there changes the model for reasons other than the domain.", "",
             *_table(header, rows, " ".join(["---", *["---:"] * (len(header) - 2), "---"]))]
    if not labeled:
        lines += ["Without target labels nothing here says which method is right. Be wary of a method that changes "
                  "many predictions, lowers the prediction diversity, or loses accuracy in the source self-check.", ""]
    return lines


def _corruption_section(report: Mapping[str, Any]) -> list[str]:
    corr = report.get("corruptions")
    if not corr:
        return []
    sev = corr["severities"]
    rows = [[name, r["family"], *[_pct(a) for a in r["accuracy"]], _pct(r["mean_accuracy"]),
             _pts(r["relative_error"])] for name, r in corr["results"].items()]
    rows.append(["**mean**", "", *[_pct(np.mean([r["accuracy"][i] for r in corr["results"].values()]))
                                   for i in range(len(sev))], _pct(corr["mean"]["accuracy"]),
                 _pts(corr["mean"]["relative_error"])])
    lines = ["## Corruption suite (source images)", "",
             f"Clean accuracy {_pct(corr['clean']['accuracy'])} on {corr['examples']} images; seed {corr['seed']}. "
             "Relative error: mean error over severities minus the clean error, in points.", "",
             *_table(["Corruption", "Family", *[f"Severity {s}" for s in sev], "Mean", "Relative error"], rows,
                     " ".join(["---", "---", *["---:"] * (len(sev) + 2)]))]
    adapted = corr.get("adaptation")
    if adapted:
        arows = []
        for method, per in adapted.items():
            for name, by_sev in per.items():
                for s, v in by_sev.items():
                    arows.append([name, s, _pct(v["source_only"]), method, _pct(v["accuracy"]),
                                  _pts(v["accuracy"] - v["source_only"])])
        lines += ["### Adaptation under corruption", "",
                  *_table(["Corruption", "Severity", "Source-only", "Method", "Adapted", "Change (points)"], arows,
                          "--- ---: ---: --- ---: ---:")]
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """domain.md from a domain.json dict."""
    lines = ["# Domain report", ""]
    for section in (_headline, _data_section, _accuracy_section, _shift_section, _signals_section, _drift_section,
                    _adaptation_section, _corruption_section):
        lines += section(report)
    plots = report.get("plots") or []
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})\n" for p in plots]
    timings = report.get("timings") or {}
    if timings:
        lines += ["## Timings", "", ", ".join(f"{k} {_num(v, 1)} s" for k, v in timings.items()), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_markdown(report: Mapping[str, Any], out_dir: Path) -> Path:
    """Writes out_dir/domain.md."""
    path = Path(out_dir) / DOMAIN_MD
    path.write_text(render_markdown(report), encoding="utf-8")
    logger.info("wrote %s", path)
    return path


# --- plots -----------------------------------------------------------------------------------------------------


def plot_feature_map(coords: np.ndarray, n_source: int, source_labels: np.ndarray,
                     target_labels: np.ndarray | None, class_names: Sequence[str], path: Path, method: str = "PCA",
                     target_labels_predicted: bool = False) -> Path:
    """2-D map of source (dots) and target (crosses) features, coloured by domain (left) and by class (right)."""
    coords = np.asarray(coords)
    fig = Figure(figsize=(13.0, 5.5))
    ax_dom, ax_cls = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    src, tgt = coords[:n_source], coords[n_source:]
    ax_dom.scatter(src[:, 0], src[:, 1], s=10, c="tab:blue", alpha=0.6, label=f"source ({len(src)})")
    if len(tgt):
        ax_dom.scatter(tgt[:, 0], tgt[:, 1], s=14, c="tab:orange", marker="x", alpha=0.6, label=f"target ({len(tgt)})")
    ax_dom.legend(fontsize=8)
    ax_dom.set_title(f"{method}: coloured by domain")
    cmap = _class_colours(len(class_names))
    ax_cls.scatter(src[:, 0], src[:, 1], s=10, c=cmap[np.asarray(source_labels)], alpha=0.7)
    if len(tgt) and target_labels is not None:
        ax_cls.scatter(tgt[:, 0], tgt[:, 1], s=14, c=cmap[np.asarray(target_labels)], marker="x", alpha=0.7)
    how = "predicted" if target_labels_predicted else "true"
    ax_cls.set_title(f"{method}: coloured by class (dots source, crosses target, {how} class)")
    if len(class_names) <= 12:
        for i, name in enumerate(class_names):
            ax_cls.scatter([], [], c=[cmap[i]], s=20, label=str(name))
        ax_cls.legend(fontsize=7, loc="best")
    for ax in (ax_dom, ax_cls):
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


def _class_colours(n: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return np.asarray([cmap(i % cmap.N) for i in range(n)])


def plot_corruption_accuracy(corruptions: Mapping[str, Any], path: Path) -> Path:
    """Accuracy vs severity (0 = clean) for each corruption, and their mean."""
    sev = [0, *corruptions["severities"]]
    clean = corruptions["clean"]["accuracy"]
    fig = Figure(figsize=(8.0, 5.0))
    ax = fig.add_subplot()
    styles = {"noise": "-", "blur": "--", "weather": ":", "digital": "-."}
    for name, r in corruptions["results"].items():
        ax.plot(sev, [clean, *r["accuracy"]], styles.get(r["family"], "-"), marker="o", markersize=3, label=name)
    mean = [clean, *np.mean([r["accuracy"] for r in corruptions["results"].values()], axis=0)]
    ax.plot(sev, mean, color="black", linewidth=2.5, label="mean")
    ax.set_xlabel("Severity (0 = clean)")
    ax.set_ylabel("Accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(sev)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Accuracy under corruption")
    return save_figure(fig, path)


def plot_batchnorm_drift(drift: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Per-layer drift (KL to the stored statistics) in network order, target and source."""
    rows = sorted(drift, key=lambda r: r["depth"])
    depth = [r["depth"] for r in rows]
    fig = Figure(figsize=(max(7.0, 0.16 * len(rows) + 3), 4.5))
    ax = fig.add_subplot()
    ax.plot(depth, [max(r["target"]["kl"], 1e-6) for r in rows], marker="o", markersize=3, label="target vs stored")
    if rows and "source" in rows[0]:
        ax.plot(depth, [max(r["source"]["kl"], 1e-6) for r in rows], marker="o", markersize=3,
                label="source vs stored")
        ax.plot(depth, [max(r["target_vs_source"]["kl"], 1e-6) for r in rows], marker="o", markersize=3,
                label="target vs source")
    ax.set_yscale("log")
    ax.set_xlabel("BatchNorm layer (network order)")
    ax.set_ylabel("mean per-channel KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("BatchNorm input statistics drift")
    return save_figure(fig, path)


def write_plots(report: Mapping[str, Any], out_dir: Path, *, maps: Mapping[str, np.ndarray],
                source_labels: np.ndarray, target_labels: np.ndarray | None = None,
                target_predicted: np.ndarray | None = None) -> list[Path]:
    """Every plot the report has data for; a plot that fails is logged, never fatal to the report."""
    out_dir = Path(out_dir)
    names = report["model"]["class_names"]
    n_source = len(source_labels)
    jobs = []
    for method, coords in maps.items():
        labels = target_labels if target_labels is not None else target_predicted
        jobs.append(lambda m=method, c=coords, lab=labels: plot_feature_map(
            c, n_source, source_labels, lab, names, out_dir / FEATURE_MAP_PNG.format(method=m),
            method="t-SNE" if m == "tsne" else m.upper(), target_labels_predicted=target_labels is None))
    if report.get("corruptions"):
        jobs.append(lambda: plot_corruption_accuracy(report["corruptions"], out_dir / CORRUPTIONS_PNG))
    if report.get("batchnorm_drift"):
        jobs.append(lambda: plot_batchnorm_drift(report["batchnorm_drift"], out_dir / DRIFT_PNG))
    target_metrics = (report.get("target") or {}).get("metrics")
    if target_metrics:
        jobs.append(lambda: run_report.plot_confusion_matrix(target_metrics["confusion_matrix"], names,
                                                             out_dir / TARGET_CONFUSION_PNG))
    written = []
    for job in jobs:
        try:
            written.append(job())
        except Exception:  # noqa: BLE001
            logger.exception("could not draw a domain plot in %s", out_dir)
    return written
