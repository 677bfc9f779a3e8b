"""Hostile answers against the unit-test sandbox (threat model: docs/sandbox.md)."""

import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from viscodex_lite.infibench.runner import PYTHON_HELPER
from viscodex_lite.infibench.sandbox import PRELOAD, Limits, Sandbox, TestJob, available_modules, toolchain


@pytest.fixture(scope="module")
def box():
    with Sandbox(Limits(wall_s=4), workers=2) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def solo():
    """One worker: every test forks from the same zygote."""
    with Sandbox(Limits(wall_s=4), workers=1) as sandbox:
        sandbox.warm_up()
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


# ------------------------------------------------------------------ the zygote (one per worker)

def wait_until(condition, seconds=15.0):
    """Poll ``condition`` until it holds or ``seconds`` pass; its last value."""
    deadline = time.monotonic() + seconds
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def marked(marker):
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


def gone(pids):
    def dead(pid):
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return all(dead(pid) for pid in pids)


def test_preload_covers_the_official_helper_imports():
    helper = {line.split()[1].split(".")[0] for line in PYTHON_HELPER} - {"sys"}
    assert helper <= set(PRELOAD)


def test_tests_fork_from_a_zygote_that_preloaded_the_heavy_modules(solo):
    preloaded = set(solo.warm_up())
    assert {"math", "statistics"} <= preloaded and available_modules(("numpy", "pandas")) <= preloaded
    answer = f"import sys\nassert {sorted(preloaded)!r} == sorted(m for m in {sorted(preloaded)!r} if m in sys.modules)"
    assert solo.run(py(answer, "assert 'unittest' not in sys.modules")).passed


def test_test_helpers_are_never_preloaded():
    with Sandbox(workers=1, preload=("unittest", "doctest", "json")) as box:
        assert box.warm_up() == ["json"]
        assert box.run(py("import sys\nassert 'json' in sys.modules and 'unittest' not in sys.modules")).passed


PANDAS = "pandas" in available_modules(("pandas",))
# (what one test does, what the next test on the same zygote checks)
STATE = {
    "preloaded module": ("import statistics, math\nstatistics.mean = lambda xs: 42\nmath.pi = 3",
                         "import statistics, math\nassert statistics.mean([1, 3]) == 2 and math.pi > 3.14"),
    "pandas": ("import pandas as pd\npd.DataFrame.sum = lambda self, *a, **k: 42\npd.LEAK = 1" if PANDAS else "pass",
               "import pandas as pd\nassert not hasattr(pd, 'LEAK') and pd.DataFrame({'a': [1, 2]}).sum()['a'] == 3"
               if PANDAS else "pass"),
    "builtins": ("import builtins\nbuiltins.LEAKED = 1\nbuiltins.sorted = lambda x: [0]",
                 "import builtins\nassert not hasattr(builtins, 'LEAKED') and sorted([2, 1]) == [1, 2]"),
    "interpreter": ("import sys\nsys.path.insert(0, '/evil')\nsys.setrecursionlimit(80)\nsys.modules['json'] = None",
                    "import sys, json\nassert '/evil' not in sys.path and sys.getrecursionlimit() > 80"),
    "environment": ("import os\nos.environ['VL_LEAK'] = '1'\nos.putenv('VL_LEAK_C', '1')",
                    "import os, subprocess\nassert 'VL_LEAK' not in os.environ\n"
                    "assert b'VL_LEAK' not in subprocess.run(['env'], capture_output=True).stdout"),
    "files": ("open('leak.txt', 'w').write('x')\nimport tempfile\ntempfile.mkstemp()",
              "import os, tempfile\nassert os.listdir('.') == [] and os.environ['HOME'] == os.getcwd() == tempfile.gettempdir()"),
}


@pytest.mark.parametrize("what", STATE)
def test_state_does_not_leak_from_one_test_to_the_next(solo, what):
    dirty, check = STATE[what]
    zygote = solo._zygotes[0].proc.pid
    assert solo.run(py(dirty)).passed
    assert solo.run(py(check)).passed, solo.run(py(check)).output
    assert solo._zygotes[0].proc.pid == zygote                      # the same zygote served both
    if check != "pass":
        assert not solo.run(py(dirty + "\n" + check)).passed       # the check sees the state when it is there


def test_each_test_gets_fresh_random_state(solo):
    draw = "import random\nprint('random', random.random())" + ("\nimport numpy\nprint('numpy', numpy.random.rand())"
                                                                if "numpy" in available_modules(("numpy",)) else "")
    first, second = (solo.run(py(draw)).output.splitlines() for _ in range(2))
    assert len(first) == len(second) == draw.count("print") and all(a != b for a, b in zip(first, second))


def test_the_test_holds_no_descriptor_of_the_zygote(solo):
    answer = ("import os\nextra = [f for f in os.listdir('/proc/self/fd') if int(f) > 3]\n"
              "assert all(not os.path.exists(f'/proc/self/fd/{f}') for f in extra), extra")   # only listdir's own
    assert solo.run(py(answer, "import os\nassert os.getpid() == 1 or True")).passed


def test_hostile_answers_cannot_reach_the_zygote(solo):
    zygote = solo._zygotes[0].proc.pid
    answer = "import os, signal\nfor pid in [-1, 0, 2, os.getppid()]:\n    try:\n        os.kill(pid, signal.SIGKILL)\n" \
             "    except OSError:\n        pass"
    solo.run(py(answer))
    assert solo._zygotes[0].proc.pid == zygote and solo._zygotes[0].alive()
    assert solo.run(py("x = 1", "assert x == 1")).passed


def test_killing_the_zygote_kills_its_running_test_and_a_new_one_takes_over(solo):
    zygote = solo._zygotes[0]
    marker = f"vl_orphan_{uuid.uuid4().hex}"
    sleeper = py(f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])",
                 timeout=30)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(solo.run, sleeper)
        test = wait_until(lambda: marked(marker))
        assert test, "the sleeping test never started"
        zygote.proc.kill()
        result = future.result(timeout=20)
    assert result.status == "failed"
    assert wait_until(lambda: gone([p.pid for p in test]) and not marked(marker))
    assert solo.run(py("x = 1", "assert x == 1")).passed and solo._zygotes[0].proc.pid != zygote.proc.pid


def test_a_killed_harness_leaves_no_zygote_or_test_behind():
    marker = f"vl_orphan_{uuid.uuid4().hex}"
    answer = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])"
    harness = ("from viscodex_lite.infibench.sandbox import Limits, Sandbox, TestJob\n"
               "box = Sandbox(Limits(wall_s=60), workers=1, preload=())\nbox.warm_up()\n"
               "print(box._zygotes[0].proc.pid, flush=True)\n"
               f"box.run(TestJob('python', [{answer!r}, 'pass']))\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", harness], stdout=subprocess.PIPE, cwd=root,
                            env=dict(os.environ, PYTHONPATH=str(root)))
    try:
        zygote = int(proc.stdout.readline())
        test = wait_until(lambda: marked(marker))
        assert test, "the sleeping test never started"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert wait_until(lambda: gone([zygote] + [p.pid for p in test]) and not marked(marker))


def test_close_stops_the_zygotes():
    box = Sandbox(workers=2, preload=())
    box.warm_up()
    pids = [z.proc.pid for z in box._zygotes.values()]
    assert len(pids) == 2
    box.close()
    assert gone(pids)
