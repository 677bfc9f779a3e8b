"""InfiBench-V scoring speed: keyword/regex answers/s and sandboxed Python unit tests cases/s.

Unit tests are timed cold (a new Sandbox: its per-worker zygotes start and import numpy/pandas,
then every test runs) and warm (the same Sandbox runs them all again), with the default
preloads and with none. The load average is printed: the VM is shared, so note it with the numbers.

    python benchmarks/bench_scoring.py [--official DIR] [--workers 2]

With ``--official DIR`` (a checkout of infi-coder/infibench-evaluator kept outside this repo) it
also times the official evaluator on the same cases and answers and reports how often its
per-answer scores agree with ours. The official modules need numba/evaluate/rpy2, which the kit
does not install: tiny stand-ins are put in ``sys.modules`` (``njit`` = identity, a no-op
``evaluate.load``), enough for its keyword, blank-filling and Python unit-test paths.
Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from viscodex_lite.infibench import cases as C  # noqa: E402
from viscodex_lite.infibench import runner as R  # noqa: E402
from viscodex_lite.infibench import scorers as S  # noqa: E402
from viscodex_lite.infibench.sandbox import PRELOAD, Limits, Sandbox  # noqa: E402

MODELS = ("reference", "finetuned", "merged", "vlm")


def load():
    cases = C.load_cases(C.sample_dir())
    root = C.sample_dir().parent / "responses"
    answers = {m: R.read_responses(root / f"{m}.jsonl") for m in MODELS}
    pairs = [(c, answers[m][c.id][0]) for m in MODELS for c in cases]
    return cases, pairs


def bench_keywords(pairs, repeat=200):
    kw = [(c, a) for c, a in pairs if "keywords" in c.grading]
    started = time.perf_counter()
    for _ in range(repeat):
        for case, answer in kw:
            S.score_keywords(case.grading["keywords"], answer, post_handler=case.case_code)
    n = repeat * len(kw)
    return n, n / (time.perf_counter() - started), len(kw)


def python_unit_jobs(pairs):
    jobs = []
    for case, answer in pairs:
        if "unit_test" in case.grading and R.LANG_ALIASES.get(str(case.grading["unit_test"].get("lang", case.lang))) == "python":
            jobs.append((case, answer, [j for j, _, _ in R.unit_test_jobs(case, answer)]))
    return jobs


def bench_sandbox(pairs, workers, preload=PRELOAD):
    """Cold: a new Sandbox runs every test (its zygotes' start-up included). Warm: the same
    Sandbox runs them all again. Rates count cases (a case = one answer, 1-3 tests)."""
    jobs = python_unit_jobs(pairs)
    flat = [j for _, _, js in jobs for j in js]
    with Sandbox(Limits(wall_s=10), workers=workers, preload=preload) as box:
        started = time.perf_counter()
        box.warm_up()
        startup = time.perf_counter() - started
        cold = box.run_many(flat)
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        warm = box.run_many(flat)
        warm_s = time.perf_counter() - started
        layers = box.isolation()
    same = [a.status for a in cold] == [b.status for b in warm]
    return {"cases": len(jobs), "tests": len(flat), "startup_s": startup, "cold": len(jobs) / cold_s,
            "warm": len(jobs) / warm_s, "warm_s": warm_s, "slowest": max(r.duration_s for r in cold + warm),
            "passed": sum(r.passed for r in warm), "same_verdicts": same, "layers": layers}


def cpu_per_case(pairs, workers, preload=PRELOAD):
    """CPU seconds (harness + every sandboxed process, zygote start-up included) per case, one
    cold pass: steadier than wall time on a shared machine."""
    flat = [j for _, _, js in python_unit_jobs(pairs) for j in js]
    cpu = lambda: sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                      for f in ("ru_utime", "ru_stime"))
    before = cpu()
    with Sandbox(Limits(wall_s=10), workers=workers, preload=preload) as box:
        box.run_many(flat)
    return (cpu() - before) / len(python_unit_jobs(pairs))


# ------------------------------------------------------------------ the official evaluator

def import_official(root: Path):
    """Import grader_main/grader_utils/execution_utils from ``root`` with stand-ins for numba/evaluate/rpy2."""
    numba = types.ModuleType("numba")
    numba.njit = lambda f: f
    evaluate = types.ModuleType("evaluate")
    evaluate.load = lambda *a, **k: None
    rpy2 = types.ModuleType("rpy2")
    rpy2.robjects = types.ModuleType("rpy2.robjects")
    sys.modules.update({"numba": numba, "evaluate": evaluate, "rpy2": rpy2, "rpy2.robjects": rpy2.robjects})
    sys.path.insert(0, str(root))
    saved = sys.argv
    sys.argv = ["grader_main.py", "x", "y"]
    try:
        import grader_main  # noqa: F401  (parses argv only under __main__)
    finally:
        sys.argv = saved
    return sys.modules["grader_main"]


def official_keywords(gm, pairs, repeat=20):
    kw = [(c, a) for c, a in pairs if set(c.grading) <= {"keywords", "max_score", "min_score"}
          and not any(isinstance(r, dict) and "post_handler" in r for r in c.grading["keywords"])]
    started = time.perf_counter()
    for _ in range(repeat):
        for case, answer in kw:
            gm.grade_response(case.raw, str(case.case_dir), answer, 1.0, 0.0)
    n = repeat * len(kw)
    return n, n / (time.perf_counter() - started)


def agreement(gm, pairs):
    """Per-answer scores of the official grade_response vs ours on keyword / blank-filling cases."""
    same = total = 0
    diffs = []
    for case, answer in pairs:
        if not set(case.grading) <= {"keywords", "blank_filling", "max_score", "min_score"}:
            continue
        if any(isinstance(r, dict) and "post_handler" in r for r in case.grading.get("keywords", [])):
            continue
        try:
            theirs = gm.grade_response(case.raw, str(case.case_dir), answer, 1.0, 0.0)[0]
        except Exception as exc:  # noqa: BLE001
            theirs = f"error {type(exc).__name__}"
        try:
            ours = R.grade_response(case, answer, S.OFFICIAL, [], None, 1.0)[0]
        except Exception as exc:  # noqa: BLE001
            ours = f"error {type(exc).__name__}"
        total += 1
        if ours == theirs or (isinstance(ours, float) and isinstance(theirs, float) and abs(ours - theirs) < 1e-12):
            same += 1
        else:
            diffs.append((case.id, ours, theirs))
    return same, total, diffs




def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", type=Path, help="checkout of infi-coder/infibench-evaluator (outside the repo)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    cases, pairs = load()
    n, kw_rate, kw_cases = bench_keywords(pairs)
    print(f"keyword/regex scoring (kit):      {kw_rate:10,.0f} answers/s  ({n} answers over {kw_cases} case-answer pairs)")
    heavy = lambda c: any(w in str(c.grading) for w in ("pandas", "np.", "numpy", "pd."))
    print(f"load average before the sandbox runs: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min)")
    for label, subset, preload in (("all sample cases", pairs, PRELOAD),
                                   ("stdlib-only cases", [(c, a) for c, a in pairs if not heavy(c)], PRELOAD),
                                   ("all sample cases, nothing preloaded", pairs, ())):
        r = bench_sandbox(subset, args.workers, preload)
        print(f"sandboxed Python unit tests (kit, {label}): warm {r['warm']:5.1f} cases/s, cold {r['cold']:5.1f} cases/s "
              f"({r['cases']} cases, {r['tests']} tests ({r['passed']} pass), {args.workers} workers; warm pass "
              f"{r['warm_s']:.2f}s, zygote start-up {r['startup_s']:.2f}s, slowest test {r['slowest']:.2f}s, "
              f"same verdicts cold/warm: {r['same_verdicts']})")
    print(f"CPU per case, one cold pass (harness + sandboxed processes): {cpu_per_case(pairs, args.workers):.3f}s "
          f"(nothing preloaded: {cpu_per_case(pairs, args.workers, ()):.3f}s)")
    print(f"sandbox layers: {' '.join(r['layers'])}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rate = kw_rate
    if args.official:
        gm = import_official(args.official.resolve())
        n, rate_off = official_keywords(gm, pairs)
        print(f"keyword scoring (official):        {rate_off:10,.0f} answers/s  ({n} answers)  -> kit/official = {rate / rate_off if rate_off else 0:.2f}x")
        same, total, diffs = agreement(gm, pairs)
        print(f"agreement with official grade_response (keywords, blank filling): {same}/{total} answers identical")
        for d in diffs[:10]:
            print("   differs:", d)
        started = time.perf_counter()
        jobs = python_unit_jobs(pairs)
        for case, answer, _ in jobs:
            cwd = os.getcwd()
            try:
                gm.utils.unit_test_execution("python", answer, case.grading["unit_test"]["tests"], str(case.case_dir))
            finally:
                os.chdir(cwd)
        off_rate = len(jobs) / (time.perf_counter() - started)
        print(f"Python unit tests (official, unsandboxed, sequential): {off_rate:.2f} cases/s ({len(jobs)} cases)")


if __name__ == "__main__":
    main()
