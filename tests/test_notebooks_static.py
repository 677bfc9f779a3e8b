"""Static gates on the notebooks (no execution): what makes a course rot quietly gets caught here.

The notebooks themselves run under nbmake in the same `make test` (see conftest.py for gpu cells).
"""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import viscodex_lite as vl
from viscodex_lite import course

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAME = re.compile(r"^(\d\d)_[a-z0-9]+(_[a-z0-9]+)*\.ipynb$")


def load(path):
    return nbformat.read(path, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ is empty"


def test_names_are_numbered_contiguously_and_lowercase():
    numbers = []
    for path in NOTEBOOKS:
        match = NAME.match(path.name)
        assert match, f"{path.name}: expected NN_lowercase_slug.ipynb"
        numbers.append(int(match.group(1)))
    assert numbers == list(range(len(numbers))), f"numbering must run 00, 01, … without gaps: {numbers}"


def test_outputs_are_stripped():
    nbstripout = shutil.which("nbstripout") or str(Path(sys.executable).with_name("nbstripout"))
    result = subprocess.run([nbstripout, "--verify", *map(str, NOTEBOOKS)], capture_output=True, text=True)
    assert result.returncode == 0, f"notebooks with outputs; run `nbstripout notebooks/*.ipynb`:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_anatomy(path):
    nb = load(path)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "kernelspec must be python3"
    cells = code_cells(nb)
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one code cell tagged 'parameters'"
    assert tagged[0] is cells[0], "the parameters cell is the first code cell"
    assert f'for_notebook("{path.name[:2]}")' in tagged[0].source, "the parameters cell calls vl.config.for_notebook(NN)"
    text = "\n".join(c.source for c in nb.cells)
    assert "| runs in" in text.lower(), "a 'Runs in' table near the top"
    assert "You will learn" in text
    assert re.search(r"^\s*assert ", text, re.M), "checks with assert on results"
    assert "## Exercises" in text and "### BEGIN SOLUTION" in text, "exercises with marked solutions"


CHECK_LINE = re.compile(r"""^assert vl\.check\.exercise\("(?P<id>\d\d\.\d+)", """, re.M)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_follow_the_course_convention(path):
    """Each exercise cell: `### BEGIN SOLUTION` … `### END SOLUTION` (optionally a `# hint: …` line inside),
    then one `assert vl.check.exercise("NN.k", answer, **context)`; ids NN.1, NN.2, … in order, each with a
    registered check (viscodex_lite/exercises/nbNN.py). `viscodex-lite course build` relies on this."""
    nb = load(path)
    number = path.name[:2]
    found = course.exercises(nb, number=number, name=path.name)  # raises on malformed markers
    assert found, "at least one exercise"
    for exercise in found:
        after = nb.cells[exercise.cell].source.split("### END SOLUTION", 1)[1]
        calls = CHECK_LINE.findall(after)
        assert len(calls) == 1, f"cell {exercise.cell}: end with one `assert vl.check.exercise(\"{number}.k\", answer, ...)`"
        assert exercise.defines, f"{exercise.id}: the solution should define the answer it checks"
    ids = [e.id for e in found]
    assert ids == [f"{number}.{k}" for k in range(1, len(ids) + 1)], f"exercise ids must run {number}.1, {number}.2, …: {ids}"
    for exercise_id in ids:
        vl.check.lookup(exercise_id)  # ExerciseError when no check is registered


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_header_says_how_to_run_it(path):
    """The first cell says how to run the notebook locally, on a one-GPU cloud machine and in JupyterLab."""
    header = load(path).cells[0]
    assert header.cell_type == "markdown"
    how = header.source.split("**How to run it.**", 1)
    assert len(how) == 2, "a '**How to run it.**' paragraph in the first cell"
    for place in ("Locally", "one-GPU cloud machine", "JupyterLab"):
        assert place in how[1], f"'How to run it' must cover: {place}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_never_reads_environment_variables(path):
    text = "\n".join(c.source for c in code_cells(load(path)))
    assert "os.environ" not in text and "getenv" not in text, "notebooks get settings from vl.config only"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_vl_symbol_exists(path):
    """Catch drift between notebooks and the package: every `vl.a.b` a notebook uses must exist."""
    for cell in code_cells(load(path)):
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute):
                chain = []
                cur = node
                while isinstance(cur, ast.Attribute):
                    chain.append(cur.attr)
                    cur = cur.value
                if isinstance(cur, ast.Name) and cur.id == "vl" and len(chain) >= 1:
                    obj = vl
                    for attr in reversed(chain[-2:] if len(chain) >= 2 else chain):
                        assert hasattr(obj, attr), f"{path.name}: vl.{'.'.join(reversed(chain))} does not exist"
                        obj = getattr(obj, attr)


def test_every_notebook_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert path.name in readme, f"README.md does not list {path.name}"
