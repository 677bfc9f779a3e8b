"""Run untrusted unit-test programs: resource limits, no network, no secrets, verdict by the harness.

Each worker owns a *zygote*: ``python -I _sandbox_boot.py`` started once with a clean
environment, which imports the trusted modules tests use (:data:`PRELOAD`: numpy, pandas, the
official helper's stdlib imports) and then forks a fresh process per test. That process enters
new network/PID/mount namespaces, sets the limits, locks the filesystem and TCP with Landlock
and drops root to a per-worker uid before any untrusted code runs, exactly as a freshly started
interpreter would, without paying for ``import pandas`` again. A test passes only when the
wrapper writes ``<nonce> passed`` to the result pipe *and* the process exits 0 within the time
limit: printing "PASS", ``sys.exit(0)``, ``os._exit(0)`` or ``process.exit(0)`` cannot produce
the nonce, which only the harness and the test process ever see. The threat model is in
``docs/sandbox.md``.

>>> box = Sandbox(Limits(wall_s=5))                                    # doctest: +SKIP
>>> box.run(TestJob("python", ["def add(a, b): return a + b", "assert add(1, 2) == 3"])).passed  # doctest: +SKIP
True
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import select
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import KitError

BOOT = Path(__file__).with_name("_sandbox_boot.py")
TOOLCHAINS = {"python": None, "javascript": "node", "cpp": "g++"}   # python = this interpreter
# The official evaluator's per-language defaults (execution_utils.py:488-499).
DEFAULT_TIMEOUT_S = {"python": 10, "cpp": 60, "javascript": 10, "typescript": 20, "java": 10, "go": 20,
                     "rust": 300, "sql": 10, "c#": 20, "r": 20}
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
             "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
             "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
HEAVY_MODULES = ("numpy", "pandas", "requests", "openpyxl", "xlsxwriter", "yolk", "matplotlib", "scipy")
# Trusted modules every worker's zygote imports once: the official Python helper's imports
# (runner.PYTHON_HELPER) and pandas' heavy parts. Missing ones are skipped; unittest/doctest/pytest
# are never preloaded (the test part must import them fresh, see _sandbox_boot._run_python).
PRELOAD = ("math", "re", "copy", "datetime", "itertools", "collections", "heapq", "statistics", "functools",
           "hashlib", "string", "typing", "numpy", "pandas", "requests", "openpyxl", "xlsxwriter", "yolk")


class SandboxError(KitError):
    """The sandbox cannot run: a required isolation layer is missing, or a worker cannot start."""


@dataclass(frozen=True)
class Limits:
    """Per-test bounds. ``wall_s=None`` uses the official per-language timeout."""

    wall_s: float | None = None
    cpu_s: int = 20
    memory_mb: int = 2048
    processes: int = 64
    file_size_mb: int = 16
    open_files: int = 256
    output_bytes: int = 16_384


@dataclass
class TestJob:
    """One unit test: ``parts`` = [answer program, test program], joined by a newline as the
    official evaluator does (execution_utils.py:158 ``predictions[0][0] + '\\n' + references[0]``)."""

    __test__ = False  # not a pytest class

    language: str
    parts: list[str]
    timeout_s: float | None = None
    label: str = ""


@dataclass
class TestResult:
    __test__ = False
    status: str          # passed | failed | timeout | skipped
    reason: str = ""
    output: str = ""
    returncode: int | None = None
    duration_s: float = 0.0
    isolation: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=None)
def toolchain(language: str) -> str | None:
    """The executable that runs ``language`` here, or None (the test is then skipped)."""
    if language == "python":
        return sys.executable
    name = TOOLCHAINS.get(language)
    return shutil.which(name) if name else None


@lru_cache(maxsize=None)
def available_modules(names: tuple[str, ...] = HEAVY_MODULES) -> frozenset[str]:
    import importlib.util

    return frozenset(n for n in names if importlib.util.find_spec(n) is not None)


def _read_paths() -> list[str]:
    """What a test may read: system directories and this interpreter's install (not $HOME, not the repo)."""
    paths = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/proc", "/dev", "/sys", "/opt",
             sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent.parent)]
    paths += [p for p in sys.path if p and Path(p).is_dir() and "site-packages" in p]
    return sorted({p for p in paths if os.path.exists(p)})


class _ZygoteGone(SandboxError):
    """A worker's zygote died or stopped answering (the message ends with its log's tail)."""


class _Zygote:
    """One worker's pre-forked interpreter (``_sandbox_boot.zygote``), spoken to over a socket pair.

    Protocol, one JSON message per packet: ``ready`` once the preloads are imported; then per
    test ``run`` (+ the test's stdin/output/result fds) -> ``pid``, ``exited`` when the test's
    supervisor exits, and ``finish`` -> the zygote kills the test's process group, reaps it and
    answers ``status`` (its exit code). EOF on the socket stops the zygote.
    """

    def __init__(self, root: Path, slot: int, preload: tuple[str, ...]):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log = root / f"zygote-{slot}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(BOOT), str(theirs.fileno()), json.dumps(list(preload))],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=str(root),
                env=dict(CLEAN_ENV, HOME=str(root), TMPDIR=str(root)), close_fds=True,
                pass_fds=(theirs.fileno(),), start_new_session=True)
        theirs.close()
        self.sock = ours
        self.preloaded = self.receive(time.monotonic() + 300)["ready"]  # a cold `import pandas` on a busy VM

    def receive(self, deadline: float) -> dict:
        """The next message, or _ZygoteGone on EOF or at ``deadline``."""
        if not select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            self.stop()
            raise _ZygoteGone("the sandbox zygote stopped answering")
        data = self.sock.recv(65536)
        if not data:
            self.stop()
            raise _ZygoteGone(f"the sandbox zygote died: {self.log_tail()}")
        return json.loads(data)

    def start(self, spec_path: Path, fds: tuple[int, int, int]) -> int:
        """Fork a test from the zygote with ``fds`` as its stdin, output and result pipe; its pid."""
        try:
            socket.send_fds(self.sock, [json.dumps({"op": "run", "spec": str(spec_path)}).encode()], list(fds))
        except OSError as exc:
            self.stop()
            raise _ZygoteGone(f"the sandbox zygote is gone: {exc}; {self.log_tail()}") from exc
        reply = self.receive(time.monotonic() + 60)
        if "pid" not in reply:
            raise _ZygoteGone(f"the sandbox zygote refused the test: {reply}")
        return reply["pid"]

    def finish(self) -> int | None:
        """Kill the test's process group, reap it; its exit code."""
        deadline = time.monotonic() + 30
        try:
            self.sock.send(b'{"op": "finish"}')
            while "status" not in (reply := self.receive(deadline)):
                pass
        except (OSError, _ZygoteGone):
            self.stop()
            return None
        return reply["status"]

    def alive(self) -> bool:
        return self.sock.fileno() >= 0 and self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            return self.log.read_bytes()[-2000:].decode(errors="replace").strip() or "(no log output)"
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """EOF makes the zygote kill its running test and exit; kill it if it does not."""
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _stop_zygotes(zygotes: dict) -> None:
    for zygote in list(zygotes.values()):
        zygote.stop()
    zygotes.clear()


class Sandbox:
    """Runs :class:`TestJob` s with ``workers`` in parallel, each worker forking tests from its own
    zygote that has imported ``preload`` (started on the worker's first test; :meth:`warm_up`
    starts them all now).

    ``require`` lists isolation layers that must be active (``"netns"``, ``"pidns"``,
    ``"landlock-fs"``, ``"landlock-net"``, ``"uid-drop"``); :meth:`isolation` says what is.
    """

    def __init__(self, limits: Limits = Limits(), workers: int = 2, require: tuple[str, ...] = (),
                 uid_base: int = 61000, landlock: bool = True, preload: tuple[str, ...] = PRELOAD):
        self.limits, self.workers, self.landlock, self.preload = limits, max(1, workers), landlock, tuple(preload)
        self.uid_base = uid_base if os.geteuid() == 0 else None
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.workers):
            self._slots.put(slot)
        self._zygotes: dict[int, _Zygote] = {}
        self._root = Path(tempfile.mkdtemp(prefix="vl-sandbox-"))
        os.chmod(self._root, 0o711)
        weakref.finalize(self, shutil.rmtree, str(self._root), True)  # also cleaned when never closed
        weakref.finalize(self, _stop_zygotes, self._zygotes)         # (runs first: finalizers are LIFO)
        missing = [layer for layer in require if layer not in self.isolation()]
        if missing:
            raise SandboxError(f"sandbox layers {missing} are not available here (have {self.isolation()}); "
                               "run as root or enable user namespaces / Landlock, or drop them from require=.")

    def isolation(self) -> list[str]:
        """Layers this machine provides (probed once with a real sandboxed run)."""
        if not hasattr(self, "_isolation"):
            result = self.run(TestJob("python", ["", "pass"], timeout_s=20))
            self._isolation = result.isolation if result.passed else []
        return self._isolation

    def warm_up(self) -> list[str]:
        """Start every worker's zygote now (in parallel); the modules they preloaded."""
        slots = [self._slots.get() for _ in range(self.workers)]   # no test runs meanwhile
        try:
            with ThreadPoolExecutor(self.workers) as pool:
                return sorted(set().union(*pool.map(lambda slot: self._zygote(slot).preloaded, slots)))
        finally:
            for slot in slots:
                self._slots.put(slot)

    def close(self) -> None:
        _stop_zygotes(self._zygotes)
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run_many(self, jobs: list[TestJob]) -> list[TestResult]:
        """Run jobs on ``workers`` threads (each job is its own sandboxed process tree)."""
        if self.workers == 1 or len(jobs) <= 1:
            return [self.run(j) for j in jobs]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.run, jobs))

    def run(self, job: TestJob) -> TestResult:
        exe = toolchain(job.language)
        if exe is None:
            return TestResult("skipped", f"skipped: no toolchain for {job.language}")
        slot = self._slots.get()
        try:
            return self._run(job, exe, slot)
        finally:
            self._slots.put(slot)

    def _zygote(self, slot: int) -> _Zygote:
        """The slot's zygote, (re)started when it is missing or dead. Only the slot's holder calls this."""
        zygote = self._zygotes.get(slot)
        if zygote is None or not zygote.alive():
            zygote = self._zygotes[slot] = _Zygote(self._root, slot, self.preload)
        return zygote

    def _run(self, job: TestJob, exe: str, slot: int) -> TestResult:
        lim = self.limits
        wall = job.timeout_s or lim.wall_s or DEFAULT_TIMEOUT_S.get(job.language, 10)
        try:
            zygote = self._zygote(slot)
        except _ZygoteGone as exc:
            return TestResult("failed", f"sandbox could not start: {exc}")
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=self._root))   # harness-only (0700): spec lives here
        workdir = run_dir / "work"
        workdir.mkdir()
        uid = None if self.uid_base is None else self.uid_base + slot
        if uid is not None:
            os.chmod(run_dir, 0o711)
            os.chown(workdir, uid, uid)
        spec = {"language": job.language, "parts": job.parts, "workdir": str(workdir), "toolchain": exe,
                "uid": uid, "landlock": self.landlock, "read_paths": _read_paths() + [str(workdir)],
                "env": dict(CLEAN_ENV, HOME=str(workdir), TMPDIR=str(workdir)),
                "lazy_modules": sorted(available_modules() - set(zygote.preloaded)),
                "limits": {"cpu_s": int(min(lim.cpu_s, wall + 3)), "memory": lim.memory_mb << 20,
                           "processes": lim.processes, "file_size": lim.file_size_mb << 20,
                           "open_files": lim.open_files}}
        spec_path = run_dir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        os.chmod(spec_path, 0o600)
        nonce = secrets.token_hex(24)
        stdin_r, stdin_w = os.pipe()
        output_r, output_w = os.pipe()
        result_r, result_w = os.pipe()
        os.write(stdin_w, (nonce + "\n").encode())   # fits the pipe buffer: the test reads it to EOF
        os.close(stdin_w)
        started = time.monotonic()
        try:
            zygote.start(spec_path, (stdin_r, output_w, result_w))
        except _ZygoteGone as exc:
            for fd in (output_r, result_r):
                os.close(fd)
            shutil.rmtree(run_dir, ignore_errors=True)
            return TestResult("failed", f"sandbox could not start: {exc}")
        finally:
            for fd in (stdin_r, output_w, result_w):
                os.close(fd)
        output, timed_out = self._collect(output_r, zygote, started + wall + 1.0, lim.output_bytes)
        returncode = zygote.finish()
        verdict = self._drain(result_r)
        duration = time.monotonic() - started
        shutil.rmtree(run_dir, ignore_errors=True)
        text = output.decode(errors="replace")
        isolation = [l for l in text.splitlines() if l.startswith("[sandbox]")]
        layers = isolation[0].split()[1:] if isolation else []
        layers.append("rlimits")
        text = "\n".join(l for l in text.splitlines() if not l.startswith("[sandbox]"))
        if timed_out:
            return TestResult("timeout", f"time out after {wall:g}s", text, None, duration, layers)
        lines = verdict.decode(errors="replace").splitlines()
        if returncode == 0 and f"{nonce} passed" in lines:
            return TestResult("passed", "passed", text, 0, duration, layers)
        reason = "failed: exit status 0 without the harness's pass record" if returncode == 0 else \
            "failed: the worker's zygote died (a new one serves the next test)" if returncode is None else \
            f"failed: returncode {returncode}"
        if any(l.strip() and l != f"{nonce} passed" for l in lines):
            reason += " (forged result lines ignored)"
        return TestResult("failed", reason, text, returncode, duration, layers)

    @staticmethod
    def _collect(fd: int, zygote: _Zygote, deadline: float, cap: int) -> tuple[bytes, bool]:
        """Read the test's merged stdout/stderr until its supervisor exits or ``deadline``, keeping
        the first ``cap`` bytes. Closes ``fd``. Returns (output, timed out)."""
        kept, sel = bytearray(), selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ, "output")
        sel.register(zygote.sock, selectors.EVENT_READ, "zygote")
        exited = False
        while not exited and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=deadline - time.monotonic()):
                if key.data == "zygote":
                    exited = True          # "exited", or EOF: the zygote died and took the test with it
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:              # every writer closed; the exit message follows
                    sel.unregister(fd)
                elif len(kept) < cap:
                    kept += chunk[: cap - len(kept)]
        sel.close()
        os.set_blocking(fd, False)         # what the test wrote before it exited is still in the pipe
        try:
            while len(kept) < cap and (chunk := os.read(fd, 65536)):
                kept += chunk[: cap - len(kept)]
        except BlockingIOError:
            pass
        os.close(fd)
        if len(kept) >= cap:
            kept += b"\n[output truncated]"
        return bytes(kept), not exited

    @staticmethod
    def _drain(fd: int) -> bytes:
        os.set_blocking(fd, False)
        data = b""
        try:
            while len(data) < 4096:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
        except BlockingIOError:
            pass
        os.close(fd)
        return data
