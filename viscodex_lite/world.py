"""The kit's tiny world: bar charts and UI mock-ups, their descriptions and their code.

Everything the kit trains or scores in tiny mode lives here: the mini family (``zoo``), mini-MCD
and the sample InfiBench-V cases all draw scenes from this one world, so a fact means the same
thing everywhere. A *scene* is a short list of items:

- a **chart**: 1-4 bars, left to right, each ``(colour, height)`` with height 1-9;
- a **ui** mock-up: 1-4 rows, top to bottom, each ``(element, colour)`` with element one of
  header / button / input / text.

Each scene has three faces, and the kit converts between them:

=============  ===========================================  =========================================
face           chart                                        ui
=============  ===========================================  =========================================
image          64x64 PIL image (:func:`render`)             64x64 PIL image
description    ``bar chart: #0 red 3, #1 blue 5``           ``page: #0 header red, #1 button blue``
code           Python: ``bar(0, 3, '#e22')`` per bar,       HTML: ``<h1 id="0" style="color:#e22"></h1>``
               then ``ylim(6)`` (max height + 1)            per row
=============  ===========================================  =========================================

Programs start with the description as a comment (``# ...`` / ``<!-- ... -->``): a spec line, as
a careful programmer writes one, that also lets a model read the image first and code second.
Writing the code needs knowledge that takes many examples to learn, which is what a *code* model
brings to a merge: an 8-entry colour -> hex table (``COLOURS``), element -> tag (``ELEMENT_TAGS``),
the x slot of each bar, and the derived ``ylim``. Reading the image is the vision skill.

Parsers turn generated text back into scenes (``None`` when it does not parse), so every probe
compares facts, not strings. Chart programs can also be *executed* (:func:`run_chart_programs`,
in a subprocess with a time limit) to get the scene they draw.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser

# Colour name -> 3-digit CSS hex. Arbitrary but fixed: a model has to memorise it. Eight colours, far
# apart in RGB: with sixteen, colour identity was what every tiny model learnt slowest (a plateau
# that kept the VLM at 8% exact descriptions), and the skill this world teaches is the mapping, not
# telling magenta from purple.
COLOURS = {
    "red": "e22", "green": "2a2", "blue": "23e", "yellow": "ec1",
    "orange": "f81", "purple": "82c", "cyan": "1cd", "black": "111",
}
HEX_TO_COLOUR = {v: k for k, v in COLOURS.items()}
HEIGHTS = range(1, 10)
# UI element -> HTML tag (a second table a coder learns).
ELEMENT_TAGS = {"header": "h1", "button": "button", "input": "input", "text": "p"}
TAG_TO_ELEMENT = {v: k for k, v in ELEMENT_TAGS.items()}
KINDS = ("chart", "ui")
MAX_ITEMS = 4
SIZE = 64  # image side in pixels; 16-px slots: one slot per bar (chart) or row (ui)
SLOT = SIZE // MAX_ITEMS
UNIT = 6  # pixels per unit of bar height

# The world's instructions (user turns). Kept here so every dataset asks the same questions.
DESCRIBE_PROMPT = "Describe the image."
IMAGE_CODE_PROMPT = "Write code for the image."
TEXT_CODE_PROMPT = "Write code for: "  # followed by a description


@dataclass(frozen=True)
class Scene:
    """One chart or UI mock-up: ``kind`` and its items, in reading order.

    >>> Scene("chart", (("red", 3), ("blue", 5))).items[1]
    ('blue', 5)
    """

    kind: str
    items: tuple[tuple, ...]

    def __post_init__(self):
        check_scene(self)


class SceneError(ValueError):
    """A scene breaks the world's rules (unknown colour, height out of range, too many items)."""


def check_scene(scene: Scene) -> None:
    """Raise :class:`SceneError` naming the first item that breaks the rules."""
    if scene.kind not in KINDS:
        raise SceneError(f"scene kind {scene.kind!r} is not one of {KINDS}")
    if not 1 <= len(scene.items) <= MAX_ITEMS:
        raise SceneError(f"a {scene.kind} has 1-{MAX_ITEMS} items, got {len(scene.items)}")
    for i, item in enumerate(scene.items):
        if scene.kind == "chart":
            ok = len(item) == 2 and item[0] in COLOURS and item[1] in HEIGHTS
        else:
            ok = len(item) == 2 and item[0] in ELEMENT_TAGS and item[1] in COLOURS
        if not ok:
            raise SceneError(f"item {i} of a {scene.kind} is invalid: {item!r}")


# ---------------------------------------------------------------------------------------------
# Sampling: seeded, with a fixed held-out split
# ---------------------------------------------------------------------------------------------


def sample_scene(rng: random.Random, kind: str | None = None, n_items: int | None = None) -> Scene:
    """A random scene from ``rng`` (kind and item count random unless given).

    >>> sample_scene(random.Random(0), "chart", 2)
    Scene(kind='chart', items=(('cyan', 7), ('red', 5)))
    """
    kind = kind or rng.choice(KINDS)
    n = n_items or rng.randint(1, MAX_ITEMS)
    colours = list(COLOURS)
    if kind == "chart":
        items = tuple((rng.choice(colours), rng.choice(HEIGHTS)) for _ in range(n))
    else:
        items = tuple((rng.choice(list(ELEMENT_TAGS)), rng.choice(colours)) for _ in range(n))
    return Scene(kind, items)


def is_held_out(scene: Scene) -> bool:
    """True for the ~10% of scenes reserved for evaluation (a hash of the description decides).

    Every training set filters these out, so no probe item is ever trained on, for any seed.
    """
    digest = hashlib.sha256(describe(scene).encode()).digest()
    return digest[0] < 26  # 26/256 ~ 10%


def sample_scenes(seed: int, n: int, *, kind: str | None = None, n_items: int | None = None,
                  split: str = "train") -> list[Scene]:
    """``n`` scenes from ``seed``: ``split="train"`` never returns a held-out scene, ``"test"`` only those.

    >>> [is_held_out(s) for s in sample_scenes(0, 3, split="test")]
    [True, True, True]
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(seed)
    out: list[Scene] = []
    while len(out) < n:
        scene = sample_scene(rng, kind, n_items)
        if is_held_out(scene) == (split == "test"):
            out.append(scene)
    return out


# ---------------------------------------------------------------------------------------------
# Image
# ---------------------------------------------------------------------------------------------


def rgb(colour: str) -> tuple[int, int, int]:
    """The RGB of a colour name (its 3-digit hex doubled, as CSS does).

    >>> rgb("red")
    (238, 34, 34)
    """
    return tuple(int(c * 2, 16) for c in COLOURS[colour])


def render(scene: Scene):
    """Draw the scene as a 64x64 RGB PIL image on white.

    Charts: bar i fills x in [16i+3, 16i+12], height 6 px per unit from the bottom edge.
    UI: row i is the band y in [16i, 16i+15]; header = wide filled bar, button = small centred
    block, input = outlined box, text = two thin lines.
    """
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(img)
    for i, item in enumerate(scene.items):
        if scene.kind == "chart":
            colour, height = item
            left = i * SLOT
            draw.rectangle([left + 3, SIZE - UNIT * height, left + 12, SIZE - 1], fill=rgb(colour))
            continue
        element, colour = item
        top = i * SLOT
        fill = rgb(colour)
        if element == "header":
            draw.rectangle([1, top + 2, SIZE - 2, top + 13], fill=fill)
        elif element == "button":
            draw.rectangle([20, top + 4, 43, top + 11], fill=fill)
        elif element == "input":
            draw.rectangle([4, top + 3, SIZE - 5, top + 12], outline=fill, width=2)
        else:  # text
            draw.rectangle([4, top + 4, 47, top + 5], fill=fill)
            draw.rectangle([4, top + 9, 35, top + 10], fill=fill)
    return img


# ---------------------------------------------------------------------------------------------
# Description
# ---------------------------------------------------------------------------------------------


def describe(scene: Scene) -> str:
    """The one-line description of a scene; each item carries its index (``#0``, ``#1``...).

    Why the index: to write item k (bar ``k`` of a program, column ``k`` of an image) a model looks
    it up by a token it can match, instead of counting commas, which the tiny models did badly
    (measured: they copied the previous item instead).

    >>> describe(Scene("chart", (("red", 3), ("blue", 5))))
    'bar chart: #0 red 3, #1 blue 5'
    >>> describe(Scene("ui", (("header", "red"), ("button", "blue"))))
    'page: #0 header red, #1 button blue'
    """
    if scene.kind == "chart":
        return "bar chart: " + ", ".join(f"#{i} {c} {h}" for i, (c, h) in enumerate(scene.items))
    return "page: " + ", ".join(f"#{i} {e} {c}" for i, (e, c) in enumerate(scene.items))


_CHART_DESC = re.compile(r"bar chart: (.+)")
_UI_DESC = re.compile(r"page: (.+)")


def parse_description(text: str) -> Scene | None:
    """The scene a description states, or ``None`` if it is not a valid description.

    >>> parse_description("bar chart: #0 red 3, #1 blue 5")
    Scene(kind='chart', items=(('red', 3), ('blue', 5)))
    >>> parse_description("bar chart: #0 red 12") is None
    True
    """
    text = text.strip()
    try:
        m = _CHART_DESC.fullmatch(text) or _UI_DESC.fullmatch(text)
        if m is None:
            return None
        items = []
        for i, part in enumerate(m.group(1).split(", ")):
            index, first, second = part.split(" ")
            if index != f"#{i}":
                return None
            items.append((first, int(second)) if text.startswith("bar") else (first, second))
        return Scene("chart" if text.startswith("bar") else "ui", tuple(items))
    except (ValueError, SceneError):
        return None


# ---------------------------------------------------------------------------------------------
# Code
# ---------------------------------------------------------------------------------------------


def to_code(scene: Scene, palette: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> str:
    """The reference program that draws the scene (Python for charts, HTML for UI).

    ``palette`` / ``tags`` replace the colour -> hex and element -> tag tables (a program written
    against another style sheet: same structure, other codes).

    >>> print(to_code(Scene("chart", (("red", 3), ("blue", 5)))))
    # bar chart: #0 red 3, #1 blue 5
    bar(0, 3, '#e22')
    bar(1, 5, '#23e')
    ylim(6)
    >>> print(to_code(Scene("ui", (("header", "red"),))))
    <!-- page: #0 header red -->
    <h1 id="0" style="color:#e22"></h1>
    """
    palette = palette or COLOURS
    tags = tags or ELEMENT_TAGS
    if scene.kind == "chart":
        lines = [f"# {describe(scene)}"]
        lines += [f"bar({i}, {h}, '#{palette[c]}')" for i, (c, h) in enumerate(scene.items)]
        lines.append(f"ylim({max(h for _, h in scene.items) + 1})")
        return "\n".join(lines)
    lines = [f"<!-- {describe(scene)} -->"]
    lines += [f'<{tags[e]} id="{i}" style="color:#{palette[c]}"></{tags[e]}>' for i, (e, c) in enumerate(scene.items)]
    return "\n".join(lines)


def shuffled_tables(rng: random.Random) -> tuple[dict[str, str], dict[str, str]]:
    """A random re-pairing of the colour -> hex and element -> tag tables (same codes, other owners).

    >>> palette, tags = shuffled_tables(random.Random(0))
    >>> sorted(palette.values()) == sorted(COLOURS.values()), sorted(tags.values()) == sorted(ELEMENT_TAGS.values())
    (True, True)
    """
    hexes, tag_names = list(COLOURS.values()), list(ELEMENT_TAGS.values())
    rng.shuffle(hexes)
    rng.shuffle(tag_names)
    return dict(zip(COLOURS, hexes)), dict(zip(ELEMENT_TAGS, tag_names))


def code_kind(code: str) -> str:
    """``"ui"`` for HTML, ``"chart"`` otherwise (decided by the first non-blank character)."""
    return "ui" if code.lstrip().startswith("<") else "chart"


def _chart_from_calls(calls: Sequence[tuple]) -> Scene | None:
    """The chart a list of ``("bar", x, h, "#hex")`` / ``("ylim", top)`` calls draws, if consistent.

    A program is correct only if bars come in slots 0, 1, 2... and ``ylim`` is max height + 1.
    """
    bars = [c for c in calls if c[0] == "bar"]
    limits = [c for c in calls if c[0] == "ylim"]
    try:
        if len(limits) != 1 or [b[1] for b in bars] != list(range(len(bars))):
            return None
        items = tuple((HEX_TO_COLOUR[str(b[3]).lstrip("#")], b[2]) for b in bars)
        scene = Scene("chart", items)
    except (KeyError, SceneError, IndexError, TypeError):
        return None
    return scene if limits[0][1] == max(h for _, h in items) + 1 else None


def _chart_calls_static(code: str) -> list[tuple] | None:
    """Read ``bar``/``ylim`` calls with literal arguments without running anything (``ast``)."""
    import ast

    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    calls = []
    for node in tree.body:
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and not node.value.keywords):
            return None
        try:
            args = [ast.literal_eval(a) for a in node.value.args]
        except ValueError:
            return None
        calls.append((node.value.func.id, *args))
    return calls


class _TagReader(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.rows.append((tag, dict(attrs).get("style") or ""))


_STYLE = re.compile(r"color:#([0-9a-f]{3})")


def parse_code(code: str) -> Scene | None:
    """The scene a program draws, read without executing it; ``None`` if it is not a valid program.

    Chart programs must be plain ``bar(x, h, '#hex')`` / ``ylim(top)`` calls (checked as for
    :func:`run_chart_programs`); HTML must be one known tag per row with a known colour.

    >>> parse_code(to_code(Scene("chart", (("cyan", 9),))))
    Scene(kind='chart', items=(('cyan', 9),))
    >>> parse_code("bar(0, 3, '#e22')\\nylim(9)") is None   # wrong derived ylim
    True
    """
    if code_kind(code) == "chart":
        calls = _chart_calls_static(code)
        return None if calls is None else _chart_from_calls(calls)
    reader = _TagReader()
    try:
        reader.feed(code)
        reader.close()
        items = []
        for tag, style in reader.rows:
            m = _STYLE.fullmatch(style)
            items.append((TAG_TO_ELEMENT[tag], HEX_TO_COLOUR[m.group(1)]))
        return Scene("ui", tuple(items))
    except (KeyError, AttributeError, SceneError, AssertionError):
        return None


# The runner executes each program in a fresh namespace with only the drawing API, under a
# per-program alarm; one subprocess serves a whole batch so a probe costs one interpreter start.
_RUNNER = r"""
import json, signal, sys
def _timeout(*_):
    raise TimeoutError
signal.signal(signal.SIGALRM, _timeout)
programs, per_program = json.load(sys.stdin)
results = []
for src in programs:
    calls = []
    api = {"__builtins__": {"range": range, "len": len, "max": max, "min": min},
           "bar": lambda x, h, colour: calls.append(("bar", x, h, colour)),
           "ylim": lambda top: calls.append(("ylim", top))}
    signal.setitimer(signal.ITIMER_REAL, per_program)
    try:
        exec(compile(src, "<program>", "exec"), api)
        results.append([list(c) for c in calls])
    except BaseException:
        results.append(None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
print(json.dumps(results))
"""


def run_chart_programs(programs: Sequence[str], *, per_program_s: float = 0.5,
                       timeout_s: float = 60.0) -> list[Scene | None]:
    """Execute chart programs in a subprocess and return the scene each one draws (or ``None``).

    Each program runs with only ``bar``/``ylim`` (and a few builtins) in scope and a time limit;
    an exception, a timeout, or an inconsistent drawing gives ``None``. Not a security sandbox:
    it bounds time, not memory or files, which is enough for the kit's own generated programs.

    >>> run_chart_programs([to_code(Scene("chart", (("red", 3),))), "while True: pass"])
    [Scene(kind='chart', items=(('red', 3),)), None]
    """
    if not programs:
        return []
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", _RUNNER], input=json.dumps([list(programs), per_program_s]),
            capture_output=True, text=True, timeout=timeout_s,
        )
        raw = json.loads(done.stdout)
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        return [None] * len(programs)
    return [None if calls is None else _chart_from_calls([tuple(c) for c in calls]) for calls in raw]


def check_programs(programs: Sequence[str], targets: Sequence[Scene], *, execute: bool = True) -> list[bool]:
    """Whether each program draws exactly its target scene (charts executed, HTML parsed).

    >>> s = Scene("ui", (("input", "purple"),))
    >>> check_programs([to_code(s), to_code(s).replace("82c", "111")], [s, s])
    [True, False]
    """
    scenes: list[Scene | None] = [parse_code(p) if code_kind(p) == "ui" or not execute else None
                                  for p in programs]
    charts = [i for i, p in enumerate(programs) if execute and code_kind(p) == "chart"]
    for i, scene in zip(charts, run_chart_programs([programs[i] for i in charts])):
        scenes[i] = scene
    return [s == t for s, t in zip(scenes, targets)]


def item_accuracy(predicted: Scene | None, target: Scene) -> float:
    """Fraction of the target's items that the prediction has right, position by position.

    >>> item_accuracy(parse_description("bar chart: #0 red 3, #1 blue 4"), parse_description("bar chart: #0 red 3, #1 blue 5"))
    0.5
    """
    if predicted is None or predicted.kind != target.kind:
        return 0.0
    right = sum(p == t for p, t in zip(predicted.items, target.items))
    return right / max(len(target.items), len(predicted.items))
