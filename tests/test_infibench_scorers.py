"""Every grading rule of the official InfiBench evaluator (infi-coder/infibench-evaluator), several
answer variants each. Each test names the official lines it follows: grader_main.py (GM),
grader_utils.py (GU), execution_utils.py (EU)."""

import random

import pytest

from viscodex_lite.infibench import scorers as S
from viscodex_lite.infibench.scorers import GradingError, ScoringOptions

FIXED = ScoringOptions.fixed()


# ---------------------------------------------------------------- keywords: GM 54-96, GU 13-42

@pytest.mark.parametrize("answer, expected", [
    ("Install Emmet in Visual Studio Code", (3.0, 3.0)),   # both rules
    ("emmet works", (2.0, 3.0)),                           # to_lower on rule 1 only
    ("EMMET in vs", (2.0, 3.0)),                            # 'VS' is case sensitive
    ("", (0.0, 3.0)),                                       # empty answer
])
def test_weighted_keywords_like_official_case_0_1_134(answer, expected):
    """GM 61-81: dict rule -> content/weight/to_lower; GU 28-36: or-clause."""
    rules = [{"content": {"content": "emmet"}, "to_lower": True, "weight": 2.0},
             {"content": {"or": [{"content": "VS"}, {"content": "Visual Studio Code"}]}, "weight": 1.0}]
    assert S.score_keywords(rules, answer)[:2] == expected


def test_plain_string_rule_is_case_sensitive_substring_weight_1():
    """GM 62-66: a bare string rule has weight 1, no lowering, no regex."""
    assert S.score_keywords(["a.b"], "xa.by")[:2] == (1.0, 1.0)
    assert S.score_keywords(["a.b"], "xaXby")[:2] == (0.0, 1.0)  # not a regex
    assert S.score_keywords(["A"], "a")[:2] == (0.0, 1.0)


def test_and_clause_needs_all_and_nests():
    """GU 31-33 and recursion through content/or/and (official case 0-0-40 shape)."""
    rule = {"content": {"or": [{"and": ["PATH=", {"or": ["apt install npm", "npm init"]}]},
                               {"and": ["wsl.conf", {"content": "appendWindowsPath(.*)=(.*)false", "regex": True}]}]}}
    assert S.score_keywords([rule], "edit wsl.conf: appendWindowsPath = false")[0] == 1.0
    assert S.score_keywords([rule], "set PATH= then npm init")[0] == 1.0
    assert S.score_keywords([rule], "set PATH= only")[0] == 0.0


def test_neg_rule_subtracts_and_adds_nothing_to_total():
    """GM 78-81: a matched neg rule subtracts its weight; neg rules never add to the total."""
    rules = [{"content": {"content": "```[\\s\\S]*for *\\(", "regex": True}, "neg": True, "weight": 10.0}, "tidyverse"]
    assert S.score_keywords(rules, "use tidyverse")[:2] == (1.0, 1.0)
    assert S.score_keywords(rules, "```r\nfor (i in x) {}\n``` tidyverse")[:2] == (-9.0, 1.0)


def test_to_lower_lowercases_the_regex_pattern_itself_quirk():
    """GU 15-16: with to_lower the pattern is lowercased too, so \\S becomes \\s (official case 0-1-137)."""
    rule = {"content": {"content": "a[\\S]+b", "regex": True}, "to_lower": True}
    assert S.score_keywords([rule], "a123b")[0] == 0.0                       # official: [\s]+ cannot match digits
    assert S.score_keywords([rule], "a123b", FIXED)[0] == 1.0                # fix: re.IGNORECASE
    assert S.score_keywords([rule], "a  b")[0] == 1.0


def test_nested_to_lower_is_ignored_quirk():
    """GU 22-36 reads only 'regex' in nested clauses; a nested to_lower does nothing (official case 2-10-497)."""
    rule = {"content": {"and": ["never", {"content": "NULL", "to_lower": True}]}}
    assert S.score_keywords([rule], "never null")[0] == 0.0
    assert S.score_keywords([rule], "never null", FIXED)[0] == 1.0
    assert S.score_keywords([rule], "never NULL")[0] == 1.0


def test_regex_beside_top_level_content_is_ignored_quirk():
    """GM 71,76: only rule['content'] reaches keyword_match, with regex=False."""
    rule = {"content": "colou?r", "regex": True}
    assert S.score_keywords([rule], "color")[0] == 0.0
    assert S.score_keywords([rule], "colou?r")[0] == 1.0
    assert S.score_keywords([rule], "color", FIXED)[0] == 1.0


def test_cond_sees_previous_verdicts():
    """GU 37-41 with GM 76: cond is evaluated with context = verdicts of earlier rules (case 0-0-46)."""
    rules = ["tsconfigRootDir", {"content": {"content": "__dirname", "cond": "context[-1].startswith('match')"}}]
    assert S.score_keywords(rules, "tsconfigRootDir: __dirname")[:2] == (2.0, 2.0)
    assert S.score_keywords(rules, "__dirname only")[:2] == (0.0, 2.0)
    with pytest.raises(IndexError):  # a cond on the first rule has no context: the case errors
        S.score_keywords([{"content": {"content": "x", "cond": "context[-1] == 'match'"}}], "x")


def test_nested_regex_flag_switches_per_clause():
    """GU 24-26: 'regex' in a nested dict overrides for that clause and below."""
    rule = {"content": {"or": [{"content": "a.c", "regex": True}, "x.z"]}}
    assert S.score_keywords([rule], "abc")[0] == 1.0
    assert S.score_keywords([rule], "xyz")[0] == 0.0


def test_post_handler_rewrites_keyword_score():
    """GM 68-70, 83-92: a post_handler entry is skipped as a rule and then rescales (score, total)."""
    seen = {}

    def factory(spec):
        seen["spec"] = spec
        return lambda score, total, verdicts: (score / 2, total, list(verdicts))
    rules = ["a", {"post_handler": {"module": "m", "func": "f"}}, "b"]
    score, total, detail = S.score_keywords(rules, "a b", post_handler=factory)
    assert (score, total, detail["post_handler_detail"]) == (1.0, 2.0, ["match", "match"])
    assert seen["spec"] == {"module": "m", "func": "f"}


# ---------------------------------------------------------- blank filling: GM 125-143, GU 44-175

def _literal_lcs(t, g):
    """A literal transcription of the official DP's recurrence (GU 52-85), for equivalence checks."""
    n, m = len(t), len(g)
    f = [[0] * m for _ in range(n)]
    s = [[0] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            if i * j > 0:
                if t[i] == g[j]:
                    f[i][j], s[i][j] = f[i - 1][j - 1] + 1, j
                else:
                    f[i][j] = max(f[i][j - 1], f[i - 1][j])
                    if f[i][j - 1] == f[i - 1][j]:
                        s[i][j] = max(s[i][j - 1], s[i - 1][j])
                    else:
                        s[i][j] = s[i][j - 1] if f[i][j - 1] >= f[i - 1][j] else s[i - 1][j]
            elif t[i] == g[j]:
                f[i][j], s[i][j] = 1, j
    out, p = [0] * n, s[n - 1][m - 1]
    for i in range(n - 1, -1, -1):
        out[i] = p if t[i] == g[p] else p + 1
        if i > 0 and t[i] == g[p]:
            p = s[i - 1][p - 1]
    return f[n - 1][m - 1], out


def test_vectorized_lcs_equals_the_official_recurrence():
    """GU 44-85 including its non-cumulative first row/column and its tie-breaking."""
    rng = random.Random(7)
    for _ in range(400):
        a = "".join(rng.choice("ab[] ") for _ in range(rng.randint(1, 10)))
        b = "".join(rng.choice("abc] ") for _ in range(rng.randint(1, 14)))
        corner, s = S.lcs_alignment(a, b)
        assert (corner, s.tolist()) == _literal_lcs(a, b)


SPEC = {"template": "Give the label a [blank] attribute whose value is the input's [blank].", "targets": ["for", "id"]}


@pytest.mark.parametrize("answer, expected", [
    ("Give the label a for attribute whose value is the input's id.", 2.0),          # correct
    ("Give the label a `for` attribute whose value is the input's `id`.", 2.0),     # escape strips backticks (GM 127)
    ("Give the label a for attribute whose value is the input's name.", 1.0),        # partial
    ("Wrap the input in the label.", 0.0),                                          # template rate < 0.8 (GU 111)
    ("", 0.0),                                                                       # empty -> ' ' (GU 92)
])
def test_blank_filling_variants(answer, expected):
    score, total, detail = S.score_blank_filling(SPEC, answer)
    assert (score, total) == (expected, 2.0)
    assert len(detail["blank_filling_detail"]) == 2


def test_blank_filling_target_forms():
    """GU 105-157: weight, to_lower, or-list, regex fullmatch, substr_match, custom blank_str/escape/prefix."""
    spec = {"template": "x = ***b***; y = ***b***; z = ***b***;", "blank_str": "***b***", "escape": " ",
            "targets": [{"content": ["ONE", "1"], "weight": 2.0, "to_lower": True},
                        {"content": [{"content": "[0-9]+", "regex": True}]},
                        {"content": "ab", "substr_match": True}]}
    assert S.score_blank_filling(spec, "x = one; y = 42; z = xaby;")[:2] == (4.0, 4.0)
    assert S.score_blank_filling(spec, "x = two; y = 4a; z = b;")[:2] == (0.0, 4.0)
    assert S.score_blank_filling({**spec, "prefix": "x = 1; "}, "y = 2; z = ab;")[:2] == (4.0, 4.0)


def test_blank_filling_errors_like_official():
    """GU 96: blanks and targets must agree; a blank ending the template indexes past the LCS map."""
    with pytest.raises(GradingError):
        S.score_blank_filling({"template": "a [blank]", "targets": ["x", "y"]}, "a x")
    with pytest.raises(GradingError):
        S.score_blank_filling({"template": "value: [blank]", "targets": ["x"]}, "value: x")


def test_blank_at_template_start_loses_characters_quirk():
    """GU 114-115: the first blank's cut starts at the template's first aligned character."""
    spec = {"template": "[blank] [blank] * * * backup.sh", "targets": ["30", "2"]}
    score, _, detail = S.score_blank_filling(spec, "30 2 * * * backup.sh")
    assert score == 1.0 and detail["blank_filling_detail"][0].startswith("unmatched")


# ------------------------------------------------------------ similarity: GM 192-214, GU 230-267

def test_rouge_values_match_hand_computation():
    """rouge_score semantics: lowercase alnum tokens; n-gram F1; LCS F1; summary-level LCS over lines."""
    ref, pred = "The cat sat on the mat", "the cat lay on a mat"
    assert S.rouge_f("rouge1", ref, pred) == pytest.approx(4 / 6)          # the cat on mat / 6 each
    assert S.rouge_f("rouge2", ref, pred) == pytest.approx(1 / 5)          # "the cat"
    assert S.rouge_f("rougeL", ref, pred) == pytest.approx(4 / 6)
    assert S.rouge_f("rougeLsum", "a b\nc d", "c d\na b") == pytest.approx(1.0)
    assert S.rouge_f("rougeL", "a b\nc d", "c d\na b") == pytest.approx(0.5)
    assert S.rouge_f("rouge1", "日本語", "日本語") == 0.0                    # non-ASCII words vanish


def test_similarity_rescaling_defaults_and_weights():
    """GU 249-263: min 0.3, max 0.53 (rouge1) / 0.51 (others), clipped to [0, 1], times weight."""
    ref = "a b c d e f g h i j"
    half = "a b c d e x y z w v"  # rouge1 = 0.5
    score, total, detail = S.score_similarity([{"metric": "rouge1", "references": [ref], "weight": 2.0}], half, None)
    assert total == 2.0 and score == pytest.approx(2.0 * (0.5 - 0.3) / (0.53 - 0.3))
    score, _, _ = S.score_similarity([{"metric": "rougeL", "references": [ref]}], half, None)
    assert score == pytest.approx((0.5 - 0.3) / (0.51 - 0.3))
    assert S.score_similarity([{"metric": "rouge1", "references": [ref]}], "zzz", None)[0] == 0.0
    custom = [{"metric": "rouge1", "references": [ref], "min_score": 0.0, "max_score": 1.0}]
    assert S.score_similarity(custom, half, None)[0] == pytest.approx(0.5)


def test_similarity_best_reference_and_reference_files():
    """GU 237-247: references are strings or {path}; the best reference counts (score_multi)."""
    metric = [{"metric": "rouge1", "references": ["x y z", {"path": "ans.txt"}], "min_score": 0, "max_score": 1}]
    score, _, _ = S.score_similarity(metric, "a b c", lambda p: {"ans.txt": "a b c"}[p])
    assert score == pytest.approx(1.0)
    with pytest.raises(GradingError):
        S.score_similarity([{"metric": "bleu", "references": ["a"]}], "a", None)


# ---------------------------------------------------------- code extraction: EU 583-661

def test_fenced_blocks_are_joined_in_order():
    answer = "Intro\n```python\na = 1\n```\ntext\n```\nb = 2\n```\n"
    assert S.extract_code(answer, "python") == "a = 1\n\nb = 2"


def test_only_longest_picks_the_longest_block():
    answer = "```\na = 1\n```\n```python\nb = 2\nc = 3\n```"
    assert S.extract_code(answer, "python", only_longest=True) == "b = 2\nc = 3"


def test_odd_fence_count_drops_the_unpaired_block_and_inline_fences_count():
    """EU 636: any line containing ``` is a marker, even mid-sentence."""
    assert S.extract_code("```\nx = 1\n```\nthen ```y``` and\nz\n", "python") == "x = 1"
    assert S.extract_code("```\nx = 1\n```\n```\ny = 2", "python") == "x = 1"


def test_bare_python_answer_is_emptied_quirk_and_fix():
    """EU 583-596: without fences the HumanEval cut runs; an answer starting with def is cut to nothing
    (GU 211 puts a newline before it, which matches the '\\ndef' stop word)."""
    bare = "\n" + "def add(a, b):\n    return a + b"
    assert S.extract_code(bare, "python") == ""
    assert S.extract_code(bare, "python", options=FIXED) == bare
    assert S.extract_code("\n    return a + b\nprint(1)", "python") == "\n    return a + b"


def test_bare_javascript_is_cut_at_the_closing_brace():
    """EU 597-619: brace counting from depth 1 stops at the first unmatched '}'."""
    assert S.extract_code("\nreturn a + b;\n}\nconsole.log(1)", "javascript") == "\nreturn a + b;\n}"
    assert S.extract_code("\nfunction f() { return 1 }", "javascript") == "\nfunction f() { return 1 }"


# ---------------------------------------------------------- combining: GM 231-243, 267-287

def test_max_score_replaces_total_and_caps():
    assert S.combine(3.0, 5.0, {"max_score": 2.0}, 1.0) == 1.0
    assert S.combine(1.0, 5.0, {"max_score": 2.0}, 1.0) == 0.5


def test_min_score_floors_negative_scores():
    assert S.combine(-2.0, 1.0, {"min_score": 0.0}, 1.0) == 0.0
    assert S.combine(-2.0, 1.0, {}, 1.0) == -2.0        # negative scores survive without min_score


def test_full_score_scales_and_zero_total_errors():
    assert S.combine(1.0, 2.0, {}, 5.0) == 2.5
    with pytest.raises(GradingError):
        S.combine(0.0, 0.0, {}, 1.0)


@pytest.mark.parametrize("mode, expected", [("avg", 0.5), ("max", 1.0), ("min", 0.0), ("avg_max_2", 0.75)])
def test_attempt_reduction_modes(mode, expected):
    assert S.reduce_scores([0.0, 1.0, 0.5, 0.5], mode)[0] == expected
