"""Fixtures shared by the unit tests (the repository-level conftest.py sets up the environment)."""

import os
import shutil
import subprocess

import pytest

from viscodex_lite import browser


@pytest.fixture(scope="session")
def chromium():
    """A headless-capable Chromium: Debian's ``chromium`` package, installed with apt-get when missing
    and this user may (root, apt-get present); otherwise the test is skipped with the reason."""
    found = browser.find_chromium()
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("Chromium is not installed and cannot be installed here (needs root and apt-get): "
                    "run `sudo apt-get install -y chromium` to include the browser tests.")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = None
    for command in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "chromium"]):
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            break
        if command[1] == "install" and result.returncode == 0:
            break
    found = browser.find_chromium()
    if not found:
        why = result.stderr.strip()[-300:] if result is not None else "timed out after 15 min"
        pytest.skip(f"`apt-get install -y chromium` failed, so the browser tests cannot run: {why}")
    return found
