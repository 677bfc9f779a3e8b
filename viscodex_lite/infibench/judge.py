"""LLM-judge grading through any OpenAI-compatible ``/chat/completions`` endpoint (GPT-4o, vLLM, ...).

InfiBench-V grades natural-language-heavy questions with a GPT-4o judge that compares the answer
with the reference on correctness and completeness (50 points each, total 0-100). A case opts in
with a ``grading.judge`` block::

    judge:
      rubric: "Full marks need the fix (flex-wrap) and the reason (items overflow)."
      weight: 1.0

The client caches every verdict on disk under a SHA-256 of the request (model, messages,
sampling settings: never the API key), retries transient failures with exponential backoff,
and caps concurrent requests. The key only ever goes into the Authorization header.

>>> JudgeClient("http://127.0.0.1:1/v1", "m", api_key="sk-secret")
JudgeClient(base_url='http://127.0.0.1:1/v1', model='m', api_key=***)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import KitError

log = logging.getLogger(__name__)

RUBRIC_SYSTEM = (
    "You are a strict grader of answers to programming questions. Compare the candidate answer with the "
    "reference answer and the rubric. Score two dimensions: correctness (0-50: is what it says and the code "
    "it gives right for the question?) and completeness (0-50: does it cover everything the reference and "
    "rubric require?). Reply with JSON only: {\"correctness\": int, \"completeness\": int, \"rationale\": str}."
)


class JudgeError(KitError):
    """The judge endpoint failed after retries or replied with something that is not a verdict."""


@dataclass
class JudgeVerdict:
    correctness: float
    completeness: float
    rationale: str = ""
    cached: bool = False

    @property
    def score(self) -> float:
        """0-100: correctness + completeness."""
        return self.correctness + self.completeness

    def to_json(self) -> dict:
        return {"correctness": self.correctness, "completeness": self.completeness, "score": self.score,
                "rationale": self.rationale, "cached": self.cached}


def rubric_messages(question: str, reference: str | None, answer: str, rubric: str = "") -> list[dict]:
    """The judge prompt: rubric as the system message, then question, reference and answer.

    >>> [m["role"] for m in rubric_messages("Q?", "ref", "ans", "be strict")]
    ['system', 'user']
    """
    parts = [f"## Question\n{question}"]
    if reference:
        parts.append(f"## Reference answer\n{reference}")
    if rubric:
        parts.append(f"## Rubric\n{rubric}")
    parts.append(f"## Candidate answer\n{answer}")
    return [{"role": "system", "content": RUBRIC_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def parse_verdict(text: str) -> JudgeVerdict:
    """Read ``{"correctness": .., "completeness": ..}`` from a reply (first JSON object in it), clipped to 0-50.

    >>> parse_verdict('Sure: {"correctness": 40, "completeness": 70, "rationale": "ok"}').score
    90.0
    """
    found = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        data = json.loads(found.group(0)) if found else None
        c, k = float(data["correctness"]), float(data["completeness"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise JudgeError(f"judge reply is not a verdict JSON: {text[:200]!r}") from exc
    clip = lambda v: max(0.0, min(50.0, v))
    return JudgeVerdict(clip(c), clip(k), str(data.get("rationale", ""))[:2000])


class JudgeClient:
    """Grades answers through ``{base_url}/chat/completions``.

    ``max_concurrency`` bounds simultaneous requests; ``retries`` transient failures (connection
    errors, 408/409/429/5xx) are retried after ``backoff_s * 2**attempt`` (+ jitter, or the
    server's Retry-After). Verdicts are cached in ``cache_dir`` (None: no cache).
    """

    RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, model: str, api_key: str | None = None, cache_dir: str | Path | None = None,
                 max_concurrency: int = 4, retries: int = 4, backoff_s: float = 0.5, timeout_s: float = 60.0,
                 temperature: float = 0.0, max_tokens: int = 512):
        self.base_url, self.model = base_url.rstrip("/"), model
        self._api_key = api_key
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_concurrency, self.retries, self.backoff_s = max(1, max_concurrency), retries, backoff_s
        self.timeout_s, self.temperature, self.max_tokens = timeout_s, temperature, max_tokens

    def __repr__(self) -> str:
        return f"JudgeClient(base_url={self.base_url!r}, model={self.model!r}, api_key={'***' if self._api_key else None})"

    # -- requests
    def request_body(self, messages: list[dict]) -> dict:
        return {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": self.max_tokens}

    @staticmethod
    def cache_key(body: dict) -> str:
        """SHA-256 of the canonical request body (the key is not part of it)."""
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def complete(self, messages: list[dict]) -> tuple[str, bool]:
        """The reply text for ``messages`` and whether it came from the cache."""
        body = self.request_body(messages)
        key = self.cache_key(body)
        cached = self._cache_get(key)
        if cached is not None:
            return cached, True
        text = self._post(body)
        self._cache_put(key, body, text)
        return text, False

    def _post(self, body: dict) -> str:
        url = f"{self.base_url}/chat/completions"
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    payload = json.loads(resp.read())
                return payload["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code} from {url}"
                if exc.code not in self.RETRY_STATUS:
                    raise JudgeError(f"{last}; check the model name and the key (not retried).") from None
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = f"{type(exc).__name__} talking to {url}: {getattr(exc, 'reason', exc)}"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
                raise JudgeError(f"{url} replied with no choices[0].message.content ({type(exc).__name__}).") from None
            if attempt < self.retries:
                delay = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() \
                    else self.backoff_s * 2 ** attempt * (1 + random.random() * 0.25)
                log.info("judge: %s; retry %d/%d in %.2fs", last, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise JudgeError(f"{last}; gave up after {self.retries + 1} attempts. Is the server up at {self.base_url}?")

    # -- cache
    def _cache_get(self, key: str) -> str | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.json"
        try:
            return json.loads(path.read_text())["reply"]
        except (OSError, json.JSONDecodeError, KeyError):
            return None

    def _cache_put(self, key: str, body: dict, reply: str) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{key}.")
        with os.fdopen(fd, "w") as f:
            json.dump({"request": body, "reply": reply}, f)
        os.replace(tmp, self.cache_dir / f"{key}.json")

    # -- grading
    def grade(self, case, answer: str) -> JudgeVerdict:
        """Judge one answer to one case (its rubric, reference answer and question)."""
        spec = case.grading.get("judge", {}) or {}
        reference = spec.get("reference") or (case.read_text(spec["reference_path"]) if "reference_path" in spec
                                               else case.reference_answer)
        text, cached = self.complete(rubric_messages(case.prompt, reference, answer, spec.get("rubric", "")))
        verdict = parse_verdict(text)
        verdict.cached = cached
        return verdict

    def grade_many(self, items: list[tuple]) -> list[JudgeVerdict]:
        """Judge ``(case, answer)`` pairs with at most ``max_concurrency`` requests in flight."""
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(lambda item: self.grade(*item), items))


class StandInJudge:
    """A loopback OpenAI-compatible server that grades by word overlap with the reference.

    For demos and notebooks without a real judge: it shows the plumbing (prompt, cache, retries),
    not GPT-4o's judgement. Use as a context manager; ``url`` is its base URL.

    >>> with StandInJudge() as judge:                                   # doctest: +SKIP
    ...     JudgeClient(judge.url, "stand-in").complete([{"role": "user", "content": "hi"}])
    """

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from .scorers import rouge_f

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                text = body["messages"][-1]["content"]
                ref = re.search(r"## Reference answer\n(.*?)(\n## |\Z)", text, re.DOTALL)
                ans = re.search(r"## Candidate answer\n(.*)\Z", text, re.DOTALL)
                overlap = rouge_f("rouge1", ref.group(1), ans.group(1)) if ref and ans else 0.0
                points = round(50 * min(1.0, overlap / 0.6))
                reply = json.dumps({"correctness": points, "completeness": points,
                                    "rationale": f"stand-in judge: word overlap {overlap:.2f} with the reference"})
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "StandInJudge":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
