"""MCD records: the real release from a local copy, checked; subsets; the chat format the model sees.

The released layout (``lingjie23/MultimodalCodingDataset``; see the paper notes, section 2.3)::

    mcd_598k.json     one JSON array of {"messages": [{"role", "content"}, ...],
                                         "images": ["html_images/123.png", ...],
                                         "category": "html" | "chart" | ...}
    mcd_images.zip    every image, stored under mcd_images/...   (or that folder, extracted)

Image paths appear with or without the ``mcd_images/`` prefix; both resolve. The category strings
``html`` and ``chart`` are confirmed; the QA and algorithm names are not, so :data:`CATEGORY_ALIASES`
maps common spellings and any other name is accepted and counted in the report. Whether the user
text carries ``<image>`` placeholders is unconfirmed too: a record with as many placeholders as
images puts each image where its placeholder is; a record with none puts its images before the
first user text (``placeholders="strict"`` rejects that instead).

The JSON is read record by record (:func:`iter_json_records`), so 598k records never sit in one
Python list. Typical use (a notebook)::

    ds = mcd.load(path)                       # datasets.Dataset with Image features
    mcd.category_counts(ds)                   # counts and shares against the paper's mix
    mcd.show_examples(ds, 4)                  # an HTML view with the images
    chat = mcd.to_chat(ds[0], max_pixels=200_704)   # Qwen2.5-VL messages + resized images
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .errors import KitError

RECORDS_FILE = "mcd_598k.json"
IMAGES_ZIP = "mcd_images.zip"
IMAGES_DIR = "mcd_images"
IMAGE_PLACEHOLDER = "<image>"

# The four parts of MCD and the paper's sample counts (thousands): HTML 200, chart 210, QA 59, algorithm 129.
CATEGORIES = ("html", "chart", "qa", "algorithm")
PAPER_COUNTS = {"html": 200_000, "chart": 210_000, "qa": 59_000, "algorithm": 129_000}
PAPER_MIX = {name: count / sum(PAPER_COUNTS.values()) for name, count in PAPER_COUNTS.items()}
# Only "html" and "chart" are confirmed spellings in the release; the rest are guesses that map home.
CATEGORY_ALIASES = {
    "html": "html", "web": "html", "webpage": "html", "web2code": "html",
    "chart": "chart", "plot": "chart", "chart2code": "chart",
    "qa": "qa", "code_qa": "qa", "stackoverflow": "qa", "stack_overflow": "qa", "stackqa": "qa", "so": "qa",
    "algorithm": "algorithm", "algorithmic": "algorithm", "algo": "algorithm", "kodcode": "algorithm",
}

# Qwen2.5-VL's image geometry: 14-px patches merged 2x2, so sides are multiples of 28 and each
# 28x28 block becomes one token. Pixel bounds are the image processor's defaults.
QWEN_FACTOR = 28
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280

# What can be wrong with one record; `skip_bad=True` counts skips under these names.
BAD_KINDS = (
    "not_a_record",          # the array element is not a JSON object
    "bad_messages",          # messages missing, empty, or an entry without a known role / string content
    "bad_images",            # images not a list of relative path strings
    "missing_image",         # a listed image is not in the zip / folder
    "unreadable_image",      # a listed image is there but is not a readable image
    "placeholder_mismatch",  # number of <image> placeholders != number of images
    "bad_category",          # category missing or not a non-empty string
    "unknown_category",      # a name outside CATEGORY_ALIASES, only when unknown_category="error"
)
CHECK_IMAGES = ("verify", "exists", "none")


class McdError(KitError):
    """An MCD file or directory cannot be used as a whole (not found, not JSON, ambiguous)."""


class RecordError(KitError):
    """One record is bad; ``.index`` is its position in the JSON array and ``.kind`` one of BAD_KINDS."""

    def __init__(self, source: str, index: int, kind: str, detail: str):
        self.source, self.index, self.kind, self.detail = source, index, kind, detail
        super().__init__(
            f"{source} record {index}: {detail} [{kind}]. Fix or drop that record, or load with "
            "skip_bad=True (CLI: --skip-bad) to skip bad records; skips are counted by kind."
        )


def canonical_category(name: Any) -> str | None:
    """The MCD part a category string names (``html``/``chart``/``qa``/``algorithm``), or None.

    >>> canonical_category("HTML"), canonical_category("StackOverflow"), canonical_category("poetry")
    ('html', 'qa', None)
    """
    if not isinstance(name, str):
        return None
    return CATEGORY_ALIASES.get(name.strip().lower().replace("-", "_").replace(" ", "_"))


def mix_key(name: str) -> str:
    """The key a category is counted and mixed under: its canonical part, else the name lower-cased."""
    return canonical_category(name) or name.strip().lower()


# ---------------------------------------------------------------------------------------------
# Finding a release on disk
# ---------------------------------------------------------------------------------------------

def image_member(ref: str) -> str:
    """An image path from a record, normalised: no ``mcd_images/`` prefix, no ``./``.

    >>> image_member("mcd_images/chart_images/7.png"), image_member("chart_images/7.png")
    ('chart_images/7.png', 'chart_images/7.png')
    """
    member = ref.replace("\\", "/")
    while member.startswith("./"):
        member = member[2:]
    if member.startswith(IMAGES_DIR + "/"):
        member = member[len(IMAGES_DIR) + 1:]
    return member


class ImageStore:
    """The images of a release: ``mcd_images.zip`` or the extracted ``mcd_images/`` folder.

    ``value(ref)`` is what a ``datasets.Image`` column stores: a path for the folder (read lazily),
    the bytes for the zip (datasets cannot open zip members fast: ~0.7 s each through fsspec).
    """

    def __init__(self, location: Path):
        self.location = Path(location)
        self.is_zip = self.location.is_file()
        if self.is_zip:
            try:
                self._zip = zipfile.ZipFile(self.location)
            except (zipfile.BadZipFile, OSError) as exc:
                raise McdError(f"{self.location} is not a readable zip file ({exc}). Re-download it.") from exc
            self._names = set(self._zip.namelist())
        elif not self.location.is_dir():
            raise McdError(f"no image folder or zip at {self.location}.")

    def __repr__(self) -> str:
        return f"ImageStore({str(self.location)!r})"

    def close(self) -> None:
        if self.is_zip:
            self._zip.close()

    def locate(self, ref: str) -> str | Path | None:
        """The zip member name or file path holding ``ref``, or None when it is not there."""
        member = image_member(ref)
        if self.is_zip:
            for name in (f"{IMAGES_DIR}/{member}", member):
                if name in self._names:
                    return name
            return None
        for path in (self.location / member, self.location / IMAGES_DIR / member):
            if path.is_file():
                return path
        return None

    def where(self, ref: str) -> str:
        """Where ``ref`` was looked for, for error messages."""
        member = image_member(ref)
        if self.is_zip:
            return f"{self.location.name} (as {IMAGES_DIR}/{member})"
        return str(self.location / member)

    def read(self, ref: str) -> bytes:
        found = self.locate(ref)
        if found is None:
            raise FileNotFoundError(self.where(ref))
        return self._zip.read(found) if self.is_zip else Path(found).read_bytes()

    def value(self, ref: str) -> dict:
        """A ``datasets.Image`` value for ``ref``: {"path", "bytes"}."""
        if self.is_zip:
            return {"path": image_member(ref), "bytes": self.read(ref)}
        found = self.locate(ref)
        if found is None:
            raise FileNotFoundError(self.where(ref))
        return {"path": str(found), "bytes": None}


@dataclass
class Release:
    """A local MCD copy: the records file and where its images are (None when there are none)."""

    records: Path
    images: ImageStore | None

    def close(self) -> None:
        if self.images is not None:
            self.images.close()


def find_records_file(path: str | os.PathLike) -> Path:
    """The records JSON of a release: ``path`` itself, else ``mcd_598k.json``, else the one ``mcd_*.json``."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise McdError(
            f"no MCD copy at {path}. Point at the directory holding {RECORDS_FILE} and {IMAGES_ZIP} "
            "(or their extracted folder), or at the JSON file itself; `viscodex-lite mcd build-mini -o DIR` "
            "makes a small one."
        )
    if (path / RECORDS_FILE).is_file():
        return path / RECORDS_FILE
    candidates = sorted(p for p in path.glob("mcd_*.json") if p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise McdError(f"{path} holds no {RECORDS_FILE} (nor another mcd_*.json records file).")
    raise McdError(f"{path} holds several records files ({', '.join(p.name for p in candidates)}); pass the one to use.")


def open_release(path: str | os.PathLike, images: str | os.PathLike | None = None) -> Release:
    """Locate a release: its records file and its images (extracted folder preferred over the zip).

    >>> open_release("/nowhere")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    viscodex_lite.mcd.McdError: no MCD copy at /nowhere...
    """
    records = find_records_file(path)
    if images is not None:
        return Release(records, ImageStore(Path(images).expanduser()))
    root = records.parent
    if (root / IMAGES_DIR).is_dir():
        return Release(records, ImageStore(root / IMAGES_DIR))
    if (root / IMAGES_ZIP).is_file():
        return Release(records, ImageStore(root / IMAGES_ZIP))
    return Release(records, None)


# ---------------------------------------------------------------------------------------------
# Reading records one at a time
# ---------------------------------------------------------------------------------------------

def iter_json_records(path: str | os.PathLike, chunk_chars: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, value)`` for each element of a JSON array file (or each line of JSON Lines).

    Memory holds one chunk plus the record being parsed, whatever the file size: the 1.7 GB
    release is never one Python list (``json.load`` of it needs several times its size in RAM).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.json"; _ = p.write_text('[{"a": 1}, {"a": [2, "]"]}]')
    >>> list(iter_json_records(p, chunk_chars=4))
    [(0, {'a': 1}), (1, {'a': [2, ']']})]
    """
    decoder = json.JSONDecoder()
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        buf, pos, consumed, eof = "", 0, 0, False

        def fill(need_more: bool) -> None:
            nonlocal buf, pos, consumed, eof
            # Drop what was parsed, then read at least one more chunk (a record may span many).
            consumed += pos
            buf, pos = buf[pos:], 0
            more = f.read(max(chunk_chars, len(buf)) if need_more else chunk_chars)
            eof = more == ""
            buf += more

        def skip_space() -> bool:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    return True
                if eof:
                    return False
                fill(False)

        def fail(what: str, index: int) -> McdError:
            return McdError(
                f"{path}: {what} near character {consumed + pos} (record {index}); the file is not valid "
                "JSON from there on, so no later record can be read. Re-download or repair the file."
            )

        fill(False)
        if not skip_space():
            raise McdError(f"{path} is empty; expected a JSON array of records.")
        if buf.startswith("\ufeff", pos):
            pos += 1
            skip_space()
        array = buf[pos] == "["
        if array:
            pos += 1
        elif buf[pos] != "{":
            raise fail("expected '[' (a JSON array) or '{' (JSON Lines)", 0)
        index = 0
        while True:
            if not skip_space():
                if array:
                    raise fail("the array is not closed (missing ']'; the file looks truncated)", index)
                return
            if array and buf[pos] == "]":
                pos += 1
                if skip_space():
                    raise fail("unexpected text after the closing ']'", index)
                return
            if array and index > 0:
                if buf[pos] != ",":
                    raise fail("expected ',' between records", index)
                pos += 1
                if not skip_space():
                    raise fail("the array is not closed (missing ']'; the file looks truncated)", index)
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    # A value that ends exactly at the buffer's end may continue in the next chunk.
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as exc:
                    if eof:
                        raise fail(f"invalid JSON ({exc.msg})", index) from None
                fill(True)
            pos = end
            yield index, value
            index += 1


# ---------------------------------------------------------------------------------------------
# Checking records
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What a pass over a release found: records read and kept, skips by kind, category names.

    >>> r = LoadReport(source="x.json", read=3, kept=2, skipped=Counter(missing_image=1))
    >>> r.summary().splitlines()[0]
    'x.json: kept 2 of 3 records; skipped 1 (missing_image 1)'
    """

    source: str = ""
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_error: dict = field(default_factory=dict)  # kind -> message of its first occurrence
    categories: Counter = field(default_factory=Counter)  # raw category name -> records kept
    unknown_categories: Counter = field(default_factory=Counter)
    implicit_placeholders: int = 0  # records with images but no <image> placeholder

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        lines = [f"{self.source}: kept {self.kept} of {self.read} records; skipped {skipped}"
                 + (" (" + ", ".join(f"{k} {v}" for k, v in self.skipped.most_common()) + ")" if skipped else "")]
        if self.unknown_categories:
            names = ", ".join(f"{k!r} {v}" for k, v in self.unknown_categories.most_common())
            lines.append(f"categories outside html/chart/qa/algorithm (kept as they are): {names}")
        if self.implicit_placeholders:
            lines.append(f"{self.implicit_placeholders} records have images but no {IMAGE_PLACEHOLDER} "
                         "placeholder: their images go before the first user text")
        for kind, message in self.first_error.items():
            lines.append(f"first {kind}: {message}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs and counts the pairs.
        return {name: dict(value) if isinstance(value, dict) else value for name, value in vars(self).items()}

    @classmethod
    def from_json(cls, data: Mapping) -> "LoadReport":
        data = dict(data)
        for key in ("skipped", "categories", "unknown_categories"):
            data[key] = Counter(data.get(key, {}))
        return cls(**data)


class _Bad(Exception):
    def __init__(self, kind: str, detail: str):
        self.kind, self.detail = kind, detail


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        got = "missing" if messages is None else ("empty" if isinstance(messages, list) else type(messages).__name__)
        raise _Bad("bad_messages", f"'messages' must be a non-empty list of {{role, content}}, got {got}")
    roles = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _Bad("bad_messages", f"messages[{i}] is a {type(message).__name__}, not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise _Bad("bad_messages", f"messages[{i}] has role {role!r} (expected user, assistant or system)")
        if not isinstance(content, str):
            raise _Bad("bad_messages", f"messages[{i}].content is {type(content).__name__}, not a string")
        if not content.strip():
            raise _Bad("bad_messages", f"messages[{i}] ({role}) has empty content")
        roles.append(role)
    if "user" not in roles:
        raise _Bad("bad_messages", "no user message")
    if roles[-1] != "assistant":
        raise _Bad("bad_messages", f"the last message is from {roles[-1]!r}; a training record ends with the assistant's answer")


def count_placeholders(messages: Sequence[Mapping]) -> int:
    """``<image>`` placeholders in the user and system turns (answers may contain SVG ``<image>`` tags)."""
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m.get("role") != "assistant")


def _check_images(refs: Any, store: ImageStore | None, check: str) -> list[str]:
    if refs is None:
        return []
    if not isinstance(refs, list) or not all(isinstance(r, str) and r.strip() for r in refs):
        raise _Bad("bad_images", f"'images' must be a list of path strings, got {json.dumps(refs)[:80]}")
    for ref in refs:
        member = image_member(ref)
        if member.startswith("/") or ".." in member.split("/") or ":" in member.split("/")[0]:
            raise _Bad("bad_images", f"image path {ref!r} must be relative to {IMAGES_DIR}/")
    if check == "none":
        return refs
    for ref in refs:
        if store is None:
            raise _Bad("missing_image", f"image {ref!r} is listed but there is no {IMAGES_ZIP} or {IMAGES_DIR}/ next to the records file")
        if store.locate(ref) is None:
            raise _Bad("missing_image", f"image {ref!r} is not in {store.where(ref)}")
        if check == "verify":
            from PIL import Image
            try:
                with Image.open(io.BytesIO(store.read(ref))) as im:
                    im.verify()
            except Exception as exc:  # PIL raises many types for broken files
                raise _Bad("unreadable_image", f"image {ref!r} cannot be read as an image ({type(exc).__name__}: {exc})") from None
    return refs


def _image_values(store: ImageStore | None, refs: list[str]) -> list[dict]:
    try:
        return [store.value(ref) for ref in refs]
    except (AttributeError, FileNotFoundError):  # only reachable with check_images="none"
        raise _Bad("missing_image", f"an image of {refs} is not in {store.location if store else 'any image store'}") from None


def check_record(record: Any, store: ImageStore | None = None, *, check_images: str = "verify",
                 placeholders: str = "auto", unknown_category: str = "accept") -> dict:
    """Check one record; return its dataset row (without images) or raise ``_Bad(kind, detail)``.

    Used by :func:`records`; call that instead (it adds the record index and source to errors).
    """
    if not isinstance(record, dict):
        raise _Bad("not_a_record", f"expected an object with messages/images/category, got {type(record).__name__}")
    messages = record.get("messages")
    _check_messages(messages)
    refs = _check_images(record.get("images"), store, check_images)
    n_placeholders = count_placeholders(messages)
    if n_placeholders != len(refs) and not (n_placeholders == 0 and placeholders == "auto"):
        raise _Bad("placeholder_mismatch",
                   f"{len(refs)} image(s) but {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the user text")
    category = record.get("category")
    if not isinstance(category, str) or not category.strip():
        raise _Bad("bad_category", f"'category' must be a non-empty string, got {json.dumps(category)}")
    if canonical_category(category) is None and unknown_category == "error":
        raise _Bad("unknown_category", f"category {category!r} is not one of {', '.join(CATEGORIES)} (or a known alias)")
    return {
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "image_paths": list(refs),
        "category": category,
        "implicit": bool(refs) and n_placeholders == 0,
    }


def records(path: str | os.PathLike | Release, *, skip_bad: bool = False, limit: int | None = None,
            check_images: str = "verify", placeholders: str = "auto", unknown_category: str = "accept",
            with_images: bool = True, report: LoadReport | None = None) -> Iterator[dict]:
    """Stream checked records as dataset rows: messages, images, category, image_paths, record_index.

    ``check_images``: "verify" opens every image, "exists" only looks it up, "none" trusts the paths.
    ``placeholders``: "auto" accepts records with images but no ``<image>`` (images go first),
    "strict" counts them as ``placeholder_mismatch``. ``unknown_category``: "accept" keeps and
    reports names outside the four parts, "error" rejects them. A bad record raises
    :class:`RecordError` naming its index, or with ``skip_bad`` is counted in ``report.skipped``.
    ``limit`` stops after that many records *read*.
    """
    if check_images not in CHECK_IMAGES:
        raise KitError(f"check_images={check_images!r}; use one of {', '.join(CHECK_IMAGES)}")
    if placeholders not in ("auto", "strict") or unknown_category not in ("accept", "error"):
        raise KitError("placeholders must be 'auto' or 'strict'; unknown_category 'accept' or 'error'")
    release = path if isinstance(path, Release) else open_release(path)
    report = report if report is not None else LoadReport()
    report.source = report.source or str(release.records)
    try:
        for index, record in iter_json_records(release.records):
            if limit is not None and index >= limit:
                break
            report.read += 1
            try:
                row = check_record(record, release.images, check_images=check_images,
                                   placeholders=placeholders, unknown_category=unknown_category)
                if with_images:
                    row["images"] = _image_values(release.images, row["image_paths"])
            except _Bad as bad:
                error = RecordError(release.records.name, index, bad.kind, bad.detail)
                if not skip_bad:
                    raise error from None
                report.skipped[bad.kind] += 1
                report.first_error.setdefault(bad.kind, str(error).split(" [")[0])
                continue
            report.kept += 1
            report.categories[row["category"]] += 1
            if canonical_category(row["category"]) is None:
                report.unknown_categories[row["category"]] += 1
            report.implicit_placeholders += row.pop("implicit")
            row["record_index"] = index
            yield row
    finally:
        if not isinstance(path, Release):
            release.close()


def scan(path: str | os.PathLike, **options) -> LoadReport:
    """Check every record without building a dataset; skip and count bad ones. Returns the report.

    ``options`` are those of :func:`records` (``check_images``, ``placeholders``, ...).
    """
    report = LoadReport()
    for _ in records(path, skip_bad=True, with_images=False, report=report, **options):
        pass
    return report


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------

def features():
    """The ``datasets.Features`` of a loaded MCD: the release's three fields plus provenance."""
    from datasets import Features, Image, List, Value

    return Features({
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "images": List(Image()),
        "category": Value("string"),
        "image_paths": List(Value("string")),  # as written in the JSON, so a subset keeps them
        "record_index": Value("int64"),        # position in the source JSON, for error messages
    })


def _fingerprint(release: Release, options: Mapping) -> str:
    parts = [str(release.records.resolve()), json.dumps(options, sort_keys=True)]
    for p in (release.records, release.images.location if release.images else None):
        if p is not None:
            st = p.stat()
            parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return "mcd-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def load(path: str | os.PathLike, *, skip_bad: bool = False, limit: int | None = None, streaming: bool = False,
         check_images: str = "verify", placeholders: str = "auto", unknown_category: str = "accept",
         images: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
         report: LoadReport | None = None):
    """Load a local MCD copy (the release, a subset, or the mini-MCD) as a ``datasets.Dataset``.

    Rows have ``messages``, ``images`` (``datasets.Image``: PIL images on access), ``category``,
    ``image_paths`` and ``record_index``. Options are those of :func:`records`. Records are read
    one at a time and written to an Arrow cache in batches (keyed by the files' size and mtime and
    the options; a second load is instant). Folder images are stored as paths, zip images as bytes
    (so loading the full zip copies ~19 GB into the cache: extract it first). ``streaming=True``
    returns an ``IterableDataset`` that reads the files as you iterate (use :func:`scan` for counts).
    Pass ``report=LoadReport()`` to receive what was kept and skipped.

    >>> ds = load("~/data/MultimodalCodingDataset", skip_bad=True, report=(report := LoadReport()))  # doctest: +SKIP
    """
    import datasets

    options = dict(skip_bad=skip_bad, limit=limit, check_images=check_images,
                   placeholders=placeholders, unknown_category=unknown_category)
    release = open_release(path, images)  # fails early, with a clear message, on a wrong path
    if streaming:
        release.close()

        def rows():
            yield from records(open_release(path, images), **options)
        return datasets.IterableDataset.from_generator(rows, features=features())

    fingerprint = _fingerprint(release, options)
    cache_root = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
    report_path = cache_root / "viscodex_mcd_reports" / f"{fingerprint}.json"
    fresh = LoadReport()

    def rows():
        yield from records(release, report=fresh, **options)
        # Written when the last record is out, so an Arrow cache never exists without its report.
        report_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(report_path, json.dumps(fresh.to_json(), indent=1).encode())

    try:
        ds = datasets.Dataset.from_generator(rows, features=features(), cache_dir=str(cache_root) if cache_dir else None,
                                             fingerprint=fingerprint)
    except datasets.exceptions.DatasetGenerationError as exc:
        if isinstance(exc.__cause__, KitError):
            raise exc.__cause__ from None
        raise
    finally:
        release.close()
    if not fresh.read:  # the Arrow cache was reused: so is the report written with it
        if report_path.is_file():
            fresh = LoadReport.from_json(json.loads(report_path.read_text()))
        elif report is not None:
            fresh = scan(path, **{k: v for k, v in options.items() if k != "skip_bad"})
    if report is not None:
        vars(report).update(vars(fresh))
    return ds


RELEASE_NAME = "MultimodalCodingDataset"  # the directory name under VISCODEX_LITE_DATA (the HF repo's name)


def path_for(cfg=None, mini_n: int = 600) -> Path:
    """Where a run's MCD comes from: ``VISCODEX_LITE_DATA/MultimodalCodingDataset`` in lab/full mode,
    else (or when that copy is missing, with a note) the mini-MCD in the mini family's world.

    >>> ds = load(path_for(cfg))  # doctest: +SKIP
    """
    from . import config, mini_mcd

    cfg = cfg or config.current()
    if cfg.mode != "tiny":
        try:
            return cfg.data_path(RELEASE_NAME)
        except config.ConfigError as exc:
            print(f"[viscodex-lite] {exc} Using the mini-MCD instead.")
    return mini_mcd.ensure(n=mini_n, seed=cfg.seed, generators=mini_mcd.WORLD_GENERATORS)


def category_counts(ds) -> "pandas.DataFrame":
    """Records per category with their share and the paper's share (by canonical part).

    >>> category_counts([{"category": "chart"}, {"category": "html"}, {"category": "chart"}])["count"].to_dict()
    {'chart': 2, 'html': 1}
    """
    import pandas as pd

    names = ds["category"] if hasattr(ds, "column_names") else [row["category"] for row in ds]
    counts = Counter(mix_key(name) for name in names)
    total = sum(counts.values()) or 1
    table = pd.DataFrame(
        [{"category": k, "count": v, "share": v / total, "paper_share": PAPER_MIX.get(k, float("nan"))}
         for k, v in counts.most_common()]
    )
    return table.set_index("category")


# ---------------------------------------------------------------------------------------------
# Stratified subsets
# ---------------------------------------------------------------------------------------------

def parse_mix(text: str) -> dict[str, float]:
    """``"html=0.4,chart=0.4,qa=0.1,algorithm=0.1"`` -> dict (weights need not sum to 1).

    >>> parse_mix("html=2, chart=1")
    {'html': 2.0, 'chart': 1.0}
    """
    mix = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, weight = item.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or value < 0 or not math.isfinite(value):
            raise KitError(f"mix entry {item!r} is not NAME=WEIGHT with a weight >= 0 (e.g. html=0.4,chart=0.4,qa=0.1,algorithm=0.1)")
        mix[mix_key(name)] = value
    if not mix or sum(mix.values()) <= 0:
        raise KitError(f"mix {text!r} gives no positive weight")
    return mix


def allocate(n: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` over categories in proportion to ``mix`` (largest remainders; sums to ``n``).

    >>> allocate(10, PAPER_MIX)
    {'html': 3, 'chart': 4, 'qa': 1, 'algorithm': 2}
    """
    weights = {mix_key(k): float(v) for k, v in mix.items() if v > 0}
    total = sum(weights.values())
    if n < 0 or total <= 0:
        raise KitError(f"cannot split n={n} over mix {dict(mix)}")
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (-(exact[k] - counts[k]), list(weights).index(k)))
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def stratified_indices(categories: Sequence[str], n: int, mix: Mapping[str, float] | None = None,
                       seed: int = 0) -> list[int]:
    """Positions of ``n`` records drawn per category in proportion to ``mix`` (default: the paper's).

    Deterministic for ``seed``; returned in source order. Raises when a category has too few records.

    >>> stratified_indices(["html"] * 5 + ["chart"] * 5, 4, {"html": 1, "chart": 1}, seed=0)
    [3, 4, 5, 9]
    """
    mix = PAPER_MIX if mix is None else mix
    by_category: dict[str, list[int]] = {}
    for i, name in enumerate(categories):
        by_category.setdefault(mix_key(name), []).append(i)
    chosen: list[int] = []
    for name, k in allocate(n, mix).items():
        pool = by_category.get(name, [])
        if k > len(pool):
            have = ", ".join(f"{c} {len(v)}" for c, v in sorted(by_category.items()))
            raise KitError(f"the subset needs {k} {name!r} records but the source has {len(pool)} "
                           f"(it has: {have}). Lower n or that category's share in the mix.")
        # A per-category generator seeded by name: the same draw whatever the other categories are.
        rng = random.Random(f"{seed}/{name}")
        chosen.extend(rng.sample(pool, k))
    return sorted(chosen)


def subset(ds, n: int, mix: Mapping[str, float] | str | None = None, seed: int = 0):
    """A stratified subset of a loaded dataset (``mix`` as a dict or "html=0.4,..."; default the paper's)."""
    mix = parse_mix(mix) if isinstance(mix, str) else mix
    return ds.select(stratified_indices(ds["category"], n, mix, seed))


# ---------------------------------------------------------------------------------------------
# Writing the release's schema
# ---------------------------------------------------------------------------------------------

def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ReleaseWriter:
    """Write records in the release's layout: ``mcd_<n>.json`` plus ``mcd_images.zip`` (or folder).

    Files appear only on :meth:`close` (temporary names, then ``os.replace``), so a crash leaves no
    half-written records file. The zip is byte-for-byte deterministic: stored members, fixed dates.

    >>> with ReleaseWriter(tempfile.mkdtemp()) as w:  # doctest: +SKIP
    ...     w.add({"messages": [...], "images": ["chart_images/0.png"], "category": "chart"},
    ...           {"chart_images/0.png": png_bytes})
    """

    def __init__(self, out_dir: str | os.PathLike, layout: str = "zip", overwrite: bool = False):
        if layout not in ("zip", "folder"):
            raise KitError(f"layout={layout!r}; use 'zip' (as released) or 'folder' (extracted)")
        self.out_dir, self.layout = Path(out_dir), layout
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ours = [p for p in self.out_dir.iterdir()
                if (p.name.startswith("mcd_") and p.suffix == ".json") or p.name in (IMAGES_ZIP, IMAGES_DIR)]
        if ours and not overwrite:
            raise McdError(f"{self.out_dir} already holds {', '.join(sorted(p.name for p in ours))}; "
                           "choose an empty directory or pass overwrite=True (CLI: --overwrite).")
        for p in ours:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        tag = f"tmp-{os.getpid()}"
        self._json_tmp = self.out_dir / f".records.json.{tag}"
        self._json = open(self._json_tmp, "w", encoding="utf-8")
        self._json.write("[")
        if layout == "zip":
            self._images_tmp = self.out_dir / f".{IMAGES_ZIP}.{tag}"
            self._zip = zipfile.ZipFile(self._images_tmp, "w", compression=zipfile.ZIP_STORED)
        else:
            self._images_tmp = self.out_dir / f".{IMAGES_DIR}.{tag}"
            self._images_tmp.mkdir()
        self._written: set[str] = set()
        self.count = 0
        self.counts: Counter = Counter()
        self.path: Path | None = None

    def add(self, record: Mapping, images: Mapping[str, bytes]) -> None:
        """Append a record (messages, images, category); ``images`` maps each of its refs to bytes."""
        for ref in record.get("images") or []:
            member = image_member(ref)
            if member in self._written:
                continue
            data = images[ref]
            if self.layout == "zip":
                info = zipfile.ZipInfo(f"{IMAGES_DIR}/{member}", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                self._zip.writestr(info, data)
            else:
                target = self._images_tmp / member
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            self._written.add(member)
        self._json.write(("\n" if self.count == 0 else ",\n") + json.dumps(dict(record), ensure_ascii=False))
        self.count += 1
        self.counts[record.get("category")] += 1

    def close(self) -> Path:
        """Finish and move everything into place; returns the records file."""
        self._json.write("\n]\n")
        self._json.close()
        if self.layout == "zip":
            self._zip.close()
            os.replace(self._images_tmp, self.out_dir / IMAGES_ZIP)
        else:
            os.replace(self._images_tmp, self.out_dir / IMAGES_DIR)
        self.path = self.out_dir / f"mcd_{self.count}.json"
        os.replace(self._json_tmp, self.path)  # last: the records file marks a complete copy
        return self.path

    def abort(self) -> None:
        self._json.close()
        if self.layout == "zip":
            self._zip.close()
        for p in (self._json_tmp, self._images_tmp):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def __enter__(self) -> "ReleaseWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.abort() if exc_type else self.close()


def _image_bytes(value: Any) -> bytes:
    """Encoded bytes of an image value: {"bytes", "path"} (datasets), PIL image, or a path."""
    if isinstance(value, dict):
        return value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
    if isinstance(value, (str, os.PathLike)):
        return Path(value).read_bytes()
    buf = io.BytesIO()
    value.save(buf, format="PNG")
    return buf.getvalue()


def save(ds, out_dir: str | os.PathLike, layout: str = "zip", overwrite: bool = False) -> Path:
    """Write a loaded dataset (e.g. a :func:`subset`) back in the release's layout; returns the JSON path."""
    with ReleaseWriter(out_dir, layout, overwrite) as writer:
        for row in _raw_rows(ds):
            refs = list(row["image_paths"])
            record = {"messages": row["messages"], "images": refs, "category": row["category"]}
            writer.add(record, {ref: _image_bytes(v) for ref, v in zip(refs, row["images"])})
    return writer.path


def write_subset(path: str | os.PathLike, out_dir: str | os.PathLike, n: int,
                 mix: Mapping[str, float] | str | None = None, seed: int = 0, *, skip_bad: bool = False,
                 check_images: str = "exists", layout: str = "zip", overwrite: bool = False,
                 report: LoadReport | None = None) -> Path:
    """Draw a stratified subset from a release on disk and write it in the same layout.

    Two streaming passes (categories, then the chosen records), so the full 598k never sit in
    memory; records keep their original fields and image paths, in source order.
    """
    mix = parse_mix(mix) if isinstance(mix, str) else mix
    report = report if report is not None else LoadReport()
    rows = records(path, skip_bad=skip_bad, check_images=check_images, with_images=False, report=report)
    index_and_category = [(row["record_index"], row["category"]) for row in rows]
    picks = stratified_indices([c for _, c in index_and_category], n, mix, seed)
    wanted = {index_and_category[i][0] for i in picks}
    release = open_release(path)
    try:
        with ReleaseWriter(out_dir, layout, overwrite) as writer:
            for index, record in iter_json_records(release.records):
                if index in wanted:
                    refs = record.get("images") or []
                    writer.add(record, {ref: release.images.read(ref) for ref in refs})
    finally:
        release.close()
    return writer.path


# ---------------------------------------------------------------------------------------------
# The chat format Qwen2.5-VL sees
# ---------------------------------------------------------------------------------------------

def qwen_resize_dims(height: int, width: int, max_pixels: int = QWEN_MAX_PIXELS,
                     min_pixels: int = QWEN_MIN_PIXELS, factor: int = QWEN_FACTOR) -> tuple[int, int]:
    """(height, width) Qwen2.5-VL resizes an image to: multiples of 28, pixels within bounds, aspect kept.

    >>> qwen_resize_dims(1080, 1920, max_pixels=200_704)
    (336, 588)
    """
    if min(height, width) <= 0 or max(height, width) / min(height, width) > 200:
        raise KitError(f"image of {width}x{height} px: Qwen2.5-VL needs both sides > 0 and an aspect ratio <= 200")
    h = round(height / factor) * factor  # may round to 0 for a thin image: then the min_pixels branch fixes it
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def image_tokens(width: int, height: int, max_pixels: int = QWEN_MAX_PIXELS, min_pixels: int = QWEN_MIN_PIXELS) -> int:
    """Vision tokens Qwen2.5-VL spends on an image (one per 28x28 block after resizing).

    >>> image_tokens(1920, 1080, max_pixels=200_704)
    252
    """
    h, w = qwen_resize_dims(height, width, max_pixels, min_pixels)
    return (h // QWEN_FACTOR) * (w // QWEN_FACTOR)


def open_image(value: Any):
    """A PIL image (RGB) from a dataset value: PIL image, {"bytes", "path"} dict, bytes, or a path."""
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    else:
        image = Image.open(io.BytesIO(_image_bytes(value)))
    return image.convert("RGB")


def fit_image(image, max_pixels: int = QWEN_MAX_PIXELS, min_pixels: int = QWEN_MIN_PIXELS):
    """Resize a PIL image to Qwen2.5-VL's grid (:func:`qwen_resize_dims`), bicubic as Qwen does."""
    from PIL import Image

    h, w = qwen_resize_dims(image.height, image.width, max_pixels, min_pixels)
    return image if (image.height, image.width) == (h, w) else image.resize((w, h), Image.Resampling.BICUBIC)


def to_chat(record: Mapping, *, max_pixels: int | None = None, min_pixels: int = QWEN_MIN_PIXELS,
            system: str | None = None) -> dict:
    """One record as Qwen2.5-VL chat messages plus its images, in placeholder order.

    Returns ``{"messages": [...], "images": [PIL...]}``: each ``<image>`` placeholder becomes a
    ``{"type": "image"}`` part (a record without placeholders gets its images before the first user
    text), text becomes ``{"type": "text", "text": ...}``. Feed it as
    ``processor.apply_chat_template(chat["messages"])`` and ``processor(text=..., images=chat["images"])``.
    ``max_pixels`` caps images the way Qwen2.5-VL resizes (sides multiples of 28, aspect kept), so a
    processor with the same cap leaves them alone; None (default) keeps them as they are, which is
    what the mini family wants (its processor has its own 64x64 geometry).

    >>> to_chat({"messages": [{"role": "user", "content": "Code this."},
    ...                       {"role": "assistant", "content": "x = 1"}]})["messages"][0]
    {'role': 'user', 'content': [{'type': 'text', 'text': 'Code this.'}]}
    """
    messages = record["messages"]
    images = [open_image(v) for v in (record.get("images") or [])]
    if max_pixels is not None:
        images = [fit_image(im, max_pixels, min_pixels) for im in images]
    n_placeholders = count_placeholders(messages)
    if n_placeholders not in (0, len(images)):
        raise RecordError("record", record.get("record_index", -1), "placeholder_mismatch",
                          f"{len(images)} image(s) but {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s)")
    chat = []
    if system is not None and messages[0]["role"] != "system":
        chat.append({"role": "system", "content": [{"type": "text", "text": system}]})
    images_first = n_placeholders == 0 and images
    for message in messages:
        parts = []
        if message["role"] == "assistant":
            parts.append({"type": "text", "text": message["content"]})
        else:
            if images_first and message["role"] == "user":
                parts.extend({"type": "image"} for _ in images)
                images_first = False
            for i, text in enumerate(message["content"].split(IMAGE_PLACEHOLDER)):
                if i > 0:
                    parts.append({"type": "image"})
                if text:
                    parts.append({"type": "text", "text": text})
        chat.append({"role": message["role"], "content": parts})
    return {"messages": chat, "images": images}


# ---------------------------------------------------------------------------------------------
# Statistics and views
# ---------------------------------------------------------------------------------------------

def _image_size(value: Any) -> tuple[int, int]:
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.size
    with Image.open(io.BytesIO(_image_bytes(value))) as im:  # reads the header only
        return im.size


def _raw_rows(ds, limit: int | None = None) -> Iterator[Mapping]:
    """Rows with undecoded images ({"bytes", "path"}) from a loaded Dataset, read straight from
    Arrow (no cast, no copy); other iterables of records are passed through."""
    if not hasattr(ds, "with_format"):
        yield from (ds if limit is None else list(ds)[:limit])
        return
    if limit is not None and hasattr(ds, "select"):
        ds = ds.select(range(min(limit, len(ds))))
    for batch in ds.with_format("arrow").iter(batch_size=256):
        yield from batch.to_pylist()


def stats(ds, tokenizer=None, *, max_pixels: int = QWEN_MAX_PIXELS, limit: int | None = None) -> "pandas.DataFrame":
    """One row per record: characters (and tokens, given a tokenizer) of prompt and answer, images
    with their sizes, and the vision tokens they cost at ``max_pixels``. Summarise with :func:`summarize`.
    """
    import pandas as pd

    rows = []
    for row in _raw_rows(ds, limit):
        prompt = "\n".join(m["content"] for m in row["messages"] if m["role"] != "assistant")
        answer = "\n".join(m["content"] for m in row["messages"] if m["role"] == "assistant")
        sizes = [_image_size(v) for v in row.get("images") or []]
        rows.append({
            "category": mix_key(row["category"]),
            "prompt_chars": len(prompt), "answer_chars": len(answer),
            "images": len(sizes),
            "max_width": max((w for w, _ in sizes), default=0), "max_height": max((h for _, h in sizes), default=0),
            "image_tokens": sum(image_tokens(w, h, max_pixels) for w, h in sizes),
            "_prompt": prompt.replace(IMAGE_PLACEHOLDER, ""), "_answer": answer,
        })
    table = pd.DataFrame(rows)
    if tokenizer is not None and len(table):
        for col in ("prompt", "answer"):
            ids = tokenizer(list(table[f"_{col}"]), add_special_tokens=False)["input_ids"]
            table[f"{col}_tokens"] = [len(x) for x in ids]
        table["total_tokens"] = table["prompt_tokens"] + table["answer_tokens"] + table["image_tokens"]
    return table.drop(columns=["_prompt", "_answer"], errors="ignore")


def summarize(table: "pandas.DataFrame") -> "pandas.DataFrame":
    """Per-category count, mean, median, 95th percentile and max of each numeric column of :func:`stats`."""
    import pandas as pd

    if table.empty:
        return pd.DataFrame()
    numeric = [c for c in table.columns if c != "category"]
    parts = {}
    for name, group in list(table.groupby("category")) + [("all", table)]:
        described = {"records": len(group)}
        for col in numeric:
            described[f"{col} mean"] = group[col].mean()
            described[f"{col} p50"] = group[col].median()
            described[f"{col} p95"] = group[col].quantile(0.95)
            described[f"{col} max"] = group[col].max()
        parts[name] = described
    return pd.DataFrame(parts).T


class HTMLView(str):
    """A string of HTML that Jupyter displays as HTML."""

    def _repr_html_(self) -> str:
        return str(self)


def _thumbnail_data_uri(value: Any, max_side: int) -> str:
    image = open_image(value)
    image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n… ({len(text) - limit} more characters)"


def examples_html(rows: Iterable[Mapping], max_side: int = 360, max_chars: int = 1500) -> str:
    """HTML cards for records: category, images (embedded, downscaled), the turns as text."""
    cards = []
    for row in rows:
        images = "".join(f'<img src="{_thumbnail_data_uri(v, max_side)}" style="max-width:{max_side}px;border:1px solid #ccc;margin:4px">'
                         for v in row.get("images") or [])
        turns = "".join(
            f'<div style="margin:4px 0"><b>{html.escape(m["role"])}</b>'
            f'<pre style="white-space:pre-wrap;background:#f6f8fa;padding:6px;margin:2px 0;max-height:260px;overflow:auto">'
            f'{html.escape(_clip(m["content"], max_chars))}</pre></div>'
            for m in row["messages"]
        )
        where = f' · record {row["record_index"]}' if "record_index" in row else ""
        cards.append(f'<div style="border:1px solid #ddd;border-radius:6px;padding:8px;margin:8px 0">'
                     f'<div><code>{html.escape(str(row["category"]))}</code>{where}</div>{images}{turns}</div>')
    return "\n".join(cards)


def show_examples(ds, n: int = 4, seed: int = 0, categories: Sequence[str] | None = None) -> HTMLView:
    """An HTML view of ``n`` records (one per category in turn when possible), with their images.

    >>> show_examples(ds, 4)  # doctest: +SKIP
    """
    names = list(ds["category"]) if hasattr(ds, "column_names") else [r["category"] for r in ds]
    by_category: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_category.setdefault(mix_key(name), []).append(i)
    wanted = [mix_key(c) for c in categories] if categories else sorted(by_category)
    rng = random.Random(seed)
    pools = {c: rng.sample(by_category.get(c, []), len(by_category.get(c, []))) for c in wanted}
    picks: list[int] = []
    while len(picks) < n and any(pools.values()):
        for c in wanted:
            if pools[c] and len(picks) < n:
                picks.append(pools[c].pop())
    return HTMLView(examples_html(ds[i] for i in picks))


def inspect_html(path: str | os.PathLike, ds, report: LoadReport, counts, summary, n_examples: int = 6, seed: int = 0) -> str:
    """A self-contained HTML page: the load report, counts per category, statistics, examples."""
    head = ('<!doctype html><html><head><meta charset="utf-8"><title>MCD inspect</title>'
            '<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:12px}'
            'table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}</style>'
            '</head><body>')
    body = [f"<h1>MCD: {html.escape(str(path))}</h1>",
            f"<pre>{html.escape(report.summary())}</pre>",
            "<h2>Categories</h2>", counts.to_html(float_format=lambda x: f"{x:.3f}"),
            "<h2>Lengths and images</h2>", summary.to_html(float_format=lambda x: f"{x:.1f}"),
            "<h2>Examples</h2>", show_examples(ds, n_examples, seed)]
    return head + "\n".join(str(b) for b in body) + "</body></html>"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _cmd_inspect(args) -> int:
    report = LoadReport()
    ds = load(args.path, skip_bad=True, limit=args.limit, check_images=args.check_images,
              placeholders=args.placeholders, report=report)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    counts = category_counts(ds)
    summary = summarize(stats(ds, tokenizer, max_pixels=args.max_pixels))
    print(report.summary())
    print(counts.to_string(float_format=lambda x: f"{x:.3f}"))
    if not summary.empty:
        keep = [c for c in summary.columns if c == "records" or c.endswith(" mean") or c.endswith(" p95")]
        print(summary[keep].to_string(float_format=lambda x: f"{x:.0f}"))
    out = Path(args.out) if args.out else Path(find_records_file(args.path)).parent / "mcd_inspect.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, inspect_html(args.path, ds, report, counts, summary, args.examples, args.seed).encode())
    print(f"wrote {out}")
    return 0


def _cmd_subset(args) -> int:
    report = LoadReport()
    path = write_subset(args.path, args.out, args.n, args.mix, args.seed, skip_bad=args.skip_bad,
                        check_images=args.check_images, layout=args.layout, overwrite=args.overwrite, report=report)
    print(report.summary())
    print(f"wrote {path} and its images ({args.layout})")
    return 0


def _cmd_build_mini(args) -> int:
    from . import mini_mcd

    mix = parse_mix(args.mix) if args.mix else None
    generators = dict(item.split("=", 1) for item in args.generators.split(",")) if args.generators else None
    result = mini_mcd.build(args.out, n=args.n, seed=args.seed, mix=mix, generators=generators,
                            layout=args.layout, workers=args.workers, overwrite=args.overwrite)
    print(result.summary())
    return 0


def register_cli(subparsers) -> None:
    """``viscodex-lite mcd inspect|subset|build-mini``."""
    parser = subparsers.add_parser("mcd", help="MCD data: inspect a local copy, draw subsets, build the mini-MCD")
    sub = parser.add_subparsers(dest="mcd_command", metavar="ACTION", required=True)

    def common(p):
        p.add_argument("--check-images", choices=CHECK_IMAGES, default="exists",
                       help="verify: open every image; exists: look each up (default); none: trust the paths")
        p.add_argument("--placeholders", choices=("auto", "strict"), default="auto",
                       help="strict: a record with images but no <image> placeholder is bad")

    p = sub.add_parser("inspect", help="counts, length and image statistics, examples into an HTML page")
    p.add_argument("path", help="directory with mcd_598k.json (or mcd_<n>.json) and mcd_images.zip/, or the JSON")
    p.add_argument("--out", help="HTML page to write (default: mcd_inspect.html next to the records)")
    p.add_argument("--examples", type=int, default=6)
    p.add_argument("--limit", type=int, help="read only the first N records")
    p.add_argument("--tokenizer", help="local tokenizer directory for token counts (default: characters only)")
    p.add_argument("--max-pixels", type=int, default=QWEN_MAX_PIXELS, help="image cap for vision-token counts")
    p.add_argument("--seed", type=int, default=0)
    common(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("subset", help="a stratified subset, written in the release's layout")
    p.add_argument("path")
    p.add_argument("--n", type=int, required=True, help="records in the subset")
    p.add_argument("--mix", help="category weights, e.g. html=0.4,chart=0.4,qa=0.1,algorithm=0.1 (default: the paper's)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (counted) instead of stopping")
    p.add_argument("--layout", choices=("zip", "folder"), default="zip")
    p.add_argument("--overwrite", action="store_true")
    common(p)
    p.set_defaults(func=_cmd_subset)

    p = sub.add_parser("build-mini", help="build the mini-MCD (all four categories, rendered images)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", help="category weights (default: the paper's)")
    p.add_argument("--generators", help="category=generator pairs, e.g. chart=world,html=world (default: generic)")
    p.add_argument("--layout", choices=("zip", "folder"), default="zip")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_build_mini)


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["mcd", *sys.argv[1:]]))
