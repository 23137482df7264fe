"""The command line explains itself: a version, help on every argument, plain text at the top,
and the UI's address checked before anything starts."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version

import pytest

from autosparse.cli import build_parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_argument_of_every_command_has_help():
    missing = [f"{name} {action.dest}" for name, command in _commands().items()
               for action in command._actions
               if not action.help and not isinstance(action, argparse._HelpAction)]
    assert missing == []


def test_top_level_help_is_plain_text_and_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "Pareto front" in text
    for name in _commands():
        assert name in text


def test_version_is_the_installed_package_version():
    done = subprocess.run([sys.executable, "-m", "autosparse.cli", "--version"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"autosparse {version('autosparse')}"


def test_ui_refuses_a_host_that_is_not_an_address_before_starting(capsys, tmp_path):
    code = main(["--runs-dir", str(tmp_path), "ui", "--host", "no such host!"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: --host 'no such host!': not an address")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, words", [
    (["search", "search_spaces/quickstart.yaml", "--workers", "3", "--threads", "1"],
     "--threads 1 is fewer than --workers 3"),
    (["export", "search_spaces/quickstart.yaml", "--trial", "3", "--minimize", "size"],
     "--minimize size: it picks a trial within --max-drop"),
], ids=["threads-below-workers", "minimize-without-max-drop"])
def test_options_that_would_be_ignored_are_refused(argv, words, capsys, tmp_path):
    code = main(["--runs-dir", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0]
    assert list(tmp_path.iterdir()) == []
