"""``viscodex-lite score`` / ``score-report`` / ``infibench-images``: the InfiBench-V commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import secret
from ..errors import KitError
from ..jsonl import write_jsonl
from .scorers import ScoringOptions

FIXES = {"ignorecase-regex": ("regex_case", "ignorecase"), "nested-to-lower": ("nested_to_lower", True),
         "top-level-regex": ("top_level_regex", True), "bare-code": ("bare_code", "whole"),
         "missing-as-null": ("missing_response", "null_score"), "errors-as-zero": ("on_error", "zero")}


def options_from(fixes: list[str]) -> ScoringOptions:
    """ScoringOptions with the named fixes on (``all`` = every fix)."""
    if "all" in fixes:
        return ScoringOptions.fixed()
    unknown = sorted(set(fixes) - set(FIXES))
    if unknown:
        raise KitError(f"unknown --fix {unknown}; choose from {sorted(FIXES)} or 'all'.")
    return ScoringOptions(**dict(FIXES[f] for f in fixes))


def _score(args: argparse.Namespace) -> int:
    from . import cases, runner
    from .judge import JudgeClient
    from .sandbox import Limits, Sandbox

    case_list = cases.load_cases(args.cases, trust_case_code=not args.no_case_code)
    settings = cases.suite_settings(args.cases)
    judge = None
    if args.judge_url:
        judge = JudgeClient(args.judge_url, args.judge_model, api_key=secret(args.judge_api_key_env),
                            cache_dir=args.judge_cache, max_concurrency=args.judge_concurrency)
    responses = runner.read_responses(args.responses)
    unknown = sorted(set(responses) - {c.id for c in case_list})
    if unknown:
        print(f"warning: {len(unknown)} responses name no case (e.g. {unknown[:3]})", file=sys.stderr)
    with Sandbox(Limits(wall_s=args.timeout), workers=args.workers) as box:
        results = runner.score_responses(case_list, responses, options_from(args.fix), sandbox=box, judge=judge,
                                         reduce_mode=settings["attempt_reduce_mode"],
                                         full_score_per_question=settings["full_score_per_question"],
                                         null_score_per_question=settings["null_score_per_question"],
                                         run_unit_tests=not args.no_unit_tests)
    write_jsonl([r.to_json() for r in results], args.output)
    summary = runner.summarize(results)["overall"]
    print(f"{summary['percent']:.2f}% ({summary['score']:.2f} / {summary['full']:.2f}) over {summary['cases']} cases, "
          f"{summary['errors']} errors, {summary['skipped']} skipped -> {args.output}")
    if args.report:
        from .report import write_report

        write_report({Path(args.responses).stem: results}, args.report)
        print(f"report -> {args.report}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .runner import read_results

    names = args.names or [Path(p).stem for p in args.results]
    if len(names) != len(args.results):
        raise KitError(f"--names has {len(names)} names for {len(args.results)} results files.")
    write_report({n: read_results(p) for n, p in zip(names, args.results)}, args.output)
    print(f"report -> {args.output}")
    return 0


def _images(args: argparse.Namespace) -> int:
    from .samples import build_images

    paths = build_images(args.root)
    print(f"{len(paths)} images -> {paths[0].parent if paths else args.root}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("score", help="score a responses JSONL against InfiBench(-V) cases")
    p.add_argument("--cases", required=True, help="case directory (eval_*.yaml) or an official suite .yaml")
    p.add_argument("--responses", required=True, help='JSONL, one {"case_id", "response"} per line')
    p.add_argument("-o", "--output", required=True, help='JSONL out: {"case_id", "score", "max_score", "details"}')
    p.add_argument("--report", help="also write an HTML report here")
    p.add_argument("--workers", type=int, default=2, help="parallel sandboxed unit tests (default 2)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per unit test (default: official per-language)")
    p.add_argument("--fix", action="append", default=[], help=f"turn on a deliberate fix: {', '.join(sorted(FIXES))}, all")
    p.add_argument("--no-unit-tests", action="store_true", help="skip unit-test grading (cases become 'skipped')")
    p.add_argument("--no-case-code", action="store_true", help="refuse cases that run their own grading code")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--judge-model", default="gpt-4o")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="name of the env var holding the key")
    p.add_argument("--judge-cache", default="runs/judge_cache")
    p.add_argument("--judge-concurrency", type=int, default=4)
    p.set_defaults(func=_score)
    r = subparsers.add_parser("score-report", help="HTML report comparing scored runs")
    r.add_argument("results", nargs="+", help="score JSONL files")
    r.add_argument("--names", nargs="*", help="model names (default: file stems)")
    r.add_argument("-o", "--output", required=True)
    r.set_defaults(func=_report)
    i = subparsers.add_parser("infibench-images", help="re-render the sample set's images")
    i.add_argument("--root", default=None, help="sample set root (default assets/infibench_v_sample)")
    i.set_defaults(func=_images)
