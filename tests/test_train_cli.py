"""wsiengine.train_cli: the train-mil and export-encoder commands are added without importing any
training code, share the parents' options, say they need the [train] extra, and without torch
print how to install it instead of a traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys

from wsiengine.train_cli import TRAIN_EXTRA, add_train_commands


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true")
    parser = argparse.ArgumentParser(prog="wsiengine")
    add_train_commands(parser.add_subparsers(dest="command", required=True), [common])
    return parser


def test_both_commands_take_the_parents_options_and_name_the_extra():
    parser = _parser()
    args = parser.parse_args(["train-mil", "--features", "f", "--labels", "l.csv", "-o", "out", "-q", "--folds", "3"])
    assert (args.func.__name__, args.quiet) == ("cmd_train_mil", True)
    from wsiengine.config.flags import given_flags
    from wsiengine.train_cli import training_settings

    assert given_flags(args, training_settings()) == {"folds": 3}  # generated from MILTrainConfig's fields
    args = parser.parse_args(["export-encoder", "default", "-o", "x.onnx"])
    assert (args.func.__name__, args.quiet, args.weights, args.opset) == ("cmd_export_encoder", False, None, 17)
    helps = parser.format_help() + "".join(
        a.format_help() for a in parser._subparsers._group_actions[0].choices.values())  # noqa: SLF001
    assert helps.count(TRAIN_EXTRA) >= 2 and "[train]" in parser.format_help()


def _without_torch(command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` through the handlers in a process where ``import torch`` fails."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import argparse\n"
            "from wsiengine.train_cli import add_train_commands\n"
            "p = argparse.ArgumentParser(); add_train_commands(p.add_subparsers(dest='c'), [])\n"
            f"args = p.parse_args({command!r})\n"
            "code = args.func(args)\n"
            "sys.exit(code)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_without_torch_the_commands_say_which_extra_to_install(tmp_path):
    for command in (["train-mil", "--features", str(tmp_path), "--labels", str(tmp_path / "l.csv"), "-o", str(tmp_path / "o")],
                    ["export-encoder", "default", "-o", str(tmp_path / "x.onnx")]):
        result = _without_torch(command)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert f"{command[0]} needs the [train] extra" in result.stderr
        assert "torch is not installed" in result.stderr and TRAIN_EXTRA in result.stderr
        assert not (tmp_path / "o").exists() and not (tmp_path / "x.onnx").exists()


def test_adding_the_commands_imports_no_training_code():
    code = ("import sys, argparse\n"
            "from wsiengine.train_cli import add_train_commands\n"
            "add_train_commands(argparse.ArgumentParser().add_subparsers(), [])\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('wsiengine.models.training')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
