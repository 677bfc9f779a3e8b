"""Score a responses file against cases: the official ``grade_response`` order, batched I/O.

``score_responses`` plans every unit test and judge request first, runs the tests in the sandbox
in parallel and the judge calls concurrently, then combines each answer's components exactly like
``grader_main.py:15-243`` (keywords, blank filling, unit tests, similarity, customized, then
InfiBench-V's judge; ``max_score``/``min_score``; ratio times ``full_score``).

>>> from viscodex_lite.infibench.cases import Case
>>> case = Case.from_dict({"id": "k", "lang": "css", "grading": {"keywords": ["flex"]}}, Path("."))
>>> [r.score for r in score_responses([case], {"k": ["use flex"]})]
[1.0]
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KitError
from ..jsonl import read_jsonl
from . import scorers
from .cases import Case
from .scorers import OFFICIAL, GradingError, ScoringOptions

# grader_main.py:164-183: the language names a unit test may give, and what they run as.
LANG_ALIASES = {"python": "python", "c": "cpp", "c++": "cpp", "cpp": "cpp", "c/c++": "cpp", "c++/c": "cpp",
                "cpp/c": "cpp", "c/cpp": "cpp", "js": "javascript", "javascript": "javascript", "java": "java",
                "c#": "c#", "c-sharp": "c#", "csharp": "c#", "cs": "c#", "ts": "typescript",
                "typescript": "typescript", "r": "r", "go": "go"}
# execution_utils.py:516-580: lines prepended to every Python / C++ / R test program.
PYTHON_HELPER = ["import math", "import re", "import sys", "import copy", "import datetime", "import itertools",
                 "import collections", "import heapq", "import statistics", "import functools", "import hashlib",
                 "import numpy", "import numpy as np", "import pandas as pd", "import string", "import requests",
                 "import openpyxl", "import xlsxwriter", "import yolk", "from typing import *",
                 "from collections import *"]
CPP_HELPER = ["using namespace std;", "#include<stdlib.h>", "#include<algorithm>", "#include<cmath>", "#include<math.h>",
              "#include<numeric>", "#include<stdio.h>", "#include<vector>", "#include<set>", "#include<map>",
              "#include<queue>", "#include<stack>", "#include<list>", "#include<deque>", "#include<boost/any.hpp>",
              "#include<string>", "#include<climits>", "#include<cstring>", "#include<iostream>", "#include<sstream>",
              "#include<fstream>"]
R_HELPER = ["rm(list=ls())", "library(assert)"]


class ResponsesError(KitError):
    """The responses file is malformed; the message names the line."""


@dataclass
class CaseResult:
    """One case's score: ``score`` of ``max_score`` (= its full score; 0 when the official
    evaluator drops it from the total), and the per-component ``details``."""

    case_id: str
    score: float
    max_score: float
    details: dict = field(default_factory=dict)
    status: str = "ok"                      # ok | error | missing | skipped
    category: str = ""
    language: str = ""
    lang: str = ""
    question_type: str = ""
    grading_types: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.score / self.max_score if self.max_score else 0.0

    def to_json(self) -> dict:
        return {"case_id": self.case_id, "score": self.score, "max_score": self.max_score,
                "details": dict(self.details, status=self.status, category=self.category, language=self.language,
                                lang=self.lang, type=self.question_type, grading_types=self.grading_types)}

    @classmethod
    def from_json(cls, rec: dict) -> "CaseResult":
        d = dict(rec.get("details", {}))
        return cls(rec["case_id"], float(rec["score"]), float(rec["max_score"]), d, d.get("status", "ok"),
                   d.get("category", ""), d.get("language", ""), d.get("lang", ""), d.get("type", ""),
                   list(d.get("grading_types", [])))


# ------------------------------------------------------------------ planning unit tests

def _available_header(line: str) -> bool:
    if "boost/" not in line:
        return True
    return any(Path(d, line.split("<", 1)[1].rstrip(">")).exists() for d in ("/usr/include", "/usr/local/include"))


def unit_test_jobs(case: Case, response: str, options: ScoringOptions = OFFICIAL) -> list[tuple[Any, float, str]]:
    """``(TestJob, weight, code)`` per unit test of a case, built like grader_utils.py:178-227 and
    execution_utils.py:664-717 (prefix + answer -> code extraction -> setup file + helper imports)."""
    from .sandbox import TestJob, available_modules

    spec = case.grading["unit_test"]
    lang = LANG_ALIASES.get(str(spec.get("lang", case.lang)).lower())
    if lang is None:
        raise GradingError(f"Does not support this language yet: {spec.get('lang', case.lang)}.")
    jobs = []
    for test in spec["tests"]:
        prefix, weight, prefix_file, timeout, only_longest = "", 1.0, "", None, False
        if isinstance(test, str):
            reference = test
        else:
            reference = case.read_text(test["path"]) if "path" in test else test["content"]
            prefix = test.get("prefix", "")
            timeout = test.get("timeout")
            if test.get("prefix_path") is not None:
                prefix_file = case.read_text(test["prefix_path"])
            weight = test.get("weight", 1.0)
            only_longest = test.get("only_longest", False)
        code = scorers.extract_code(prefix + "\n" + response, lang, only_longest, options)
        program = prefix_file + "\n" + code
        if lang == "python":
        # missing helper modules are left out: the official environment installs them all
            have = available_modules()
            helper = [l for l in PYTHON_HELPER if l.split()[1].split(".")[0] not in
                      {"numpy", "pandas", "requests", "openpyxl", "xlsxwriter", "yolk"} - have]
            lines = ("\n".join(helper) + "\n" + program).strip().split("\n")
            program = "\n".join([l for l in lines if l.startswith("from __future__")] +
                                [l for l in lines if not l.startswith("from __future__")])
        elif lang == "cpp":
            program = ("\n".join(l for l in CPP_HELPER if _available_header(l)) + "\n" + program).strip()
        elif lang == "r":
            program = ("\n".join(R_HELPER) + "\n" + program).strip()
        jobs.append((TestJob(lang, [program, reference], timeout_s=timeout, label=case.id), weight, program))
    return jobs


# ------------------------------------------------------------------ combining one answer

def grade_response(case: Case, response: str, options: ScoringOptions, test_results: list | None,
                   judge_result: Any, full_score: float) -> tuple[float, float, dict]:
    """``(score, full_score, detail)`` for one answer, components in the official order."""
    grading = case.grading
    earned, total, detail = 0.0, 0.0, {}
    skipped: list[str] = []
    post = case.case_code
    if "keywords" in grading:
        e, t, d = scorers.score_keywords(grading["keywords"], response, options, post)
        detail.update(d, keywords_score=e, keywords_totscore=t)
        earned, total = earned + e, total + t
    if "blank_filling" in grading:
        e, t, d = scorers.score_blank_filling(grading["blank_filling"], response, post)
        detail.update(d, blank_filling_score=e, blank_filling_totscore=t)
        earned, total = earned + e, total + t
    if "unit_test" in grading:
        e = t = 0.0
        tests = []
        for (job, weight, code), res in zip(unit_test_jobs(case, response, options), test_results or []):
            entry = {"status": res.status, "reason": res.reason, "output": res.output[-2000:],
                     "duration_s": round(res.duration_s, 3), "code": code, "isolation": res.isolation}
            tests.append(entry)
            if res.status == "skipped":
                skipped.append(res.reason)
                continue
            t += weight
            e += weight * float(res.passed)
        detail.update(unit_test_detail=tests, unit_test_score=e, unit_test_totscore=t)
        earned, total = earned + e, total + t
    if "similarity" in grading:
        e, t, d = scorers.score_similarity(grading["similarity"], response, case.read_text)
        detail.update(d, similarity_score=e, similarity_totscore=t)
        earned, total = earned + e, total + t
    if "customized" in grading:
        e, t, d = post(grading["customized"])(response)
        detail.update(custom_score=e, custom_totscore=t, custom_detail=d)
        earned, total = earned + e, total + t
    if "judge" in grading:
        weight = float(grading["judge"].get("weight", 1.0))
        if judge_result is None:
            skipped.append("skipped: no judge configured")
        else:
            e = weight * judge_result.score / 100.0
            detail.update(judge_score=e, judge_totscore=weight, judge_detail=judge_result.to_json())
            earned, total = earned + e, total + weight
    if skipped and total == 0:
        raise _Skipped("; ".join(sorted(set(skipped))))
    if skipped:
        detail["skipped"] = sorted(set(skipped))
    for key in ("max_score", "min_score"):
        if key in grading:
            detail[key] = grading[key]
    return scorers.combine(earned, total, grading, full_score), full_score, detail


class _Skipped(Exception):
    pass


# ------------------------------------------------------------------ the whole run

def score_responses(cases: list[Case], responses: dict[str, list[str]], options: ScoringOptions = OFFICIAL,
                    sandbox=None, judge=None, reduce_mode: str = "avg", full_score_per_question: float = 1.0,
                    null_score_per_question: float = 0.0, run_unit_tests: bool = True) -> list[CaseResult]:
    """Score every case (cases without a response follow ``options.missing_response``).

    ``sandbox``: a :class:`~.sandbox.Sandbox` (one with 2 workers is made when needed);
    ``judge``: a :class:`~.judge.JudgeClient` or None (judge components are then skipped).
    """
    plans: dict[tuple[str, int], list] = {}
    jobs, judge_requests = [], []
    for case in cases:
        for n, response in enumerate(responses.get(case.id, [])):
            if run_unit_tests and "unit_test" in case.grading:
                try:
                    planned = unit_test_jobs(case, response, options)
                except Exception:   # the error surfaces again when the answer is graded
                    planned = []
                plans[(case.id, n)] = list(range(len(jobs), len(jobs) + len(planned)))
                jobs.extend(job for job, _, _ in planned)
            if judge is not None and "judge" in case.grading:
                judge_requests.append((case, response))
    own_sandbox = None
    if jobs and sandbox is None:
        from .sandbox import Sandbox

        sandbox = own_sandbox = Sandbox(workers=2)
    try:
        test_results = sandbox.run_many(jobs) if jobs else []
    finally:
        if own_sandbox is not None:
            own_sandbox.close()
    verdicts = dict(zip([(c.id, r) for c, r in judge_requests], judge.grade_many(judge_requests))) if judge_requests else {}

    results = []
    for case in cases:
        full = case.full_score(full_score_per_question)
        meta = dict(category=case.category, language=case.language, lang=case.lang,
                    question_type=case.question_type, grading_types=case.grading_types)
        answers = responses.get(case.id)
        if not answers:
            if options.missing_response == "null_score":
                results.append(CaseResult(case.id, case.null_score(null_score_per_question), full,
                                          {"info": "no response"}, "missing", **meta))
            else:  # grader_main.py:260-261 + 363-365: the case errors and leaves the total
                results.append(CaseResult(case.id, 0.0, 0.0, {"info": "error encountered",
                                          "error_obj": "no response (excluded from the total, like the official evaluator)"},
                                          "missing", **meta))
            continue
        try:
            scored = []
            for n, response in enumerate(answers):
                if "unit_test" in case.grading and not run_unit_tests:
                    raise _Skipped("skipped: unit tests disabled")
                tests = [test_results[i] for i in plans.get((case.id, n), [])]
                scored.append(grade_response(case, response, options, tests, verdicts.get((case.id, response)), full))
            score, std = scorers.reduce_scores([s for s, _, _ in scored], reduce_mode)
            details = {"responses": [d for _, _, d in scored]} if len(scored) > 1 else scored[0][2]
            if std:
                details["std"] = std
            results.append(CaseResult(case.id, score, full, details, "ok", **meta))
        except _Skipped as why:
            results.append(CaseResult(case.id, 0.0, 0.0, {"info": str(why)}, "skipped", **meta))
        except Exception as exc:  # noqa: BLE001 - grader_main.py:363 catches everything, so do we
            max_score = full if options.on_error == "zero" else 0.0
            results.append(CaseResult(case.id, 0.0, max_score, {"info": "error encountered", "error_obj": str(exc),
                                      "traceback": traceback.format_exc(limit=3)}, "error", **meta))
    return results


# ------------------------------------------------------------------ files

def read_responses(path: str | Path) -> dict[str, list[str]]:
    """``{"case_id", "response"}`` per line -> {case_id: [responses...]} (several lines = several attempts)."""
    out: dict[str, list[str]] = {}
    for where, rec in read_jsonl(path, ResponsesError):
        if "case_id" not in rec or "response" not in rec:
            raise ResponsesError(f"{where}: expected a JSON object with 'case_id' and 'response'.")
        response = rec["response"]
        if not isinstance(response, str):
            raise ResponsesError(f"{where}: 'response' must be a string, got {type(response).__name__}.")
        out.setdefault(str(rec["case_id"]), []).append(response)
    return out


def read_results(path: str | Path) -> list[CaseResult]:
    """The per-case results a ``score`` run wrote (``jsonl.write_jsonl`` of ``CaseResult.to_json()``)."""
    return [CaseResult.from_json(rec) for _, rec in read_jsonl(path, ResponsesError)]


def summarize(results: list[CaseResult], by: str | None = None) -> dict[str, dict]:
    """Suite score(s) like grader_main.py:355-373: sum of scores over sum of full scores, in %.

    ``by`` = ``"category"``, ``"language"``, ``"grading_type"`` or None (overall).
    """
    groups: dict[str, list[CaseResult]] = {}
    for r in results:
        keys = r.grading_types if by == "grading_type" else [getattr(r, by) if by else "overall"]
        for k in keys:
            groups.setdefault(k or "?", []).append(r)
    out = {}
    for k, rs in sorted(groups.items()):
        got, full = sum(r.score for r in rs), sum(r.max_score for r in rs)
        out[k] = {"score": got, "full": full, "percent": 100.0 * got / full if full else 0.0, "cases": len(rs),
                  "errors": sum(r.status == "error" for r in rs), "skipped": sum(r.status == "skipped" for r in rs)}
    return out
