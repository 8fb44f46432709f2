"""The `hfcap` console script: every subcommand is wired and documents itself."""

import subprocess
import sys

import pytest

from hfcap.cli import SUBCOMMANDS, main


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"hfcap {command}" in capsys.readouterr().out


def test_console_script_lists_the_subcommands():
    result = subprocess.run([sys.executable, "-m", "hfcap.cli", "--help"], capture_output=True, text=True, check=True)
    for command in SUBCOMMANDS:
        assert command in result.stdout
