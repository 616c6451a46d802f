"""Docs and flags agree (issue 13 item 9): what --help promises is what the option accepts. No TensorFlow needed."""

from __future__ import annotations

from click.testing import CliRunner

from tftransfer import cli


def test_fit_image_size_zero_means_the_backbone_default():
    ctx = cli.main.commands["fit"].make_context("fit", ["--data", "d", "--image-size", "0"])
    assert ctx.params["image_size"] == 0
    cfg = cli._config_from_options(None, (), {k: v for k, v in ctx.params.items()
                                              if k in ("data", "image_size")}, None)
    assert cfg.data.image_size == 0  # resolved to the backbone's default size when the run starts


def test_epochs_sets_fine_tuning_and_leaves_the_cheap_head_phase_its_own(tmp_path):
    def config(command: str, *args: str):
        head = [] if command == "fit" else [str(tmp_path), "--student", "tiny"]
        ctx = cli.main.commands[command].make_context(command, [*head, *args])
        flags = {k: v for k, v in ctx.params.items() if k in ("epochs", "head_epochs")}
        return cli._config_from_options(None, (), flags, None), flags

    default, _ = config("fit")
    short, _ = config("fit", "--epochs", "2")
    assert (short.phases.finetune.epochs, short.phases.head.epochs) == (2, default.phases.head.epochs)
    both, _ = config("fit", "--epochs", "0", "--head-epochs", "7")
    assert (both.phases.finetune.epochs, both.phases.head.epochs) == (0, 7)
    _, flags = config("distill", "--epochs", "3", "--head-epochs", "4")  # distill: the same flags, the same keys
    assert {key for flag in flags for key in cli._DISTILL_FLAGS[flag]} == {"phases.finetune.epochs",
                                                                          "phases.head.epochs"}


def test_fit_data_help_lists_every_kind_of_data():
    text = CliRunner().invoke(cli.main, ["fit", "--help"]).output
    for kind in ("CSV/JSONL", ".npz", "tfds:", "builtin:", "0 = the backbone's default"):
        assert kind in " ".join(text.split()), kind


def test_backbones_columns_line_up_for_every_row():
    lines = CliRunner().invoke(cli.main, ["backbones"]).output.splitlines()
    table = lines[:lines.index("")]
    size_end = table[0].index("size") + len("size")
    assert len(table) > 10 and any("inception_resnet_v2" in line for line in table)  # the longest family name
    for line in table[1:]:
        assert line[:size_end].split()[-1].isdigit() and line[size_end] == " ", line


def test_every_command_help_ends_with_an_example():
    def commands(group, prefix=()):
        for name, command in group.commands.items():
            yield (*prefix, name), command
            if hasattr(command, "commands"):
                yield from commands(command, (*prefix, name))

    for path, command in commands(cli.main):
        assert (command.epilog or "").startswith("Example: tftransfer "), " ".join(path)
        assert "Example: tftransfer" in CliRunner().invoke(cli.main, [*path, "--help"]).output, " ".join(path)
