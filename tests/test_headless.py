"""The headless client's parts that need no server (the rest runs in tests/integration)."""
import asyncio

import pytest

from liteffn.headless import client


def test_overrides_set_inputs_with_json_values():
    wf = {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}, "6": {"class_type": "T", "inputs": {}}}
    out = client.apply_overrides(wf, ["3.seed=42", "6.text=a red fox", "3.cfg=3.5", "3.flag=true"])
    assert out["3"]["inputs"] == {"seed": 42, "cfg": 3.5, "flag": True} and out["6"]["inputs"]["text"] == "a red fox"
    assert wf["3"]["inputs"]["seed"] == 1  # the original is left alone
    with pytest.raises(client.WorkflowError, match="NODE_ID.input=value"):
        client.apply_overrides(wf, ["9.seed=1"])


def test_ui_format_is_refused_with_the_fix():
    with pytest.raises(client.WorkflowError, match="UI-format.*Export \\(API\\)"):
        asyncio.run(client.run("http://127.0.0.1:1", {"nodes": [], "links": []}))


# ------------------------------------------------------------------ against a local fake ComfyUI (http.server)
import base64  # noqa: E402
import hashlib  # noqa: E402
import http.server  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import urllib.parse  # noqa: E402

EVIL = "\x1b[2J\x1b]0;pwned\x07\x1b]52;c;ZWNobyBoaQ==\x07\r\x9b31m\u202e"  # clear screen, title, clipboard, CR, C1, bidi
WF = {"1": {"class_type": "LiteFFNCompressModel", "inputs": {}}, "9": {"class_type": "SaveImage", "inputs": {}}}


def _frame(payload: bytes, opcode=0x1, fin=True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    head += bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n) if n < 65536 else \
        bytes([127]) + struct.pack(">Q", n)
    return head + payload


class FakeComfy(http.server.BaseHTTPRequestHandler):
    """POST /prompt, GET /ws (websocket), /history/<id>, /view, as ComfyUI answers them; what it
    answers is set per test in `self.server.plan`."""

    def log_message(self, *_):
        pass

    def _json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        plan = self.server.plan
        if plan.get("reject"):
            return self._json(400, {"error": {"message": "Prompt outputs failed validation" + EVIL},
                                    "node_errors": {"1": {"class_type": "LiteFFNCompressModel", "errors": [
                                        {"message": "Value 999 bigger than max", "details": "rank\n" + EVIL}]}}})
        self.server.prompt_id = body["prompt_id"]
        self.server.queued.set()
        self._json(200, {"prompt_id": body["prompt_id"], "number": 0, "node_errors": {}})

    def do_GET(self):
        u = urllib.parse.urlsplit(self.path)
        plan, q = self.server.plan, urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if u.path == "/ws":
            return self._websocket(plan)
        if u.path.startswith("/history/"):
            pid = u.path.rsplit("/", 1)[1]
            files = [{"filename": n, "subfolder": "", "type": "output"} for n in plan.get("files", {})]
            return self._json(200, {pid: {"outputs": {"9": {"images": files, "text": ["report" + EVIL + " end"]}}}})
        if u.path == "/view":
            status, body = plan["files"][q["filename"][0]]
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if status != 200 else "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self._json(404, {})

    def _websocket(self, plan):
        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] +
                                                "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.write(_frame(json.dumps({"type": "status", "data": {"status": {}}}).encode()))
        self.wfile.flush()
        self.server.queued.wait(10)
        self.server.queued.clear()  # the next run's websocket waits for its own prompt
        pid = self.server.prompt_id
        msgs = [{"type": "execution_start", "data": {"prompt_id": "someone else's"}},
                {"type": "executing", "data": {"node": "1", "prompt_id": pid}},
                {"type": "progress", "data": {"node": "1", "value": 1, "max": 2, "prompt_id": pid}}]
        out = b"".join(_frame(json.dumps(m).encode()) for m in msgs)
        out += _frame(b"\x89PNG binary preview", opcode=0x2) + _frame(b"hi", opcode=0x9)  # a preview, a ping
        if plan.get("hang"):
            self.wfile.write(out)
            self.wfile.flush()
            while self.rfile.read(1):  # until the client goes (its pong to the ping above is not goodbye)
                pass
            return
        if plan.get("fail"):
            last = {"type": "execution_error", "data": {"prompt_id": pid, "node_id": "1", "node_type": "X" + EVIL,
                                                         "exception_type": "ValueError",
                                                         "exception_message": "bad\nthing" + EVIL}}
        else:
            last = {"type": "executing", "data": {"node": None, "prompt_id": pid}}
        raw = json.dumps(last).encode()  # in two fragments, as a server may send a long message
        out += _frame(raw[:10], fin=False) + _frame(raw[10:], opcode=0x0)
        self.wfile.write(out)
        self.wfile.flush()
        self.rfile.read(1)


@pytest.fixture
def comfy():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeComfy)
    srv.daemon_threads = True
    srv.plan, srv.queued, srv.prompt_id = {}, threading.Event(), None
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def wf_file(tmp_path):
    p = tmp_path / "wf.json"
    p.write_text(json.dumps(WF))
    return str(p)


def _no_escapes(text):
    assert not any(c in text for c in "\x1b\x07\r\x9b\u202e"), repr(text)


def test_queues_follows_downloads_streamed_without_aiohttp(comfy, wf_file, tmp_path, capsys, monkeypatch):
    srv, url = comfy
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # the standard library only
    monkeypatch.setattr(client, "CHUNK", 4096)  # several chunks
    big = os.urandom(50_000)
    srv.plan = {"files": {"a.png": (200, big), "b.mp4": (200, b"video")}}
    out = tmp_path / "out"
    assert client.main([wf_file, "--server", url, "--out", str(out)]) == 0
    o = capsys.readouterr()
    assert (out / "a.png").read_bytes() == big and (out / "b.mp4").read_bytes() == b"video"
    assert sorted(os.listdir(out)) == ["a.png", "b.mp4"]  # no temp file left
    assert "running 1 (LiteFFNCompressModel)" in o.out and "1: 1/2" in o.out and "saved" in o.out
    assert "report" in o.out and "0;pwned" not in o.out and "end" in o.out
    _no_escapes(o.out + o.err)


def test_http_error_page_is_not_saved(comfy, wf_file, tmp_path, capsys):
    srv, url = comfy
    srv.plan = {"files": {"err.png": (500, b"<html><body>500 Internal Server Error</body></html>")}}
    out = tmp_path / "out"
    assert client.main([wf_file, "--server", url, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "HTTP 500" in err and "err.png" in err and "nothing saved" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(out) == []


def test_planted_symlink_is_not_written_through(comfy, wf_file, tmp_path, capsys):
    srv, url = comfy
    srv.plan = {"files": {"a.png": (200, b"attacker-chosen bytes")}}
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.write_text("precious")
    os.symlink(victim, out / "a.png")
    assert client.main([wf_file, "--server", url, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and len(err.strip().splitlines()) == 1
    assert victim.read_text() == "precious" and os.path.islink(out / "a.png") and os.listdir(out) == ["a.png"]


def test_hostile_file_names_are_refused(comfy, wf_file, tmp_path, capsys):
    srv, url = comfy
    for name in ("..", "x\x1b[2J.png"):
        srv.plan = {"files": {name: (200, b"x")}}
        assert client.main([wf_file, "--server", url, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "unusable file name" in err
        _no_escapes(err)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_node_failure_and_rejection_are_one_clean_line(comfy, wf_file, capsys):
    srv, url = comfy
    srv.plan = {"fail": True}
    assert client.main([wf_file, "--server", url]) == 2
    err = capsys.readouterr().err
    assert "node 1" in err and "ValueError: bad thing" in err and len(err.strip().splitlines()) == 1
    _no_escapes(err)
    srv.plan = {"reject": True}
    assert client.main([wf_file, "--server", url]) == 2
    err = capsys.readouterr().err
    assert "rejected" in err and "Value 999 bigger than max" in err and len(err.strip().splitlines()) == 1
    _no_escapes(err)


def test_unreachable_server_bad_file_and_options(tmp_path, wf_file, capsys):
    assert client.main([wf_file, "--server", "http://127.0.0.1:1"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err
    assert client.main([str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert client.main([str(tmp_path / "bad.json")]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert client.main([wf_file, "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err
    assert client.main([wf_file, "--set", "7.x=1"]) == 2
    assert "NODE_ID.input=value" in capsys.readouterr().err


def test_every_option_has_help():
    for action in client.build_parser()._actions:
        assert action.help, action.option_strings or action.dest


def _env():
    """The subprocess imports `liteffn` as this test does (conftest's link or an install)."""
    import liteffn

    root = os.path.dirname(os.path.dirname(os.path.abspath(liteffn.__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def _terminal_sigint():
    """In the child before exec: SIGINT as a terminal delivers it, not ignored or blocked, whatever this test
    process inherited or set (an ignored SIGINT is inherited across exec, and Python then installs no handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def _signal_masks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "; ".join(ln.strip() for ln in f if ln.startswith(("SigBlk", "SigIgn", "SigCgt", "State")))
    except OSError as e:
        return f"unreadable ({e})"


def test_ctrl_c_is_one_line_and_130(comfy, wf_file, tmp_path):
    srv, url = comfy
    srv.plan = {"hang": True}
    p = subprocess.Popen([sys.executable, "-m", "liteffn.headless.client", wf_file, "--server", url],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         preexec_fn=_terminal_sigint)
    try:
        line = p.stdout.readline()  # the workflow is running
        assert "running 1" in line, line + p.stderr.read()
        p.send_signal(signal.SIGINT)
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # once, in a full-suite run (not reproduced): say what the child had
            pytest.fail(f"no exit 30 s after SIGINT; the child's signal masks: {_signal_masks(p.pid)}")
    finally:
        p.kill()
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
