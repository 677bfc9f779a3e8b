"""InfiBench case files: the official evaluator's YAML, read unchanged, plus InfiBench-V fields.

An official case (``eval_<id>.yaml``) has ``id``, ``prompt_path``, ``type``, ``lang``, optional
``full_score``/``null_score`` and a ``grading`` block with any of ``keywords``, ``blank_filling``,
``unit_test``, ``similarity``, ``customized``, ``max_score``, ``min_score``. InfiBench-V adds, all
optional: ``category`` (Front-End, Data Science & ML, Back-End, Mobile & Desktop, IT Ops),
``language`` (display name, e.g. ``JavaScript``), ``images`` (paths relative to the case file),
``reference_answer_path`` and a ``grading.judge`` block (rubric grading by an LLM judge).

>>> case = Case.from_dict({"id": "x", "lang": "python", "grading": {"keywords": ["a"]}}, Path("."))
>>> case.grading_types, case.category
(['keywords'], 'Uncategorized')
"""

from __future__ import annotations

import base64
import importlib.util
import json
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from ..errors import KitError
from ..jsonl import read_jsonl

CATEGORIES = ("Front-End", "Data Science & ML", "Back-End", "Mobile & Desktop", "IT Ops")
GRADING_TYPES = ("keywords", "blank_filling", "unit_test", "similarity", "customized", "judge")


class CaseError(KitError):
    """A case file is missing or malformed; the message names the file and the field."""


@dataclass
class Case:
    """One benchmark question and how to grade it (the YAML mapping is kept in ``raw``)."""

    id: str
    case_dir: Path
    raw: dict
    path: Path | None = None
    suite_root: Path | None = None
    weight: float = 1.0
    trust_case_code: bool = True
    _code_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict, case_dir: Path, path: Path | None = None, **kw) -> "Case":
        where = path or f"case {raw.get('id')!r}"
        if not isinstance(raw, dict):
            raise CaseError(f"{where}: a case file must be a YAML mapping, got {type(raw).__name__}.")
        if not isinstance(raw.get("grading"), dict):
            raise CaseError(f"{where}: missing 'grading' mapping (keywords/blank_filling/unit_test/similarity/judge).")
        if "id" not in raw:
            raise CaseError(f"{where}: missing 'id'.")
        return cls(id=str(raw["id"]), case_dir=Path(case_dir), raw=raw, path=path, **kw)

    # --- fields the official evaluator reads
    @property
    def grading(self) -> dict:
        return self.raw["grading"]

    @property
    def lang(self) -> str:
        return str(self.raw.get("lang", ""))

    @property
    def question_type(self) -> str:
        return str(self.raw.get("type", ""))

    @property
    def grading_types(self) -> list[str]:
        return [k for k in GRADING_TYPES if k in self.grading]

    def full_score(self, suite_default: float = 1.0) -> float:
        return float(self.raw.get("full_score", suite_default))

    def null_score(self, suite_default: float = 0.0) -> float:
        return float(self.raw.get("null_score", suite_default))

    # --- InfiBench-V extensions
    @property
    def category(self) -> str:
        return str(self.raw.get("category", "Uncategorized"))

    @property
    def language(self) -> str:
        return str(self.raw.get("language", self.lang))

    @property
    def image_paths(self) -> list[Path]:
        return [self.resolve(p) for p in self.raw.get("images", []) or []]

    @property
    def prompt(self) -> str:
        if "prompt" in self.raw:
            return str(self.raw["prompt"])
        if "prompt_path" in self.raw:
            return self.read_text(self.raw["prompt_path"])
        raise CaseError(f"{self.where}: no 'prompt' or 'prompt_path'.")

    @property
    def reference_answer(self) -> str | None:
        if "reference_answer" in self.raw:
            return str(self.raw["reference_answer"])
        if "reference_answer_path" in self.raw:
            return self.read_text(self.raw["reference_answer_path"])
        return None

    # --- files next to the case
    @property
    def where(self) -> str:
        return str(self.path) if self.path else f"case {self.id}"

    def resolve(self, relative: str) -> Path:
        return self.case_dir / relative

    def read_text(self, relative: str) -> str:
        path = self.resolve(relative)
        try:
            return path.read_text()
        except OSError as exc:
            raise CaseError(f"{self.where}: cannot read {path} ({exc.strerror}).") from exc

    def case_code(self, spec: dict) -> Callable:
        """The ``func`` of a case-provided ``module`` (post_handler / customized grading).

        The official evaluator imports ``module`` (e.g. ``cases_dev.handler_0-0-21``) from its
        working directory; here the dotted name is looked up under the suite root, then by its
        last part in the case directory. This runs benchmark code, never model output.
        """
        if not self.trust_case_code:
            raise CaseError(f"{self.where}: grading uses case code {spec.get('module')!r}; load cases with trust_case_code=True to allow it.")
        module, func = spec["module"], spec["func"]
        if module not in self._code_cache:
            rel = module.replace(".", "/") + ".py"
            candidates = ([self.suite_root / rel] if self.suite_root else []) + [self.case_dir / rel, self.case_dir / (module.split(".")[-1] + ".py")]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise CaseError(f"{self.where}: case code module {module!r} not found (looked for {', '.join(map(str, candidates))}).")
            spec_ = importlib.util.spec_from_file_location(f"_infibench_case_{abs(hash(str(path)))}", path)
            mod = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(mod)
            self._code_cache[module] = mod
        return getattr(self._code_cache[module], func)


def load_case(path: str | Path, suite_root: Path | None = None, trust_case_code: bool = True) -> Case:
    """Read one official-format case YAML (``yaml.SafeLoader``; duplicate keys: last wins, as PyYAML)."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=yaml.SafeLoader)
    except OSError as exc:
        raise CaseError(f"cannot read case file {path} ({exc.strerror}).") from exc
    except yaml.YAMLError as exc:
        raise CaseError(f"{path}: invalid YAML: {exc}") from exc
    return Case.from_dict(raw, path.parent, path=path, suite_root=suite_root or path.parent,
                          trust_case_code=trust_case_code)


def load_cases(source: str | Path, trust_case_code: bool = True) -> list[Case]:
    """Cases from a directory of ``eval_*.yaml`` (or ``*.yaml``) files, or an official suite file.

    A suite file (``suite_v2.0.0_dev.yaml``) lists ``cases:`` as paths (or ``{path, weight}``)
    relative to the suite file's directory, like the official ``grader_main.py``.

    >>> cases = load_cases(sample_dir())  # doctest: +SKIP
    """
    source = Path(source)
    if source.is_file():
        suite = yaml.load(source.read_text(), Loader=yaml.SafeLoader)
        if not isinstance(suite, dict) or "cases" not in suite:
            raise CaseError(f"{source}: a suite file needs a 'cases' list.")
        out = []
        for entry in suite["cases"]:
            rel, weight = (entry, 1.0) if isinstance(entry, str) else (entry["path"], float(entry["weight"]))
            case = load_case(source.parent / rel, suite_root=source.parent, trust_case_code=trust_case_code)
            case.weight = weight
            out.append(case)
        return out
    if not source.is_dir():
        raise CaseError(f"no case directory or suite file at {source}.")
    files = sorted(source.glob("eval_*.yaml")) or sorted(p for p in source.glob("*.yaml"))
    files = [p for p in files if not p.name.startswith("suite")]
    if not files:
        raise CaseError(f"{source}: no case files (expected eval_*.yaml in the official format).")
    cases = [load_case(p, suite_root=source, trust_case_code=trust_case_code) for p in files]
    seen: dict[str, Path] = {}
    for case in cases:
        if case.id in seen:
            raise CaseError(f"duplicate case id {case.id!r} in {seen[case.id]} and {case.path}.")
        seen[case.id] = case.path
    return cases


def suite_settings(source: str | Path) -> dict:
    """``attempt_reduce_mode``/``full_score_per_question``/``null_score_per_question`` of a suite (defaults otherwise)."""
    out = {"attempt_reduce_mode": "avg", "full_score_per_question": 1.0, "null_score_per_question": 0.0}
    source = Path(source)
    if source.is_file():
        out.update({k: v for k, v in (yaml.safe_load(source.read_text()) or {}).items() if k in out})
    return out


def load_infibench_v(path: str | Path) -> list[Case]:
    """The InfiBench-V release from a local path (nothing is downloaded).

    Accepts the official case layout (a directory of case YAMLs or a suite file) or a JSON/JSONL
    manifest whose records carry ``id``, ``question``/``prompt``, ``images``, ``category``,
    ``language`` and a ``grading`` mapping in the official format. The release itself is not
    public yet; when it is, point this at its directory.
    """
    path = Path(path)
    if path.is_dir() or path.suffix in (".yaml", ".yml"):
        return load_cases(path)
    if path.suffix not in (".json", ".jsonl"):
        raise CaseError(f"{path}: expected a case directory, a suite .yaml, or a .json/.jsonl manifest.")
    if not path.is_file():
        raise CaseError(f"no file at {path}: set VISCODEX_LITE_DATA to where InfiBench-V lives.")
    if path.suffix == ".jsonl":
        records = [rec for _, rec in read_jsonl(path, CaseError)]
    else:
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CaseError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}).") from exc
    cases = []
    for n, rec in enumerate(records, 1):
        rec = dict(rec)
        if "prompt" not in rec and "question" in rec:
            rec["prompt"] = rec.pop("question")
        try:
            cases.append(Case.from_dict(rec, path.parent, path=path, suite_root=path.parent))
        except CaseError as exc:
            raise CaseError(f"{path} record {n}: {exc}") from exc
    return cases


def sample_dir() -> Path:
    """The kit's InfiBench-V-style sample set (``assets/infibench_v_sample/cases``)."""
    from .. import config

    return config.current(mode="tiny").assets_dir / "infibench_v_sample" / "cases"


# ------------------------------------------------------------ prompts for generation

SYSTEM_PROMPT = ("You are a professional assistant for programmers. By default, questions and answers "
                 "are in Markdown format.")


def prompt_messages(case: Case, system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Chat messages for a case in the Hugging Face multimodal format (images first, then the question).

    Each image is ``{"type": "image", "path": ...}``, which ``processor.apply_chat_template``
    of Qwen2.5-VL accepts; ``generate`` calls this.

    >>> case = Case.from_dict({"id": "x", "prompt": "Why?", "images": ["a.png"], "grading": {"keywords": []}}, Path("/c"))
    >>> [part["type"] for part in prompt_messages(case)[1]["content"]]
    ['image', 'text']
    """
    content = [{"type": "image", "path": str(p)} for p in case.image_paths]
    content.append({"type": "text", "text": case.prompt})
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return messages + [{"role": "user", "content": content}]


def openai_messages(case: Case, system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """The same prompt for an OpenAI-compatible server (vLLM, GPT-4o): images as base64 data URLs."""
    content: list[dict] = []
    for p in case.image_paths:
        mime = mimetypes.guess_type(p.name)[0] or "image/png"
        try:
            data = base64.b64encode(p.read_bytes()).decode()
        except OSError as exc:
            raise CaseError(f"{case.where}: image {p} unreadable ({exc.strerror}).") from exc
        content.append({"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}})
    content.append({"type": "text", "text": case.prompt})
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
