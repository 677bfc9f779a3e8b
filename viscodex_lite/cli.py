"""``viscodex-lite <command>``: the same functions the notebooks call, for full-scale runs.

Each capability module registers its own subcommands through ``register_cli(subparsers)``; this
file only assembles them, so a command's options live next to the code they drive.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import KitError

# Modules that provide subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "viscodex_lite.envcheck",
    "viscodex_lite.checkpoints",
    "viscodex_lite.merge",
    "viscodex_lite.zoo",
    "viscodex_lite.analysis",
    "viscodex_lite.mcd",
    "viscodex_lite.finetune",
    "viscodex_lite.generate",
    "viscodex_lite.infibench.cli",
    "viscodex_lite.course",
    "viscodex_lite.runbook",
    "viscodex_lite.demo",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every available subcommand)."""
    parser = argparse.ArgumentParser(
        prog="viscodex-lite",
        description="Merge a coding LLM into a VLM, fine-tune it on MCD and score it on InfiBench-V.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):  # not in this checkout yet
                continue
            raise
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``viscodex-lite`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KitError as exc:
        print(f"viscodex-lite {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"viscodex-lite {args.command}: interrupted; no partial output was left in place.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
