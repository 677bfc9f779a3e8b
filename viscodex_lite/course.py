"""Course labs from the kit's notebooks: student and solution copies, and grading a class's work.

Each exercise is written once, in the notebook, with its solution between markers and its check
after them, in the same code cell::

    ### BEGIN SOLUTION
    # hint: negate the task vector, then apply it to the code model's weights
    without_code = (-tau_code).apply_to(weights["code"])
    ### END SOLUTION
    assert vl.check.exercise("01.1", without_code, base=weights["base"])

``viscodex-lite course build -o DIR`` writes ``DIR/solution/`` (markers removed) and
``DIR/student/`` (each solution block replaced by a stub that raises ``NotImplementedError`` with
the block's ``# hint:`` line, or a generic hint naming the exercise), both without outputs, and an
instructor's ``DIR/README.md``. ``viscodex-lite course grade FOLDER`` runs every collected student
notebook in its own time- and resource-limited process and writes a student × exercise table
(pass / not yet / error / timeout) as CSV and HTML.

>>> nb = notebooks.new_notebook(['### BEGIN SOLUTION\\n# hint: 6 × 7\\nx = 42\\n### END SOLUTION\\nassert x == 42'])
>>> print(student_copy(nb, number="09").cells[0].source)
# ✏️ exercise 09.1: your code here (define `x`)
raise NotImplementedError("09.1: 6 × 7")
assert x == 42
"""

from __future__ import annotations

import argparse
import ast
import csv
import html
import json
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import notebooks
from .atomic import atomic_path
from .config import REPO_ROOT
from .errors import KitError

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HINT_LINE = re.compile(r"^\s*#\s*hint:\s*(?P<hint>.*\S)\s*$", re.IGNORECASE)
CHECK_CALL = re.compile(r"""vl\.check\.exercise\(\s*["'](?P<id>\d\d\.\d+)["']""")
NOTEBOOK_NUMBER = re.compile(r"(?:^|\D)(?P<number>\d\d)_[a-z0-9_]+$")
META_KEY = "viscodex_lite"  # cell metadata {"viscodex_lite": {"exercise": "01.2"}} in built copies
STATUSES = ("pass", "not yet", "error", "timeout")


class CourseError(KitError):
    """A notebook's exercise markers are malformed, or a folder holds nothing to build or grade."""


# ----------------------------------------------------------------------------------- exercises

@dataclass(frozen=True)
class Exercise:
    """One exercise: its id ("NN.k"), its code cell, the hint and the names its solution defines."""

    id: str
    cell: int
    hint: str | None
    defines: tuple[str, ...]


def _solution_span(lines: list[str], where: str) -> tuple[int, int] | None:
    """Line indices of the BEGIN and END markers of a cell, checked: one pair, in order, alone on their lines."""
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    stray = [i for i, line in enumerate(lines) if "SOLUTION" in line and i not in begins + ends and line.lstrip().startswith("###")]
    if not begins and not ends and not stray:
        return None
    if stray or len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise CourseError(f"{where}: expected one '{BEGIN}' line, then one '{END}' line, each alone on its line "
                          f"(found BEGIN at lines {[b + 1 for b in begins]}, END at {[e + 1 for e in ends]}"
                          + (f", malformed marker at {[s + 1 for s in stray]}" if stray else "") + ")")
    return begins[0], ends[0]


def _defined_names(code: str) -> tuple[str, ...]:
    """Names a solution block assigns or defines at its top level (for the stub's "define `x`")."""
    try:
        tree = ast.parse(textwrap.dedent(code))
    except SyntaxError:
        return ()
    names: list[str] = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        for target in targets:
            for name in ast.walk(target) if target is not None else ():
                if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Store):
                    names.append(name.id)
    return tuple(dict.fromkeys(names))


def exercises(nb, *, number: str = "00", name: str = "notebook") -> list[Exercise]:
    """The exercises of a source notebook, in order. The id comes from the cell's
    ``vl.check.exercise("NN.k", ...)`` call, or is ``number.k`` (k counting exercise cells) without one.
    """
    found: list[Exercise] = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        lines = cell.source.splitlines()
        span = _solution_span(lines, f"{name}, cell {index}")
        if span is None:
            continue
        block = lines[span[0] + 1:span[1]]
        hints = [m["hint"] for m in map(HINT_LINE.match, block) if m]
        call = CHECK_CALL.search(cell.source)
        exercise_id = call["id"] if call else f"{number}.{len(found) + 1}"
        found.append(Exercise(exercise_id, index, hints[0] if hints else None, _defined_names("\n".join(block))))
    ids = [e.id for e in found]
    if len(set(ids)) != len(ids):
        raise CourseError(f"{name}: exercise ids repeat: {ids}")
    return found


def _stub(exercise: Exercise, indent: str) -> list[str]:
    what = f" (define {', '.join(f'`{n}`' for n in exercise.defines)})" if exercise.defines else ""
    hint = exercise.hint or f"write your answer to exercise {exercise.id} here (see the question above), then run the cell"
    message = json.dumps(f"{exercise.id}: {hint}", ensure_ascii=False)  # a JSON string is a valid Python literal
    return [f"{indent}# ✏️ exercise {exercise.id}: your code here{what}", f"{indent}raise NotImplementedError({message})"]


def _copy(nb, number: str, name: str, student: bool):
    nb = notebooks.strip_outputs(nb)
    for exercise in exercises(nb, number=number, name=name):
        cell = nb.cells[exercise.cell]
        lines = cell.source.splitlines()
        begin, end = _solution_span(lines, name)
        indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
        middle = _stub(exercise, indent) if student else lines[begin + 1:end]
        cell.source = "\n".join(lines[:begin] + middle + lines[end + 1:])
        cell.metadata[META_KEY] = {"exercise": exercise.id}
    return nb


def student_copy(nb, *, number: str = "00", name: str = "notebook"):
    """``nb`` without outputs, each solution block replaced by a stub raising ``NotImplementedError``."""
    return _copy(nb, number, name, student=True)


def solution_copy(nb, *, number: str = "00", name: str = "notebook"):
    """``nb`` without outputs and without the solution markers (the solutions stay)."""
    return _copy(nb, number, name, student=False)


def notebook_number(path: Path) -> str:
    match = NOTEBOOK_NUMBER.search(Path(path).stem)
    return match["number"] if match else "00"


# -------------------------------------------------------------------------------------- build

def build(out_dir: str | Path, source_dir: str | Path = REPO_ROOT / "notebooks") -> dict[str, list[Exercise]]:
    """Write ``out_dir/student/``, ``out_dir/solution/`` and ``out_dir/README.md`` from ``source_dir``.

    Each of the two folders is built beside its target and swapped in whole, so a failed build
    leaves the previous one in place. Returns the exercises of each notebook.
    """
    out_dir, source_dir = Path(out_dir), Path(source_dir)
    sources = sorted(source_dir.glob("[0-9][0-9]_*.ipynb"))
    if not sources:
        raise CourseError(f"no notebooks (NN_name.ipynb) in {source_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, list[Exercise]] = {}
    staged = {kind: Path(tempfile.mkdtemp(prefix=f".{kind}.", dir=out_dir)) for kind in ("student", "solution")}
    try:
        for path in sources:
            nb, number = notebooks.read(path), notebook_number(path)
            found[path.name] = exercises(nb, number=number, name=path.name)
            notebooks.write(student_copy(nb, number=number, name=path.name), staged["student"] / path.name)
            notebooks.write(solution_copy(nb, number=number, name=path.name), staged["solution"] / path.name)
        for kind, tmp in staged.items():
            os.chmod(tmp, 0o755)
            target = out_dir / kind
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
    finally:
        for tmp in staged.values():
            shutil.rmtree(tmp, ignore_errors=True)
    with atomic_path(out_dir / "README.md") as tmp:
        tmp.write_text(instructor_readme(found))
    return found


def instructor_readme(found: dict[str, list[Exercise]]) -> str:
    """The instructor's README of a built course folder."""
    rows = "\n".join(f"| `{name}` | {', '.join(e.id for e in exs) or '—'} | "
                     + "; ".join(f"{e.id}: {e.hint}" for e in exs if e.hint) + " |"
                     for name, exs in found.items())
    return f"""# viscodex-lite course labs (instructor copy)

Built by `viscodex-lite course build` from the kit's notebooks. **Hand out `student/` only**; `solution/`
holds the answers.

| folder | what |
|---|---|
| `student/` | every notebook without outputs; each exercise's solution replaced by a stub that raises `NotImplementedError` with a hint |
| `solution/` | the same notebooks with the solutions in place (the answer key) |

| notebook | exercises | hints given to students |
|---|---|---|
{rows}

## Running a lab

1. **Hand out** `student/`: students run the notebooks in JupyterLab with the kit installed (see each
   notebook's "How to run it"). Every exercise cell ends with `assert vl.check.exercise("NN.k", answer, ...)`,
   which prints ✅ pass or ❌ not yet with a hint. The check computes the expected result from the
   notebook's own objects, so there is no answer to copy from the notebook.
2. **Collect** the notebooks into one folder, one sub-folder per student:
   `submissions/alice/01_task_vector_arithmetic.ipynb`, `submissions/bob/01_…`. (Files at the top level
   count as one student each: `alice_01_task_vector_arithmetic.ipynb` → `alice`.)
3. **Grade**: `viscodex-lite course grade submissions/ -o grades/` runs each notebook in its own process
   (tiny mode, time limit `--timeout`, memory limit `--memory-mb`, no network where Linux namespaces are
   available) and writes `grades/grades.csv`, `grades/grades_detail.csv`, `grades/grades.html`
   (pass / not yet / error / timeout per student and exercise) and the executed notebooks.
4. **Check the key**: `python -m pytest -p viscodex_lite.nbmake_gpu --nbmake solution/` runs every solution
   copy (cells tagged `gpu` are skipped without CUDA); `viscodex-lite course grade solution/` should say pass everywhere.
"""


# -------------------------------------------------------------------------------------- grade

@dataclass
class Submission:
    student: str
    path: Path


def find_submissions(folder: str | Path, *, skip: Path | None = None) -> list[Submission]:
    """Notebooks under ``folder``: ``folder/<student>/*.ipynb``, or ``folder/<student>_NN_name.ipynb``."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise CourseError(f"{folder} is not a folder of student notebooks")
    skip = Path(skip).resolve() if skip else None
    found = []
    for path in sorted(folder.rglob("*.ipynb")):
        rel = path.relative_to(folder)
        if any(part.startswith((".", "_")) for part in rel.parts[:-1]) or (skip and skip in path.parents):
            continue
        if len(rel.parts) > 1:
            student = rel.parts[0]
        else:
            match = NOTEBOOK_NUMBER.search(path.stem)
            student = path.stem[: match.start("number")].rstrip("_-") if match and match.start("number") else path.stem
        found.append(Submission(student or path.stem, path))
    if not found:
        raise CourseError(f"no notebooks under {folder}: collect them as {folder}/<student>/NN_name.ipynb")
    return found


def exercise_cells(nb) -> dict[str, int]:
    """Exercise id → cell index in a built (student or solution) copy: cell metadata first, then the check call."""
    cells: dict[str, int] = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        exercise_id = cell.metadata.get(META_KEY, {}).get("exercise")
        call = CHECK_CALL.search(cell.source)
        for found in {exercise_id, call["id"] if call else None} - {None}:
            cells.setdefault(found, index)
    return cells


def _kit_exercises(path: Path) -> list[str]:
    """The exercise ids of the kit notebook with the same number as ``path`` (empty when none)."""
    number = NOTEBOOK_NUMBER.search(path.stem)
    for source in sorted((REPO_ROOT / "notebooks").glob(f"{number['number']}_*.ipynb") if number else []):
        return [e.id for e in exercises(notebooks.read(source), number=number["number"], name=source.name)]
    return []


@dataclass
class Limits:
    """Bounds of one graded notebook run."""

    timeout_s: float = 300.0
    memory_mb: int = 6144
    file_size_mb: int = 256
    open_files: int = 1024
    processes: int = 512


def _accessible_to_others(path: Path) -> bool:
    """Whether a non-root user can reach ``path`` (every ancestor searchable, the path readable)."""
    path = path.resolve()
    if not os.stat(path).st_mode & 0o004:
        return False
    return all(os.stat(parent).st_mode & 0o001 for parent in path.parents)


def _isolation_plan() -> tuple[tuple[str, ...], bool]:
    """Namespace command prefix (the InfiBench sandbox's probe) and whether to drop root to a grading uid.

    The sandbox itself (Landlock read allow-list, 2 GiB, one Python program) does not fit a notebook:
    a kernel needs the kit's repository, its assets and Jupyter's runtime files; so grading reuses its
    namespace probe and runs the kernel over Unix sockets inside it.
    """
    try:
        from .infibench.sandbox import _unshare_flags
        prefix = _unshare_flags()
    except ImportError:
        prefix = ()
    drop = (os.geteuid() == 0 and "--user" not in prefix
            and all(_accessible_to_others(p) for p in (REPO_ROOT, Path(sys.prefix), Path(sys.base_prefix))))
    return prefix, drop


def _child_env(workdir: Path, mode: str) -> dict[str, str]:
    """A clean environment: the kit's settings, offline flags, the work dir as HOME; no inherited secrets."""
    from .config import current

    cfg = current(mode=mode)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir), "PYTHONPATH": str(REPO_ROOT),
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
           "VISCODEX_LITE_MODE": cfg.mode, "VISCODEX_LITE_STATIC": "1", "VISCODEX_LITE_SEED": str(cfg.seed),
           "VISCODEX_LITE_ASSETS": str(cfg.assets_dir), "VISCODEX_LITE_RUNS": str(workdir / "runs")}
    for var, value in (("VISCODEX_LITE_MODELS", cfg.models_root), ("VISCODEX_LITE_DATA", cfg.data_root)):
        if value is not None:
            env[var] = str(value)
    return env


def _set_limits(limits: Limits):
    import resource

    def apply():
        for what, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_AS, limits.memory_mb << 20),
                            (resource.RLIMIT_CPU, int(limits.timeout_s * 2) + 60),
                            (resource.RLIMIT_FSIZE, limits.file_size_mb << 20),
                            (resource.RLIMIT_NOFILE, limits.open_files)):
            resource.setrlimit(what, (value, value))

    return apply


def run_submission(path: Path, workdir: Path, *, limits: Limits = Limits(), mode: str = "tiny",
                   slot: int = 0) -> dict:
    """Run one student notebook in a child process and return its per-cell record (see :func:`_worker`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, workdir / "submission.ipynb")
    prefix, drop = _isolation_plan()
    uid = 61000 + slot if drop else None
    spec = {"notebook": str(workdir / "submission.ipynb"), "record": str(workdir / "record.json"),
            "executed": str(workdir / "executed.ipynb"), "timeout_s": limits.timeout_s, "uid": uid,
            "processes": limits.processes, "ipc": bool(prefix), "skip_gpu": not notebooks.has_cuda()}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    if uid is not None:
        for item in (workdir, *workdir.iterdir()):
            os.chown(item, uid, uid)
    import subprocess

    started = time.monotonic()
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "viscodex_lite.course", str(spec_path)],
                            cwd=workdir, env=_child_env(workdir, mode), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_set_limits(limits))
    try:
        output, _ = proc.communicate(timeout=limits.timeout_s + 60)  # the worker stops itself at timeout_s
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
    record_path = workdir / "record.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"cells": {}, "stopped": None}
    if not record.get("finished") and not record.get("stopped"):
        tail = output.decode(errors="replace").strip().splitlines()[-3:]
        record["stopped"] = {"cell": record.get("current"), "reason": "error",
                             "detail": f"the run ended early (exit {proc.returncode}): {' | '.join(tail)}"}
    record["isolation"] = ([*(f for f in prefix if f in ("--net", "--pid", "--user"))] + (["uid-drop"] if uid else [])
                           + ["rlimits", "timeout", "clean-env"])
    record["wall_s"] = round(time.monotonic() - started, 1)
    return record


def _cell_record(cell) -> dict:
    verdicts, error = [], None
    from .check import MIMETYPE

    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            error = [output.get("ename", ""), output.get("evalue", "")]
        elif MIMETYPE in output.get("data", {}):
            verdicts.append(output["data"][MIMETYPE])
    return {"error": error, "verdicts": verdicts}


def _worker(spec_path: str) -> int:
    """Inside the graded process: drop privileges, run the notebook, record each cell as it finishes."""
    import resource

    spec = json.loads(Path(spec_path).read_text())
    if spec["uid"] is not None:
        os.setgroups([])
        os.setgid(spec["uid"])
        os.setuid(spec["uid"])
        resource.setrlimit(resource.RLIMIT_NPROC, (spec["processes"], spec["processes"]))
    record: dict = {"cells": {}, "stopped": None, "finished": False, "current": None}
    record_path = Path(spec["record"])

    def save():
        with atomic_path(record_path) as tmp:
            tmp.write_text(json.dumps(record))

    def on_cell_executed(cell, cell_index, execute_reply):
        record["cells"][str(cell_index)] = _cell_record(cell)
        save()

    def on_cell_start(cell, cell_index):
        record["current"] = cell_index

    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    nb = notebooks.read(spec["notebook"])
    save()
    try:
        executed = notebooks.execute(nb, cwd=Path(spec_path).parent, deadline_s=spec["timeout_s"],
                                     cell_timeout_s=spec["timeout_s"], allow_errors=True, skip_gpu=spec["skip_gpu"],
                                     transport="ipc" if spec["ipc"] else "tcp", ipc_dir=Path(spec_path).parent,
                                     on_cell_executed=on_cell_executed, on_cell_start=on_cell_start)
        notebooks.write(executed, spec["executed"])
        record["finished"] = True
    except CellTimeoutError:
        record["stopped"] = {"cell": record["current"], "reason": "timeout",
                             "detail": f"the notebook ran past {spec['timeout_s']:g} s"}
    except DeadKernelError:
        record["stopped"] = {"cell": record["current"], "reason": "error",
                             "detail": "the kernel died (memory limit?)"}
    save()
    return 0


def exercise_status(exercise_id: str, cell: int | None, record: dict) -> tuple[str, str]:
    """(status, detail) of one exercise from a run's record."""
    verdicts = [v for c in record["cells"].values() for v in c["verdicts"] if v.get("exercise") == exercise_id]
    if verdicts:
        last = verdicts[-1]
        return ("pass", last.get("message", "")) if last.get("passed") else ("not yet", last.get("message", ""))
    if cell is None:
        return "error", "the exercise cell is missing from the notebook"
    ran = record["cells"].get(str(cell))
    if ran and ran["error"]:
        ename, evalue = ran["error"]
        if ename == "NotImplementedError":
            return "not yet", "not attempted (the stub still raises NotImplementedError)"
        return "error", f"{ename}: {evalue}"[:300]
    stopped = record.get("stopped")
    if ran is None and stopped:
        return ("timeout" if stopped["reason"] == "timeout" else "error"), stopped.get("detail", "")
    if ran is None:
        return "error", "the cell did not run"
    return "error", "the check did not report (was its line removed?)"


@dataclass
class GradeResult:
    """Per student and exercise: (status, detail); plus where each notebook's run went."""

    exercises: list[str] = field(default_factory=list)
    rows: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)


def grade(folder: str | Path, out_dir: str | Path, *, limits: Limits = Limits(), mode: str = "tiny",
          echo=print) -> GradeResult:
    """Run every notebook under ``folder`` and write the table to ``out_dir`` (CSV and HTML)."""
    out_dir = Path(out_dir).resolve()
    submissions = find_submissions(folder, skip=out_dir)
    result = GradeResult()
    scratch = Path(tempfile.mkdtemp(prefix="vl-grade-"))
    os.chmod(scratch, 0o711)
    try:
        for n, sub in enumerate(submissions):
            nb = notebooks.read(sub.path)
            cells = exercise_cells(nb)
            ids = list(dict.fromkeys(_kit_exercises(sub.path) + sorted(cells)))
            echo(f"[{n + 1}/{len(submissions)}] {sub.student}: {sub.path.name} ({len(ids)} exercises) …", end=" ", flush=True)
            record = run_submission(sub.path, scratch / f"{n:04d}", limits=limits, mode=mode)
            row = result.rows.setdefault(sub.student, {})
            for exercise_id in ids:
                row[exercise_id] = exercise_status(exercise_id, cells.get(exercise_id), record)
            executed = scratch / f"{n:04d}" / "executed.ipynb"
            if executed.exists():
                notebooks.write(notebooks.read(executed), out_dir / "executed" / sub.student / sub.path.name)
            passed = sum(row[i][0] == "pass" for i in ids)
            echo(f"{passed}/{len(ids)} pass in {record['wall_s']:.0f} s")
            result.runs.append({"student": sub.student, "notebook": str(sub.path), "wall_s": record["wall_s"],
                                "isolation": record["isolation"], "stopped": record.get("stopped")})
            result.exercises = sorted(set(result.exercises) | set(ids), key=lambda e: tuple(map(int, e.split("."))))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_tables(result, out_dir)
    return result


def _write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_tables(result: GradeResult, out_dir: Path) -> dict[str, Path]:
    """``grades.csv`` (student × exercise), ``grades_detail.csv`` (one row per cell) and ``grades.html``."""
    import io

    wide, long = io.StringIO(), io.StringIO()
    w = csv.writer(wide)
    w.writerow(["student", *result.exercises, "passed", "total"])
    d = csv.writer(long)
    d.writerow(["student", "exercise", "status", "detail"])
    body = []
    colours = {"pass": "#d7f5dd", "not yet": "#fff2c2", "error": "#ffd6d6", "timeout": "#e3e3ff", "": "#f4f4f4"}
    for student, row in sorted(result.rows.items()):
        statuses = [row.get(e, ("", ""))[0] for e in result.exercises]
        passed, total = statuses.count("pass"), sum(1 for s in statuses if s)
        w.writerow([student, *statuses, passed, total])
        for exercise_id in result.exercises:
            if exercise_id in row:
                d.writerow([student, exercise_id, *row[exercise_id]])
        cells = "".join(f'<td style="background:{colours[s]}" title="{html.escape(row.get(e, ("", ""))[1])}">{s or "—"}</td>'
                        for e, s in zip(result.exercises, statuses))
        body.append(f"<tr><th>{html.escape(student)}</th>{cells}<td>{passed}/{total}</td></tr>")
    head = "".join(f"<th>{html.escape(e)}</th>" for e in result.exercises)
    page = (f"<!doctype html><meta charset='utf-8'><title>viscodex-lite grades</title>"
            "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 8px;text-align:center}"
            "table{border-collapse:collapse}</style><h1>Grades</h1>"
            "<p>pass / not yet / error / timeout per student and exercise; hover a cell for the hint or error.</p>"
            f"<table><tr><th>student</th>{head}<th>passed</th></tr>{''.join(body)}</table>")
    paths = {"csv": out_dir / "grades.csv", "detail": out_dir / "grades_detail.csv", "html": out_dir / "grades.html"}
    _write_atomic(paths["csv"], wide.getvalue())
    _write_atomic(paths["detail"], long.getvalue())
    _write_atomic(paths["html"], page)
    return paths


def format_table(result: GradeResult) -> str:
    """The grade table as aligned text for the terminal."""
    rows = [["student", *result.exercises]] + [[s, *(r.get(e, ("—", ""))[0] for e in result.exercises)]
                                               for s, r in sorted(result.rows.items())]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


# ---------------------------------------------------------------------------------------- CLI

def _cmd_build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    found = build(args.out, args.notebooks)
    n = sum(len(v) for v in found.values())
    print(f"{len(found)} notebooks, {n} exercises → {Path(args.out) / 'student'} and {Path(args.out) / 'solution'} "
          f"({time.monotonic() - started:.1f} s); instructor notes in {Path(args.out) / 'README.md'}")
    return 0


def _cmd_grade(args: argparse.Namespace) -> int:
    out = Path(args.out or Path(args.folder) / "_grades")
    result = grade(args.folder, out, limits=Limits(timeout_s=args.timeout, memory_mb=args.memory_mb), mode=args.mode,
                   echo=print)
    print()
    print(format_table(result))
    print(f"\n→ {out / 'grades.csv'}, {out / 'grades_detail.csv'}, {out / 'grades.html'}; executed notebooks in {out / 'executed'}")
    if result.runs:
        print(f"isolation: {' '.join(result.runs[0]['isolation'])}")
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    from . import docs_site

    docs_site.build_site(Path(args.out), work_dir=Path(args.work), jobs=args.jobs, echo=print)
    return 0


def register_cli(subparsers) -> None:
    course = subparsers.add_parser("course", help="course labs: student/solution copies, grading, docs site")
    sub = course.add_subparsers(dest="course_command", metavar="ACTION", required=True)
    p = sub.add_parser("build", help="write student and solution copies of every notebook")
    p.add_argument("-o", "--out", required=True, help="output folder (student/, solution/, README.md)")
    p.add_argument("--notebooks", default=str(REPO_ROOT / "notebooks"), help="source notebooks (default: the kit's)")
    p.set_defaults(func=_cmd_build)
    p = sub.add_parser("grade", help="run a folder of student notebooks and tabulate the exercises")
    p.add_argument("folder", help="collected notebooks: FOLDER/<student>/NN_name.ipynb")
    p.add_argument("-o", "--out", help="where the tables go (default FOLDER/_grades)")
    p.add_argument("--timeout", type=float, default=Limits.timeout_s, help="seconds per notebook (default %(default)s)")
    p.add_argument("--memory-mb", type=int, default=Limits.memory_mb, help="address-space limit per notebook")
    p.add_argument("--mode", default="tiny", help="run mode of the graded notebooks (default tiny)")
    p.set_defaults(func=_cmd_grade)
    p = sub.add_parser("docs", help="execute every notebook (tiny) and build the static docs site")
    p.add_argument("-o", "--out", default=str(REPO_ROOT / "site"), help="site folder (default site/)")
    p.add_argument("--work", default=str(REPO_ROOT / "build" / "docs"), help="staging folder (default build/docs)")
    p.add_argument("--jobs", type=int, default=2, help="notebooks executed in parallel (default 2)")
    p.set_defaults(func=_cmd_docs)


if __name__ == "__main__":  # the graded process: python -m viscodex_lite.course SPEC.json
    sys.exit(_worker(sys.argv[1]))
