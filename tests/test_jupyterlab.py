"""JupyterLab as learners use it (`make lab`): a real server on loopback lists and serves every
notebook, its `python3` kernel is the kit's Python and imports the kit, and the widgets extension is
installed so explorers render.

The server runs like `make lab` (`jupyter lab --notebook-dir=notebooks`) plus what a test needs:
127.0.0.1, a free port, a random token, no browser, a private runtime directory, and no extension
manager lookups on PyPI (offline). It is always shut down, within bounded time.
"""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, url: str, token: str):
        self.url, self.token = url, token

    def get(self, path: str, token: bool = True):
        sep = "&" if "?" in path else "?"
        with urllib.request.urlopen(f"{self.url}{path}{sep}token={self.token}" if token else f"{self.url}{path}", timeout=30) as r:
            return json.load(r)

    def send(self, method: str, path: str, body: dict | None = None):
        request = urllib.request.Request(f"{self.url}{path}", method=method, data=json.dumps(body or {}).encode(),
                                         headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            data = r.read()
        return json.loads(data) if data else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    port, token = free_port(), secrets.token_hex(16)
    runtime = tmp_path_factory.mktemp("jupyter_runtime")
    log_path = runtime / "lab.log"
    command = [sys.executable, "-m", "jupyter", "lab", "--notebook-dir", str(ROOT / "notebooks"), "--no-browser",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", "--LabApp.extension_manager=readonly"]
    if os.geteuid() == 0:  # containers run as root; jupyter refuses that without the flag
        command.append("--allow-root")
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    lab = Lab(f"http://127.0.0.1:{port}", token)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                lab.get("/api/status")
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start within {START_TIMEOUT_S} s:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.25)
        yield lab
    finally:
        try:
            lab.send("POST", "/api/shutdown")
            server.wait(timeout=20)
        except Exception:  # noqa: BLE001 - fall back to signals whatever went wrong
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def test_the_test_server_is_make_lab():
    recipe = (ROOT / "Makefile").read_text().split("\nlab:", 1)[1].split("\n\n", 1)[0]
    assert "jupyter lab --notebook-dir=notebooks" in recipe and "--allow-root" in recipe


def test_lists_every_notebook(lab):
    listing = lab.get("/api/contents")
    assert sorted(item["name"] for item in listing["content"] if item["type"] == "notebook") == NOTEBOOKS


def test_serves_a_notebook(lab):
    name = NOTEBOOKS[0]
    model = lab.get(f"/api/contents/{name}?content=1")
    on_disk = json.loads((ROOT / "notebooks" / name).read_text())
    assert model["type"] == "notebook" and model["format"] == "json"
    assert model["content"]["nbformat"] == 4 and len(model["content"]["cells"]) == len(on_disk["cells"])
    assert model["content"]["metadata"]["kernelspec"]["name"] == "python3"


def test_needs_the_token(lab):
    with pytest.raises(urllib.error.HTTPError) as err:
        lab.get("/api/contents", token=False)
    assert err.value.code == 403


def test_python3_kernelspec_is_the_kits_python(lab):
    specs = lab.get("/api/kernelspecs")
    assert specs["default"] == "python3"
    executable = specs["kernelspecs"]["python3"]["spec"]["argv"][0]
    # "python" is replaced by the server's own interpreter at launch (jupyter_client); a path must be ours.
    assert executable in ("python", "python3") or Path(executable).resolve() == Path(sys.executable).resolve(), (
        f"the python3 kernelspec runs {executable}, not the kit's {sys.executable}: remove the stale kernelspec "
        "(`jupyter kernelspec list`) or reinstall with `make env`")


def test_kernel_runs_the_kit(lab):
    import websocket

    kernel = lab.send("POST", "/api/kernels", {"name": "python3"})
    ws = websocket.create_connection(f"{lab.url.replace('http', 'ws')}/api/kernels/{kernel['id']}/channels?token={lab.token}",
                                     timeout=60, suppress_origin=True)
    try:
        msg_id = uuid.uuid4().hex
        code = "import sys, viscodex_lite\nprint(sys.executable)\nprint(viscodex_lite.__file__)"
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": uuid.uuid4().hex,
                       "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        # The reply (shell channel) and the printed output (iopub) may come in either order: wait for the
        # reply and for iopub's "idle", which follows every output of the request.
        out, reply, idle = "", None, False
        deadline = time.monotonic() + 60
        while (reply is None or not idle) and time.monotonic() < deadline:
            message = json.loads(ws.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "stream":
                out += message["content"]["text"]
            elif message["msg_type"] == "execute_reply":
                reply = message["content"]
            elif message["msg_type"] == "status":
                idle = message["content"]["execution_state"] == "idle"
    finally:
        ws.close()
        lab.send("DELETE", f"/api/kernels/{kernel['id']}")
    assert reply is not None and reply["status"] == "ok", reply
    executable, module = out.split()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(module).resolve().is_relative_to(ROOT)


def test_widgets_extension_is_installed(lab):
    extensions = {e["name"]: e for e in lab.get("/lab/api/extensions")}
    widgets = extensions.get("@jupyter-widgets/jupyterlab-manager")
    assert widgets is not None, "ipywidgets' JupyterLab extension (jupyterlab_widgets) is missing: run `make env`"
    assert widgets["enabled"] and widgets["installed"] and widgets["status"] == "ok"
