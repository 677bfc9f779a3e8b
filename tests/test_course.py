"""Course labs: student/solution copies from one source, checked exercises, grading a class.

Fast tests use small synthetic notebooks (kernels that import no torch). The two tests marked
``course`` run every real notebook's copies (``make course-test``): each solution copy under
nbmake, each student copy with errors allowed, which must fail exactly at its exercise cells.
"""

import csv
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import viscodex_lite as vl
from viscodex_lite import check, course, notebooks

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

EXERCISE = '''### BEGIN SOLUTION
# hint: six times seven
x = 6 * 7
### END SOLUTION
assert vl.check.exercise("42.1", x)'''


def code_of(nb):
    return [c.source for c in nb.cells if c.cell_type == "code"]


# ------------------------------------------------------------------------------ student / solution copies

def test_exercises_are_found_with_ids_hints_and_defined_names():
    nb = notebooks.new_notebook(["import viscodex_lite as vl", EXERCISE,
                                 "### BEGIN SOLUTION\ndef f(a):\n    return a\ny, z = 1, 2\n### END SOLUTION\nassert y"])
    found = course.exercises(nb, number="42")
    assert [(e.id, e.cell, e.hint, e.defines) for e in found] == [("42.1", 1, "six times seven", ("x",)),
                                                                  ("42.2", 2, None, ("f", "y", "z"))]


@pytest.mark.parametrize("source", ["### BEGIN SOLUTION\nx = 1", "### END SOLUTION\nx = 1",
                                    "### END SOLUTION\n### BEGIN SOLUTION", "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION",
                                    "x = 1  ### BEGIN SOLUTION\n### END SOLUTION", "### BEGIN SOLUTIONS\n### END SOLUTION"])
def test_malformed_markers_name_the_cell(source):
    with pytest.raises(course.CourseError, match=r"lab\.ipynb, cell 1"):
        course.exercises(notebooks.new_notebook(["x = 0", source]), name="lab.ipynb")


def test_repeated_ids_are_refused():
    with pytest.raises(course.CourseError, match="repeat"):
        course.exercises(notebooks.new_notebook([EXERCISE, EXERCISE]), number="42")


def test_student_copy_replaces_each_solution_with_a_stub_and_keeps_the_check():
    nb = notebooks.new_notebook(["import viscodex_lite as vl", EXERCISE,
                                 "if True:\n    ### BEGIN SOLUTION\n    y = 1\n    ### END SOLUTION\n    assert y"])
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="✅ 42.1 pass")]
    nb.cells[1].execution_count = 3
    student = course.student_copy(nb, number="42")
    assert student.cells[1].source == ('# ✏️ exercise 42.1: your code here (define `x`)\n'
                                       'raise NotImplementedError("42.1: six times seven")\n'
                                       'assert vl.check.exercise("42.1", x)')
    assert student.cells[2].source.splitlines()[:3] == [
        "if True:", "    # ✏️ exercise 42.2: your code here (define `y`)",
        '    raise NotImplementedError("42.2: write your answer to exercise 42.2 here (see the question above), then run the cell")']
    assert student.cells[1].outputs == [] and student.cells[1].execution_count is None
    assert student.cells[1].metadata["viscodex_lite"] == {"exercise": "42.1"}
    assert "x = 6 * 7" not in "\n".join(code_of(student)) and "SOLUTION" not in "\n".join(code_of(student))
    assert nb.cells[1].outputs, "the source notebook is not modified"


def test_solution_copy_only_drops_the_markers():
    nb = notebooks.new_notebook(["import viscodex_lite as vl", EXERCISE])
    assert course.solution_copy(nb, number="42").cells[1].source == (
        '# hint: six times seven\nx = 6 * 7\nassert vl.check.exercise("42.1", x)')


def test_a_hint_with_quotes_stays_a_valid_string():
    nb = notebooks.new_notebook(['### BEGIN SOLUTION\n# hint: use weights["base"] and \\n\nx = 1\n### END SOLUTION'])
    stub = course.student_copy(nb, number="42").cells[0].source
    namespace = {}
    with pytest.raises(NotImplementedError, match=r'42\.1: use weights\["base"\] and \\n'):
        exec(stub, namespace)


def test_build_writes_both_copies_of_every_notebook_and_a_readme(tmp_path):
    found = course.build(tmp_path / "course")
    assert sorted(found) == [p.name for p in SOURCES]
    for source in SOURCES:
        nb = notebooks.read(source)
        student = notebooks.read(tmp_path / "course" / "student" / source.name)
        solution = notebooks.read(tmp_path / "course" / "solution" / source.name)
        without_markers = ["\n".join(l for l in src.splitlines() if l.strip() not in (course.BEGIN, course.END))
                           for src in code_of(nb)]
        assert code_of(solution) == without_markers
        exercise_cells = {e.cell for e in found[source.name]}
        for index, (a, b) in enumerate(zip(nb.cells, student.cells)):
            if index in exercise_cells:
                assert "raise NotImplementedError(" in b.source and course.BEGIN not in b.source
            else:
                assert a.source == b.source
        for copy in (student, solution):
            assert all(not c.get("outputs") for c in copy.cells)
            for src in code_of(copy):  # every cell still parses (shell and magic lines aside)
                compile("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("!", "%"))), source.name, "exec")
    readme = (tmp_path / "course" / "README.md").read_text()
    assert "Hand out `student/` only" in readme and "viscodex-lite course grade" in readme
    assert all(e.id in readme for exs in found.values() for e in exs)


def test_rebuilding_replaces_stale_copies(tmp_path):
    stale = tmp_path / "student" / "99_removed.ipynb"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    (tmp_path / "grades.csv").write_text("kept")
    course.build(tmp_path)
    assert not stale.exists() and (tmp_path / "grades.csv").read_text() == "kept"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folders left behind"


def test_cli_course_build(tmp_path, capsys):
    assert vl.cli.main(["course", "build", "-o", str(tmp_path)]) == 0
    assert "exercises" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "student").iterdir()) == [p.name for p in SOURCES]


# --------------------------------------------------------------------------------------------- checks

@check.checker("42.1", hint="six times seven")
def _forty_two(answer, *, factor=1):
    require_number = check.number(answer)
    check.require(require_number is not None, "answer with a number")
    check.require(require_number == 6 * 7 * factor, "multiply six by seven")
    return f"x = {answer}"


def test_check_passes_and_says_so(capsys):
    assert check.exercise("42.1", 42) is True
    assert capsys.readouterr().out == "✅ 42.1 pass: x = 42\n"


@pytest.mark.parametrize("answer, hint", [(41, "multiply six by seven"), ("42", "answer with a number"),
                                          (None, "no answer yet (six times seven)")])
def test_check_says_not_yet_with_a_hint(answer, hint, capsys):
    assert check.exercise("42.1", answer) is False
    assert capsys.readouterr().out == f"❌ 42.1 not yet: {hint}\n"


def test_check_compares_with_a_value_computed_from_the_context():
    assert check.exercise("42.1", 84, factor=2) and not check.exercise("42.1", 42, factor=2)


def test_an_answer_that_breaks_the_check_is_not_yet_not_a_crash():
    @check.checker("42.9", hint="a list of numbers")
    def _sum(answer):
        return sum(answer)

    verdict = check.verdict("42.9", 5)
    assert not verdict.passed and "TypeError" in verdict.message and "a list of numbers" in verdict.message


def test_a_notebook_bug_is_an_error_not_a_verdict():
    with pytest.raises(check.ExerciseError, match="needs the context"):
        check.exercise("42.1", 42, wrong_name=1)
    with pytest.raises(check.ExerciseError, match="exercises/nb97.py"):
        check.exercise("97.1", 1)
    with pytest.raises(check.ExerciseError, match="NN.k"):
        check.exercise("1.1", 1)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    trio = vl.tiny.make_trio(tmp_path_factory.mktemp("trio"))
    return trio, vl.tiny.load_trio_weights(trio)


def test_notebook_01_checks_accept_the_solution_and_reject_near_misses(trio):
    trio, weights = trio
    tau_code = vl.task_vectors.TaskVector.between(weights["code"], weights["base"])
    assert check.verdict("01.1", (-tau_code).apply_to(weights["code"]), base=weights["base"]).passed
    assert not check.verdict("01.1", (-tau_code).apply_to(weights["base"]), base=weights["base"]).passed
    assert not check.verdict("01.1", weights["code"], base=weights["base"]).passed
    ctx = dict(weights=weights, trio=trio, lam=0.7)
    assert check.verdict("01.2", 0.3, **ctx).passed and check.verdict("01.2", 0.6, **dict(ctx, lam=0.4)).passed
    assert not check.verdict("01.2", 0.7, **ctx).passed and not check.verdict("01.2", 0.31, **ctx).passed
    base_norm = sum(float((v.double() ** 2).sum()) for v in weights["base"].values()) ** 0.5
    assert check.verdict("01.3", tau_code.norm() / base_norm, weights=weights).passed
    assert check.verdict("01.3", tau_code.norm(), weights=weights).message.startswith("that is ‖τ_code‖ alone")
    assert not check.verdict("01.3", tau_code.norm() / base_norm * 1.01, weights=weights).passed


def test_notebook_00_checks_count_from_the_processor_and_the_model(trio):
    from transformers import Qwen2_5_VLForConditionalGeneration

    trio, _ = trio
    processor = vl.models.load_processor(trio.vlm)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(trio.vlm)
    assert check.verdict("00.1", 48, processor=processor).passed
    assert "patches" in check.verdict("00.1", 192, processor=processor).message
    assert check.verdict("00.2", 30, vlm=vlm).passed == (sum(1 for _ in vlm.model.visual.named_parameters()) == 30)
    assert not check.verdict("00.2", len(vlm.state_dict()), vlm=vlm).passed


def test_notebook_04_checks_accept_the_solution_and_reject_near_misses(trio):
    from viscodex_lite import memory as mem
    from viscodex_lite.layout import layout_of, meta_model

    trio, _ = trio
    meta = meta_model(trio.vlm)
    layout = layout_of(meta)
    attention = layout.lm_target_regex(("q_proj", "k_proj", "v_proj", "o_proj"))
    assert check.verdict("04.1", attention, meta=meta, layout=layout).passed
    assert "MLP" in check.verdict("04.1", layout.lm_target_regex(), meta=meta, layout=layout).message
    assert not check.verdict("04.1", "q_proj", meta=meta, layout=layout).passed
    seven = mem.QWEN25_VL_7B
    plain, up = mem.estimate_memory(seven), mem.estimate_memory(seven, upcast_non_quantized=True)
    extra = (up.weights - plain.weights) / 2**30
    vision = "weights: vision tower + projector (frozen)"
    assert check.verdict("04.2", (extra, vision), config=seven).passed
    assert not check.verdict("04.2", (extra, "weights: lm_head"), config=seven).passed
    assert "all the weights" in check.verdict("04.2", (up.weights / 2**30, vision), config=seven).message
    seq = 2048
    while mem.estimate_memory(seven, seq_len=seq).peak <= 22 * 2**30:
        seq *= 2
    assert check.verdict("04.3", seq, config=seven, budget_gib=22).passed
    assert "still fits" in check.verdict("04.3", seq // 2, config=seven, budget_gib=22).message
    ctx = dict(width=1920, height=1080, cap=512 * 28 * 28)
    assert check.verdict("04.4", (1222, 480), **ctx).passed
    assert "resizes first" in check.verdict("04.4", (68 * 38, 480), **ctx).message
    assert not check.verdict("04.4", (1222, 512), **ctx).passed


# ---------------------------------------------------------------------------------------------- grading

SETUP = '''import viscodex_lite as vl
from viscodex_lite.check import checker, require

def _six_times_seven(answer):
    require(answer == 6 * 7, "multiply six by seven")

for k in range(1, 7):
    checker(f"42.{k}", hint="six times seven")(_six_times_seven)'''


def lab(*exercise_cells, name="42_lab.ipynb"):
    """A built student copy: a set-up cell, then exercise cells 42.1, 42.2, … marked as ``course build`` marks them."""
    nb = notebooks.new_notebook([SETUP, *exercise_cells])
    for k in range(1, len(exercise_cells) + 1):
        nb.cells[k].metadata[course.META_KEY] = {"exercise": f"42.{k}"}
    return nb, name


def write(folder, student, nb_and_name):
    nb, name = nb_and_name
    return notebooks.write(nb, folder / student / name)


def checked(k, code):
    return f'{code}\nassert vl.check.exercise("42.{k}", x)'


def test_find_submissions_understands_both_layouts(tmp_path):
    nb, _ = lab("x = 1")
    for path in ("alice/42_lab.ipynb", "bob_42_lab.ipynb", "carol.ipynb", "_grades/alice/42_lab.ipynb",
                 "alice/.ipynb_checkpoints/42_lab-checkpoint.ipynb"):
        notebooks.write(nb, tmp_path / path)
    found = {(s.student, s.path.name) for s in course.find_submissions(tmp_path, skip=tmp_path / "_grades")}
    assert found == {("alice", "42_lab.ipynb"), ("bob", "bob_42_lab.ipynb"), ("carol", "carol.ipynb")}
    (tmp_path / "empty").mkdir()
    with pytest.raises(course.CourseError, match="no notebooks"):
        course.find_submissions(tmp_path / "empty")


def test_grade_tabulates_pass_not_yet_and_error(tmp_path):
    subs = tmp_path / "subs"
    write(subs, "ann", lab(checked(1, "x = 42"),
                           checked(2, "x = 41"),
                           checked(3, '# ✏️ exercise 42.3: your code here\nraise NotImplementedError("42.3: six times seven")'),
                           checked(4, "x = 1 / 0"),
                           "x = 42",                                  # 42.5: the check line was deleted
                           checked(6, "x = bytearray(3 << 30)")))     # 42.6: over the memory limit
    write(subs, "ben", lab(checked(1, "x = 6 * 7")))
    result = course.grade(subs, tmp_path / "grades", limits=course.Limits(timeout_s=60, memory_mb=2048),
                          echo=lambda *a, **k: None)
    ann = result.rows["ann"]
    assert [ann[f"42.{k}"][0] for k in range(1, 7)] == ["pass", "not yet", "not yet", "error", "error", "error"]
    assert ann["42.2"][1] == "multiply six by seven"
    assert ann["42.3"][1].startswith("not attempted")
    assert ann["42.4"][1].startswith("ZeroDivisionError")
    assert "did not report" in ann["42.5"][1]
    assert ann["42.6"][1].startswith("MemoryError")
    assert result.rows["ben"] == {"42.1": ("pass", "")}
    rows = {r["student"]: r for r in csv.DictReader((tmp_path / "grades" / "grades.csv").open())}
    assert (rows["ann"]["42.1"], rows["ann"]["passed"], rows["ann"]["total"]) == ("pass", "1", "6")
    assert (rows["ben"]["42.1"], rows["ben"]["42.2"], rows["ben"]["total"]) == ("pass", "", "1")
    detail = list(csv.DictReader((tmp_path / "grades" / "grades_detail.csv").open()))
    assert len(detail) == 7 and {"student": "ann", "exercise": "42.2", "status": "not yet",
                                 "detail": "multiply six by seven"} in detail
    page = (tmp_path / "grades" / "grades.html").read_text()
    assert "<th>42.6</th>" in page and "multiply six by seven" in page
    assert (tmp_path / "grades" / "executed" / "ann" / "42_lab.ipynb").exists()
    assert {"rlimits", "timeout", "clean-env"} <= set(result.runs[0]["isolation"])


def test_a_notebook_past_its_time_limit_is_stopped_and_marked_timeout(tmp_path):
    write(tmp_path / "subs", "eve", lab(checked(1, "x = 42"), checked(2, "import time\ntime.sleep(600)\nx = 42"),
                                        checked(3, "x = 42")))
    result = course.grade(tmp_path / "subs", tmp_path / "grades", limits=course.Limits(timeout_s=8),
                          echo=lambda *a, **k: None)
    assert [result.rows["eve"][f"42.{k}"][0] for k in (1, 2, 3)] == ["pass", "timeout", "timeout"]
    assert result.runs[0]["wall_s"] < 60


def test_graded_notebooks_get_no_network_and_a_clean_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "do-not-leak")
    probe = '''import os, socket
leaked = "SECRET_TOKEN" in os.environ
try:
    socket.create_connection(("1.1.1.1", 53), timeout=3).close(); online = True
except OSError:
    online = False
x = 42 if not leaked and not (online and NETNS) else 0'''
    prefix, _ = course._isolation_plan()
    write(tmp_path / "subs", "ann", lab(checked(1, f"NETNS = {'--net' in prefix}\n" + probe)))
    result = course.grade(tmp_path / "subs", tmp_path / "grades", limits=course.Limits(timeout_s=60),
                          echo=lambda *a, **k: None)
    assert result.rows["ann"]["42.1"][0] == "pass", result.rows


def test_cli_course_grade(tmp_path, capsys):
    write(tmp_path, "ann", lab(checked(1, "x = 42")))
    assert vl.cli.main(["course", "grade", str(tmp_path), "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    assert "ann" in out and "pass" in out and (tmp_path / "_grades" / "grades.csv").exists()


# ------------------------------------------------------------------------- the real notebooks (course-test)

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("course")
    return out, course.build(out)


@pytest.mark.course
def test_every_solution_copy_runs_under_nbmake(built, tmp_path):
    out, _ = built
    env = {**notebooks_env(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "viscodex_lite.nbmake_gpu", "-p", "no:cacheprovider",
                             "--nbmake", "--nbmake-timeout=300", "-q", "-rs", *sorted(map(str, (out / "solution").glob("*.ipynb")))],
                            cwd=out, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(SOURCES)} passed" in result.stdout


@pytest.mark.course
def test_every_student_copy_fails_exactly_at_its_exercise_cells(built, tmp_path):
    out, found = built
    for name, exercises in found.items():
        executed = notebooks.execute(out / "student" / name, allow_errors=True, env=notebooks_env(tmp_path),
                                     cell_timeout_s=300)
        errors = {i: o for i, c in enumerate(executed.cells) for o in c.get("outputs", []) if o["output_type"] == "error"}
        assert set(errors) == {e.cell for e in exercises}, f"{name}: cells {sorted(errors)} failed, exercises are {[e.cell for e in exercises]}"
        assert {o["ename"] for o in errors.values()} == {"NotImplementedError"}, name


def notebooks_env(tmp_path):
    import os

    return {**os.environ, "VISCODEX_LITE_MODE": "tiny", "VISCODEX_LITE_STATIC": "1", "TQDM_DISABLE": "1",
            "VISCODEX_LITE_RUNS": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
