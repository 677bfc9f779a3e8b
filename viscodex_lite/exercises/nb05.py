"""Checks of notebook 05's exercises (scoring on InfiBench-V)."""

from __future__ import annotations

from collections.abc import Mapping

from ..check import checker, require
from ..infibench import report, runner, scorers


@checker("05.1", hint="rules are substrings that the reference has and the vlm answer lacks")
def rules_separate_reference_from_vlm(answer, *, reference, weak):
    """``answer`` (keyword rules) must give ``reference`` full marks and ``weak`` nothing."""
    require(isinstance(answer, list) and answer, "answer with a non-empty list of rules, e.g. [\"```python\"]")
    earned_ref, total_ref, _ = scorers.score_keywords(answer, reference)
    earned_weak, total_weak, _ = scorers.score_keywords(answer, weak)
    require(total_ref > 0, "the rules carry no weight: add at least one positive rule")
    require(earned_ref == total_ref, f"the reference earns {earned_ref:g} of {total_ref:g}: "
                                     "every rule must match the reference answer")
    require(earned_weak <= 0, f"the vlm answer still earns {earned_weak:g} of {total_weak:g}: "
                              "pick substrings it lacks (compare the two answers)")
    return f"reference {earned_ref:g}/{total_ref:g}, vlm {earned_weak:g}/{total_weak:g}"


@checker("05.2", hint="gain = merged% − vlm% per category; name the category with the largest gain")
def category_that_gains_most_from_merging(answer, *, results):
    """``answer`` must be a category whose merged − vlm gain is the largest (ties: any of them)."""
    table = report.table(results, "category")
    gain = {cat: row["merged"] - row["vlm"] for cat, row in table.items()}
    require(isinstance(answer, str), f"answer with a category name, one of {sorted(gain)}")
    require(answer in gain, f"{answer!r} is not a category; pick one of {sorted(gain)}")
    best = max(gain.values())
    if gain[answer] != best:
        top_merged = max(table, key=lambda cat: table[cat]["merged"])
        require(answer != top_merged, "that is where `merged` scores highest: subtract the `vlm` score first")
        require(False, f"{answer!r} gains {gain[answer]:+.1f} points; another category gains more")
    return f"{answer}: {best:+.1f} points"


@checker("05.3", hint='attempts = {"cheat": a fenced answer that fakes a pass, "honest": a fenced real solution}')
def sandbox_scores_cheat_zero_and_honest_full(answer, *, case, sandbox):
    """``answer["cheat"]`` (fenced code) must score 0 on ``case`` and ``answer["honest"]`` 100."""
    require(isinstance(answer, Mapping) and {"cheat", "honest"} <= set(answer),
            'answer with a dict {"cheat": ..., "honest": ...}')
    cheat, honest = answer["cheat"], answer["honest"]
    require(isinstance(cheat, str) and "```" in cheat,
            "put the cheat in a ```python block, so the sandbox really runs it")
    require(isinstance(honest, str) and "```" in honest, "put the honest answer in a ```python block")
    cheat_result, honest_result = (runner.score_responses([case], {case.id: [text]}, sandbox=sandbox)[0]
                                   for text in (cheat, honest))
    require(honest_result.percent == 100.0, f"the honest answer scores {honest_result.percent:.0f}, not 100: "
                                            "fix moving_average until the case's unit test passes")
    require(cheat_result.percent == 0.0, f"the cheat scored {cheat_result.percent:.0f}: tell the kit's maintainers!")
    return "cheat 0, honest 100"
