"""The `imat` root command: help, versions, exit codes, lazy imports."""

from __future__ import annotations

from imat import __version__
from imat.cli.main import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_every_listed_command_loads_and_has_help(capsys):
    # The lazy table names modules and attributes by string: each must resolve to a real command.
    for name in COMMANDS:
        assert main([name, "--help"]) == 0, name
        assert f"Usage: imat {name}" in capsys.readouterr().out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["no-such-command"]) == 2
    assert "no-such-command" in capsys.readouterr().err


def test_help_does_not_import_the_training_stack(cli_in_fresh_process):
    _, heavy = cli_in_fresh_process(["--help"])
    assert heavy == []
