"""Case-level grading on case files the kit writes in the official YAML format (grader_main.py:15-243,
246-288, 351-366), the responses/results files, the CLI and the shipped sample set."""

import json
import textwrap

import pytest

from viscodex_lite.infibench import cases as C
from viscodex_lite.infibench import runner as R
from viscodex_lite.infibench.cli import options_from
from viscodex_lite.infibench.sandbox import Limits, Sandbox
from viscodex_lite.infibench.scorers import ScoringOptions


@pytest.fixture(scope="module")
def box():
    with Sandbox(Limits(wall_s=10), workers=2) as sandbox:
        yield sandbox


def write_case(tmp_path, name, body, files=None):
    (tmp_path / f"eval_{name}.yaml").write_text(textwrap.dedent(body))
    for rel, text in (files or {}).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return C.load_case(tmp_path / f"eval_{name}.yaml")


UNIT = """\
    id: py-1
    type: code completion
    lang: python
    grading:
      unit_test:
        tests:
          - content: "assert add(2, 3) == 5"
          - path: test_add.py
            weight: 2.0
"""


@pytest.mark.parametrize("answer, expected", [
    ("```python\ndef add(a, b):\n    return a + b\n```", 1.0),              # correct, fenced
    ("Here:\n```\ndef add(a, b):\n    return a - b\n```", 0.0),              # wrong code
    ("```python\ndef add(a, b):\n    return 5\n```", 1 / 3),                # partial: first test only
    ("def add(a, b):\n    return a + b", 0.0),                              # bare code: official cut empties it
    ("", 0.0),                                                               # empty
])
def test_unit_test_case_variants(tmp_path, box, answer, expected):
    """GU 178-227: weight * pass per test; GM 243: ratio of weights."""
    case = write_case(tmp_path, "py-1", UNIT, {"test_add.py": "assert add(-1, 1) == 0\nassert add(0, 0) == 0\n"})
    [result] = R.score_responses([case], {"py-1": [answer]}, sandbox=box)
    assert result.status == "ok" and result.score == pytest.approx(expected)
    assert result.details["unit_test_totscore"] == 3.0


def test_bare_code_fix_runs_the_whole_answer(tmp_path, box):
    case = write_case(tmp_path, "py-1", UNIT, {"test_add.py": "assert add(-1, 1) == 0\n"})
    [result] = R.score_responses([case], {"py-1": ["def add(a, b):\n    return a + b"]}, options_from(["bare-code"]), sandbox=box)
    assert result.score == 1.0


def test_prefix_path_helper_imports_and_future_lines(tmp_path, box):
    """EU 674-701: setup file + helper imports (np, pd, typing *) before the answer; __future__ first."""
    body = """\
        id: py-2
        lang: python
        grading:
          unit_test:
            tests:
              - path: t.py
                prefix_path: setup.py
                only_longest: true
    """
    case = write_case(tmp_path, "py-2", body, {"t.py": "assert f() == 6 and BASE == 1\n", "setup.py": "BASE = 1\n"})
    answer = "```\nx = 1\n```\n```python\nfrom __future__ import annotations\ndef f() -> List[int]:\n    return int(np.sum(np.arange(4)))\n```"
    [result] = R.score_responses([case], {"py-2": [answer]}, sandbox=box)
    assert result.score == 1.0, result.details
    code = result.details["unit_test_detail"][0]["code"]
    assert code.startswith("from __future__") and "BASE = 1" in code and "import numpy as np" in code


def test_javascript_unit_test_and_language_override(tmp_path, box):
    """GM 160-183: unit_test.lang overrides the case lang; js aliases."""
    body = """\
        id: js-1
        lang: html
        grading:
          unit_test:
            lang: js
            tests:
              - "require('node:assert').strictEqual(double(4), 8);"
    """
    case = write_case(tmp_path, "js-1", body)
    good = "```js\nfunction double(x) { return 2 * x; }\n```"
    bad = "```js\nfunction double(x) { return x; }\n```"
    results = R.score_responses([case], {"js-1": [good, bad]}, sandbox=box)
    assert results[0].score == 0.5  # avg over the two attempts (GM 267)


def test_unknown_language_errors_and_drops_out_of_total(tmp_path):
    """GM 182-183 NotImplementedError, caught at GM 363-365: score 0 of 0."""
    case = write_case(tmp_path, "x", "id: x\nlang: cobol\ngrading:\n  unit_test:\n    tests: ['x']\n")
    [result] = R.score_responses([case], {"x": ["a"]})
    assert (result.status, result.score, result.max_score) == ("error", 0.0, 0.0)
    [fixed] = R.score_responses([case], {"x": ["a"]}, ScoringOptions(on_error="zero"))
    assert (fixed.score, fixed.max_score) == (0.0, 1.0)


def test_missing_response_is_excluded_like_official(tmp_path):
    """GM 258-261 returns 3 values where GM 352 unpacks 4, so the case errors: 0 of 0."""
    case = write_case(tmp_path, "k", "id: k\nlang: css\nfull_score: 2.0\nnull_score: 0.5\ngrading:\n  keywords: [flex]\n")
    [r] = R.score_responses([case], {})
    assert (r.status, r.max_score) == ("missing", 0.0)
    [r] = R.score_responses([case], {}, ScoringOptions(missing_response="null_score"))
    assert (r.score, r.max_score) == (0.5, 2.0)


def test_components_add_in_official_order_with_max_min(tmp_path):
    """GM 37-237: keywords + blank filling + similarity summed, then max_score/min_score, times full_score."""
    body = """\
        id: mix
        lang: python
        full_score: 10
        grading:
          max_score: 3.0
          min_score: 0.0
          keywords:
            - content: loc
              weight: 2.0
            - content: {content: "inplace=True", neg: true}
          blank_filling:
            template: "df.[blank][mask, 'c'] = 1"
            targets: [loc]
          similarity:
            - metric: rouge1
              references: ["use loc to assign"]
    """
    case = write_case(tmp_path, "mix", body)
    [r] = R.score_responses([case], {"mix": ["df.loc[mask, 'c'] = 1  use loc to assign"]})
    assert r.details["keywords_score"] == 2.0 and r.details["blank_filling_score"] == 1.0
    assert r.score == pytest.approx(10.0)   # 2 + 1 + ~0.9 capped at max_score 3 -> 3/3 * 10


def test_customized_and_post_handler_case_code(tmp_path):
    """GM 216-229 customized(response) and GU 164-173 blank post_handler, loaded from the case directory."""
    body = """\
        id: cust
        lang: javascript
        grading:
          customized: {module: cases_dev.handler_cust, func: handle}
    """
    case = write_case(tmp_path, "cust", body, {"cases_dev/handler_cust.py": "def handle(r):\n    return (1.0, 2.0, 'half') if 'ok' in r else (0.0, 2.0, 'no')\n"})
    [r] = R.score_responses([case], {"cust": ["ok"]})
    assert r.score == 0.5 and r.details["custom_detail"] == "half"
    untrusted = C.load_case(tmp_path / "eval_cust.yaml", trust_case_code=False)
    assert R.score_responses([untrusted], {"cust": ["ok"]})[0].status == "error"


def test_toolchain_less_tests_are_skipped_not_failed(tmp_path, box):
    body = "id: g\nlang: go\ngrading:\n  unit_test:\n    tests: ['func main() {}']\n  keywords: [range]\n"
    case = write_case(tmp_path, "g", body)
    [r] = R.score_responses([case], {"g": ["for range x"]}, sandbox=box)
    assert r.score == 1.0 and any("no toolchain" in s for s in r.details["skipped"])


def test_responses_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"case_id": "a", "response": "x"}\n{"case": "b"}\n')
    with pytest.raises(R.ResponsesError, match="r.jsonl:2"):
        R.read_responses(bad)


def test_loader_reads_suite_files_and_rejects_bad_cases(tmp_path):
    (tmp_path / "c").mkdir()
    write_case(tmp_path / "c", "a", "id: a\nlang: css\ngrading:\n  keywords: [x]\n")
    (tmp_path / "suite.yaml").write_text("attempt_reduce_mode: max\ncases:\n  - c/eval_a.yaml\n  - {path: c/eval_a.yaml, weight: 2}\n")
    loaded = C.load_cases(tmp_path / "suite.yaml")
    assert [c.id for c in loaded] == ["a", "a"] and loaded[1].weight == 2.0
    assert C.suite_settings(tmp_path / "suite.yaml")["attempt_reduce_mode"] == "max"
    (tmp_path / "eval_bad.yaml").write_text("id: bad\nlang: css\n")
    with pytest.raises(C.CaseError, match="eval_bad.yaml"):
        C.load_case(tmp_path / "eval_bad.yaml")


def test_sample_set_covers_every_grading_type_and_category():
    cases = C.load_cases(C.sample_dir())
    assert len(cases) >= 40
    assert {c.category for c in cases} == set(C.CATEGORIES)
    assert {t for c in cases for t in c.grading_types} == set(C.GRADING_TYPES)
    assert len({c.language for c in cases}) >= 10
    assert all(p.is_file() for c in cases for p in c.image_paths)
    msgs = C.prompt_messages(cases[0])
    assert msgs[-1]["content"][0]["type"] == "image" and msgs[-1]["content"][-1]["text"] == cases[0].prompt


def test_sample_set_reference_answers_score_full_and_models_rank(box):
    cases = C.load_cases(C.sample_dir())
    root = C.sample_dir().parent / "responses"
    percent = {m: R.summarize(R.score_responses(cases, R.read_responses(root / f"{m}.jsonl"), sandbox=box))["overall"]["percent"]
               for m in ("reference", "finetuned", "merged", "vlm")}
    assert percent["reference"] == pytest.approx(100.0)
    assert percent["reference"] > percent["finetuned"] > percent["merged"] > percent["vlm"] > 0


def test_cli_score_writes_results_and_report(tmp_path):
    from viscodex_lite.cli import main

    out, html = tmp_path / "s.jsonl", tmp_path / "r.html"
    responses = C.sample_dir().parent / "responses" / "vlm.jsonl"
    assert main(["score", "--cases", str(C.sample_dir()), "--responses", str(responses), "-o", str(out),
                 "--report", str(html), "--no-unit-tests"]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert {"case_id", "score", "max_score", "details"} <= set(rows[0]) and len(rows) == 42
    assert "Score per category" in html.read_text()
    assert main(["score-report", str(out), str(out), "--names", "a", "b", "-o", str(tmp_path / "two.html")]) == 0
