"""The mini-MCD: a small stand-in for MCD in the release's exact layout, with images the kit renders.

Four parts, as in the paper (section 2), each made by a *generator* ``rng -> Sample``:

- ``html``: a page spec becomes both the HTML/CSS answer and a Pillow mock-up of the page;
- ``chart``: a matplotlib script is the answer, and executing that very script draws the image;
- ``qa``: StackOverflow-style questions with a screenshot of code and its real traceback/output;
- ``algorithm``: text-only problems with a reference solution and tests computed from it.

Generators are pluggable (:func:`generator`). The ``world`` generators make the chart and page parts
speak the mini family's world (``viscodex_lite.world``: its 64x64 scenes, instruction and programs)
instead of generic matplotlib/HTML, which is what tiny-mode fine-tuning of the mini family needs:
``build(..., generators=WORLD_GENERATORS)``. Each sample draws from its own ``random.Random(f"{seed}/{category}/{i}")``, so the output
is byte-identical for a seed whatever the number of workers.

    path = mini_mcd.ensure(n=600, generators=mini_mcd.WORLD_GENERATORS)   # built once, then reused
    ds = mcd.load(path)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import io
import json
import keyword
import multiprocessing
import os
import random
import re
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from .atomic import atomic_path
from .errors import KitError
from .mcd import CATEGORIES, IMAGE_PLACEHOLDER, PAPER_MIX, ReleaseWriter, allocate, mix_key

# Bump when any generator's output changes, so cached builds (ensure) are rebuilt.
BUILDER_VERSION = 1


@dataclass
class Sample:
    """One generated record: the user's prompt (with ``<image>`` where images go), the answer, images."""

    prompt: str
    answer: str
    images: list = field(default_factory=list)  # PIL images, in placeholder order


# category -> generator name -> function(rng) -> Sample
GENERATORS: dict[str, dict[str, Callable[[random.Random], Sample]]] = {c: {} for c in CATEGORIES}


def generator(category: str, name: str):
    """Register ``fn(rng) -> Sample`` as generator ``name`` of ``category`` (decorator)."""
    def register(fn):
        GENERATORS.setdefault(category, {})[name] = fn
        return fn
    return register


def png_bytes(image) -> bytes:
    """PNG bytes with no metadata (no timestamps, no software tag): equal images give equal bytes."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def font(size: int, mono: bool = False, bold: bool = False):
    """A DejaVu TrueType font at ``size`` px: matplotlib ships it, so every install has the same one."""
    import matplotlib
    from PIL import ImageFont

    name = "DejaVuSansMono" if mono else "DejaVuSans"
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{name}{'-Bold' if bold else ''}.ttf"
    return ImageFont.truetype(str(path), size)


def wrap(text: str, fnt, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to ``width`` px in font ``fnt``."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and fnt.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


# ---------------------------------------------------------------------------------------------
# Shared vocabulary
# ---------------------------------------------------------------------------------------------

PALETTE = {  # name -> hex; also what chart prompts and page specs may mention
    "blue": "#1f77b4", "orange": "#ff7f0e", "green": "#2ca02c", "red": "#d62728", "purple": "#9467bd",
    "brown": "#8c564b", "pink": "#e377c2", "gray": "#7f7f7f", "olive": "#bcbd22", "teal": "#17becf",
}
TOPICS = [  # title, x label, y label, category labels
    ("Monthly sales", "Month", "Units sold", ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug"]),
    ("Fruit harvest", "Fruit", "Tonnes", ["Apples", "Pears", "Plums", "Cherries", "Grapes", "Figs"]),
    ("Server latency", "Region", "Latency (ms)", ["EU", "US", "Asia", "Africa", "Oceania", "LatAm"]),
    ("Exam scores", "Subject", "Average score", ["Math", "Physics", "History", "Art", "Biology", "Music"]),
    ("Website visits", "Day", "Visits", ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]),
    ("Energy mix", "Source", "Share (%)", ["Solar", "Wind", "Hydro", "Gas", "Coal", "Nuclear"]),
    ("Bug reports", "Team", "Open bugs", ["Core", "Web", "Mobile", "Data", "Infra", "Docs"]),
    ("Library loans", "Genre", "Loans", ["Crime", "Sci-fi", "Poetry", "History", "Travel", "Cooking"]),
]
WORDS = ("river pixel amber orbit cedar lumen harbor meadow quartz ember summit willow atlas nova "
         "maple coral falcon breeze canyon velvet").split()
SITE_KINDS = ["Bakery", "Studio", "Cafe", "Books", "Garden", "Labs", "Travel", "Fitness", "Records", "Florist"]
NOUNS = ["apple", "pear", "plum", "cherry", "melon", "lemon", "mango", "kiwi"]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]


def _site_name(rng: random.Random) -> str:
    return f"{rng.choice(WORDS).title()} {rng.choice(SITE_KINDS)}"


# ---------------------------------------------------------------------------------------------
# chart: the matplotlib script is the answer and draws the image
# ---------------------------------------------------------------------------------------------

CHART_PROMPTS = [
    "<image>\nPlease provide the python code to generate the image below.",
    "<image>\nWrite matplotlib code that reproduces this chart exactly.",
    "<image>\nGenerate the Python (matplotlib) script that draws this figure.",
    "Here is a chart:\n<image>\nGive me the code to recreate it with matplotlib.",
]


def _chart_code(rng: random.Random) -> str:
    title, xlabel, ylabel, labels = rng.choice(TOPICS)
    k = rng.randint(3, min(6, len(labels)))
    cats = labels[:k]
    colors = rng.sample(list(PALETTE.values()), 3)
    kind = rng.choice(["bar", "bar", "barh", "line", "line", "scatter", "pie", "grouped"])
    head = ["import matplotlib.pyplot as plt", ""]
    body: list[str]
    if kind in ("bar", "barh"):
        values = [rng.randint(2, 40) for _ in cats]
        call = "ax.bar(labels, values" if kind == "bar" else "ax.barh(labels, values"
        body = [f"labels = {cats!r}", f"values = {values!r}", "",
                "fig, ax = plt.subplots(figsize=(4, 3), dpi=70)",
                f"bars = {call}, color={colors[0]!r})"]
        if rng.random() < 0.5:
            body.append("ax.bar_label(bars)")
        body += [f"ax.set_title({title!r})"]
        body += ([f"ax.set_xlabel({xlabel!r})", f"ax.set_ylabel({ylabel!r})"] if kind == "bar"
                 else [f"ax.set_xlabel({ylabel!r})", f"ax.set_ylabel({xlabel!r})"])
    elif kind == "line":
        n_series = rng.randint(1, 3)
        body = [f"x = {cats!r}"]
        names = rng.sample(["2022", "2023", "2024", "model A", "model B", "baseline"], n_series)
        for s in range(n_series):
            body.append(f"y{s} = {[rng.randint(1, 30) for _ in cats]!r}")
        body += ["", "fig, ax = plt.subplots(figsize=(4, 3), dpi=70)"]
        marker = rng.choice(["o", "s", "^", None])
        for s in range(n_series):
            style = f", marker={marker!r}" if marker else ""
            body.append(f"ax.plot(x, y{s}, color={colors[s]!r}{style}, label={names[s]!r})")
        body += [f"ax.set_title({title!r})", f"ax.set_xlabel({xlabel!r})", f"ax.set_ylabel({ylabel!r})"]
        if n_series > 1:
            body.append("ax.legend()")
        if rng.random() < 0.5:
            body.append("ax.grid(alpha=0.3)")
    elif kind == "scatter":
        m = rng.randint(8, 20)
        xs = [round(rng.uniform(0, 10), 1) for _ in range(m)]
        ys = [round(0.8 * x + rng.uniform(-2, 2), 1) for x in xs]
        body = [f"x = {xs!r}", f"y = {ys!r}", "",
                "fig, ax = plt.subplots(figsize=(4, 3), dpi=70)",
                f"ax.scatter(x, y, color={colors[0]!r}, s={rng.choice([20, 40, 60])})",
                f"ax.set_title({title!r})", "ax.set_xlabel('x')", "ax.set_ylabel('y')"]
    elif kind == "pie":
        k = min(k, 5)
        shares = [rng.randint(5, 40) for _ in range(k)]
        body = [f"labels = {cats[:k]!r}", f"sizes = {shares!r}",
                f"colors = {rng.sample(list(PALETTE.values()), k)!r}", "",
                "fig, ax = plt.subplots(figsize=(4, 3), dpi=70)",
                "ax.pie(sizes, labels=labels, colors=colors, autopct='%1.0f%%')",
                f"ax.set_title({title!r})", "ax.axis('equal')"]
    else:  # grouped bars
        a, b = [rng.randint(2, 30) for _ in cats], [rng.randint(2, 30) for _ in cats]
        body = [f"labels = {cats!r}", f"first = {a!r}", f"second = {b!r}",
                "positions = range(len(labels))", "width = 0.4", "",
                "fig, ax = plt.subplots(figsize=(4, 3), dpi=70)",
                f"ax.bar([p - width / 2 for p in positions], first, width, color={colors[0]!r}, label='2023')",
                f"ax.bar([p + width / 2 for p in positions], second, width, color={colors[1]!r}, label='2024')",
                "ax.set_xticks(list(positions))", "ax.set_xticklabels(labels)",
                f"ax.set_title({title!r})", f"ax.set_ylabel({ylabel!r})", "ax.legend()"]
    # Fixed margins rather than tight_layout(): the same look here, at half the rendering time.
    margins = {"pie": "left=0.05, right=0.95, top=0.88, bottom=0.05", "barh": "left=0.24, right=0.95, top=0.88, bottom=0.17"}
    adjust = f"fig.subplots_adjust({margins.get(kind, 'left=0.17, right=0.95, top=0.88, bottom=0.17')})"
    return "\n".join(head + body + [adjust, "plt.show()", ""])


def render_matplotlib(code: str):
    """Execute a matplotlib script and return the figure it made as a PIL image (RGB).

    Draws with the Agg canvas directly and silences ``plt.show``, so it works (and shows nothing)
    inside a Jupyter kernel as well as in a worker process; rcParams are matplotlib's defaults.
    """
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    before = set(plt.get_fignums())
    show = plt.show
    try:
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matplotlib.rcdefaults()
            plt.show = lambda *a, **k: None
            exec(compile(code, "chart.py", "exec"), {"__name__": "__chart__"})
            new = sorted(set(plt.get_fignums()) - before)
            if not new:
                raise KitError("the chart code made no figure")
            fig = plt.figure(new[-1])
            canvas = FigureCanvasAgg(fig)
            canvas.draw()
            image = Image.frombuffer("RGBA", canvas.get_width_height(), bytes(canvas.buffer_rgba()), "raw", "RGBA", 0, 1)
    finally:
        plt.show = show
        for num in set(plt.get_fignums()) - before:
            plt.close(num)
    return image.convert("RGB")


@generator("chart", "generic")
def generic_chart(rng: random.Random) -> Sample:
    code = _chart_code(rng)
    return Sample(rng.choice(CHART_PROMPTS), f"```python\n{code}```", [render_matplotlib(code)])


# ---------------------------------------------------------------------------------------------
# html: one page spec -> the HTML answer and a Pillow mock-up of the page
# ---------------------------------------------------------------------------------------------

PAGE_WIDTH = 480
HTML_PROMPTS = [
    "<image>\nBuild this web page with HTML and CSS. Match the colours, layout and text.",
    "<image>\nWrite the HTML (with embedded CSS) that renders this page.",
    "Here is a screenshot of a page:\n<image>\nRecreate it as a single HTML file.",
]
THEMES = [  # background, surface, primary, accent, text, muted
    ("#ffffff", "#f1f5f9", "#1e3a8a", "#f97316", "#0f172a", "#475569"),
    ("#fffbeb", "#fef3c7", "#92400e", "#059669", "#1c1917", "#57534e"),
    ("#f0fdf4", "#dcfce7", "#166534", "#db2777", "#052e16", "#3f6212"),
    ("#faf5ff", "#ede9fe", "#5b21b6", "#0ea5e9", "#1e1b4b", "#6b21a8"),
    ("#111827", "#1f2937", "#0f766e", "#facc15", "#f9fafb", "#9ca3af"),
    ("#fdf2f8", "#fce7f3", "#9d174d", "#2563eb", "#500724", "#831843"),
]
HEADINGS = ["Fresh every morning", "Design that works", "Read something new", "Plan your next trip",
            "Grow your own garden", "Train smarter", "Music for every mood", "Flowers for every day"]
BLURBS = ["Small batches, local ingredients and a warm welcome.", "We build simple tools for busy teams.",
          "Hand-picked titles, delivered to your door.", "Guides, maps and tips from people who have been there.",
          "Seeds, soil and advice for balconies and backyards.", "Short sessions, clear goals, real progress."]
CARD_TITLES = ["Quality", "Delivery", "Support", "Pricing", "Events", "Gallery", "Team", "Offers", "Classes"]
CARD_TEXTS = ["Checked by hand before it leaves.", "Free over 30 euros, next day.", "Real people, seven days a week.",
              "Simple plans, no surprises.", "Join us every first Friday.", "See what we made this season.",
              "Meet the people behind it.", "New deals each week.", "Beginner and advanced groups."]
BUTTONS = ["Order now", "Get started", "Browse", "Book a visit", "Learn more", "Sign up"]
NAV_LINKS = ["Home", "Shop", "About", "Blog", "Contact", "Menu", "Events"]


def page_spec(rng: random.Random, align: str | None = None) -> dict:
    """A random page: theme, nav links, hero (heading, text, button), 2-4 cards, optional footer."""
    bg, surface, primary, accent, text, muted = rng.choice(THEMES)
    site = _site_name(rng)
    return {
        "site": site, "bg": bg, "surface": surface, "primary": primary, "accent": accent, "text": text, "muted": muted,
        "links": rng.sample(NAV_LINKS, rng.randint(2, 4)),
        "align": align or rng.choice(["left", "center"]),
        "heading": rng.choice(HEADINGS), "blurb": rng.choice(BLURBS), "button": rng.choice(BUTTONS),
        "cards": [{"title": t, "text": x} for t, x in zip(rng.sample(CARD_TITLES, 4), rng.sample(CARD_TEXTS, 4))][: rng.randint(2, 4)],
        "footer": f"\u00a9 2024 {site}" if rng.random() < 0.7 else None,
    }


def page_html(spec: dict) -> str:
    """The HTML/CSS of a page spec (the CSS px values are those the mock-up draws)."""
    links = "".join(f'<a href="#">{x}</a>' for x in spec["links"])
    cards = "\n".join(f'    <div class="card"><h3>{c["title"]}</h3><p>{c["text"]}</p></div>' for c in spec["cards"])
    footer = f'\n  <footer>{spec["footer"]}</footer>' if spec["footer"] else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{spec["site"]}</title>
<style>
  body {{ margin: 0; width: {PAGE_WIDTH}px; font-family: "DejaVu Sans", sans-serif; background: {spec["bg"]}; color: {spec["text"]}; }}
  nav {{ display: flex; justify-content: space-between; align-items: center; height: 40px; padding: 0 16px; background: {spec["primary"]}; }}
  nav .brand {{ color: #ffffff; font-weight: bold; font-size: 15px; }}
  nav a {{ color: #ffffff; margin-left: 14px; font-size: 12px; text-decoration: none; }}
  .hero {{ padding: 22px 16px; text-align: {spec["align"]}; }}
  .hero h1 {{ margin: 0 0 8px; font-size: 22px; }}
  .hero p {{ margin: 0 0 14px; font-size: 13px; color: {spec["muted"]}; }}
  .btn {{ display: inline-block; padding: 7px 14px; border-radius: 4px; background: {spec["accent"]}; color: #ffffff; font-size: 13px; text-decoration: none; }}
  .cards {{ display: flex; gap: 10px; padding: 0 16px 16px; }}
  .card {{ flex: 1; padding: 10px; border-radius: 6px; background: {spec["surface"]}; }}
  .card h3 {{ margin: 0 0 6px; font-size: 14px; }}
  .card p {{ margin: 0; font-size: 11px; color: {spec["muted"]}; }}
  footer {{ padding: 8px 16px; font-size: 11px; color: {spec["muted"]}; border-top: 1px solid {spec["surface"]}; }}
</style>
</head>
<body>
  <nav><span class="brand">{spec["site"]}</span><div>{links}</div></nav>
  <section class="hero">
    <h1>{spec["heading"]}</h1>
    <p>{spec["blurb"]}</p>
    <a class="btn" href="#">{spec["button"]}</a>
  </section>
  <section class="cards">
{cards}
  </section>{footer}
</body>
</html>
"""


def render_page(spec: dict):
    """A Pillow mock-up of :func:`page_html` for ``spec`` (same boxes, colours, sizes and text).

    Rendered from the spec, not by parsing HTML; a headless browser would render the HTML itself
    (none is installed here, so this is the renderer the kit uses).
    """
    from PIL import Image, ImageDraw

    cards = spec["cards"]
    inner = PAGE_WIDTH - 32
    card_w = (inner - 10 * (len(cards) - 1)) // len(cards)
    card_lines = [wrap(c["text"], font(11), card_w - 20) for c in cards]
    card_h = 10 + 17 + 6 + 14 * max(len(x) for x in card_lines) + 10
    blurb = wrap(spec["blurb"], font(13), inner)
    hero_h = 22 + 26 + 8 + 17 * len(blurb) + 14 + 30 + 22
    height = 40 + hero_h + card_h + 16 + (28 if spec["footer"] else 0)
    image = Image.new("RGB", (PAGE_WIDTH, height), spec["bg"])
    draw = ImageDraw.Draw(image)
    # nav
    draw.rectangle([0, 0, PAGE_WIDTH, 40], fill=spec["primary"])
    draw.text((16, 20), spec["site"], font=font(15, bold=True), fill="#ffffff", anchor="lm")
    x = PAGE_WIDTH - 16
    for link in reversed(spec["links"]):
        x -= font(12).getlength(link)
        draw.text((x, 20), link, font=font(12), fill="#ffffff", anchor="lm")
        x -= 14
    # hero
    y = 40 + 22
    center = spec["align"] == "center"

    def line(text, fnt, fill, y):
        w = fnt.getlength(text)
        draw.text(((PAGE_WIDTH - w) / 2 if center else 16, y), text, font=fnt, fill=fill)

    line(spec["heading"], font(22, bold=True), spec["text"], y)
    y += 26 + 8
    for text in blurb:
        line(text, font(13), spec["muted"], y)
        y += 17
    y += 14
    bw = font(13).getlength(spec["button"]) + 28
    bx = (PAGE_WIDTH - bw) / 2 if center else 16
    draw.rounded_rectangle([bx, y, bx + bw, y + 30], radius=4, fill=spec["accent"])
    draw.text((bx + bw / 2, y + 15), spec["button"], font=font(13), fill="#ffffff", anchor="mm")
    y += 30 + 22
    # cards
    for i, (card, lines) in enumerate(zip(cards, card_lines)):
        cx = 16 + i * (card_w + 10)
        draw.rounded_rectangle([cx, y, cx + card_w, y + card_h], radius=6, fill=spec["surface"])
        draw.text((cx + 10, y + 10), card["title"], font=font(14, bold=True), fill=spec["text"])
        for j, text in enumerate(lines):
            draw.text((cx + 10, y + 10 + 17 + 6 + 14 * j), text, font=font(11), fill=spec["muted"])
    y += card_h + 16
    if spec["footer"]:
        draw.line([0, y, PAGE_WIDTH, y], fill=spec["surface"])
        draw.text((16, y + 8), spec["footer"], font=font(11), fill=spec["muted"])
    return image


@generator("html", "generic")
def generic_html(rng: random.Random) -> Sample:
    spec = page_spec(rng)
    return Sample(rng.choice(HTML_PROMPTS), f"```html\n{page_html(spec)}```", [render_page(spec)])


# ---------------------------------------------------------------------------------------------
# qa: StackOverflow-style questions with a screenshot of code and what it printed
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"(#[^\n]*)|('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")|(\b\d+(?:\.\d+)?\b)|([A-Za-z_]\w*)|(\s+|.)")


def render_code_screenshot(code: str, console: str | None = None, title: str = "main.py"):
    """A dark editor-style screenshot of ``code`` (line numbers, simple colouring), with an optional
    console pane below it showing ``console`` (a traceback or printed output)."""
    from PIL import Image, ImageDraw

    mono = font(12, mono=True)
    lines = code.rstrip("\n").split("\n")
    out_lines = console.rstrip("\n").split("\n") if console else []
    char_w = mono.getlength("x")
    longest = max([len(x) + 5 for x in lines] + [len(x) + 1 for x in out_lines])
    width = int(min(640, max(320, 16 + char_w * longest)))
    line_h = 16
    height = 26 + 8 + line_h * len(lines) + 8 + ((22 + line_h * len(out_lines) + 8) if out_lines else 0)
    image = Image.new("RGB", (width, height), "#1e1e1e")
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width, 26], fill="#2d2d2d")
    draw.text((10, 13), title, font=font(11), fill="#cccccc", anchor="lm")
    y = 34
    for number, text in enumerate(lines, 1):
        draw.text((8, y), f"{number:>3}", font=mono, fill="#6e7681")
        x = 8 + char_w * 5
        for comment, string, num, word, other in _TOKEN.findall(text):
            piece = comment or string or num or word or other
            color = ("#6a9955" if comment else "#ce9178" if string else "#b5cea8" if num
                     else "#569cd6" if word and keyword.iskeyword(word) else "#dcdcaa" if word in ("print", "len", "range", "sum", "int", "sorted") else "#d4d4d4")
            draw.text((x, y), piece, font=mono, fill=color)
            x += char_w * len(piece)
        y += line_h
    if out_lines:
        y += 8
        draw.rectangle([0, y, width, height], fill="#0c0c0c")
        draw.text((10, y + 4), "TERMINAL", font=font(10), fill="#8b949e")
        y += 22
        for text in out_lines:
            is_error = text and not text.startswith(" ") and ("Error" in text or "Exception" in text)
            draw.text((10, y), text, font=mono, fill="#f48771" if is_error else "#cccccc")
            y += line_h
    return image


def run_snippet(code: str) -> tuple[str, str | None]:
    """Run a generated snippet; return (printed output, traceback text or None) as Python would show
    them for a file ``main.py`` (frames outside the snippet left out, no caret lines)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "main.py", "exec"), {"__name__": "__main__"})
    except Exception as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "main.py"]
        source = code.splitlines()  # linecache cannot see a compiled string, so quote it ourselves
        text = ["Traceback (most recent call last):"]
        for f in frames:
            text += [f'  File "main.py", line {f.lineno}, in {f.name}', f"    {source[f.lineno - 1].strip()}"]
        text.append(f"{type(exc).__name__}: {exc}")
        return out.getvalue(), "\n".join(text)
    return out.getvalue(), None


def _bug_str_concat(rng):
    name, age = rng.choice(NAMES).title(), rng.randint(18, 70)
    bad = f'name = "{name}"\nage = {age}\nprint(name + " is " + age + " years old")\n'
    good = f'name = "{name}"\nage = {age}\nprint(f"{{name}} is {{age}} years old")\n'
    why = ("`age` is an `int`, and `+` between a `str` and an `int` is not defined in Python, so the "
           "concatenation raises `TypeError`. Convert the number with `str(age)`, or let an f-string do it:")
    return bad, good, why


def _bug_off_by_one(rng):
    items = rng.sample(NOUNS, rng.randint(3, 5))
    bad = f"fruits = {items!r}\nfor i in range(len(fruits) + 1):\n    print(i, fruits[i])\n"
    good = f"fruits = {items!r}\nfor i, fruit in enumerate(fruits):\n    print(i, fruit)\n"
    why = (f"The list has {len(items)} items, so valid indexes are 0 to {len(items) - 1}; `range(len(fruits) + 1)` "
           f"goes one step too far and `fruits[{len(items)}]` raises `IndexError`. Iterate over the list itself:")
    return bad, good, why


def _bug_key_error(rng):
    stock = {k: rng.randint(1, 20) for k in rng.sample(NOUNS, 3)}
    missing = rng.choice([n for n in NOUNS if n not in stock])
    bad = f'stock = {stock!r}\nprint("{missing}:", stock["{missing}"])\n'
    good = f'stock = {stock!r}\nprint("{missing}:", stock.get("{missing}", 0))\n'
    why = (f"`'{missing}'` is not a key of the dictionary, and indexing a dict with a missing key raises "
           "`KeyError`. Use `dict.get` with a default (or check `in` first):")
    return bad, good, why


def _bug_zero_division(rng):
    fn = rng.choice(["average", "mean", "avg_score"])
    bad = f"def {fn}(values):\n    return sum(values) / len(values)\n\nprint({fn}([]))\n"
    good = f"def {fn}(values):\n    if not values:\n        return 0.0\n    return sum(values) / len(values)\n\nprint({fn}([]))\n"
    why = "With an empty list `len(values)` is 0, and dividing by zero raises `ZeroDivisionError`. Handle the empty case first:"
    return bad, good, why


def _bug_sort_none(rng):
    scores = [rng.randint(10, 99) for _ in range(rng.randint(3, 6))]
    bad = f"scores = {scores!r}\nranked = scores.sort(reverse=True)\nprint(ranked[0])\n"
    good = f"scores = {scores!r}\nranked = sorted(scores, reverse=True)\nprint(ranked[0])\n"
    why = ("`list.sort()` sorts in place and returns `None`, so `ranked` is `None` and `ranked[0]` raises "
           "`TypeError`. Use `sorted()`, which returns a new list:")
    return bad, good, why


def _bug_int_parse(rng):
    value = f"{rng.randint(1, 99)}.{rng.randint(1, 9)}"
    bad = f'text = "{value}"\ncount = int(text)\nprint(count * 2)\n'
    good = f'text = "{value}"\ncount = int(float(text))\nprint(count * 2)\n'
    why = ("`int()` only parses whole numbers from a string, so `'" + value + "'` raises `ValueError`. "
           "Parse it as a float first (and round or truncate as you need):")
    return bad, good, why


def _bug_none_attribute(rng):
    users = {n: n.title() for n in rng.sample(NAMES, 3)}
    missing = rng.choice([n for n in NAMES if n not in users])
    bad = f'users = {users!r}\nname = users.get("{missing}")\nprint(name.upper())\n'
    good = f'users = {users!r}\nname = users.get("{missing}")\nif name is None:\n    print("no such user")\nelse:\n    print(name.upper())\n'
    why = (f"`users.get('{missing}')` returns `None` because that key is missing, and `None` has no `.upper()`, "
           "hence the `AttributeError`. Check for `None` before using the value:")
    return bad, good, why


BUGS = [_bug_str_concat, _bug_off_by_one, _bug_key_error, _bug_zero_division, _bug_sort_none, _bug_int_parse, _bug_none_attribute]
ERROR_PROMPTS = [
    "I'm running the script in the screenshot and get the error shown under it:\n<image>\nWhat is wrong and how do I fix it?",
    "<image>\nWhy does this code crash with the error in the terminal, and what is the right way to write it?",
    "My Python script fails (screenshot below).\n<image>\nHow can I fix this error?",
]


def _surprise_default_arg(rng):
    fn, a, b = rng.choice(["add_item", "collect", "remember"]), *rng.sample(NOUNS, 2)
    code = f'def {fn}(item, basket=[]):\n    basket.append(item)\n    return basket\n\nprint({fn}("{a}"))\nprint({fn}("{b}"))\n'
    fixed = f'def {fn}(item, basket=None):\n    if basket is None:\n        basket = []\n    basket.append(item)\n    return basket\n\nprint({fn}("{a}"))\nprint({fn}("{b}"))\n'
    why = ("A default value is evaluated once, when the function is defined, so every call without `basket` "
           "shares the same list. Use `None` as the default and create the list inside:")
    return code, fixed, why


def _surprise_alias(rng):
    items = [rng.randint(1, 9) for _ in range(3)]
    extra = rng.randint(10, 20)
    code = f"original = {items!r}\ncopy = original\ncopy.append({extra})\nprint(original)\n"
    fixed = f"original = {items!r}\ncopy = list(original)\ncopy.append({extra})\nprint(original)\n"
    why = "`copy = original` binds a second name to the same list; it does not copy it. Make a real copy:"
    return code, fixed, why


def _surprise_late_binding(rng):
    k = rng.randint(3, 5)
    code = f"funcs = [lambda: i for i in range({k})]\nprint([f() for f in funcs])\n"
    fixed = f"funcs = [lambda i=i: i for i in range({k})]\nprint([f() for f in funcs])\n"
    why = ("Each lambda looks `i` up when it is *called*, and by then the loop has finished with "
           f"`i == {k - 1}`. Bind the current value as a default argument:")
    return code, fixed, why


def _surprise_float(rng):
    a, b = rng.choice([(0.1, 0.2), (0.1, 0.7), (0.3, 0.6)])
    code = f"total = {a} + {b}\nprint(total)\nprint(total == {round(a + b, 10)})\n"
    fixed = f"import math\n\ntotal = {a} + {b}\nprint(round(total, 2))\nprint(math.isclose(total, {round(a + b, 10)}))\n"
    why = ("Binary floating point cannot represent most decimal fractions exactly, so the sum is off in the "
           "last digits and `==` fails. Compare with a tolerance:")
    return code, fixed, why


SURPRISES = [_surprise_default_arg, _surprise_alias, _surprise_late_binding, _surprise_float]


@generator("qa", "generic")
def generic_qa(rng: random.Random) -> Sample:
    kind = rng.random()
    if kind < 0.6:  # an error: the screenshot shows the code and its real traceback
        bad, good, why = rng.choice(BUGS)(rng)
        printed, tb = run_snippet(bad)
        image = render_code_screenshot(bad, (printed + (tb or "")).strip())
        return Sample(rng.choice(ERROR_PROMPTS), f"{why}\n\n```python\n{good}```", [image])
    if kind < 0.85:  # surprising output
        code, fixed, why = rng.choice(SURPRISES)(rng)
        printed, _ = run_snippet(code)
        fixed_out, _ = run_snippet(fixed)
        image = render_code_screenshot(code, printed)
        prompt = rng.choice([
            "<image>\nWhy does this print what is shown in the terminal? I expected something else.",
            "Can someone explain the output in this screenshot?\n<image>",
        ])
        answer = f"{why}\n\n```python\n{fixed}```\n\nThis prints:\n\n```\n{fixed_out.rstrip()}\n```"
        return Sample(prompt, answer, [image])
    # a layout question about a page screenshot
    spec = page_spec(rng, align="left")
    prompt = ("<image>\nThe heading, text and button of my hero section sit on the left (screenshot). "
              "How do I center them horizontally?")
    answer = ("Center the inline content of the section with `text-align`; the button is an "
              "`inline-block`, so it follows:\n\n```css\n.hero {\n  text-align: center;\n}\n```\n\n"
              "If the items must stay blocks, use flexbox instead:\n\n```css\n.hero {\n  display: flex;\n"
              "  flex-direction: column;\n  align-items: center;\n}\n```")
    return Sample(prompt, answer, [render_page(spec)])


# ---------------------------------------------------------------------------------------------
# algorithm: text-only problems, a reference solution, tests computed from it
# ---------------------------------------------------------------------------------------------

@dataclass
class Problem:
    name: str
    statement: str
    solution: str
    explanation: str
    inputs: Callable[[random.Random], tuple]


PROBLEMS = [
    Problem("sum_of_multiples", "Write a function `sum_of_multiples(a, b, n)` that returns the sum of all non-negative integers below `n` that are divisible by `a` or by `b`.",
            "def sum_of_multiples(a, b, n):\n    return sum(x for x in range(n) if x % a == 0 or x % b == 0)\n",
            "Walk over every number below `n` and keep those divisible by either `a` or `b`.",
            lambda r: (r.randint(2, 7), r.randint(2, 9), r.randint(1, 60))),
    Problem("reverse_words", "Write a function `reverse_words(s)` that returns the words of `s` in reverse order, separated by single spaces.",
            "def reverse_words(s):\n    return \" \".join(reversed(s.split()))\n",
            "`str.split()` without arguments drops repeated spaces; reverse the list and join it.",
            lambda r: (" ".join(r.sample(WORDS, r.randint(1, 5))),)),
    Problem("count_vowels", "Write a function `count_vowels(s)` that counts the vowels (a, e, i, o, u, either case) in `s`.",
            "def count_vowels(s):\n    return sum(1 for ch in s.lower() if ch in \"aeiou\")\n",
            "Lower-case the string once and count the characters that are vowels.",
            lambda r: ("".join(r.choice("abcdeiouxyzAEIO ") for _ in range(r.randint(0, 15))),)),
    Problem("two_sum", "Write a function `two_sum(nums, target)` that returns the indices `[i, j]` (i < j) of the first pair of numbers in `nums` that add up to `target`, or `[]` if there is none.",
            "def two_sum(nums, target):\n    seen = {}\n    for j, x in enumerate(nums):\n        if target - x in seen:\n            return [seen[target - x], j]\n        seen.setdefault(x, j)\n    return []\n",
            "Remember the first index of every value seen so far; for each new value look up its complement. This is O(n).",
            lambda r: ([r.randint(-5, 15) for _ in range(r.randint(2, 8))], r.randint(-3, 20))),
    Problem("running_max", "Write a function `running_max(nums)` that returns a list whose i-th element is the largest of `nums[0..i]`.",
            "def running_max(nums):\n    out = []\n    best = None\n    for x in nums:\n        best = x if best is None or x > best else best\n        out.append(best)\n    return out\n",
            "Keep the best value so far and append it at every step.",
            lambda r: ([r.randint(-9, 9) for _ in range(r.randint(0, 8))],)),
    Problem("is_balanced", "Write a function `is_balanced(s)` that returns True if the brackets `()[]{}` in `s` are balanced and properly nested.",
            "def is_balanced(s):\n    pairs = {\")\": \"(\", \"]\": \"[\", \"}\": \"{\"}\n    stack = []\n    for ch in s:\n        if ch in \"([{\":\n            stack.append(ch)\n        elif ch in pairs:\n            if not stack or stack.pop() != pairs[ch]:\n                return False\n    return not stack\n",
            "Push opening brackets on a stack; each closing bracket must match the top of the stack, and the stack must end empty.",
            lambda r: ("".join(r.choice("()[]{}") for _ in range(r.randint(0, 8))),)),
    Problem("run_length_encode", "Write a function `run_length_encode(s)` that encodes runs of equal characters as the character followed by the run length, e.g. `\"aaab\"` becomes `\"a3b1\"`.",
            "def run_length_encode(s):\n    out = []\n    i = 0\n    while i < len(s):\n        j = i\n        while j < len(s) and s[j] == s[i]:\n            j += 1\n        out.append(f\"{s[i]}{j - i}\")\n        i = j\n    return \"\".join(out)\n",
            "Scan the string, extend each run as far as it goes, and emit the character with the run's length.",
            lambda r: ("".join(r.choice("aab") * r.randint(1, 3) for _ in range(r.randint(0, 5))),)),
    Problem("rotate_right", "Write a function `rotate_right(nums, k)` that returns `nums` rotated right by `k` positions (k may exceed the length).",
            "def rotate_right(nums, k):\n    if not nums:\n        return []\n    k %= len(nums)\n    return nums[-k:] + nums[:-k] if k else list(nums)\n",
            "Reduce `k` modulo the length, then join the last `k` items with the rest.",
            lambda r: ([r.randint(0, 9) for _ in range(r.randint(0, 6))], r.randint(0, 10))),
    Problem("second_largest", "Write a function `second_largest(nums)` that returns the second largest *distinct* value in `nums`, or None if there is none.",
            "def second_largest(nums):\n    values = sorted(set(nums), reverse=True)\n    return values[1] if len(values) > 1 else None\n",
            "Remove duplicates with a set, sort descending, and take the second value if it exists.",
            lambda r: ([r.randint(0, 6) for _ in range(r.randint(0, 6))],)),
    Problem("merge_intervals", "Write a function `merge_intervals(intervals)` that merges overlapping closed intervals `[start, end]` and returns them sorted by start.",
            "def merge_intervals(intervals):\n    merged = []\n    for start, end in sorted(intervals):\n        if merged and start <= merged[-1][1]:\n            merged[-1][1] = max(merged[-1][1], end)\n        else:\n            merged.append([start, end])\n    return merged\n",
            "Sort by start; each interval either extends the last merged one or starts a new one.",
            lambda r: ([sorted([r.randint(0, 20), r.randint(0, 20)]) for _ in range(r.randint(0, 5))],)),
    Problem("fib_mod", "Write a function `fib_mod(n, m)` that returns the n-th Fibonacci number (F(0) = 0, F(1) = 1) modulo `m`.",
            "def fib_mod(n, m):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, (a + b) % m\n    return a % m\n",
            "Iterate the recurrence keeping only residues modulo `m`, so the numbers stay small.",
            lambda r: (r.randint(0, 60), r.randint(2, 1000))),
    Problem("is_palindrome", "Write a function `is_palindrome(s)` that returns True if `s` reads the same backwards, ignoring case and every character that is not a letter or digit.",
            "def is_palindrome(s):\n    kept = [ch.lower() for ch in s if ch.isalnum()]\n    return kept == kept[::-1]\n",
            "Keep only letters and digits, lower-cased, and compare the sequence with its reverse.",
            lambda r: (r.choice(["Never odd or even", "A man, a plan, a canal: Panama", "abc", "No lemon, no melon", "", "ab ba", "xy!"]),)),
    Problem("longest_common_prefix", "Write a function `longest_common_prefix(words)` that returns the longest string that is a prefix of every word in `words` (\"\" for an empty list).",
            "def longest_common_prefix(words):\n    if not words:\n        return \"\"\n    prefix = words[0]\n    for w in words[1:]:\n        while not w.startswith(prefix):\n            prefix = prefix[:-1]\n    return prefix\n",
            "Start from the first word and shorten it until every other word starts with it.",
            lambda r: ([r.choice(["inter", "in", "int"]) + r.choice(["", "net", "val", "stellar"]) for _ in range(r.randint(0, 4))],)),
    Problem("count_islands", "Write a function `count_islands(grid)` that counts groups of horizontally or vertically connected 1s in a grid (a list of lists of 0/1).",
            "def count_islands(grid):\n    seen = set()\n    count = 0\n    for r, row in enumerate(grid):\n        for c, cell in enumerate(row):\n            if cell == 1 and (r, c) not in seen:\n                count += 1\n                stack = [(r, c)]\n                while stack:\n                    i, j = stack.pop()\n                    if (i, j) in seen or not (0 <= i < len(grid) and 0 <= j < len(grid[i])) or grid[i][j] != 1:\n                        continue\n                    seen.add((i, j))\n                    stack += [(i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)]\n    return count\n",
            "Flood-fill each unvisited 1 with an explicit stack and count how many fills start.",
            lambda r: ([[r.randint(0, 1) for _ in range(4)] for _ in range(r.randint(1, 4))],)),
]


def solve(problem: Problem, args: tuple):
    """The reference answer of ``problem`` for ``args`` (runs its solution source)."""
    scope: dict = {}
    exec(problem.solution, scope)
    return scope[problem.name](*args)


@generator("algorithm", "generic")
def generic_algorithm(rng: random.Random) -> Sample:
    problem = rng.choice(PROBLEMS)
    cases = []
    for _ in range(rng.randint(3, 5)):
        args = problem.inputs(rng)
        call = f"{problem.name}({', '.join(repr(a) for a in args)})"
        cases.append((call, solve(problem, args)))
    example_call, example_result = cases[0]
    prompt = f"{problem.statement}\n\nExample: `{example_call}` returns `{example_result!r}`."
    tests = "\n".join([f"def test_{problem.name}():"] + [f"    assert {call} == {result!r}" for call, result in cases])
    answer = f"{problem.explanation}\n\n```python\n{problem.solution}```\n\nTests:\n\n```python\n{tests}\n```"
    return Sample(prompt, answer, [])


# ---------------------------------------------------------------------------------------------
# in-world generators: the mini family's charts and pages (viscodex_lite.world)
# ---------------------------------------------------------------------------------------------

# What tiny mode fine-tunes the mini family on: its own world for the two image -> code parts.
WORLD_GENERATORS = {"chart": "world", "html": "world"}


def _world():
    try:
        return importlib.import_module(f"{__package__}.world")
    except ModuleNotFoundError as exc:
        raise KitError("the 'world' generators need viscodex_lite/world.py (the mini family's world), which this "
                       "checkout does not have; use the 'generic' generators.") from exc


def world_example(rng: random.Random, kind: str) -> Sample:
    """An image -> code record in the mini family's own format: the world's 64x64 scene, its
    instruction (image first, as ``zoo`` trains it) and its reference program. Scenes the world
    holds out for the probes are never drawn, so fine-tuning on this never sees a test item."""
    world = _world()
    scene = world.sample_scene(rng, kind)
    while world.is_held_out(scene):
        scene = world.sample_scene(rng, kind)
    return Sample(IMAGE_PLACEHOLDER + world.IMAGE_CODE_PROMPT, world.to_code(scene), [world.render(scene)])


@generator("chart", "world")
def world_chart(rng: random.Random) -> Sample:
    return world_example(rng, "chart")


@generator("html", "world")
def world_html(rng: random.Random) -> Sample:
    return world_example(rng, "ui")


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

DEFAULT_GENERATORS = {c: "generic" for c in CATEGORIES}


def _resolve(generators: Mapping[str, str] | None) -> dict[str, str]:
    chosen = dict(DEFAULT_GENERATORS)
    for category, name in (generators or {}).items():
        category = mix_key(category)
        if name not in GENERATORS.get(category, {}):
            known = ", ".join(f"{c}: {'/'.join(g)}" for c, g in GENERATORS.items())
            raise KitError(f"no generator {name!r} for category {category!r} (known: {known})")
        chosen[category] = name
    return chosen


def make_sample(job: tuple) -> tuple:
    """Worker: generate sample ``i`` of ``category`` and encode its images. Picklable for a pool."""
    seed, category, i, name = job
    sample = GENERATORS[category][name](random.Random(f"{seed}/{category}/{i}"))
    if sample.prompt.count(IMAGE_PLACEHOLDER) != len(sample.images):
        raise KitError(f"generator {category}/{name} sample {i}: {len(sample.images)} images but "
                       f"{sample.prompt.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders")
    return category, i, sample.prompt, sample.answer, [png_bytes(im) for im in sample.images]


@dataclass
class BuildResult:
    path: Path
    records: int
    counts: dict
    seconds: float
    bytes: int
    manifest: dict

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return (f"mini-MCD: {self.records} records ({parts}) in {self.seconds:.1f} s, "
                f"{self.bytes / 1e6:.1f} MB at {self.path}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build(out_dir: str | os.PathLike, n: int = 3000, seed: int = 0, mix: Mapping[str, float] | None = None,
          generators: Mapping[str, str] | None = None, layout: str = "zip", workers: int = 1,
          overwrite: bool = False) -> BuildResult:
    """Build the mini-MCD into ``out_dir``: ``mcd_<n>.json``, ``mcd_images.zip`` (or folder), ``manifest.json``.

    ``mix`` defaults to the paper's shares; ``generators`` picks one per category (default all
    ``generic``; ``{"chart": "world", "html": "world"}`` for the mini family's world). The same
    arguments give byte-identical files, whatever ``workers``.
    """
    start = time.perf_counter()
    chosen = _resolve(generators)
    counts = allocate(n, mix or PAPER_MIX)
    jobs = [(seed, c, i, chosen[c]) for c in CATEGORIES for i in range(counts.get(c, 0))]
    random.Random(f"{seed}/order").shuffle(jobs)  # a mixed file, as the release is
    out_dir = Path(out_dir)
    with ReleaseWriter(out_dir, layout, overwrite) as writer:
        if workers > 1 and len(jobs) > 50:
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            with multiprocessing.get_context(method).Pool(workers) as pool:
                made = pool.imap(make_sample, jobs, chunksize=8)
                _write_samples(writer, made)
        else:
            _write_samples(writer, map(make_sample, jobs))
    manifest = {
        "builder_version": BUILDER_VERSION, "n": n, "seed": seed, "mix": dict(mix or PAPER_MIX),
        "generators": chosen, "counts": dict(writer.counts), "layout": layout,
        "files": {p.name: _sha256(p) for p in sorted(out_dir.iterdir()) if p.is_file() and p.name.startswith("mcd_")},
    }
    with atomic_path(out_dir / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    return BuildResult(writer.path, writer.count, dict(writer.counts), time.perf_counter() - start, size, manifest)


def _write_samples(writer: ReleaseWriter, made) -> None:
    for category, i, prompt, answer, pngs in made:
        refs = [f"{category}_images/{i:06d}.png" if len(pngs) == 1 else f"{category}_images/{i:06d}_{j}.png"
                for j in range(len(pngs))]
        record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                  "images": refs, "category": category}
        writer.add(record, dict(zip(refs, pngs)))


def code_fingerprint(chosen: Mapping[str, str]) -> str:
    """A short hash of the code that makes the records: this module, plus ``world.py`` when a world
    generator is chosen. Part of :func:`ensure`'s cache key, so a change to the mini family's world
    (its programs' format, its held-out scenes) rebuilds the mini-MCD instead of reusing a stale one."""
    sources = [Path(__file__).read_bytes()]
    if "world" in chosen.values():
        sources.append(Path(_world().__file__).read_bytes())
    return hashlib.sha256(b"\0".join(sources)).hexdigest()[:8]


def ensure(n: int = 600, seed: int = 0, generators: Mapping[str, str] | None = None,
           root: str | os.PathLike | None = None, workers: int = 1) -> Path:
    """The directory of a mini-MCD with these settings, built on first use and reused after.

    Lives under ``runs/<mode>/mini_mcd/`` (or ``root``), keyed by the settings and the generators'
    code (:func:`code_fingerprint`); a build goes to a temporary directory that is renamed into
    place, so an interrupted build is never picked up.
    """
    from . import config

    chosen = _resolve(generators)
    root = Path(root) if root is not None else config.current().workdir("mini_mcd")
    tag = "-".join(f"{c}_{g}" for c, g in chosen.items() if g != "generic")
    key = f"n{n}-seed{seed}-v{BUILDER_VERSION}-{code_fingerprint(chosen)}" + (f"-{tag}" if tag else "")
    target = root / key
    if (target / "manifest.json").is_file():
        return target
    tmp = root / f".{key}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    build(tmp, n=n, seed=seed, generators=chosen, workers=workers)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
