"""Open an HTML page in headless Chromium and report what a reader sees: JavaScript errors, which
plotly figures rendered, and a full-page screenshot.

The kit's reports must open offline from a file, so a test loads them in a real browser with no
network. Chromium is driven through its DevTools protocol (``--remote-debugging-port`` and a
websocket): every uncaught exception, ``console.error`` and browser log error (a script that failed
to load, say) is collected; after the load event the page is polled until every plotly figure has
drawn its SVG; then a screenshot of the whole page is taken. Used by ``tests/test_report_browser.py``;
any report of the kit can be checked the same way.

>>> check = check_page("runs/tiny/demo/report.html", "report.png")   # doctest: +SKIP
>>> check.errors, [f["svgs"] > 0 for f in check.figures]             # doctest: +SKIP
([], [True, True, True])
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KitError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless, no GPU, nothing that reaches the network on its own, a fresh profile per run.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync", "--disable-extensions", "--disable-default-apps", "--mute-audio",
         "--hide-scrollbars", "--remote-debugging-port=0")

# Per plotly figure: its id, how many plotly SVG layers it drew and how many traces it holds.
FIGURES_JS = """Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => ({
  id: d.id, svgs: d.querySelectorAll('.main-svg').length, traces: (d.data || []).length,
  drawn: d.querySelectorAll('.trace, .barlayer .point, .scatterlayer .lines, .heatmaplayer image').length}))"""


class BrowserError(KitError):
    """Chromium could not be found, started or driven; the message says what to do."""


@dataclass
class PageCheck:
    """What :func:`check_page` saw."""

    title: str
    errors: list[str] = field(default_factory=list)   # exceptions, console errors, browser log errors
    figures: list[dict] = field(default_factory=list)  # one dict per plotly figure (see FIGURES_JS)
    screenshot: Path | None = None
    seconds: float = 0.0


def find_chromium() -> str | None:
    """Path of a Chromium or Chrome executable on ``PATH``, or ``None``."""
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


class _DevTools:
    """The smallest DevTools client: numbered commands, events kept in arrival order."""

    def __init__(self, ws_url: str, timeout: float):
        import websocket  # websocket-client

        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.timeout = timeout
        self.next_id, self.events = 0, []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise BrowserError(f"DevTools {method} failed: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, method: str, deadline: float) -> bool:
        while not any(e["method"] == method for e in self.events):
            if time.monotonic() > deadline:
                self.ws.settimeout(self.timeout)
                return False
            self.ws.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                message = json.loads(self.ws.recv())
            except Exception:  # noqa: BLE001 - a timeout here just means "not yet"
                continue
            if "method" in message:
                self.events.append(message)
        self.ws.settimeout(self.timeout)  # later calls (the screenshot) get the full timeout again
        return True


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')} (line {d.get('lineNumber')})")
        elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
    return out


def _start(chromium: str, profile: Path, timeout: float) -> tuple[subprocess.Popen, int]:
    log = open(profile.parent / "chromium.log", "wb")
    proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"],
                            stdout=log, stderr=log, start_new_session=True)
    log.close()
    port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return proc, int(port_file.read_text().split()[0])
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    _stop(proc)
    tail = (profile.parent / "chromium.log").read_text(errors="replace")[-800:]
    raise BrowserError(f"{chromium} did not open its DevTools port within {timeout:.0f} s. Its log ends with:\n{tail}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def check_page(html_path: str | Path, screenshot: str | Path | None = None, *, chromium: str | None = None,
               timeout: float = 60.0, settle_s: float = 0.5) -> PageCheck:
    """Load ``html_path`` in headless Chromium; return its errors, figures and (optionally) a screenshot.

    Waits for the load event, then until every plotly figure drew at least one SVG layer (or
    ``timeout``), then ``settle_s`` for late errors.
    """
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise BrowserError(f"no page at {html_path}.")
    chromium = chromium or find_chromium()
    if chromium is None:
        raise BrowserError("no Chromium found: install Debian's `chromium` package (apt-get install -y chromium).")
    start = time.monotonic()
    deadline = start + timeout
    workdir = Path(tempfile.mkdtemp(prefix="viscodex-lite-chromium-"))
    proc = None
    try:
        proc, port = _start(chromium, workdir / "profile", timeout)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as response:
            page = next(t for t in json.load(response) if t.get("type") == "page")
        tools = _DevTools(page["webSocketDebuggerUrl"], timeout)
        for domain in ("Runtime", "Log", "Page"):
            tools.call(f"{domain}.enable")
        tools.events.clear()  # about:blank's events are not the page's
        tools.call("Page.navigate", url=html_path.as_uri())
        if not tools.wait_for("Page.loadEventFired", deadline):
            raise BrowserError(f"{html_path} did not finish loading within {timeout:.0f} s.")

        def figures():
            return tools.call("Runtime.evaluate", expression=FIGURES_JS, returnByValue=True)["result"]["value"]

        found = figures()
        while any(f["svgs"] == 0 for f in found) and time.monotonic() < deadline:
            time.sleep(0.1)
            found = figures()
        tools.wait_for("never.arrives", time.monotonic() + settle_s)  # collect late events
        check = PageCheck(tools.call("Runtime.evaluate", expression="document.title", returnByValue=True)["result"]["value"],
                          _errors(tools.events), found)
        if screenshot is not None:
            size = tools.call("Page.getLayoutMetrics")["cssContentSize"]
            shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                              clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
            check.screenshot = Path(screenshot)
            check.screenshot.write_bytes(base64.b64decode(shot["data"]))
        tools.ws.close()
        check.seconds = time.monotonic() - start
        return check
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)
