"""The kit's InfiBench-V-style sample set: deterministic images for its questions.

The questions, grading specs and fixture answers are authored files under
``assets/infibench_v_sample/`` (``cases/*.yaml`` in the official format, ``responses/*.jsonl``).
Their pictures (UI screenshots, charts, error messages, phone mock-ups) are drawn here from the
specs in ``images.yaml`` with Pillow and matplotlib, so ``build_images()`` re-creates the exact
PNGs (``python -m viscodex_lite.infibench.samples``).

>>> img = render({"kind": "terminal", "lines": ["$ ls", "a.txt"]}); img.width
640
"""

from __future__ import annotations

import io
from pathlib import Path

import yaml
from PIL import Image, ImageDraw, ImageFont

W = 640


def _font(size: int = 14, mono: bool = False) -> ImageFont.ImageFont:
    names = ["DejaVuSansMono.ttf" if mono else "DejaVuSans.ttf"]
    for name in names:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            pass
    return ImageFont.load_default()


def _terminal(spec: dict) -> Image.Image:
    """An error message or shell session: monospace lines on a dark (or light) background."""
    lines = spec["lines"]
    dark = spec.get("theme", "dark") == "dark"
    h = 24 + 18 * len(lines) + 16 + (26 if spec.get("title") else 0)
    img = Image.new("RGB", (W, h), (30, 30, 30) if dark else (250, 250, 250))
    d = ImageDraw.Draw(img)
    y = 12
    if spec.get("title"):
        d.rectangle([0, 0, W, 26], fill=(60, 60, 60) if dark else (225, 225, 225))
        d.text((10, 6), spec["title"], fill=(230, 230, 230) if dark else (40, 40, 40), font=_font(13))
        y = 38
    for line in lines:
        red = any(w in line for w in ("Error", "error", "FAILED", "Exception", "fatal", "denied"))
        color = (255, 110, 100) if red else ((220, 220, 220) if dark else (30, 30, 30))
        d.text((12, y), line, fill=color, font=_font(13, mono=True))
        y += 18
    return img


def _ui(spec: dict) -> Image.Image:
    """A web page or desktop window: boxes with labels at given positions (x, y, w, h)."""
    h = spec.get("height", 400)
    img = Image.new("RGB", (W, h), tuple(spec.get("background", (245, 246, 248))))
    d = ImageDraw.Draw(img)
    if spec.get("title"):
        d.rectangle([0, 0, W, 30], fill=(52, 58, 64))
        d.text((12, 8), spec["title"], fill=(255, 255, 255), font=_font(14))
    for el in spec.get("elements", []):
        x, y, w, hh = el["box"]
        fill = tuple(el.get("fill", (255, 255, 255)))
        outline = tuple(el.get("outline", (180, 180, 180)))
        if el.get("kind") == "button":
            d.rounded_rectangle([x, y, x + w, y + hh], radius=6, fill=fill, outline=outline)
        elif el.get("kind") == "text":
            pass
        else:
            d.rectangle([x, y, x + w, y + hh], fill=fill, outline=outline)
        if el.get("text"):
            d.text((x + 8, y + max(4, hh // 2 - 8)), el["text"], fill=tuple(el.get("color", (33, 37, 41))),
                   font=_font(el.get("size", 14), mono=el.get("mono", False)))
    return img


def _phone(spec: dict) -> Image.Image:
    """A phone frame around a small UI (mobile questions)."""
    inner = _ui(dict(spec, height=spec.get("height", 420)))
    inner = inner.crop((0, 0, 300, inner.height))
    img = Image.new("RGB", (W, inner.height + 60), (255, 255, 255))
    d = ImageDraw.Draw(img)
    x0 = (W - 320) // 2
    d.rounded_rectangle([x0, 10, x0 + 320, inner.height + 50], radius=28, fill=(20, 20, 20))
    img.paste(inner, (x0 + 10, 30))
    return img


def _chart(spec: dict) -> Image.Image:
    """A matplotlib chart (line, bar, scatter, hist) from literal data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    kind = spec.get("type", "line")
    for s in spec.get("series", []):
        if kind == "bar":
            ax.bar(s.get("x", list(range(len(s["y"])))), s["y"], label=s.get("label"), color=s.get("color"))
        elif kind == "scatter":
            ax.scatter(s["x"], s["y"], label=s.get("label"), color=s.get("color"), s=18)
        elif kind == "hist":
            ax.hist(s["y"], bins=s.get("bins", 10), label=s.get("label"), color=s.get("color"))
        else:
            ax.plot(s.get("x", list(range(len(s["y"])))), s["y"], label=s.get("label"), color=s.get("color"),
                    linestyle=s.get("style", "-"), marker=s.get("marker"))
    ax.set_title(spec.get("title", ""))
    ax.set_xlabel(spec.get("xlabel", ""))
    ax.set_ylabel(spec.get("ylabel", ""))
    if any(s.get("label") for s in spec.get("series", [])):
        ax.legend(loc=spec.get("legend", "best"))
    if spec.get("grid"):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return Image.open(buf).convert("RGB")


RENDERERS = {"terminal": _terminal, "ui": _ui, "phone": _phone, "chart": _chart}


def render(spec: dict) -> Image.Image:
    """Draw one image spec (``kind``: terminal, ui, phone or chart)."""
    try:
        return RENDERERS[spec["kind"]](spec)
    except KeyError as exc:
        raise ValueError(f"image spec needs kind in {sorted(RENDERERS)}: {spec!r}") from exc


def sample_root() -> Path:
    from .. import config

    return config.current(mode="tiny").assets_dir / "infibench_v_sample"


def build_images(root: str | Path | None = None) -> list[Path]:
    """Render every image listed in ``root/images.yaml`` into ``root/cases/images/`` (palette PNGs)."""
    root = Path(root) if root else sample_root()
    specs = yaml.safe_load((root / "images.yaml").read_text())
    out_dir = root / "cases" / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in sorted(specs.items()):
        img = render(spec).quantize(colors=64, dither=Image.Dither.NONE)
        path = out_dir / f"{name}.png"
        img.save(path, optimize=True)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in build_images():
        print(p)
