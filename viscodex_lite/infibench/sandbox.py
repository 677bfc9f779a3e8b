"""Run untrusted unit-test programs: resource limits, no network, no secrets, verdict by the harness.

Each test runs as ``[unshare --net --pid --fork --kill-child --mount-proc] python -I
_sandbox_boot.py SPEC`` in its own process group, with a clean environment, a fresh work
directory, and stdin carrying a random nonce. The boot wrapper (``_sandbox_boot.py``) sets the
limits, locks the filesystem and TCP with Landlock, drops root to a per-worker uid, then runs the
answer and the test. A test passes only when the wrapper writes ``<nonce> passed`` to the result
pipe *and* the process exits 0 within the time limit: printing "PASS", ``sys.exit(0)``,
``os._exit(0)`` or ``process.exit(0)`` cannot produce the nonce. The threat model is in
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
import selectors
import shutil
import signal
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


class SandboxError(KitError):
    """The sandbox cannot provide an isolation layer that was required."""


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


@lru_cache(maxsize=None)
def _unshare_flags() -> tuple[str, ...]:
    """Namespace flags that work for this user: root gets net+pid+mount; others try a user namespace."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for flags in (("--net", "--pid", "--fork", "--kill-child", "--mount-proc"),
                  ("--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"),
                  ("--user", "--map-root-user", "--net")):
        try:
            if subprocess.run([exe, *flags, "true"], capture_output=True, timeout=10).returncode == 0:
                return (exe, *flags)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ()


def _read_paths() -> list[str]:
    """What a test may read: system directories and this interpreter's install (not $HOME, not the repo)."""
    paths = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/proc", "/dev", "/sys", "/opt",
             sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent.parent)]
    paths += [p for p in sys.path if p and Path(p).is_dir() and "site-packages" in p]
    return sorted({p for p in paths if os.path.exists(p)})


class Sandbox:
    """Runs :class:`TestJob` s with ``workers`` in parallel.

    ``require`` lists isolation layers that must be active (``"netns"``, ``"pidns"``,
    ``"landlock-fs"``, ``"landlock-net"``, ``"uid-drop"``); :meth:`isolation` says what is.
    """

    def __init__(self, limits: Limits = Limits(), workers: int = 2, require: tuple[str, ...] = (),
                 uid_base: int = 61000, landlock: bool = True):
        self.limits, self.workers, self.landlock = limits, max(1, workers), landlock
        self.uid_base = uid_base if os.geteuid() == 0 else None
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.workers):
            self._slots.put(slot)
        self._root = Path(tempfile.mkdtemp(prefix="vl-sandbox-"))
        os.chmod(self._root, 0o711)
        weakref.finalize(self, shutil.rmtree, str(self._root), True)  # also cleaned when never closed
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

    def close(self) -> None:
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

    def _run(self, job: TestJob, exe: str, slot: int) -> TestResult:
        lim = self.limits
        wall = job.timeout_s or lim.wall_s or DEFAULT_TIMEOUT_S.get(job.language, 10)
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=self._root))   # harness-only (0700): spec lives here
        workdir = run_dir / "work"
        workdir.mkdir()
        uid = None if self.uid_base is None else self.uid_base + slot
        if uid is not None:
            os.chmod(run_dir, 0o711)
            os.chown(workdir, uid, uid)
        spec = {"language": job.language, "parts": job.parts, "workdir": str(workdir), "toolchain": exe,
                "uid": uid, "landlock": self.landlock, "mount_ns": "--mount-proc" in _unshare_flags(), "read_paths": _read_paths() + [str(workdir)],
                "lazy_modules": sorted(available_modules()),
                "limits": {"cpu_s": int(min(lim.cpu_s, wall + 3)), "memory": lim.memory_mb << 20,
                           "processes": lim.processes, "file_size": lim.file_size_mb << 20,
                           "open_files": lim.open_files}}
        spec_path = run_dir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        os.chmod(spec_path, 0o600)
        nonce = secrets.token_hex(24)
        env = dict(CLEAN_ENV, HOME=str(workdir), TMPDIR=str(workdir))
        result_r, result_w = os.pipe()
        argv = [*_unshare_flags(), sys.executable, "-I", str(BOOT), str(spec_path), str(result_w)]
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env, cwd=str(workdir), process_group=0, close_fds=True,
                                    pass_fds=(result_w,))
        except OSError as exc:
            os.close(result_r)
            os.close(result_w)
            shutil.rmtree(run_dir, ignore_errors=True)
            return TestResult("failed", f"sandbox could not start: {exc}")
        os.close(result_w)
        proc.stdin.write((nonce + "\n").encode())
        proc.stdin.close()
        output, timed_out = self._collect(proc, started + wall + 1.0, lim.output_bytes)
        verdict = self._drain(result_r)
        self._kill(proc)
        duration = time.monotonic() - started
        shutil.rmtree(run_dir, ignore_errors=True)
        text = output.decode(errors="replace")
        isolation = [l for l in text.splitlines() if l.startswith("[sandbox]")]
        layers = isolation[0].split()[1:] if isolation else []
        if _unshare_flags():
            layers = ["netns"] + (["pidns"] if "--pid" in _unshare_flags() else []) + layers
        layers.append("rlimits")
        text = "\n".join(l for l in text.splitlines() if not l.startswith("[sandbox]"))
        if timed_out:
            return TestResult("timeout", f"time out after {wall:g}s", text, None, duration, layers)
        lines = verdict.decode(errors="replace").splitlines()
        if proc.returncode == 0 and f"{nonce} passed" in lines:
            return TestResult("passed", "passed", text, 0, duration, layers)
        reason = "failed: exit status 0 without the harness's pass record" if proc.returncode == 0 else f"failed: returncode {proc.returncode}"
        if any(l.strip() and l != f"{nonce} passed" for l in lines):
            reason += " (forged result lines ignored)"
        return TestResult("failed", reason, text, proc.returncode, duration, layers)

    @staticmethod
    def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bool]:
        """Read merged stdout/stderr until exit or deadline, keeping the first ``cap`` bytes."""
        kept, sel = bytearray(), selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        fd = proc.stdout.fileno()
        timed_out = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not sel.select(timeout=min(left, 0.5)):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if len(kept) < cap:
                kept += chunk[: cap - len(kept)]
        sel.close()
        if not timed_out:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        if len(kept) >= cap:
            kept += b"\n[output truncated]"
        return bytes(kept), timed_out

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

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """Kill the whole process group; with a PID namespace the kernel takes every descendant too."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        proc.stdout.close()
