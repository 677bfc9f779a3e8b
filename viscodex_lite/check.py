"""Checked exercises: ``vl.check.exercise("01.2", answer, **context)`` says ✅ pass or ❌ not yet: hint.

Every exercise cell of a notebook ends with one check, wrapped in ``assert`` so that a wrong answer
fails the cell (and the nbmake run of the solution copy)::

    ### BEGIN SOLUTION
    # hint: apply −τ_code to θ_code
    without_code = (-tau_code).apply_to(weights["code"])
    ### END SOLUTION
    assert vl.check.exercise("01.1", without_code, base=weights["base"])

A check never compares with a stored answer a learner could read: the checker of each exercise
computes the expected result *from the context the notebook passes* (the model, the weights, the
processor), when it runs. Checkers live in ``viscodex_lite/exercises/nbNN.py``, one module per
notebook, registered with :func:`checker`; inside them :func:`require` turns a failed condition into
a "not yet" with a hint. The verdict is shown as text and, in a kernel, also as structured data
(:data:`MIMETYPE`) that ``viscodex-lite course grade`` reads back from the executed notebook.

>>> @checker("99.1", hint="add the two numbers")
... def _sum(answer, *, a, b):
...     require(answer == a + b, "a + b, not a - b" if answer == a - b else "add the two numbers")
>>> exercise("99.1", 5, a=2, b=3)
✅ 99.1 pass
True
>>> exercise("99.1", -1, a=2, b=3)
❌ 99.1 not yet: a + b, not a - b
False
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .errors import KitError

MIMETYPE = "application/vnd.viscodex-lite.check+json"
EXERCISE_ID = re.compile(r"^(?P<notebook>\d\d)\.(?P<number>\d+)$")
_CHECKERS: dict[str, tuple[Callable, str]] = {}


class ExerciseError(KitError):
    """A check is missing or was called without the context it needs (a notebook bug, not the learner's)."""


class NotYet(Exception):
    """Raised inside a checker: the answer is not right yet; ``hint`` says what to look at."""

    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: ``message`` is the hint (not yet) or an optional detail (pass)."""

    exercise: str
    passed: bool
    message: str = ""

    def text(self) -> str:
        if self.passed:
            return f"✅ {self.exercise} pass" + (f": {self.message}" if self.message else "")
        return f"❌ {self.exercise} not yet: {self.message}"


def checker(exercise_id: str, *, hint: str) -> Callable[[Callable], Callable]:
    """Register ``fn(answer, **context)`` as the check of ``exercise_id`` ("NN.k").

    ``fn`` raises :class:`NotYet` (via :func:`require`) when the answer is not right, and may return
    a short detail shown on a pass. ``hint`` is the fallback hint when checking the answer raises.
    """
    if not EXERCISE_ID.match(exercise_id):
        raise ExerciseError(f"exercise id {exercise_id!r} must look like 'NN.k' (notebook number, exercise number)")

    def register(fn: Callable) -> Callable:
        _CHECKERS[exercise_id] = (fn, hint)
        return fn

    return register


def require(condition: object, hint: str) -> None:
    """Inside a checker: not yet, with ``hint``, unless ``condition`` holds."""
    if not condition:
        raise NotYet(hint)


def number(answer: object) -> float | None:
    """``answer`` as a float when it is a number (int, float, NumPy or one-element torch scalar), else None.

    >>> number(3), number("3"), number(True)
    (3.0, None, None)
    """
    if isinstance(answer, (bool, str, bytes)):
        return None
    try:
        return float(answer)
    except (TypeError, ValueError, RuntimeError):
        return None


def close(answer: object, expected: float, *, rel: float = 1e-6, abs_: float = 1e-9) -> bool:
    """Whether ``answer`` is a number within ``rel`` (relative) or ``abs_`` of ``expected``.

    >>> close(0.30000000000000004, 0.3), close("0.3", 0.3)
    (True, False)
    """
    value = number(answer)
    return value is not None and abs(value - expected) <= max(abs_, rel * abs(expected))


def lookup(exercise_id: str) -> tuple[Callable, str]:
    """The registered checker and fallback hint of ``exercise_id`` (imports ``exercises/nbNN.py``)."""
    match = EXERCISE_ID.match(exercise_id)
    if not match:
        raise ExerciseError(f"exercise id {exercise_id!r} must look like 'NN.k', e.g. '01.2'")
    if exercise_id not in _CHECKERS:
        module = f"{__package__}.exercises.nb{match['notebook']}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    if exercise_id not in _CHECKERS:
        raise ExerciseError(f"no check registered for exercise {exercise_id}: add "
                            f"@checker({exercise_id!r}, hint=...) to viscodex_lite/exercises/nb{match['notebook']}.py")
    return _CHECKERS[exercise_id]


def verdict(exercise_id: str, answer: object, **context: object) -> Verdict:
    """Check ``answer`` without showing anything (what :func:`exercise` shows)."""
    fn, fallback_hint = lookup(exercise_id)
    try:
        inspect.signature(fn).bind(answer, **context)
    except TypeError as exc:
        wanted = [p for p in inspect.signature(fn).parameters][1:]
        raise ExerciseError(f"the check of {exercise_id} needs the context {wanted}, got {sorted(context)}: {exc}") from None
    if answer is None or answer is Ellipsis or answer is NotImplemented:
        return Verdict(exercise_id, False, f"no answer yet ({fallback_hint})")
    try:
        detail = fn(answer, **context)
    except NotYet as exc:
        return Verdict(exercise_id, False, exc.hint)
    except ExerciseError:
        raise
    except Exception as exc:  # the learner's answer made the check itself fail: still "not yet"
        return Verdict(exercise_id, False, f"checking your answer raised {type(exc).__name__}: {exc} ({fallback_hint})")
    return Verdict(exercise_id, True, str(detail) if detail else "")


def exercise(exercise_id: str, answer: object, **context: object) -> bool:
    """Check ``answer`` to exercise ``exercise_id``, show ✅ pass / ❌ not yet: hint, return whether it passed."""
    result = verdict(exercise_id, answer, **context)
    _show(result)
    return result.passed


def _show(result: Verdict) -> None:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and getattr(shell, "kernel", None) is not None:
        from IPython.display import display

        display({"text/plain": result.text(), MIMETYPE: asdict(result)}, raw=True)
    else:
        print(result.text())
