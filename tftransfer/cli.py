"""The `tftransfer` command line: parse, validate, call one library function, print the outcome."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tftransfer import __version__
from tftransfer.errors import TfTransferError

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes) buries the messages a user needs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _ClickHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        click.echo(f"{prefix}{record.getMessage()}", err=True)


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger("tftransfer")
    if not any(isinstance(h, _ClickHandler) for h in root.handlers):
        root.addHandler(_ClickHandler())
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns library errors meant for users into a one-line `Error: ...` and exit code 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TfTransferError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="tftransfer")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Fine-tune keras.applications backbones on your images and ship them to TF Serving."""
    _setup_logging(verbose)


@main.command("backbones")
@click.option("--details", is_flag=True,
              help="Build every backbone (weights=None) to count parameters and unfreezable blocks (slow).")
@click.argument("names", nargs=-1)
@_user_errors
def backbones_command(details: bool, names: tuple[str, ...]) -> None:
    """List supported backbones: input size, preprocessing, and with --details or NAMES params and blocks."""
    from tftransfer import backbones

    specs = [backbones.get_backbone_spec(n) for n in names] if names else \
        [backbones.get_backbone_spec(n) for n in backbones.list_backbones()]
    if details or names:
        click.echo(f"{'name':<20} {'family':<16} {'size':>5} {'min':>4} {'preprocess':<10} {'params':>13} "
                   f"{'blocks':>6}  top blocks")
        for spec in specs:
            d = backbones.describe_backbone(spec)
            click.echo(f"{spec.name:<20} {spec.family:<16} {spec.default_size:>5} {spec.min_size:>4} "
                       f"{spec.preprocess_mode:<10} {d['params']:>13,} {d['blocks']:>6}  "
                       f"{', '.join(d['top_blocks'])}")
        return
    click.echo(f"{'name':<20} {'family':<16} {'size':>5} {'min':>4} {'preprocess':<10}")
    for spec in specs:
        click.echo(f"{spec.name:<20} {spec.family:<16} {spec.default_size:>5} {spec.min_size:>4} "
                   f"{spec.preprocess_mode:<10}")
    click.echo(f"\n{len(specs)} backbones. Params and unfreezable blocks: tftransfer backbones --details "
               "(or: tftransfer backbones NAME).")


_CONFIG_FLAGS = {  # flag name -> the config key(s) it sets
    "backbone": ("model.backbone",), "data": ("data.path",), "weights": ("model.weights",),
    "epochs": ("phases.head.epochs", "phases.finetune.epochs"), "batch_size": ("data.batch_size",),
    "image_size": ("data.image_size",), "name": ("name",), "precision": ("runtime.precision",),
    "jit": ("runtime.jit",),
}


def _experiment_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that build an experiment config, shared by fit and lr-find."""
    options = [
        click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="YAML experiment config (see configs/); flags and --set override it."),
        click.option("-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key, e.g. --set phases.finetune.epochs=3 (repeatable)."),
        click.option("--backbone", help="Backbone name (see `tftransfer backbones`).  [model.backbone]"),
        click.option("--data", help="Image folder (class subfolders), tfds:<name> or builtin:digits.  [data.path]"),
        click.option("--weights", help="imagenet, none, or a local .h5/.weights.h5/.keras file.  [model.weights]"),
        click.option("--epochs", type=click.IntRange(min=0), help="Epochs of each phase.  [phases.*.epochs]"),
        click.option("--batch-size", type=click.IntRange(min=1), help="Batch size.  [data.batch_size]"),
        click.option("--image-size", type=click.IntRange(min=1), help="Input size in pixels.  [data.image_size]"),
        click.option("--name", help="Run name: runs/<name>/ and saved_models/<name>/.  [name]"),
        click.option("--precision", type=click.Choice(["auto", "float32", "mixed_float16", "mixed_bfloat16"]),
                     help="Compute precision.  [runtime.precision]"),
        click.option("--jit", type=click.Choice(["auto", "on", "off"]), help="XLA compilation.  [runtime.jit]"),
        click.option("--overwrite", is_flag=True,
                     help="Replace an existing run of this name (the old one is kept aside)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _config_from_options(config_path: Path | None, overrides: tuple[str, ...], flags: dict[str, Any]) -> Any:
    from tftransfer.config import load_config

    values = {key: value for flag, value in flags.items() if value is not None for key in _CONFIG_FLAGS[flag]}
    return load_config(config_path, overrides=overrides, values=values)


@main.command("fit")
@_experiment_options
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Continue an interrupted run (runs/<name>) from its last finished epoch, with its own config.")
@click.option("--lr-find", "lr_find", is_flag=True,
              help="Run the learning-rate range test first and train with its suggested rates.")
@click.option("--progress", is_flag=True, help="Show Keras progress bars.")
@_user_errors
def fit_command(config_path: Path | None, overrides: tuple[str, ...], overwrite: bool, resume_dir: Path | None,
                lr_find: bool, progress: bool, **flags: Any) -> None:
    """Fine-tune a backbone in two phases, evaluate it and export a SavedModel for TF Serving."""
    from tftransfer.train import run_fit

    verbose = 1 if progress else 0
    if resume_dir is not None:
        given = [f"--{n.replace('_', '-')}" for n, v in flags.items() if v is not None]
        given += [n for n, v in (("--config", config_path), ("--set", overrides), ("--overwrite", overwrite),
                                 ("--lr-find", lr_find)) if v]
        if given:
            raise click.UsageError(f"--resume continues a run with its saved config; drop {', '.join(given)}")
        _echo_fit_result(run_fit(None, resume=resume_dir, verbose=verbose).metrics)
        return
    cfg = _config_from_options(config_path, overrides, flags)
    if lr_find:
        from tftransfer.lr_find import run_lr_find, with_suggestions

        found = run_lr_find(cfg, overwrite=overwrite)
        click.echo(f"lr-find: {found['suggested']} ({found['run_dir']})")
        cfg = with_suggestions(cfg, found["suggested"])
    _echo_fit_result(run_fit(cfg, overwrite=overwrite, verbose=verbose).metrics)


@main.command("lr-find")
@_experiment_options
@click.option("--phase", "phases", type=click.Choice(["head", "finetune"]), multiple=True,
              help="Phase(s) to test (default both).")
@click.option("--steps", type=click.IntRange(min=10), default=100, show_default=True,
              help="Optimizer steps of the exponential learning-rate ramp.")
@click.option("--min-lr", type=click.FloatRange(min=0, min_open=True), default=1e-7, show_default=True)
@click.option("--max-lr", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@_user_errors
def lr_find_command(config_path: Path | None, overrides: tuple[str, ...], overwrite: bool, phases: tuple[str, ...],
                    steps: int, min_lr: float, max_lr: float, **flags: Any) -> None:
    """Learning-rate range test: loss against an exponentially growing rate, with a suggested rate per phase."""
    if min_lr >= max_lr:
        raise click.BadParameter("--min-lr must be below --max-lr")
    from tftransfer.lr_find import run_lr_find

    cfg = _config_from_options(config_path, overrides, flags)
    found = run_lr_find(cfg, phases=phases or ("head", "finetune"), steps=steps, min_lr=min_lr, max_lr=max_lr,
                        overwrite=overwrite)
    for phase, lr in found["suggested"].items():
        click.echo(f"{phase:<9} suggested learning rate: {lr:.2e}" if lr else f"{phase:<9} no suggestion")
    click.echo(f"plots and lr_find.json: {found['run_dir']}")


def _echo_fit_result(metrics: dict[str, Any]) -> None:
    run = metrics["run"]
    click.echo(f"\nrun: {run['run_dir']}")
    for phase in metrics["phases"]:
        val = phase.get("val") or {}
        acc = f"val accuracy {val['accuracy']:.4f}" if "accuracy" in val else "no validation data"
        click.echo(f"  {phase['name']:<9} {phase['epochs_run']:>3} epochs  {phase['seconds']:7.1f} s  {acc}")
    final = (metrics.get("final") or {}).get("val")
    if final:
        click.echo(f"final val accuracy {final['accuracy']:.4f}  macro-F1 {final['macro_f1']:.4f}")
    export = metrics.get("export")
    if export:
        status = "OK" if export["parity_ok"] else "FAILED"
        click.echo(f"exported: {export['path']}  (parity max abs diff {export['parity_max_abs_diff']:.1e}: {status})")
    click.echo(f"summary: {Path(run['run_dir']) / 'summary.md'}   tensorboard --logdir {Path(run['run_dir']).parent}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
