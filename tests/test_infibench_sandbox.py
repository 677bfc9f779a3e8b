"""Hostile answers against the unit-test sandbox (threat model: docs/sandbox.md)."""

import os
import time
import uuid

import psutil
import pytest

from viscodex_lite.infibench.sandbox import Limits, Sandbox, TestJob, toolchain


@pytest.fixture(scope="module")
def box():
    with Sandbox(Limits(wall_s=4), workers=2) as sandbox:
        yield sandbox


def py(answer, test="pass", timeout=None):
    return TestJob("python", [answer, test], timeout_s=timeout)


def test_honest_answers_pass_and_wrong_ones_fail(box):
    assert box.run(py("def add(a, b): return a + b", "assert add(1, 2) == 3")).passed
    result = box.run(py("def add(a, b): return a - b", "assert add(1, 2) == 3"))
    assert result.status == "failed" and "AssertionError" in result.output


@pytest.mark.parametrize("answer", [
    "print('PASS'); print('passed'); print('ok')\ndef add(a, b): return 0",      # fake success text
    "import sys\nsys.exit(0)",                                                    # SystemExit(0) fails (official too)
    "import os\nos._exit(0)",                                                     # exit 0 before the test runs
    "import builtins\nbuiltins.AssertionError = Exception\nbuiltins.all = lambda x: True\ndef add(a, b): return 0",
    "import sys\nsys.settrace(lambda *a: None)\ndef add(a, b): return 0",
    "import os\nos.write(3, b'passed\\n')\nos.write(1, b'passed\\n')\nos._exit(0)",  # forged result line, no nonce
    "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",                   # kill the parent
])
def test_fake_pass_tricks_fail(box, answer):
    result = box.run(py(answer, "assert all([add(1, 2) == 3])"))
    assert result.status == "failed", (answer, result)


def test_monkeypatching_unittest_does_not_reach_the_test(box):
    answer = "import unittest\nunittest.TestCase.assertEqual = lambda *a, **k: None\ndef add(a, b): return 0"
    test = "import unittest\nclass T(unittest.TestCase):\n    def test(self):\n        self.assertEqual(add(1, 2), 3)\n" \
           "r = unittest.TextTestRunner().run(unittest.defaultTestLoader.loadTestsFromTestCase(T))\nassert r.wasSuccessful()"
    assert box.run(py(answer, test)).status == "failed"
    assert box.run(py("def add(a, b): return a + b", test)).passed


def test_infinite_loop_is_bounded(box):
    started = time.monotonic()
    result = box.run(py("while True:\n    pass", timeout=1))
    assert result.status == "timeout" and time.monotonic() - started < 10


def test_fork_bomb_is_bounded(box):
    started = time.monotonic()
    result = box.run(py("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", timeout=2))
    assert not result.passed and time.monotonic() - started < 15
    assert box.run(py("x = 1", "assert x == 1")).passed   # the machine still works


def test_memory_bomb_is_bounded(box):
    result = box.run(py("x = bytearray(16 << 30)", "pass"))
    assert result.status == "failed" and "MemoryError" in result.output


def test_output_flood_is_capped(box):
    result = box.run(py("import sys\nfor _ in range(200000):\n    sys.stdout.write('x' * 100 + '\\n')"))
    assert len(result.output) <= Limits().output_bytes + 100 and "truncated" in result.output


def test_environment_secrets_are_not_visible(box, monkeypatch):
    monkeypatch.setenv("VL_TEST_SECRET", "hunter2")
    answer = "import os\nassert 'VL_TEST_SECRET' not in os.environ\n" \
             "for pid in os.listdir('/proc'):\n    try:\n        assert b'hunter2' not in open(f'/proc/{pid}/environ', 'rb').read()\n" \
             "    except (PermissionError, FileNotFoundError, NotADirectoryError, ProcessLookupError):\n        pass"
    result = box.run(py(answer))
    assert result.passed, result.output


def test_writes_outside_the_workdir_are_blocked(box, tmp_path):
    target = tmp_path / "world-writable"
    target.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(target, 0o777)
    answer = f"open('{target}/escaped.txt', 'w').write('x')"
    result = box.run(py(answer))
    assert result.status == "failed" and not (target / "escaped.txt").exists()
    assert box.run(py("open('inside.txt', 'w').write('x')", "assert open('inside.txt').read() == 'x'")).passed


def test_network_is_unreachable(box):
    if not {"netns", "landlock-net"} & set(box.isolation()):
        pytest.skip("no network isolation layer on this machine")
    answer = "import socket\ns = socket.socket()\ns.settimeout(2)\nassert s.connect_ex(('127.0.0.1', 22)) != 0 or True\n" \
             "try:\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n    raise SystemExit('connected')\nexcept OSError:\n    pass"
    assert box.run(py(answer)).passed


def test_background_daemons_do_not_outlive_the_run(box):
    if "pidns" not in box.isolation():
        pytest.skip("no PID namespace here: a setsid daemon could escape the process group")
    marker = f"vl_daemon_{uuid.uuid4().hex}"
    answer = ("import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])\n"
              "    os._exit(0)\ntime.sleep(0.3)")
    assert box.run(py(answer)).passed
    time.sleep(0.3)
    survivors = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert survivors == []


def test_parallel_workers_keep_results_apart(box):
    jobs = [py(f"v = {i}", f"assert v == {i}") for i in range(6)] + [py("v = 0", "assert v == 1")]
    results = box.run_many(jobs)
    assert [r.passed for r in results] == [True] * 6 + [False]


@pytest.mark.skipif(toolchain("javascript") is None, reason="no node")
def test_node_exit_tricks_fail(box):
    test = "require('node:assert').strictEqual(add(1, 2), 3);"
    assert box.run(TestJob("javascript", ["function add(a, b) { return a + b; }", test])).passed
    for answer in ["process.exit(0);", "process.emit('exit', 0); process.reallyExit(0);", "console.log('passed'); function add() { return 0; }"]:
        assert box.run(TestJob("javascript", [answer, test])).status == "failed", answer


@pytest.mark.skipif(toolchain("cpp") is None, reason="no g++")
def test_cpp_exit_tricks_fail(box):
    test = "#include <cassert>\nint main() { assert(add(1, 2) == 3); return 0; }"
    assert box.run(TestJob("cpp", ["int add(int a, int b) { return a + b; }", test], timeout_s=30)).passed
    early_exit = "#include <cstdlib>\nint add(int, int);\nstruct Quit { Quit() { std::exit(0); } } quit_now;\nint add(int a, int b) { return 0; }"
    assert box.run(TestJob("cpp", [early_exit, test], timeout_s=30)).status == "failed"


def test_missing_toolchain_is_reported_as_skipped(box):
    result = box.run(TestJob("go", ["package main", "func main() {}"]))
    assert result.status == "skipped" and "no toolchain" in result.reason
