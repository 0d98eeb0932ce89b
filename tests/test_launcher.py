"""The `retrofit` console command (retrofit_command): `retrofit --help` lists the commands without importing
torch, transformers or retrofit; a command runs as `python -m retrofit` runs it."""

from __future__ import annotations

import subprocess
import sys

import typer.main

from retrofit_command import COMMANDS


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_top_level_help_imports_neither_torch_nor_retrofit():
    probe = ("import sys; from retrofit_command import main; sys.argv = ['retrofit', '--help']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'retrofit', 'pydantic') if m in sys.modules))")
    done = _run(probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    for name, summary in COMMANDS.items():
        assert name in done.stdout and summary.split()[0] in done.stdout


def test_the_launcher_knows_exactly_the_apps_commands():
    from retrofit.cli import app

    commands = typer.main.get_command(app).commands
    assert list(commands) == list(COMMANDS)
    for name, summary in COMMANDS.items():  # the summary says what the command's own help says first
        first = commands[name].help.split()[0]
        assert summary.split()[0] == first, (name, summary, first)


def test_a_commands_help_and_a_typo_through_the_launcher():
    code = ("import sys; from retrofit_command import main; sys.argv = ['retrofit', *sys.argv[1:]]; main()")
    done = subprocess.run([sys.executable, "-c", code, "convert", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "--capacity-factor" in done.stdout and "--guard-size" in done.stdout
    typo = subprocess.run([sys.executable, "-c", code, "conver"], capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and "Did you mean 'convert'?" in typo.stderr

