"""The `tftransfer` command line: parse, validate, call one library function, print the outcome."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import click

from tftransfer import __version__
from tftransfer.config.commands import (
    SELECT_SCORE_NAMES,
    AdaptCommandConfig,
    CompressReportCommandConfig,
    DomainCommandConfig,
    EvaluateCommandConfig,
    ExportCommandConfig,
    LrFindCommandConfig,
    PredictCommandConfig,
    SelectCommandConfig,
    SettingSpec,
    command_config,
    setting_specs,
)
from tftransfer.config.experiment import ADAPT_METHODS, RECIPES, load_config
from tftransfer.core.errors import TfTransferError
from tftransfer.core.io import storage_error
from tftransfer.core.lazy import lazy, resolve
from tftransfer.core.native_logs import import_tensorflow_quietly, set_log_defaults
from tftransfer.core.progress import ProgressEvent, report_progress_to
from tftransfer.data.probe import report_progress
from tftransfer.model.catalog import builtin_backbones
from tftransfer.runs.records import RunMetrics


# Jobs import TensorFlow: they are named here and imported when a command runs, so --help and config errors are fast.
def _job(target: str) -> Callable[..., Any]:
    """lazy(target), with TensorFlow imported first by core.native_logs, its C++ start-up lines filtered out."""
    call = lazy(target)

    @functools.wraps(call)
    def run(*args: Any, **kwargs: Any) -> Any:
        import_tensorflow_quietly()
        return call(*args, **kwargs)

    return run


run_fit = _job("tftransfer.jobs.fit:run_fit")
run_lr_find = _job("tftransfer.jobs.lr_find:run_lr_find")
with_suggestions = _job("tftransfer.jobs.lr_find:with_suggestions")
run_seeds = _job("tftransfer.jobs.seeds:run_seeds")
render_seeds = _job("tftransfer.jobs.seeds:render_seeds")
run_domain = _job("tftransfer.jobs.domain:run_domain")
run_adapt = _job("tftransfer.jobs.adapt:run_adapt")
run_evaluation = _job("tftransfer.jobs.evaluate:run_evaluation")
export_run = _job("tftransfer.jobs.export:export_run")
run_compress_report = _job("tftransfer.jobs.compress_report:run_compress_report")
predict_files = _job("tftransfer.jobs.predict:predict_files")
inspect_data = _job("tftransfer.data.inspect:inspect_data")
format_report = _job("tftransfer.data.inspect:format_report")
list_backbones = _job("tftransfer.model.backbones:list_backbones")
get_backbone_spec = _job("tftransfer.model.backbones:get_backbone_spec")
describe_backbone = _job("tftransfer.model.backbones:describe_backbone")
run_select = _job("tftransfer.jobs.select:run_select")
run_distill = _job("tftransfer.jobs.distill:run_distill")

# tftransfer.evaluation.transferability.SCORES, first the default (a test ties them; importing it here would load
# scikit-learn for --help).
SELECT_CRITERIA = SELECT_SCORE_NAMES

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes) buries the messages a user needs: a level set before
# any TensorFlow import (the user's own TF_CPP_MIN_LOG_LEVEL is kept).
set_log_defaults()


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


PROBE_BAR_MIN_FILES = 50  # smaller passes finish before a bar would be worth drawing
PROBE_BAR_LABEL_CHARS = 40  # keeps label + bar on one terminal line: a wrapped line breaks the redraw


def _stderr_is_tty() -> bool:
    return click.get_text_stream("stderr").isatty()


def _probe_label(what: str) -> str:
    if len(what) > PROBE_BAR_LABEL_CHARS:
        what = "..." + what[-(PROBE_BAR_LABEL_CHARS - 3):]
    return f"checking {what or 'images'}"


@contextlib.contextmanager
def _probe_progress(enabled: bool | None = None, file: IO[str] | None = None) -> Iterator[None]:
    """While image files are probed, one click progress bar per probing pass on stderr (never stdout).

    `enabled` None means only when stderr is a terminal, so pipes, logs and CI output get no carriage-return noise;
    passes over at most PROBE_BAR_MIN_FILES files get no bar.
    """
    if enabled is None:
        enabled = _stderr_is_tty()
    if not enabled:
        yield
        return
    out = file if file is not None else click.get_text_stream("stderr")
    bar_stack = contextlib.ExitStack()
    bar: Any = None

    def update(done: int, total: int, what: str) -> None:
        nonlocal bar
        if done == 0:  # a new pass; a bar left open by a pass that raised and was caught ends here
            bar_stack.close()
            bar = None
            if total > PROBE_BAR_MIN_FILES:
                bar = bar_stack.enter_context(click.progressbar(length=total, label=_probe_label(what), file=out,
                                                                show_pos=True, show_percent=True))
            return
        if bar is None:
            return
        bar.update(done - bar.pos)
        if done >= total:
            bar_stack.close()
            bar = None

    # the ExitStack finishes a bar cut short by an error, so the error message starts on a line of its own
    with bar_stack, report_progress(update):
        yield


class _ProgressBars:
    """The CLI's tftransfer.core.progress callback on a terminal: one click progress bar per tracked step on stderr,
    the innermost step drawn while steps nest (two bars on one line would garble it)."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        self.open: list[tuple[int, Any, contextlib.ExitStack]] = []  # (step, bar, its exit), innermost last

    def __call__(self, event: ProgressEvent) -> None:
        if event.finished:
            while self.open and any(step == event.step for step, _, _ in self.open):
                step, bar, stack = self.open.pop()
                if step == event.step:
                    bar.update(event.done - bar.pos)
                stack.close()
            return
        if not self.open or self.open[-1][0] != event.step:
            if any(step == event.step for step, _, _ in self.open):
                return  # an outer step moved while an inner one is drawn
            stack = contextlib.ExitStack()
            label = event.what if len(event.what) <= PROBE_BAR_LABEL_CHARS else \
                event.what[:PROBE_BAR_LABEL_CHARS - 3] + "..."
            bar = stack.enter_context(click.progressbar(length=max(event.total, 1), label=label, file=self.file,
                                                        show_pos=True, show_percent=True))
            self.open.append((event.step, bar, stack))
        bar = self.open[-1][1]
        bar.update(event.done - bar.pos)

    def close(self) -> None:
        while self.open:
            self.open.pop()[2].close()


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[None]:
    """Progress of the library's long steps: bars on a terminal, the library's log lines when stderr is piped."""
    if not enabled or not _stderr_is_tty():
        with report_progress_to(None, enabled=enabled):
            yield
        return
    bars = _ProgressBars(click.get_text_stream("stderr"))
    try:
        with report_progress_to(bars):
            yield
    finally:
        bars.close()  # a bar cut short by an error ends here, so the error message starts on its own line


PROGRESS_HELP = "Progress of long steps: a bar on a terminal, a log line every few seconds when piped."


def _with_probe_progress(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Runs a command inside _probe_progress() and _progress(): file probing and the library's long steps show
    their progress (off with the command's --no-progress, where it has one)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        enabled = bool(kwargs.get("progress", True))
        with _probe_progress(None if enabled else False), _progress(enabled):
            return fn(*args, **kwargs)

    return wrapper


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns library errors meant for users into a one-line `Error: ...` and exit code 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TfTransferError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            # A full or read-only disk met anywhere (a report, a plot): one line naming the path, no traceback.
            converted = storage_error(exc)
            if converted is None:
                raise
            raise click.ClickException(str(converted)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None

    return wrapper


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _output_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """A file a command writes at its end (--csv, --json): checked while parsing, so a bad path fails before the
    work, not after it. Its folder must exist and be writable ('-' is stdout)."""
    if value is None or str(value) == "-":
        return value
    folder = value.absolute().parent
    if not folder.is_dir():
        raise click.BadParameter(f"{value}: folder {folder} does not exist", ctx, param)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{value}: folder {folder} is not writable", ctx, param)
    return value


def _output_dir(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """An output folder (made with its parents at the end): its nearest existing ancestor is a writable folder."""
    if value is None:
        return value
    base = _nearest_existing(value)
    if not base.is_dir():
        raise click.BadParameter(f"{value}: {base} is a file, not a folder", ctx, param)
    if not os.access(base, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{value}: folder {base} is not writable", ctx, param)
    return value


class _CommaList(click.ParamType):
    """'1,3,5' -> (1, 3, 5) for a tuple[int, ...] config field; '' -> (); a tuple (the default) stays. With
    `choices`, each item must be one of them."""

    def __init__(self, item: type, choices: tuple[Any, ...] | None = None) -> None:
        self.item, self.choices = item, choices
        one = {str: "TEXT", int: "INT", float: "FLOAT"}.get(item, item.__name__.upper())
        self.name = f"{one}[,{one}...]" if not choices else "[" + "|".join(map(str, choices)) + "][,...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            items = tuple(self.item(v.strip()) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"expected comma-separated {self.item.__name__} values, got {value!r}", param, ctx)
        bad = [v for v in items if self.choices and v not in self.choices]
        if bad:
            self.fail(f"{bad[0]!r} is not one of {', '.join(map(str, self.choices))}", param, ctx)
        return items


def _click_type(spec: SettingSpec) -> Any:
    """The Click parameter type of a config field: its choices, its range, or its plain type."""
    if spec.multiple:
        return _CommaList(spec.type, spec.choices)
    if spec.choices:
        return click.Choice(list(spec.choices))
    if spec.type in (int, float) and (spec.min is not None or spec.max is not None):
        if spec.type is int:
            return click.IntRange(min=spec.min, max=spec.max)
        return click.FloatRange(min=spec.min, max=spec.max, min_open=spec.min_exclusive,
                                max_open=spec.max_exclusive)
    if spec.type is Path:
        return click.Path(path_type=Path)
    return {int: click.INT, float: click.FLOAT, str: click.STRING}[spec.type]


def config_option(cls: type, name: str, *decls: str, **extra: Any) -> Callable[[Callable[..., Any]], Any]:
    """A click.option for field `name` of the command config `cls`: its default, choices, range and help come from
    the field (tftransfer.config.commands), so they are written once. `decls` default to --field-name (a bool
    with a True default becomes --name/--no-name); `extra` adds Click-only settings (a click.Path's checks)."""
    spec = setting_specs(cls)[name]
    flag = f"--{name.replace('_', '-')}"
    kwargs: dict[str, Any] = {"help": spec.help}
    if spec.type is bool:
        decls = decls or ((f"{flag}/--no-{flag[2:]}",) if spec.default else (flag,))
        kwargs.update(default=spec.default, is_flag=True, show_default=bool(spec.default))
    else:
        kwargs.update(type=_click_type(spec), default=spec.default,
                      show_default=spec.default not in (None, "", ()))
    kwargs.update(extra)
    return click.option(*(decls or (flag,)), name, **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
             epilog="Example: tftransfer fit --data images/ --backbone mobilenetv2 --name flowers")
@click.version_option(__version__, prog_name="tftransfer")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Fine-tune keras.applications backbones on your images and ship them to TF Serving."""
    _setup_logging(verbose)


def _echo_table(header: list[str], rows: list[list[Any]], align: str) -> None:
    """Columns as wide as their widest cell (a long family name must not push its row out of line); `align`
    holds l or r per column."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        line = "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align))
        click.echo(line.rstrip())


@main.command("backbones", epilog="Example: tftransfer backbones mobilenetv2 efficientnetb0")
@click.option("--details", is_flag=True,
              help="Build every backbone (weights=None) to count parameters and unfreezable blocks (slow).")
@click.argument("names", nargs=-1)
@_user_errors
def backbones_command(details: bool, names: tuple[str, ...]) -> None:
    """List supported backbones: input size, preprocessing, and with --details or NAMES params and blocks."""
    if details or names:
        # Building a backbone needs Keras; the plain list comes from the static catalog, without TensorFlow.
        specs = [get_backbone_spec(n) for n in names] if names else [get_backbone_spec(n) for n in list_backbones()]
        rows = []
        for spec in specs:
            d = describe_backbone(spec)
            rows.append([spec.name, spec.family, spec.default_size, spec.min_size, spec.preprocess_mode,
                         f"{d['params']:,}", d["blocks"], ", ".join(d["top_blocks"])])
        _echo_table(["name", "family", "size", "min", "preprocess", "params", "blocks", "top blocks"], rows,
                    "llrrlrrl")
        return
    specs = builtin_backbones()
    _echo_table(["name", "family", "size", "min", "preprocess"],
                [[s.name, s.family, s.default_size, s.min_size, s.preprocess_mode] for s in specs], "llrrl")
    click.echo(f"\n{len(specs)} backbones. Params and unfreezable blocks: tftransfer backbones --details "
               "(or: tftransfer backbones NAME).")


EPOCHS_HELP = ("Epochs of phase 2, fine-tuning the top blocks (0 = head only); the head phase keeps its own "
               "(--head-epochs).  [phases.finetune.epochs]")
HEAD_EPOCHS_HELP = "Epochs of phase 1, the new head on the frozen backbone (0 skips it).  [phases.head.epochs]"

_CONFIG_FLAGS = {  # flag name -> the config key(s) it sets
    "backbone": ("model.backbone",), "data": ("data.path",), "weights": ("model.weights",),
    # fastai's convention: --epochs is the expensive phase; the head's epochs on cached features are nearly free,
    # so a short --epochs does not starve the head of them
    "epochs": ("phases.finetune.epochs",), "head_epochs": ("phases.head.epochs",), "batch_size": ("data.batch_size",),
    "image_size": ("data.image_size",), "name": ("name",), "precision": ("runtime.precision",),
    "jit": ("runtime.jit",), "val_split": ("data.val_split",), "test_split": ("data.test_split",),
    "class_weight": ("data.class_weight",), "strict_data": ("data.strict",), "target": ("adapt.target",),
    "adapt": ("adapt.method",),
}


def _experiment_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that build an experiment config, shared by fit and lr-find."""
    options = [
        click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="YAML experiment config (see configs/); flags and --set override it."),
        click.option("-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key, e.g. --set phases.finetune.epochs=3 (repeatable)."),
        click.option("--backbone", help="Backbone name (see `tftransfer backbones`).  [model.backbone]"),
        click.option("--data", help="Image folder (class subfolders), CSV/JSONL manifest (path,label), .npz "
                                    "(images, labels), tfds:<name> or builtin:<name>.  [data.path]"),
        click.option("--weights", help="imagenet, none, or a local .h5/.weights.h5/.keras file.  [model.weights]"),
        click.option("--epochs", type=click.IntRange(min=0), help=EPOCHS_HELP),
        click.option("--head-epochs", type=click.IntRange(min=0), help=HEAD_EPOCHS_HELP),
        click.option("--batch-size", type=click.IntRange(min=1), help="Batch size.  [data.batch_size]"),
        click.option("--image-size", type=click.IntRange(min=0),
                     help="Input size in pixels; 0 = the backbone's default.  [data.image_size]"),
        click.option("--name", help="Run name: runs/<name>/ and saved_models/<name>/.  [name]"),
        click.option("--precision", type=click.Choice(["auto", "float32", "mixed_float16", "mixed_bfloat16"]),
                     help="Compute precision.  [runtime.precision]"),
        click.option("--jit", type=click.Choice(["auto", "on", "off"]), help="XLA compilation.  [runtime.jit]"),
        click.option("--val-split", type=click.FloatRange(0, 0.9),
                     help="Validation fraction when the data has no val/ folder.  [data.val_split]"),
        click.option("--test-split", type=click.FloatRange(0, 0.9),
                     help="Test fraction when the data has no test/ folder.  [data.test_split]"),
        click.option("--class-weight", type=click.Choice(["none", "auto"]),
                     help="auto = weight the loss by inverse class frequency.  [data.class_weight]"),
        click.option("--strict-data", is_flag=True, default=None,
                     help="Any unreadable or non-image file is an error, before training.  [data.strict]"),
        click.option("--overwrite", is_flag=True,
                     help="Replace an existing run of this name (the old one is kept aside)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _config_from_options(config_path: Path | None, overrides: tuple[str, ...], flags: dict[str, Any],
                         recipe: str | None = None) -> Any:
    values = {key: value for flag, value in flags.items() if value is not None for key in _CONFIG_FLAGS[flag]}
    return load_config(config_path, overrides=overrides, values=values, recipe=recipe)


@main.command("fit", epilog="Example: tftransfer fit --data images/ --backbone mobilenetv2 --epochs 5 "
                                "--name flowers")
@_experiment_options
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Continue an interrupted run (runs/<name>) from its last finished epoch, with its own config.")
@click.option("--lr-find", "lr_find", is_flag=True,
              help="Run the learning-rate range test first and train with its suggested rates.")
@click.option("--progress/--no-progress", default=True, show_default=True, help=PROGRESS_HELP)
@click.option("--target", help="Unlabeled target-domain data to adapt to (folder, manifest#domain=NAME, ...); "
                                "its labels, if any, are only reported.  [adapt.target]")
@click.option("--adapt", type=click.Choice(list(ADAPT_METHODS)),
              help="Training-time domain adaptation with --target.  [adapt.method]")
@click.option("--recipe", type=click.Choice(list(RECIPES)),
              help="A named fine-tuning recipe (lp-ft, ft, lp, lp-ft-l2sp); the config file, flags and --set "
                   "override its values.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train this many times (seeds seed, seed+1, ...) and report mean +- std.")
@_user_errors
@_with_probe_progress
def fit_command(config_path: Path | None, overrides: tuple[str, ...], overwrite: bool, resume_dir: Path | None,
                lr_find: bool, progress: bool, recipe: str | None, seeds: int, **flags: Any) -> None:
    """Fine-tune a backbone in two phases, evaluate it and export a SavedModel for TF Serving."""
    verbose = 0  # Keras' own bars show 1/Unknown on tf.data and collide with the epoch lines: _progress draws them
    if resume_dir is not None:
        given = [f"--{n.replace('_', '-')}" for n, v in flags.items() if v is not None]
        given += [n for n, v in (("--config", config_path), ("--set", overrides), ("--overwrite", overwrite),
                                 ("--lr-find", lr_find), ("--recipe", recipe), ("--seeds", seeds > 1)) if v]
        if given:
            raise click.UsageError(f"--resume continues a run with its saved config; drop {', '.join(given)}")
        _echo_fit_result(run_fit(None, resume=resume_dir, verbose=verbose).metrics)
        return
    cfg = _config_from_options(config_path, overrides, flags, recipe)
    if lr_find:
        found = run_lr_find(cfg, overwrite=overwrite)
        _echo_suggestions(found, kept="the config's rate is kept")
        cfg = with_suggestions(cfg, found["suggested"])
    if seeds > 1:
        summary = run_seeds(cfg, seeds, overwrite=overwrite, verbose=verbose)
        click.echo(render_seeds(summary))
        click.echo(f"seeds summary: {Path(cfg.runs_dir) / summary['name'] / 'seeds.json'}")
        return
    _echo_fit_result(run_fit(cfg, overwrite=overwrite, verbose=verbose).metrics)


_DISTILL_FLAGS = {  # flag name -> the config key(s) it sets
    **{flag: _CONFIG_FLAGS[flag] for flag in ("data", "weights", "image_size", "name", "batch_size", "epochs",
                                              "head_epochs")},
    "alpha": ("distill.alpha",), "temperature": ("distill.temperature",), "views": ("distill.views",),
    "unlabeled": ("distill.unlabeled",), "baseline": ("distill.baseline",),
}


@main.command("distill", epilog="Example: tftransfer distill runs/big_teacher --student mobilenet "
                                    "--unlabeled more_photos/ --train-baseline")
@click.argument("teacher", metavar="TEACHER_RUN", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--student", required=True, help="The student's backbone (see `tftransfer backbones`).  "
                                               "[model.backbone]")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML experiment config for the student; flags and --set override it.")
@click.option("-s", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set distill.views=8 (repeatable).")
@click.option("--data", help="Labelled training data (default: the teacher run's data settings).  [data.path]")
@click.option("--weights", help="The student's weights: imagenet, none or a file.  [model.weights]")
@click.option("--image-size", type=click.IntRange(min=1), help="The student's input size.  [data.image_size]")
@click.option("--epochs", type=click.IntRange(min=0), help=EPOCHS_HELP)
@click.option("--head-epochs", type=click.IntRange(min=0), help=HEAD_EPOCHS_HELP)
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size.  [data.batch_size]")
@click.option("--name", help="Run name (default <student>_from_<teacher run>).  [name]")
@click.option("--alpha", type=click.FloatRange(0, 1), help="Weight of the soft loss.  [distill.alpha]")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True),
              help="Softmax temperature of the soft targets.  [distill.temperature]")
@click.option("--views", type=click.IntRange(min=1), help="Fixed views per image.  [distill.views]")
@click.option("--unlabeled", type=click.Path(exists=True, file_okay=False),
              help="A folder of unlabeled images the teacher labels.  [distill.unlabeled]")
@click.option("--baseline", type=click.Path(exists=True, file_okay=False),
              help="A run of the same student without the teacher, compared in summary.md.  [distill.baseline]")
@click.option("--train-baseline", is_flag=True,
              help="First train the same student without the teacher (<name>_baseline), compared in summary.md.")
@click.option("--overwrite", is_flag=True, help="Replace existing runs of these names (the old ones are kept aside).")
@click.option("--progress/--no-progress", default=True, show_default=True, help=PROGRESS_HELP)
@_user_errors
@_with_probe_progress
def distill_command(teacher: Path, student: str, config_path: Path | None, overrides: tuple[str, ...],
                    train_baseline: bool, overwrite: bool, progress: bool,
                    **flags: Any) -> None:
    """Train a small STUDENT on TEACHER_RUN's soft targets (knowledge distillation), as a new run."""
    if train_baseline and flags.get("baseline"):
        raise click.UsageError("give --baseline RUN or --train-baseline, not both")
    values = {key: value for flag, value in flags.items() if value is not None for key in _DISTILL_FLAGS[flag]}
    result = run_distill(teacher, student, config=config_path, values=values, overrides=overrides,
                         train_baseline=train_baseline, overwrite=overwrite)
    _echo_fit_result(result.metrics)
    distill = result.metrics.get("distill") or {}
    rows = [("teacher", (distill.get("teacher") or {}).get("here")), ("student", distill.get("student")),
            ("baseline", distill.get("baseline"))]
    for label, entry in rows:
        if entry:
            click.echo(f"  {label:<9} val accuracy {entry['accuracy']:.4f}  agreement with teacher "
                       f"{entry['agreement_with_teacher']:.1%}  KL to teacher {entry['kl_to_teacher']:.4f}")


@main.command("domain", epilog="Example: tftransfer domain runs/flowers --target field_photos/ "
                                   "--corruptions all")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@config_option(DomainCommandConfig, "source")
@config_option(DomainCommandConfig, "target")
@config_option(DomainCommandConfig, "target_unlabeled")
@config_option(DomainCommandConfig, "corruptions")
@config_option(DomainCommandConfig, "severities")
@config_option(DomainCommandConfig, "adapt")
@config_option(DomainCommandConfig, "adapt_severities")
@config_option(DomainCommandConfig, "out_dir", "--out", type=click.Path(file_okay=False, path_type=Path),
               callback=_output_dir)
@config_option(DomainCommandConfig, "batch_size")
@config_option(DomainCommandConfig, "max_images")
@config_option(DomainCommandConfig, "permutations")
@config_option(DomainCommandConfig, "folds")
@config_option(DomainCommandConfig, "tsne")
@config_option(DomainCommandConfig, "self_check")
@config_option(DomainCommandConfig, "seed")
@_user_errors
@_with_probe_progress
def domain_command(model: Path, **settings: Any) -> None:
    """How MODEL (a run directory) fares on another domain: shift measures, corruptions, cheap adaptation."""
    cfg = command_config(DomainCommandConfig, settings=settings)
    if cfg.target is None and not cfg.corruptions:
        raise click.UsageError("nothing to measure: give --target DATA and/or --corruptions all")
    result = run_domain(model, cfg)
    _echo_domain(result.report, result.out_dir)


@main.command("adapt", epilog="Example: tftransfer adapt runs/flowers --target field_photos/ --method mcc")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_option(AdaptCommandConfig, "target", required=True)
@config_option(AdaptCommandConfig, "method")
@config_option(AdaptCommandConfig, "validator")
@config_option(AdaptCommandConfig, "name")
@config_option(AdaptCommandConfig, "overwrite")
@config_option(AdaptCommandConfig, "max_images")
@config_option(AdaptCommandConfig, "batch_size")
@config_option(AdaptCommandConfig, "seed")
@config_option(AdaptCommandConfig, "steps")
@config_option(AdaptCommandConfig, "shot_steps")
@config_option(AdaptCommandConfig, "head_init")
@_user_errors
@_with_probe_progress
def adapt_command(model: Path, **settings: Any) -> None:
    """Write MODEL (a run directory) adapted to TARGET's images as a new run that `tftransfer export` ships."""
    out = run_adapt(model, command_config(AdaptCommandConfig, settings=settings))
    click.echo(f"adapted run: {out}\nship it with: tftransfer export {out}")


def _echo_domain(report: dict[str, Any], out: Path) -> None:
    src = report["source"]["metrics"]
    click.echo(f"\nsource {report['source']['data']} ({report['source']['split']}, {report['source']['examples']} "
               f"images): accuracy {src['accuracy']:.4f}")
    target = report.get("target")
    if target:
        acc = f"accuracy {target['metrics']['accuracy']:.4f}" if target.get("metrics") else "unlabeled"
        click.echo(f"target {target['data']} ({target['examples']} images): {acc}")
        shift = report["shift"]
        a_dist = shift["proxy_a_distance"]
        click.echo(f"proxy A-distance {a_dist['value']:.3f} +- {a_dist['std']:.3f}  MMD^2 {shift['mmd']['mmd2']:.4g} "
                   f"(p = {shift['mmd']['p_value']:.3g})  CORAL {shift['coral']['value']:.3g}")
    for method, entry in (report.get("adaptation") or {}).items():
        acc = f"accuracy {entry['accuracy']:.4f}" if "accuracy" in entry else "no labels"
        click.echo(f"  {method:<14} {acc}  mean entropy {entry['signals']['mean_entropy']:.3f}  changed "
                   f"{entry['changed_predictions']:.1%}{'  HURTS' if entry.get('hurts') else ''}")
    corr = report.get("corruptions")
    if corr:
        click.echo(f"corruptions: clean {corr['clean']['accuracy']:.4f}, mean {corr['mean']['accuracy']:.4f} over "
                   f"{len(corr['results'])} corruptions")
    click.echo(f"report: {out / 'domain.md'}")


@main.command("lr-find", epilog="Example: tftransfer lr-find --data images/ --backbone mobilenetv2 "
                                    "--phase head")
@_experiment_options
@config_option(LrFindCommandConfig, "phases", "--phase")
@config_option(LrFindCommandConfig, "steps")
@config_option(LrFindCommandConfig, "min_lr")
@config_option(LrFindCommandConfig, "max_lr")
@_user_errors
@_with_probe_progress
def lr_find_command(config_path: Path | None, overrides: tuple[str, ...], overwrite: bool, phases: tuple[str, ...],
                    steps: int, min_lr: float, max_lr: float, **flags: Any) -> None:
    """Learning-rate range test: loss against an exponentially growing rate, with a suggested rate per phase."""
    ramp = command_config(LrFindCommandConfig, None, {"phases": phases, "steps": steps, "min_lr": min_lr,
                                                      "max_lr": max_lr})  # min < max before TensorFlow loads
    cfg = _config_from_options(config_path, overrides, flags)
    found = run_lr_find(cfg, ramp, overwrite=overwrite)
    _echo_suggestions(found)


def _echo_suggestions(found: dict[str, Any], kept: str = "") -> None:
    for phase, entry in found["phases"].items():
        lr = entry["suggested_learning_rate"]
        tail = f"; {kept}" if kept else ""
        click.echo(f"{phase:<9} suggested learning rate: {lr:.2e}" if lr
                   else f"{phase:<9} no suggestion: {entry['reason']}{tail}")
    click.echo(f"plots and lr_find.json: {found['run_dir']}")


@main.command("evaluate", epilog="Example: tftransfer evaluate runs/flowers --data test_photos/")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--data", help="Image folder, CSV/JSONL manifest, .npz, tfds:<name> or builtin:<name> (default: a run's "
                            "own data, its held-out split: test if it has one, else val).")
@config_option(EvaluateCommandConfig, "split")
@config_option(EvaluateCommandConfig, "val_split")
@config_option(EvaluateCommandConfig, "test_split")
@config_option(EvaluateCommandConfig, "output", type=click.Path(file_okay=False, path_type=Path),
               callback=_output_dir)
@config_option(EvaluateCommandConfig, "overwrite")
@config_option(EvaluateCommandConfig, "top_k")
@config_option(EvaluateCommandConfig, "mistakes")
@config_option(EvaluateCommandConfig, "temperature")
@config_option(EvaluateCommandConfig, "batch_size")
@config_option(EvaluateCommandConfig, "image_size")
@config_option(EvaluateCommandConfig, "tfds_data_dir")
@click.option("--progress/--no-progress", default=True, show_default=True, help=PROGRESS_HELP)
@_user_errors
@_with_probe_progress
def evaluate_command(model: Path, data: str | None, progress: bool, **settings: Any) -> None:
    """Evaluate MODEL (a run directory or an exported SavedModel) on DATA: metrics.json, summary.md, plots."""
    result = run_evaluation(model, data, command_config(EvaluateCommandConfig, settings=settings))
    _echo_evaluation(result.metrics, result.output_dir)


def _echo_evaluation(result: dict[str, Any], out: Path) -> None:
    m, data, timing = result["metrics"], result["data"], result["timing"]
    click.echo(f"\n{result['model']['name']} on {data['spec']} ({data['split']}, {m['num_examples']} images)")
    click.echo(f"accuracy {m['accuracy']:.4f}  balanced {m['balanced_accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}"
               f"  top-{m['top_k_accuracy']['k']} {m['top_k_accuracy']['value']:.4f}")
    line = f"log loss {m['log_loss']:.4f}  ECE {m['ece']:.4f}"
    calibration = result.get("calibration")
    if calibration:
        after = calibration["after"]
        line += (f"  ->  temperature {calibration['temperature']:.3f}: log loss {after['log_loss']:.4f}  "
                 f"ECE {after['ece']:.4f}{'  (in-sample)' if calibration['in_sample'] else ''}")
    click.echo(line)
    latency = timing["latency"]
    if timing.get("images_per_second") and latency.get("p50_ms") is not None:
        click.echo(f"{timing['images_per_second']:.1f} images/s (batch {timing['batch_size']}); latency p50 "
                   f"{latency['p50_ms']:.2f} ms, p95 {latency['p95_ms']:.2f} ms (batch 1)")
    if result["mistakes"]:
        click.echo("most confident mistakes:")
        for item in result["mistakes"][:5]:
            click.echo(f"  {item['confidence']:.3f} {item['predicted']} (true {item['true']}): {item['file']}")
    click.echo(f"summary: {out / 'summary.md'}")


@main.command("compress-report", epilog="Example: tftransfer compress-report runs/teacher runs/student "
                                          "--tflite float32,int8-uint8")
@click.argument("models", metavar="RUN_OR_EXPORT...", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@config_option(CompressReportCommandConfig, "data")
@config_option(CompressReportCommandConfig, "split")
@config_option(CompressReportCommandConfig, "tflite")
@config_option(CompressReportCommandConfig, "output", "-o", "--output")
@config_option(CompressReportCommandConfig, "max_images")
@config_option(CompressReportCommandConfig, "latency_runs")
@config_option(CompressReportCommandConfig, "batch_size")
@config_option(CompressReportCommandConfig, "threads")
@config_option(CompressReportCommandConfig, "representative_images")
@_user_errors
def compress_report_command(models: tuple[Path, ...], **settings: Any) -> None:
    """Compare runs, exports and .tflite files on the same images: accuracy, parameters, size, latency."""
    result = run_compress_report(list(models), command_config(CompressReportCommandConfig, settings=settings))
    report = result.report
    click.echo(f"{report['examples']} images of {report['data']} ({report['split']}):")
    for row in report["models"]:
        click.echo(f"  {row['name']:<36} accuracy {row['accuracy']:.4f}  nonzero {row['nonzero_parameters']:>10,} "
                   f"of {row['parameters']:>10,}  gzip {row['gzip_bytes']:>11,} B  batch 1 "
                   f"{row['latency_batch1_ms']:8.2f} ms{'  (Pareto)' if row['pareto'] else ''}")
    click.echo(f"report: {result.output_dir / 'compress_report.md'}")


@main.command("export", epilog="Example: tftransfer export runs/flowers --tflite int8")
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_option(ExportCommandConfig, "tflite")
@config_option(ExportCommandConfig, "model_dir", "--to")
@config_option(ExportCommandConfig, "version")
@config_option(ExportCommandConfig, "top_k")
@config_option(ExportCommandConfig, "force")
@click.option("--signatures", "show_signatures", is_flag=True, help="Print the SavedModel's signature listing.")
@_user_errors
def export_command(run_dir: Path, show_signatures: bool, **settings: Any) -> None:
    """Export a finished RUN as the next SavedModel version, check it in a fresh process, optionally TFLite.

    A model below the majority-class rate plus export.min_gain_over_chance, or below the newest version's
    validation accuracy on the same split, is not published (TF Serving serves the highest version) unless --force.
    """
    result = export_run(run_dir, command_config(ExportCommandConfig, settings=settings))
    parity = result.parity
    status = "OK" if parity["ok"] else "FAILED"
    click.echo(f"\nexported: {result.version_dir}")
    click.echo(f"parity in a fresh process on {parity['data']}: max abs probability difference "
               f"{parity['max_abs_diff']:.1e} (tolerance {parity['tolerance']:.0e}): {status}")
    if show_signatures:
        click.echo(result.signatures_text, nl=False)
    lite = result.tflite
    if lite:
        line = f"\ntflite {lite['mode']}: {lite['file']}  {lite['size_bytes']:,} bytes " \
               f"(SavedModel {lite['saved_model_size_bytes']:,})"
        comparison = lite.get("comparison")
        if comparison:
            line += (f"\n  validation accuracy {comparison['accuracy']:.4f} vs SavedModel "
                     f"{comparison['reference_accuracy']:.4f} (delta {comparison['accuracy_delta']:+.4f}, top-1 "
                     f"agreement {comparison['top1_agreement']:.1%}, max abs diff {comparison['max_abs_diff']:.1e})")
        click.echo(line)
    click.echo(f"model card: {result.version_dir / 'model_card.json'}")


@main.command("predict", epilog="Example: tftransfer predict runs/flowers photos/ --csv predictions.csv")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("images", nargs=-1, required=True)
@config_option(PredictCommandConfig, "top_k")
@config_option(PredictCommandConfig, "batch_size")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              callback=_output_file, help="Write CSV here ('-' for stdout) instead of the table.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              callback=_output_file, help="Write JSON here ('-' for stdout) instead of the table.")
@config_option(PredictCommandConfig, "image_size")
@config_option(PredictCommandConfig, "min_side", "--min-size")
@_user_errors
@_with_probe_progress
def predict_command(model: Path, images: tuple[str, ...], csv_path: Path | None, json_path: Path | None,
                    **settings: Any) -> None:
    """Classify IMAGES (files, folders, globs) with MODEL (a run directory or an exported SavedModel)."""
    result = predict_files(model, images, command_config(PredictCommandConfig, settings=settings))
    outputs = [(fmt, path) for fmt, path in (("csv", csv_path), ("json", json_path)) if path is not None]
    for fmt, path in outputs or [("table", Path("-"))]:
        text = resolve("tftransfer.jobs.predict:FORMATS")[fmt](result)
        if str(path) == "-":
            click.echo(text, nl=False)
        else:
            path.write_text(text, encoding="utf-8")
            click.echo(f"wrote {path}", err=True)
    click.echo(f"{len(result.predictions)} images classified, {len(result.skipped)} skipped", err=True)


def _echo_fit_result(metrics: dict[str, Any]) -> None:
    record = RunMetrics.from_dict(metrics)
    run_dir = record.run_dir or Path(".")
    click.echo(f"\nrun: {run_dir}")
    for phase in record.phases:
        val = phase.get("val") or {}
        acc = f"val accuracy {val['accuracy']:.4f}" if "accuracy" in val else "no validation data"
        prune = phase.get("pruning")
        pruned = f"  pruned {prune['zeros']:,} of {prune['pruned_weights']:,} weights ({prune['sparsity']:.1%})" \
            if prune else ""
        click.echo(f"  {phase['name']:<9} {phase['epochs_run']:>3} epochs  {phase['seconds']:7.1f} s  {acc}{pruned}")
    if record.val:
        click.echo(f"final val accuracy {record.val['accuracy']:.4f}  macro-F1 {record.val['macro_f1']:.4f}")
    export = record.export
    if export and "gate" in export:
        click.echo(f"not exported: {export['gate']}")
    elif export:
        status, what = ("OK", "exported") if export["parity_ok"] else ("FAILED", "rejected, not published")
        click.echo(f"{what}: {export['path']}  (parity max abs diff {export['parity_max_abs_diff']:.1e}: {status})")
    adapt = record.adapt
    if adapt:
        final_target = record.target_accuracy
        click.echo(f"target {adapt['target']} ({adapt['target_examples']} images, adapt {adapt['method']}): "
                   + (f"accuracy {final_target:.4f}" if final_target is not None else "unlabeled"))
    click.echo(f"summary: {run_dir / 'summary.md'}   tensorboard --logdir {run_dir.parent}")
    if export and not export.get("parity_ok", True):
        raise click.ClickException(f"the run's export disagrees with its Keras model and was not published (kept in "
                                   f"{export['path']}); the run itself is complete")


@main.command("select", epilog="Example: tftransfer select --data images/ "
                                   "--candidates mobilenetv2,efficientnetb0@160")
@click.option("--data", required=True, help="Labelled images: anything fit's --data takes.")
@click.option("--candidates", required=True,
              help="Backbones to compare: names separated by commas (NAME or NAME@SIZE, e.g. "
                   "mobilenetv2,efficientnetb0@160), or a YAML file: a list of {backbone, weights, backbone_kwargs, "
                   "image_size}.")
@config_option(SelectCommandConfig, "weights")
@config_option(SelectCommandConfig, "image_size")
@config_option(SelectCommandConfig, "rank_by")
@config_option(SelectCommandConfig, "folds")
@config_option(SelectCommandConfig, "max_images")
@config_option(SelectCommandConfig, "budget_seconds")
@config_option(SelectCommandConfig, "fit_config", "-c", "--config", type=click.Path(dir_okay=False, path_type=Path))
@config_option(SelectCommandConfig, "name")
@config_option(SelectCommandConfig, "runs_dir")
@config_option(SelectCommandConfig, "batch_size")
@config_option(SelectCommandConfig, "seed")
@config_option(SelectCommandConfig, "cache_dir")
@config_option(SelectCommandConfig, "latency_runs")
@_user_errors
@_with_probe_progress
def select_command(data: str, candidates: str, **settings: Any) -> None:
    """Rank backbones on DATA by transferability (LogME, H-score, linear probe) and cost; recommend one."""
    result = run_select(data, candidates, command_config(SelectCommandConfig, settings=settings))
    click.echo(f"\n{'rank':>4}  {'candidate':<44} {'LogME':>8} {'H-score':>8} {'probe':>14} {'batch-1 ms':>10}")
    for entry in result.candidates:
        if entry.get("skipped") or entry.get("error"):
            why = f"skipped: {entry['skipped']}" if entry.get("skipped") else "error (see select.md)"
            click.echo(f"{'-':>4}  {entry['backbone']:<44} {why}")
            continue
        probe = f"{entry['probe_accuracy']:.1%} +- {entry['probe_accuracy_std']:.1%}"
        label = f"{entry['backbone']}@{entry['image_size']} ({Path(entry['weights']).name})"
        click.echo(f"{entry.get('rank') or '-':>4}  {label:<44} {entry['logme']:>8.4f} {entry['h_score']:>8.3f} "
                   f"{probe:>14} {entry['latency_batch1_ms']:>10.1f}")
    if result.recommendation:
        click.echo(f"\nrecommendation: {result.recommendation['text']}\n  {result.recommendation['fit_command']}")
    click.echo(f"report: {result.run_dir / 'select.md'}")


@main.group("data", epilog="Example: tftransfer data inspect images/")
def data_group() -> None:
    """Look at a data set before training on it."""


@data_group.command("inspect", epilog="Example: tftransfer data inspect images/ --json report.json")
@click.argument("data")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), callback=_output_file,
              help="Also write the full report as JSON to this file.")
@click.option("--val-split", type=click.FloatRange(0.0, 0.9), help="As data.val_split (default from the config).")
@click.option("--test-split", type=click.FloatRange(0.0, 0.9), help="As data.test_split.")
@click.option("--stratify/--no-stratify", default=None, help="As data.stratify.")
@click.option("--tfds-data-dir", default="", help="As data.tfds_data_dir.")
@click.option("--allow-outside-paths", is_flag=True,
              help="As data.allow_outside_paths: a manifest may name files outside its own folder.")
@click.option("--near-bits", type=click.IntRange(0, 128),
              help="Bits (of a 256-bit dHash) two images may differ by to count as near-duplicates (default 24; "
                   "0 = identical hash).")
@click.option("--no-progress", is_flag=True,
              help="No progress bar while files are checked (one is drawn on stderr only when it is a terminal).")
@_user_errors
def inspect_command(data: str, json_path: Path | None, val_split: float | None, test_split: float | None,
                    stratify: bool | None, tfds_data_dir: str, allow_outside_paths: bool, near_bits: int | None,
                    no_progress: bool) -> None:
    """Classes and counts per split, imbalance, image sizes, bad files, duplicates and leakage across splits.

    DATA is anything --data takes: an image folder, a .csv/.jsonl manifest, an .npz, tfds:NAME or builtin:NAME.
    """
    with _probe_progress(enabled=False if no_progress else None):
        report = inspect_data(data, val_split=val_split, test_split=test_split, stratify=stratify,
                              tfds_data_dir=tfds_data_dir, near_duplicate_bits=near_bits, json_path=json_path,
                              allow_outside_paths=allow_outside_paths)
    click.echo(format_report(report), nl=False)
    if json_path is not None:
        click.echo(f"report: {json_path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
