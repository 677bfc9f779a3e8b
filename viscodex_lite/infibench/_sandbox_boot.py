"""Sandbox wrapper: the trusted first code inside a sandboxed process (stdlib only, run with -I).

Started by :mod:`viscodex_lite.infibench.sandbox` as ``python -I _sandbox_boot.py SPEC`` inside
fresh network/PID/mount namespaces when available. In order, before any untrusted code runs:
read the nonce from stdin (then stdin is /dev/null), read the spec, enter the work directory,
set resource limits, lock the filesystem and TCP with Landlock, drop root to the slot's uid.
Then it runs the answer and the test, and only if the test program finished without an error
does it write ``<nonce> passed`` to fd 3 (a pipe the harness reads). Whatever the answer prints
or however it exits, without the nonce line the harness scores a failure.
"""

import builtins
import ctypes
import json
import os
import resource
import sys

_write, _close = os.write, os.close  # saved before untrusted code can patch os
_stdout, _stderr = sys.stdout, sys.stderr
RESULT_FD = 3


def _exit(code):
    """Flush what the program printed (for the report), then leave without running its atexit hooks."""
    for stream in (_stdout, _stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(code)


# ------------------------------------------------------------------ Landlock (Linux >= 5.13)

def _landlock(read_paths, write_paths, write_files):
    """Allow reads under ``read_paths``, everything under ``write_paths``; deny other writes and all TCP."""
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(444, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return []
    fs_all = (1 << 13) - 1
    if abi >= 2:
        fs_all |= 1 << 13   # REFER
    if abi >= 3:
        fs_all |= 1 << 14   # TRUNCATE
    if abi >= 5:
        fs_all |= 1 << 15   # IOCTL_DEV
    read = (1 << 0) | (1 << 2) | (1 << 3)            # EXECUTE | READ_FILE | READ_DIR
    file_rights = (1 << 0) | (1 << 1) | (1 << 2) | ((1 << 14) if abi >= 3 else 0) | ((1 << 15) if abi >= 5 else 0)
    attr = (ctypes.c_uint64 * 3)(fs_all, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # net: BIND|CONNECT TCP; scope: unix|signal
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = libc.syscall(444, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return []

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    def allow(path, rights):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        if not os.path.isdir(path):
            rights &= file_rights
        rule = PathBeneath(rights, fd)
        libc.syscall(445, ruleset, 1, ctypes.byref(rule), 0)
        os.close(fd)

    for p in read_paths:
        allow(p, read)
    for p in write_paths:
        allow(p, fs_all)
    for p in write_files:
        allow(p, file_rights)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if libc.syscall(446, ruleset, 0) != 0:
        return []
    layers = ["landlock-fs"]
    if abi >= 4:
        layers.append("landlock-net")
    if abi >= 6:
        layers.append("landlock-scope")
    return layers


def _expose(read_paths):
    """In our private mount namespace, let the dropped uid reach ``read_paths`` that sit under a
    directory it cannot enter (e.g. a Python under /root, mode 0700): mount an empty tmpfs over
    that directory and bind back only the needed paths. The rest of it (keys, tokens) stays hidden."""
    libc = ctypes.CDLL(None, use_errno=True)
    masks = {}
    for path in read_paths:
        parts = os.path.abspath(path).split("/")
        for i in range(2, len(parts)):
            ancestor = "/".join(parts[:i])
            try:
                mode = os.stat(ancestor).st_mode
            except OSError:
                break
            if not mode & 0o001:
                masks.setdefault(ancestor, set()).add(path)
                break
    done = []
    for ancestor, paths in masks.items():
        fds = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in sorted(paths) if os.path.isdir(p)}
        if libc.mount(b"tmpfs", ancestor.encode(), b"tmpfs", 0, b"mode=0755") != 0:
            return done
        for p, fd in fds.items():
            target = p
            os.makedirs(target, mode=0o755, exist_ok=True)
            libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, 4096 | 16384, None)  # MS_BIND|MS_REC
            os.close(fd)
        done.append(ancestor)
    return done


def _limit(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass


# ------------------------------------------------------------------ lazy heavy imports

class _LazyHeavy:
    """Import numpy/pandas/... lazily so the official import preamble costs nothing unless used."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path, target=None):
        if name not in self.names:
            return None
        import importlib.util
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = importlib.util.LazyLoader(spec.loader)
                return spec
        return None


# ------------------------------------------------------------------ runners per language

def _run_python(spec, nonce):
    """Official semantics (execution_utils.py:146-154): exec in a fresh ``{}`` globals; any
    BaseException (SystemExit included) fails. The answer part runs first; before the test part
    the builtins are restored and test helpers the answer imported are re-imported fresh."""
    sys.meta_path.insert(0, _LazyHeavy(spec.get("lazy_modules", [])))
    setup, test = spec["parts"]
    whole = setup + "\n" + test
    try:
        compile(whole, "main.py", "exec")              # a syntax error fails like the official run
        try:
            codes = [compile(setup, "main.py", "exec"), compile("\n" * (setup.count("\n") + 1) + test, "main.py", "exec")]
        except SyntaxError:                            # only the whole program parses: run it unsplit
            codes = [compile(whole, "main.py", "exec")]
    except BaseException as exc:
        print(f"failed: {type(exc)} {exc}", file=sys.stderr)
        _exit(1)
    pristine = dict(builtins.__dict__)
    modules_before = set(sys.modules)
    namespace = {}
    try:
        for n, code in enumerate(codes):
            if n == 1:  # the test must see the real builtins and unpatched test helpers
                sys.settrace(None)
                sys.setprofile(None)
                builtins.__dict__.clear()
                builtins.__dict__.update(pristine)
                for name in [m for m in sys.modules if m not in modules_before]:
                    if name.split(".")[0] in ("unittest", "doctest", "pytest", "_pytest"):
                        del sys.modules[name]
            exec(code, namespace)
    except BaseException as exc:
        try:
            print(f"failed: {type(exc)} {exc}"[:2000], file=_stderr)
        finally:
            _exit(1)
    _write(RESULT_FD, (nonce + " passed\n").encode())
    _exit(0)


_NODE_RUNNER = r"""
'use strict';
const fs = require('fs'), path = require('path');
const nonce = fs.readFileSync(0, 'utf8').trim();
const writeSync = fs.writeSync, active = process.getActiveResourcesInfo.bind(process);
let loaded = false, userExit = false, reported = false;
const exit = process.exit, reallyExit = process.reallyExit;
process.exit = function (code) { userExit = true; return exit.call(process, code); };
process.reallyExit = function (code) { userExit = true; return reallyExit.call(process, code); };
process.on('exit', (code) => {
  if (reported) return;
  reported = true;
  const pending = active().filter((r) => r !== 'TTYWrap' && r !== 'PipeWrap');
  if (loaded && !userExit && code === 0 && pending.length === 0) writeSync(3, nonce + ' passed\n');
});
require(path.resolve(process.argv[2]));
loaded = true;
"""

_CPP_HARNESS = r"""
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
/* The nonce is read before any other static initializer (priority 101) and reported from an
   atexit handler: only a return from main reaches it, since exit() is wrapped (-Wl,--wrap=exit)
   and _exit/abort/signals skip atexit handlers. */
static char vl_line[160];
static ssize_t vl_len = 0;
static void vl_report(void) { if (vl_len > 0) write(3, vl_line, vl_len); }
__attribute__((constructor(101))) static void vl_init(void) {
  ssize_t n = read(0, vl_line, 100);
  while (n > 0 && (vl_line[n - 1] == '\n' || vl_line[n - 1] == '\r')) n--;
  if (n > 0) { memcpy(vl_line + n, " passed\n", 8); vl_len = n + 8; atexit(vl_report); }
}
extern "C" void __real_exit(int);
extern "C" void __wrap_exit(int code) { vl_len = 0; __real_exit(code); }
"""


def _spawn(argv, stdin_data=None):
    """Run a toolchain step as a child; returns its exit status (the harness enforces wall time)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(r, 0)
        os.close(r)
        os.close(w)
        try:
            os.execvp(argv[0], argv)
        finally:
            _exit(127)
    os.close(r)
    if stdin_data:
        os.write(w, stdin_data.encode())
    os.close(w)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _run_node(spec, nonce):
    with open("test.js", "w") as f:
        f.write("\n".join(spec["parts"]))
    with open("__vl_runner.js", "w") as f:
        f.write(_NODE_RUNNER)
    rc = _spawn([spec["toolchain"], "--max-old-space-size=512", "__vl_runner.js", "test.js"], nonce + "\n")
    _exit(rc & 0xFF if rc >= 0 else 1)


def _run_cpp(spec, nonce):
    with open("main.cpp", "w") as f:
        f.write("\n".join(spec["parts"]))
    with open("__vl_harness.cpp", "w") as f:
        f.write(_CPP_HARNESS)
    if _spawn([spec["toolchain"], "-O0", "-w", "__vl_harness.cpp", "main.cpp", "-Wl,--wrap=exit", "-o", "main"]) != 0:
        print("failed: compilation error", file=sys.stderr)
        _exit(1)
    _exit(_spawn(["./main"], nonce + "\n") & 0xFF)


RUNNERS = {"python": _run_python, "javascript": _run_node, "cpp": _run_cpp}


def main():
    result_fd = int(sys.argv[2])
    if result_fd != RESULT_FD:  # the result pipe always sits on fd 3 (the C++ and node reporters use it)
        os.dup2(result_fd, RESULT_FD)
        os.close(result_fd)
    nonce = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    os.chdir(spec["workdir"])
    lim = spec["limits"]
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_CPU, lim["cpu_s"])
    _limit(resource.RLIMIT_FSIZE, lim["file_size"])
    _limit(resource.RLIMIT_NOFILE, lim["open_files"])
    _limit(resource.RLIMIT_AS, lim["memory"])
    layers = []
    if spec.get("uid") is not None and os.getuid() == 0 and spec.get("mount_ns"):
        if _expose(spec["read_paths"]):
            layers.append("home-masked")
    if spec.get("landlock"):
        layers = _landlock(spec["read_paths"], [spec["workdir"]], [os.devnull])
        if not layers and spec.get("require_landlock"):
            print("failed: landlock required but unavailable", file=sys.stderr)
            _exit(70)
    uid = spec.get("uid")
    if uid is not None and os.getuid() == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        layers.append("uid-drop")
    _limit(resource.RLIMIT_NPROC, lim["processes"])   # counted per uid: only effective after the drop
    _write(2, ("[sandbox] " + " ".join(layers) + "\n").encode())
    RUNNERS[spec["language"]](spec, nonce)


if __name__ == "__main__":
    main()
