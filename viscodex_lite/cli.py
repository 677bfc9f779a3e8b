"""``viscodex-lite <command>``: the same functions the notebooks call, for full-scale runs.

Each capability module registers its own subcommands through ``register_cli(subparsers)``, so a
command's options live next to the code they drive. This file only knows, from the table
:data:`COMMANDS`, which module provides which subcommand, and imports that one module alone: a
``viscodex-lite merge`` does not pay for (or need) nbformat, datasets or transformers, and
``viscodex-lite --help`` imports nothing. ``tests/test_cli.py`` keeps the table in step with
every module's ``register_cli``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import KitError

# subcommand -> (module providing it, one-line help), in the order `--help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("viscodex_lite.envcheck", "check versions, device, bitsandbytes backend and run mode"),
    "inspect": ("viscodex_lite.checkpoints", "check a checkpoint's headers and show its layout (reads no weights)"),
    "preflight": ("viscodex_lite.merge", "check a merge from configs and headers only (reads no weights)"),
    "merge": ("viscodex_lite.merge", "merge checkpoints (streamed, float32, vision copied from the VLM)"),
    "zoo": ("viscodex_lite.zoo", "the mini family: build, verify, list"),
    "analyze": ("viscodex_lite.analysis",
                "where fine-tuning changed the weights: streamed statistics and an offline HTML report"),
    "mcd": ("viscodex_lite.mcd", "MCD data: inspect a local copy, draw subsets, build the mini-MCD"),
    "finetune": ("viscodex_lite.finetune", "QLoRA fine-tune a VLM's language model (also under accelerate launch)"),
    "finetune-estimate": ("viscodex_lite.finetune", "QLoRA memory estimate for Qwen2.5-VL-3B and -7B"),
    "generate": ("viscodex_lite.generate", "greedy responses of a local checkpoint to prompts with images (JSONL)"),
    "score": ("viscodex_lite.infibench.cli", "score a responses JSONL against InfiBench(-V) cases"),
    "score-report": ("viscodex_lite.infibench.cli", "HTML report comparing scored runs"),
    "infibench-images": ("viscodex_lite.infibench.cli", "re-render the sample set's images"),
    "course": ("viscodex_lite.course", "course labs: student/solution copies, grading, docs site"),
    "runbook": ("viscodex_lite.runbook", "print the commands that rebuild VisCodex-8B/33B at full scale"),
    "demo": ("viscodex_lite.demo", "run the whole pipeline (tiny mode by default) and write an HTML report"),
}
COMMAND_MODULES = tuple(dict.fromkeys(module for module, _ in COMMANDS.values()))


def build_parser(command: str | None = "all") -> argparse.ArgumentParser:
    """The argument parser, with the real options of ``command``'s module only.

    ``command="all"`` (the default) imports every module and gives the complete parser (the runbook
    checks its commands against it); any other value imports at most the module providing
    ``command``, and the other subcommands are listed by name and help alone.

    >>> sorted(build_parser(None)._subparsers._group_actions[0].choices) == sorted(COMMANDS)
    True
    """
    parser = argparse.ArgumentParser(
        prog="viscodex-lite",
        description="Merge a coding LLM into a VLM, fine-tune it on MCD and score it on InfiBench-V.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = COMMAND_MODULES if command == "all" else [COMMANDS[command][0]] if command in COMMANDS else []
    registered: set[str] = set()
    for name, (module_name, help_text) in COMMANDS.items():
        if name in registered:
            continue
        if module_name in wanted:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if command == "all" and exc.name and (module_name + ".").startswith(exc.name + "."):  # not in this checkout
                    continue
                raise
            before = set(sub.choices)
            module.register_cli(sub)
            registered |= set(sub.choices) - before
            if name in registered:
                continue
        sub.add_parser(name, help=help_text, add_help=False)  # listed in --help; its module is not loaded
        registered.add(name)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``viscodex-lite`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command)
    except ModuleNotFoundError as exc:  # an optional dependency of this one command
        print(f"viscodex-lite {command}: error: needs the package {exc.name!r}, which is not installed "
              f"(pip install {exc.name}, or install viscodex-lite with its dependencies).", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
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
