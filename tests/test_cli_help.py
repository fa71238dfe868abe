"""``fgvce --version`` and ``--help``: every option with a default says it, and explain lists the split points."""
import argparse
import importlib.metadata

import pytest

from fgvce_jax import cli


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"fgvce {importlib.metadata.version('fgvce-jax')}"


def _subparsers():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_default_is_in_the_help(command):
    sub = _subparsers()[command]
    text = " ".join(sub.format_help().split())
    for action in sub._actions:
        if not action.option_strings or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
        assert "default" in action.help or f"(default: {shown})" in text, (command, action.option_strings[0])


def test_explain_help_lists_the_split_points():
    text = " ".join(_subparsers()["explain"].format_help().split())
    for point in ("layer4.0", "layer4", "layer3", "features", "block"):
        assert point in text
