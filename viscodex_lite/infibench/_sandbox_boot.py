"""Sandbox zygote: the trusted code that starts every sandboxed test (stdlib only, run with -I).

:mod:`viscodex_lite.infibench.sandbox` starts one zygote per worker as ``python -I
_sandbox_boot.py SOCKET_FD PRELOAD_JSON`` with a clean environment. The zygote imports the
trusted modules tests use (numpy, pandas, the official helper's stdlib imports), freezes them
out of the garbage collector, then serves its socket. Per test the harness sends the spec path
and three fds (stdin holding the nonce, the output pipe, the result pipe) and the zygote forks:

- a *supervisor* (same uid as the harness, never runs untrusted code): own process group, dies
  with the zygote, closes every inherited fd but the test's four, enters fresh network, PID and
  mount namespaces, forks the test process, waits for it and exits with its status;
- the *test process*, PID 1 of the new PID namespace. In order, before any untrusted code runs:
  die with the supervisor, mount its own /proc, read the nonce (then stdin is /dev/null), read
  the spec, replace the environment, enter the work directory, set resource limits, lock the
  filesystem and TCP with Landlock, drop root to the slot's uid. Then it runs the answer and the
  test, and only if the test program finished without an error does it write ``<nonce> passed``
  to fd 3 (a pipe the harness reads). Whatever the answer prints or however it exits, without
  the nonce line the harness scores a failure.

The zygote itself never reads a spec, an answer or a nonce, and never runs untrusted code: every
test starts from a fresh fork of the same imported state, so nothing one test does reaches the next.
"""

import builtins
import ctypes
import gc
import importlib
import json
import os
import resource
import select
import signal
import socket
import sys

_write, _close = os.write, os.close  # saved before untrusted code can patch os
_stdout, _stderr = sys.stdout, sys.stderr
_libc = ctypes.CDLL(None, use_errno=True)
RESULT_FD = 3
TEST_HELPERS = ("unittest", "doctest", "pytest", "_pytest")   # always imported fresh by the test part
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
PR_SET_PDEATHSIG = 1


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
    libc = _libc
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
    restricted = libc.syscall(446, ruleset, 0) == 0
    os.close(ruleset)           # the test must not inherit (or add rules to) the ruleset
    if not restricted:
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
    libc = _libc
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
    the builtins are restored and test helper modules (unittest, ...) are dropped so the test
    imports them fresh."""
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
    namespace = {}
    try:
        for n, code in enumerate(codes):
            if n == 1:  # the test must see the real builtins and unpatched test helpers
                sys.settrace(None)
                sys.setprofile(None)
                builtins.__dict__.clear()
                builtins.__dict__.update(pristine)
                for name in [m for m in sys.modules if m.split(".")[0] in TEST_HELPERS]:
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


# ------------------------------------------------------------------ one test: supervisor and test process

def _namespaces():
    """Enter fresh network, PID and mount namespaces (inside a new user namespace when that is
    what this user may do); the PID namespace takes effect for the next fork. Returns the layers."""
    uid, gid = os.getuid(), os.getgid()
    layers = []
    if _libc.unshare(CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS) == 0:
        layers = ["netns", "pidns"]
    elif _libc.unshare(CLONE_NEWUSER) == 0:   # not root: map ourselves to root of a user namespace
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        if _libc.unshare(CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS) == 0:
            layers = ["netns", "pidns"]
        elif _libc.unshare(CLONE_NEWNET) == 0:
            layers = ["netns"]
    if "pidns" in layers and _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "cannot make the new mount namespace private")
    return layers


def _supervise(spec_path, fds, zygote_pid):
    """The forked supervisor of one test: never returns."""
    try:
        os.setpgid(0, 0)                                   # the harness kills this group at the end
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != zygote_pid:
            os._exit(70)
        stdin, output, result = fds
        for target, fd in ((0, stdin), (1, output), (2, output), (RESULT_FD, result)):
            os.dup2(fd, target)
        os.closerange(RESULT_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # the zygote's socket too
        layers = _namespaces()
        alive_r, alive_w = os.pipe()                       # EOF on alive_r = this supervisor is gone
        pid = os.fork()
    except BaseException as exc:
        os.write(2, f"failed: sandbox could not start: {exc}\n".encode())
        os._exit(70)
    if pid == 0:
        os.close(alive_w)
        _test_process(spec_path, layers, alive_r)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2, RESULT_FD):                        # only the test process holds the pipes
        os.dup2(devnull, fd)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code < 0:                                           # killed by a signal: die the same way
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def _die_with_supervisor(alive_fd):
    """SIGKILL this process when the supervisor dies (which ends the namespace). The kernel clears
    this on every uid/gid change, so it is set again after the drop; then a closed ``alive_fd``
    says whether the supervisor died in between."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([alive_fd], [], [], 0)[0]:
        os._exit(70)


def _test_process(spec_path, layers, alive_fd):
    """PID 1 of the test's namespaces: isolate, then run the test. Never returns."""
    try:
        _die_with_supervisor(alive_fd)
        if "pidns" in layers and _libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
            raise OSError(ctypes.get_errno(), "cannot mount /proc for the new PID namespace")
        nonce = b""
        while len(nonce) < 4096:
            chunk = os.read(0, 4096)
            if not chunk:
                break
            nonce += chunk
        nonce = nonce.decode().strip()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        with open(spec_path) as f:
            spec = json.load(f)
        os.environ.clear()                                 # the zygote's was clean too; this one is the test's
        os.environ.update(spec["env"])
        if "tempfile" in sys.modules:
            sys.modules["tempfile"].tempdir = None         # re-read TMPDIR
        if "numpy.random" in sys.modules:
            sys.modules["numpy.random"].seed()             # `random` reseeds itself after fork; numpy does not
        sys.argv[1:] = []
        os.chdir(spec["workdir"])
        lim = spec["limits"]
        _limit(resource.RLIMIT_CORE, 0)
        _limit(resource.RLIMIT_CPU, lim["cpu_s"])
        _limit(resource.RLIMIT_FSIZE, lim["file_size"])
        _limit(resource.RLIMIT_NOFILE, lim["open_files"])
        _limit(resource.RLIMIT_AS, lim["memory"])
        uid = spec.get("uid")
        if uid is not None and os.getuid() == 0 and "pidns" in layers:
            if _expose(spec["read_paths"]):
                layers = layers + ["home-masked"]
        if spec.get("landlock"):
            layers = layers + _landlock(spec["read_paths"], [spec["workdir"]], [os.devnull])
        if uid is not None and os.getuid() == 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            layers.append("uid-drop")
        _die_with_supervisor(alive_fd)
        os.close(alive_fd)
        _limit(resource.RLIMIT_NPROC, lim["processes"])   # counted per uid: only effective after the drop
    except BaseException as exc:
        _write(2, f"failed: sandbox could not start: {exc}\n".encode())
        _exit(70)
    _write(2, ("[sandbox] " + " ".join(layers) + "\n").encode())
    RUNNERS[spec["language"]](spec, nonce)


# ------------------------------------------------------------------ the zygote

def _send(sock, message):
    sock.send(json.dumps(message).encode())


def _serve(sock, spec_path, fds):
    """Fork one test's supervisor, tell the harness its pid and when it exits; on the harness's
    word kill its process group, reap it and report its exit status."""
    zygote_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        _supervise(spec_path, fds, zygote_pid)
    for fd in fds:
        os.close(fd)
    _send(sock, {"pid": pid})
    try:
        watch = os.pidfd_open(pid)      # readable once the supervisor exits (Linux >= 5.3)
    except (AttributeError, OSError):
        watch = None                    # older kernels: poll
    exited = False
    while True:
        waiting = [sock] if exited or watch is None else [sock, watch]
        ready = select.select(waiting, [], [], 0.05 if watch is None and not exited else None)[0]
        if not exited and (watch in ready if watch is not None else
                           os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)):
            exited = True
            _send(sock, {"exited": True})
        if sock in ready:
            message = sock.recv(4096)   # "finish" (or EOF: the harness is gone)
            for kill in (os.killpg, os.kill):   # unreaped, so the pid and group cannot be reused yet
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            if watch is not None:
                os.close(watch)
            if not message:
                os._exit(0)
            _send(sock, {"status": status})
            return


def zygote(sock_fd, preload):
    """Import ``preload`` (never the test helpers), then serve ``run`` requests until EOF."""
    sock = socket.socket(fileno=sock_fd)
    loaded = []
    for name in preload:
        if name.split(".")[0] in TEST_HELPERS:
            continue
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception:  # noqa: BLE001  (not installed or broken: tests import it themselves)
            pass
    gc.collect()
    gc.freeze()                     # forked tests never walk (and so never copy) the preloaded objects
    sys.stdout.flush()
    _send(sock, {"ready": loaded})
    while True:
        message, fds, _, _ = socket.recv_fds(sock, 65536, 3)
        if not message:
            return
        request = json.loads(message)
        if request.get("op") != "run" or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            _send(sock, {"error": "bad request"})
            continue
        _serve(sock, request["spec"], fds)


if __name__ == "__main__":
    zygote(int(sys.argv[1]), json.loads(sys.argv[2]))
