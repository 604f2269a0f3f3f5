"""`medpeft --help` and every sub-command's help render, and `run --help` documents every option."""
from __future__ import annotations

import argparse

import pytest

from medpeft.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in _subparsers(build_parser()):
        assert name in out


@pytest.mark.parametrize("command", sorted(_subparsers(build_parser())))
def test_every_command_help_renders_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    sub = _subparsers(build_parser())[command]
    for action in sub._actions:
        if action.help == argparse.SUPPRESS:
            continue
        for flag in action.option_strings:
            assert flag in out, f"'medpeft {command} --help' does not show {flag}"
        if action.dest != "help":
            name = action.option_strings[0] if action.option_strings else action.dest
            assert action.help, f"'medpeft {command}' argument {name} has no help text"
