"""cli.py imports only the chosen subcommand's module, and its table matches every register_cli."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from viscodex_lite import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module_name", cli.COMMAND_MODULES)
def test_table_matches_each_modules_register_cli(module_name):
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module_name).register_cli(sub)
    registered = {a.dest: a.help for a in sub._choices_actions}
    table = {name: help_text for name, (module, help_text) in cli.COMMANDS.items() if module == module_name}
    assert registered == table, f"update cli.COMMANDS for {module_name}"


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_help_lists_every_command_and_imports_no_command_module():
    out = _run(
        "import sys, contextlib, io\n"
        "from viscodex_lite import cli\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try: cli.main(['--help'])\n"
        "    except SystemExit: pass\n"
        "print(buf.getvalue())\n"
        "print('LOADED', sorted(m for m in cli.COMMAND_MODULES if m in sys.modules), 'torch' in sys.modules)\n"
    )
    for name in cli.COMMANDS:
        assert f"    {name}" in out
    assert "LOADED [] False" in out


def test_a_subcommand_imports_only_its_module():
    out = _run(
        "import sys, contextlib, io\n"
        "from viscodex_lite import cli\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try: cli.main(['merge', '--help'])\n"
        "    except SystemExit: pass\n"
        "print(buf.getvalue())\n"
        "print('LOADED', sorted(m for m in cli.COMMAND_MODULES if m in sys.modules and m != 'viscodex_lite.checkpoints'))\n"
    )
    assert "--lam" in out and "--overwrite" in out  # the real merge options
    assert "LOADED ['viscodex_lite.merge']" in out  # (merge imports checkpoints, its I/O layer)


def test_missing_optional_dependency_names_the_package(monkeypatch, capsys):
    real_import = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "viscodex_lite.course":
            raise ModuleNotFoundError("No module named 'nbformat'", name="nbformat")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    assert cli.main(["course", "build", "-o", "x"]) == 2
    assert "'nbformat'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # other commands still parse: here, their real options
        cli.main(["runbook", "--help"])


def test_full_parser_has_every_command_with_real_options():
    parser = cli.build_parser()
    choices = parser._subparsers._group_actions[0].choices
    assert set(choices) == set(cli.COMMANDS)
    args = parser.parse_args(["merge", "--vlm", "a", "--code", "b", "--base", "c", "-o", "d"])
    assert args.func is not None and args.lam == 0.7
