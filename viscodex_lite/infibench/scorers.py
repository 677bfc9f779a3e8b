"""Pure scoring rules of InfiBench, reproduced from the official evaluator's semantics.

Everything here is a function of strings and plain dicts: no files, no subprocesses, no network.
Each rule names the lines of the official evaluator (GitHub ``infi-coder/infibench-evaluator``,
files ``grader_main.py``, ``grader_utils.py``, ``execution_utils.py``) whose behaviour it follows,
quirks included. Deliberate fixes are opt-in through :class:`ScoringOptions`; the defaults score
exactly like the official evaluator.

>>> score_keywords(["emmet", {"content": "VS Code", "weight": 2.0}], "Use Emmet in VS Code")[:2]
(2.0, 3.0)
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class ScoringOptions:
    """How to treat the official evaluator's quirks. Defaults = the official behaviour.

    - ``regex_case``: ``"lower_pattern"`` (official, grader_utils.py:15-16 lowercases the regex
      pattern itself, so ``\\S`` becomes ``\\s``) or ``"ignorecase"`` (fix: match with re.IGNORECASE).
    - ``nested_to_lower``: official ignores ``to_lower`` inside nested ``or``/``and`` clauses
      (grader_utils.py:22-36 only reads ``regex``); ``True`` honours it.
    - ``top_level_regex``: official ignores ``regex``/``cond`` written beside a top-level
      ``content`` string (grader_main.py:71,76 passes only ``rule['content']``); ``True`` honours them.
    - ``bare_code``: ``"official"`` extracts unfenced Python answers with the HumanEval-style
      truncation (execution_utils.py:583-620, which empties a bare ``def ...`` answer);
      ``"whole"`` (fix) uses the whole answer when it has no fences.
    - ``missing_response``: ``"exclude"`` (official: grader_main.py:260-261 returns 3 values where
      4 are unpacked, so the case errors and drops out of the total) or ``"null_score"`` (fix).
    - ``on_error``: ``"exclude"`` (official grader_main.py:363-365: an erroring case scores 0 of 0)
      or ``"zero"`` (fix: 0 of its full score).
    """

    regex_case: str = "lower_pattern"
    nested_to_lower: bool = False
    top_level_regex: bool = False
    bare_code: str = "official"
    missing_response: str = "exclude"
    on_error: str = "exclude"

    @classmethod
    def fixed(cls) -> "ScoringOptions":
        """Every deliberate fix switched on."""
        return cls("ignorecase", True, True, "whole", "null_score", "zero")


OFFICIAL = ScoringOptions()


class GradingError(Exception):
    """A case's grading spec cannot be applied (the official evaluator errors on the same input)."""


# ---------------------------------------------------------------- keywords (grader_utils.py:13-42)

def keyword_match(rule: Any, to_lower: bool, regex: bool, response: str, context: list[str],
                  options: ScoringOptions = OFFICIAL) -> bool:
    """Does one keyword rule (a string or an ``or``/``and``/``content`` dict) match ``response``?

    >>> keyword_match({"or": ["vue", "react"]}, False, False, "I use react", [])
    True
    >>> keyword_match({"content": "No\\\\S", "regex": True}, True, False, "no!", [])  # pattern lowered: \\s
    False
    """
    if isinstance(rule, str):
        flags = 0
        if to_lower:
            if regex and options.regex_case == "ignorecase":
                flags = re.IGNORECASE
            else:  # official: both the rule (even a regex) and the response are lowercased
                rule, response = rule.lower(), response.lower()
        if regex:
            return re.search(rule, response, flags) is not None
        return rule in response
    if not isinstance(rule, dict):
        raise GradingError(f"keyword rule must be a string or a mapping, got {type(rule).__name__}: {rule!r}")
    if "regex" in rule:  # a nested clause may switch regex on or off for itself and below
        regex = rule["regex"]
    if options.nested_to_lower and "to_lower" in rule:
        to_lower = bool(rule["to_lower"])
    if "or" in rule:
        ans = any([keyword_match(c, to_lower, regex, response, context, options) for c in rule["or"]])
    elif "and" in rule:
        ans = all([keyword_match(c, to_lower, regex, response, context, options) for c in rule["and"]])
    else:
        if "content" not in rule:
            raise GradingError(f"keyword clause has none of content/or/and: {rule!r}")
        ans = keyword_match(rule["content"], to_lower, regex, response, context, options)
    if "cond" in rule:  # case-authored predicate over earlier verdicts, e.g. "context[-1] == 'match'"
        ans = ans and eval(rule["cond"], {}, {"context": context, "ans": ans, "rule": rule,
                                              "response": response, "regex": regex, "to_lower": to_lower})
    return ans


def score_keywords(rules: list, response: str, options: ScoringOptions = OFFICIAL,
                   post_handler: Callable | None = None) -> tuple[float, float, dict]:
    """Weighted keyword score (grader_main.py:54-96): ``(earned, total, detail)``.

    A ``neg: true`` rule subtracts its weight when it matches and adds nothing to the total.

    >>> score_keywords([{"content": "eval(", "neg": True, "weight": 2}, "json.loads"], "use eval(")[:2]
    (-2.0, 1.0)
    """
    earned, total = 0.0, 0.0
    verdicts: list[str] = []
    handler_spec = None
    for rule in rules:
        if isinstance(rule, str):
            content, weight, to_lower, neg, regex, top = rule, 1.0, False, False, False, None
        else:
            if not isinstance(rule, dict):
                raise GradingError(f"keyword rule must be a string or a mapping, got {rule!r}")
            if "post_handler" in rule:
                handler_spec = rule["post_handler"]
                continue
            if "content" not in rule:
                raise GradingError(f"keyword rule without 'content': {rule!r}")
            content = rule["content"]
            weight = float(rule.get("weight", 1.0))
            to_lower = bool(rule.get("to_lower", False))
            neg = bool(rule.get("neg", False))
            regex = bool(rule.get("regex", False)) if options.top_level_regex else False
            top = rule if options.top_level_regex and "cond" in rule else None
        hit = keyword_match(content, to_lower, regex, response, verdicts, options)
        if top is not None:
            hit = hit and eval(top["cond"], {}, {"context": verdicts, "ans": hit})
        verdicts.append("match" if hit else "unmatch")
        if hit:
            earned += -weight if neg else weight
        total += 0.0 if neg else weight
    detail: dict[str, Any] = {"keywords": verdicts}
    if handler_spec is not None:
        if post_handler is None:
            raise GradingError(f"keywords post_handler {handler_spec!r} needs case code; load the case with trust_case_code=True")
        earned, total, detail["post_handler_detail"] = post_handler(handler_spec)(earned, total, verdicts)
    return earned, total, detail


# ---------------------------------------------------------- blank filling (grader_utils.py:44-175)

def lcs_alignment(template: str, target: str) -> tuple[int, np.ndarray]:
    """LCS length table corner and the template->target index map of the official ``LCS``.

    Same tie-breaking and border quirks as grader_utils.py:44-85 (its first row and column are
    not cumulative), computed a row at a time with numpy: inside a row, cells between two
    character matches are a running lexicographic max of (length, index) pairs, so each segment
    is one ``np.maximum.accumulate`` on encoded keys.

    >>> n, s = lcs_alignment("ab", "xaby"); int(n), s.tolist()
    (2, [1, 2])
    """
    n, m = len(template), len(target)
    t = np.frombuffer(template.encode("utf-32-le"), dtype=np.uint32)
    r = np.frombuffer(target.encode("utf-32-le"), dtype=np.uint32)
    base = m + 1                              # key = length * base + index
    cols = np.arange(m, dtype=np.int64)
    s_all = np.empty((n, m), dtype=np.int64)
    hit = r == t[0]                           # row 0: a cell is 1 at a match, else 0 (no carry)
    f_prev = hit.astype(np.int64)
    s_all[0] = np.where(hit, cols, 0)
    big = (min(n, m) + 2) * base
    for i in range(1, n):
        hit = r == t[i]
        key = np.empty(m, dtype=np.int64)
        key[1:] = np.where(hit[1:], (f_prev[:-1] + 1) * base + cols[1:], f_prev[1:] * base + s_all[i - 1, 1:])
        key[0] = (1 * base + 0) if hit[0] else 0     # column 0: forced, like row 0
        starts = hit.copy()
        starts[0] = True
        seg = np.cumsum(starts)
        row = np.maximum.accumulate(key + seg * big) - seg * big
        f_prev = row // base
        s_all[i] = row % base
    corner = int(f_prev[-1]) if n > 1 else int(f_prev[-1])
    s = np.zeros(n, dtype=np.int64)
    p = int(s_all[n - 1, m - 1])
    for i in range(n - 1, -1, -1):
        same = template[i] == target[p]
        s[i] = p if same else p + 1
        if i > 0 and same:
            p = int(s_all[i - 1, p - 1])      # p - 1 == -1 wraps to the last column, as in numpy
    return corner, s


DEFAULT_ESCAPE = " '\"`"          # grader_main.py:127
DEFAULT_BLANK = "[blank]"         # grader_main.py:130


def score_blank_filling(spec: dict, response: str, post_handler: Callable | None = None) -> tuple[float, float, dict]:
    """Fill-in-the-blank score (grader_main.py:125-143, grader_utils.py:88-175).

    The answer is aligned to the template by LCS; if under 80% of the template's fixed text is
    found, every blank is unmatched; otherwise each blank's text is cut out between its
    neighbours' aligned positions, stripped of ``escape`` characters and compared to the targets.

    >>> spec = {"template": "x = [blank]; y = [blank];", "targets": ["1", "2"]}
    >>> score_blank_filling(spec, "x = 1; y = 3;")[:2]
    (1.0, 2.0)
    """
    template = spec["template"]
    blank = spec.get("blank_str", DEFAULT_BLANK)
    escape = spec.get("escape", DEFAULT_ESCAPE)
    targets = spec["targets"]
    response = spec.get("prefix", "") + response
    if response == "":
        response = " "  # grader_utils.py:92
    places = [i for i in range(len(template)) if template.startswith(blank, i)]
    if template.count(blank) != len(places) or len(places) != len(targets):
        raise GradingError("Number of targets should be equal to number of blanks")  # grader_utils.py:96
    fixed = len(template) - len(places) * len(blank)
    if fixed == 0:
        raise GradingError("blank_filling template has no text besides blanks (division by zero)")
    corner, s = lcs_alignment(template, response)
    rate = corner / fixed
    earned, total, details = 0.0, 0.0, []
    for no, target in enumerate(targets):
        is_str = isinstance(target, str)
        weight = 1.0 if is_str else target.get("weight", 1.0)
        to_lower = False if is_str else target.get("to_lower", False)
        substr = False if is_str else target.get("substr_match", False)
        total += weight
        if rate < 0.8:
            details.append(f"unmatched: match rate too low - {rate}")
            continue
        start = places[no]
        end = start + len(blank)
        if end >= len(s):
            raise GradingError(f"blank {no} ends the template (index {end} out of range, as in the official LCS map)")
        if start == 0:
            got = response[s[start]: s[end]]
        else:
            got = response[s[start - 1] + 1: s[end]]
        got = got.strip(escape)
        answers = [target] if is_str else target["content"]
        if isinstance(answers, str):
            answers = [answers]
        status, matched = "unmatched", False
        for ans in answers:
            ans_str = ans if isinstance(ans, str) else ans["content"]
            ans_cond = None if isinstance(ans, str) else ans.get("cond")
            ans_re = False if isinstance(ans, str) else ans.get("regex", False)
            status = f"response string: {got}, ans: {ans_str}"
            if to_lower:
                got, ans_str = got.lower(), ans_str.lower()
            env = {"grading_details": details, "ans_str": ans_str, "ans_re": ans_re, "response_str": got}
            if not substr:
                ok = (not ans_re and got == ans_str) or (ans_re and re.fullmatch(ans_str, got) is not None)
            else:
                ok = (not ans_re and got.count(ans_str) > 0) or bool(ans_re and re.search(ans_str, got))
            if ok and (ans_cond is None or eval(ans_cond, {}, env)):
                earned += weight
                status, matched = "matched: " + status, True
                break
        details.append(status if matched else "unmatched: " + status)
    detail: dict[str, Any] = {"blank_filling_detail": details, "template_match_rate": rate}
    if spec.get("post_handler") is not None:
        if post_handler is None:
            raise GradingError("blank_filling post_handler needs case code; load the case with trust_case_code=True")
        earned, total, detail["blank_filling_post_handler_detail"] = post_handler(spec["post_handler"])(earned, total, details)
    return earned, total, detail


# -------------------------------------------------- similarity (grader_utils.py:230-267, ROUGE)

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer: lowercase, non ``[a-z0-9]`` to spaces, split (no stemming).

    >>> rouge_tokens("Hello, World! Ça va?")
    ['hello', 'world', 'a', 'va']
    """
    return [tok for tok in _NON_ALNUM.sub(" ", text.lower()).split() if tok]


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _lcs_table(a: list[str], b: list[str]) -> list[list[int]]:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        row, prev, ai = table[i], table[i - 1], a[i - 1]
        for j in range(1, len(b) + 1):
            row[j] = prev[j - 1] + 1 if ai == b[j - 1] else max(row[j - 1], prev[j])
    return table


def _lcs_indices(ref: list[str], can: list[str]) -> list[int]:
    t = _lcs_table(ref, can)
    i, j, out = len(ref), len(can), []
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif t[i][j - 1] > t[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def rouge_f(metric: str, reference: str, prediction: str) -> float:
    """ROUGE F-measure as the ``rouge_score`` package computes it (``rouge1``/``rouge2``/``rougeL``/``rougeLsum``).

    >>> round(rouge_f("rouge1", "the cat sat", "the cat ran"), 4)
    0.6667
    """
    if metric == "rougeLsum":  # summary-level LCS over newline-separated sentences
        ref = [rouge_tokens(s) for s in reference.split("\n") if s]
        can = [rouge_tokens(s) for s in prediction.split("\n") if s]
        m, n = sum(map(len, ref)), sum(map(len, can))
        if not ref or not can or not m or not n:
            return 0.0
        cnt_r, cnt_c = Counter(t for s in ref for t in s), Counter(t for s in can for t in s)
        hits = 0
        for r in ref:
            union = sorted(set().union(*[_lcs_indices(r, c) for c in can]))
            for t in (r[i] for i in union):
                if cnt_c[t] > 0 and cnt_r[t] > 0:
                    hits += 1
                    cnt_c[t] -= 1
                    cnt_r[t] -= 1
        return _f1(hits / n, hits / m)
    ref, can = rouge_tokens(reference), rouge_tokens(prediction)
    if metric == "rougeL":
        if not ref or not can:
            return 0.0
        lcs = _lcs_table(ref, can)[-1][-1]
        return _f1(lcs / len(can), lcs / len(ref))
    found = re.fullmatch(r"rouge([0-9])", metric)
    if not found or int(found.group(1)) <= 0:
        raise GradingError(f"unknown similarity metric {metric!r} (rouge1, rouge2, rougeL, rougeLsum)")
    k = int(found.group(1))
    grams = lambda toks: Counter(tuple(toks[i:i + k]) for i in range(len(toks) - k + 1))
    gr, gc = grams(ref), grams(can)
    inter = sum(min(c, gc[g]) for g, c in gr.items())
    return _f1(inter / max(sum(gc.values()), 1), inter / max(sum(gr.values()), 1))


def score_similarity(metrics: list[dict], response: str, read_reference: Callable[[str], str]) -> tuple[float, float, dict]:
    """ROUGE rescaled to [0, 1] between ``min_score`` and ``max_score`` (grader_utils.py:230-267).

    Defaults: min 0.3; max 0.53 for rouge1, 0.51 otherwise. With several references the best one
    counts (rouge_score's ``score_multi``).

    >>> score_similarity([{"metric": "rouge1", "references": ["a b c d"]}], "a b c d", None)[:2]
    (1.0, 1.0)
    """
    earned, total, details = 0.0, 0.0, []
    for metric in metrics:
        name = metric["metric"]
        refs = [item if isinstance(item, str) else read_reference(item["path"]) for item in metric["references"]]
        raw = max(rouge_f(name, ref, response) for ref in refs)
        lo = float(metric["min_score"]) if "min_score" in metric else 0.3
        hi = float(metric["max_score"]) if "max_score" in metric else (0.53 if name == "rouge1" else 0.51)
        normalized = max(min((raw - lo) / (hi - lo), 1.0), 0.0)
        weight = metric.get("weight", 1.0)
        total += weight
        earned += normalized * weight
        details.append({name: raw, "normalized_score": normalized})
    return earned, total, {"similarity_detail": details}


# ------------------------------------------------ code extraction (execution_utils.py:583-661)

STOP_WORDS = {  # execution_utils.py:470-486
    "python": ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\nassert"],
    "go": ["\n//", "\nfunc main(", "struct", "\nfunc"],
}


def _truncate_unfenced(code: str, lang: str) -> str:
    """HumanEval-style completion cut of an unfenced answer (execution_utils.py:583-620)."""
    for word in STOP_WORDS.get(lang, []):
        if word in code:
            code = code[:code.find(word)]
    if lang == "python":
        lines = code.split("\n")
        for i, line in enumerate(lines):
            if line.strip() and line[0] not in " \t":
                return "\n".join(lines[:i])
    elif lang in ("java", "javascript", "go", "cpp", "rust"):
        depth, cut = (2 if lang == "java" else 1), False
        for i, c in enumerate(code):
            depth += (c == "{") - (c == "}")
            if depth == 0:
                code, cut = code[:i + 1], True
                break
        if not cut:
            if lang == "java":
                main_pos = code.find("public static void main")
                if main_pos != -1:
                    code = code[:main_pos] + "}"
                if "}" in code:
                    code = code[:code.rfind("}")] + "}"
                if code.count("{") - 1 == code.count("}"):
                    code += "\n}"
            elif "}" in code:
                code = code[:code.rfind("}")] + "}"
    return code


def extract_code(response: str, lang: str, only_longest: bool = False, options: ScoringOptions = OFFICIAL) -> str:
    """The code a unit test runs, cut from an answer like execution_utils.py:623-661.

    Any line containing a fence (or ``\\begin{code}``/``\\end{code}``) is a marker; markers pair up
    in order (an unpaired last one is dropped) and the blocks between pairs are joined, or only the
    longest with ``only_longest``. Without two markers the official evaluator applies the
    HumanEval completion cut, which for Python empties an answer starting with ``def``.

    >>> extract_code("Try:\\n```python\\nx = 1\\n```\\ndone", "python")
    'x = 1'
    >>> extract_code("\\ndef f():\\n    return 1", "python"), extract_code("def f(): pass", "python", options=ScoringOptions(bare_code="whole"))
    ('', 'def f(): pass')
    """
    fence_count = response.count("```") + response.count("\\begin{code}") + response.count("\\end{code}")
    if fence_count >= 2:
        lines = response.split("\n")
        marks = [no for no, text in enumerate(lines)
                 if "```" in text or "\\begin{code}" in text or "\\end{code}" in text]
        blocks = ["\n".join(lines[marks[i] + 1: marks[i + 1]]) for i in range(0, len(marks) - 1, 2)]
        if not only_longest:
            return "\n\n".join(blocks)
        if len(marks) < 2:
            return ""
        best, best_len = 0, 0
        for i in range(0, len(marks) - 1, 2):
            if marks[i + 1] - marks[i] > best_len:
                best, best_len = i, marks[i + 1] - marks[i]
        return "\n".join(lines[marks[best] + 1: marks[best + 1]])
    if options.bare_code == "whole":
        return response
    return _truncate_unfenced(response, lang)


# ------------------------------------------------------ combining (grader_main.py:231-243)

def combine(earned: float, total: float, grading: dict, full_score: float) -> float:
    """Case score from the summed components: ``max_score`` replaces the total and caps the score,
    ``min_score`` floors it, then the ratio is scaled to ``full_score`` (grader_main.py:231-243).

    >>> combine(5.0, 5.0, {"max_score": 2.0}, 1.0), combine(-3.0, 2.0, {"min_score": 0.0}, 1.0)
    (1.0, 0.0)
    """
    if "max_score" in grading:
        total = grading["max_score"]
        earned = min(earned, total)
    if "min_score" in grading:
        earned = max(earned, grading["min_score"])
    if total == 0:
        raise GradingError("case total weight is 0 (division by zero in the official evaluator)")
    return earned / total * full_score


def reduce_scores(scores: list[float], mode: str = "avg") -> tuple[float, float]:
    """Several answers to one case -> (score, std), like grader_main.py:267-287.

    >>> reduce_scores([0.0, 1.0, 0.5, 0.5], "avg_max_2")
    (0.75, 0.3535533905932738)
    """
    if mode == "avg":
        return float(np.average(scores)), 0.0
    if mode == "max":
        return float(np.max(scores)), 0.0
    if mode == "min":
        return float(np.min(scores)), 0.0
    if mode.startswith("avg_max_"):
        batch = int(mode[len("avg_max_"):])
        buckets = [float(np.max(scores[i:i + batch])) for i in range(0, len(scores), batch)]
        return float(np.mean(buckets)), (float(np.std(buckets, ddof=1)) if len(buckets) > 1 else 0.0)
    raise GradingError(f"Unsupported score reduction mode: {mode}")
