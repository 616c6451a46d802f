"""Learning-rate range test (Smith 2017, fastai's lr_find) for the head phase and the fine-tune phase.

The learning rate grows exponentially from `min_lr` to `max_lr` over `steps` optimizer steps while the training
loss is recorded; the suggestion is the rate where the smoothed loss falls fastest. The model's weights are put
back afterwards, so the test changes nothing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import tensorflow as tf

from tftransfer.config.commands import LrFindCommandConfig, command_config
from tftransfer.config.experiment import ExperimentConfig
from tftransfer.core.io import write_json
from tftransfer.jobs.fit import feature_cache_spec, prepare_experiment
from tftransfer.model.freezing import freeze_backbone, unfreeze_top_blocks
from tftransfer.runs.layout import create_run_dir
from tftransfer.training.augment_step import AugmentingModel, step_augmenter
from tftransfer.training.lr_range import RangeTest, range_test, smooth
from tftransfer.training.phases import head_on_features

logger = logging.getLogger(__name__)


def plot_range_test(test: RangeTest, path: Path) -> Path:
    """Loss against learning rate (log x), the suggestion marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    smoothed = smooth(test.losses)
    ax.plot(test.lrs[: len(smoothed)], smoothed, label="smoothed loss")
    ax.plot(test.lrs, test.losses, alpha=0.3, label="batch loss")
    if test.suggestion:
        ax.axvline(test.suggestion, color="red", linestyle="--", label=f"suggested {test.suggestion:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {test.phase} phase")
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def run_lr_find(cfg: ExperimentConfig, config: LrFindCommandConfig | None = None, overwrite: bool = False,
                **settings: Any) -> dict[str, Any]:
    """`tftransfer lr-find`: range tests into runs/<name>-lr-find/ (JSON, PNG, TensorBoard scalars). Settings come
    as an LrFindCommandConfig or its fields by keyword (`run_lr_find(cfg, phases=("head",), steps=50)`)."""
    ramp = command_config(LrFindCommandConfig, config, settings)
    phases, steps, min_lr, max_lr = ramp.phases, ramp.steps, ramp.min_lr, ramp.max_lr
    exp = prepare_experiment(cfg)
    cfg = exp.cfg
    # With placement model the training batches come un-augmented: the ramp trains through the augmenter as fit does.
    augmenter = step_augmenter(exp.data)
    on_images = exp.model if augmenter is None else AugmentingModel(exp.model, augmenter)
    run = create_run_dir(cfg.runs_dir, f"{cfg.name}-lr-find", overwrite=overwrite)
    results: dict[str, Any] = {}
    num_classes = len(exp.source.class_names)
    for phase in phases:
        if phase == "head":
            freeze_backbone(exp.model)
            if cfg.phases.head.feature_cache:
                inputs = head_on_features(exp.model, cfg.phases.head, exp.data,
                                           feature_cache_spec(cfg, exp.spec, exp.image_size), cfg.runtime.seed)
                model, train = inputs.model, inputs.train
            else:
                model, train = on_images, exp.data.train
        else:
            unfreeze_top_blocks(exp.model, exp.blocks, max(cfg.phases.finetune.unfreeze_blocks, 1))
            model, train = on_images, exp.data.train
        test = range_test(model, train, num_classes, phase, min_lr, max_lr, steps)
        plot_range_test(test, run.path / f"lr_find_{phase}.png")
        with tf.summary.create_file_writer(str(run.logs / f"lr_find_{phase}")).as_default():
            for step, (lr, loss) in enumerate(zip(test.lrs, test.losses)):
                if math.isfinite(loss):
                    tf.summary.scalar("lr_find/loss", loss, step=step)
                    tf.summary.scalar("lr_find/learning_rate", lr, step=step)
        results[phase] = test.to_dict()
    summary = {"config": cfg.name, "steps": steps, "min_lr": min_lr, "max_lr": max_lr,
               "suggested": {p: r["suggested_learning_rate"] for p, r in results.items()}, "phases": results}
    write_json(run.path / "lr_find.json", summary)
    summary["run_dir"] = str(run.path)
    return summary


def with_suggestions(cfg: ExperimentConfig, suggested: dict[str, float | None]) -> ExperimentConfig:
    """The config with each phase's learning rate replaced by the range test's suggestion (where there is one)."""
    phases = cfg.phases
    if suggested.get("head"):
        phases = replace(phases, head=replace(phases.head, learning_rate=suggested["head"]))
    if suggested.get("finetune"):
        phases = replace(phases, finetune=replace(phases.finetune, learning_rate=suggested["finetune"]))
    return replace(cfg, phases=phases)
