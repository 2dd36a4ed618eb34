"""Queue an API-format workflow on a running ComfyUI, follow it over the websocket, report outputs.

    liteffn-queue workflow_api.json --server http://127.0.0.1:8188 \
        --set 3.seed=42 --set 6.text="a red fox" --out results/
    (or: python -m liteffn.headless.client ..., python custom_nodes/ComfyUI-LiteFFN/headless/client.py ...)

Prints progress per node, the outputs each output node recorded in /history (texts, and the
files it saved or previewed, downloaded into --out), and exits with code 2 and one line naming
the cause (ComfyUI's own message when the server rejects the workflow or a node fails; an
HTTP error; a refused file) and 130 on Ctrl-C. Python's standard library only (urllib and a
small websocket reader), so it runs from any Python 3.10+.

What the server sends is not trusted: control characters and terminal escapes are stripped
before printing, a download is checked (HTTP status, length) and streamed to a new temp file
in --out, then renamed over a regular file only (never written through a link).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import socket
import stat
import struct
import sys
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import uuid

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130
CHUNK = 1 << 20  # download chunk: a video is never held whole in memory
MAX_MESSAGE = 64 << 20  # a websocket message larger than this is not ComfyUI's
KEEPALIVE_S = 30  # ping an idle websocket this often (what aiohttp's heartbeat did)


class WorkflowError(RuntimeError):
    pass


# ------------------------------------------------------------------ text from the server
_ESCAPES = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, clear screen
                      r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window title, hyperlinks, clipboard
                      r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS, SOS, PM, APC strings
                      r"|\x1b.?")  # any other escape


def clean(text, one_line: bool = False) -> str:
    """Server text made safe for a terminal: escape sequences removed, then every control and
    bidirectional-format character (newlines and tabs kept unless one_line)."""
    text = _ESCAPES.sub("", str(text))
    if one_line:
        text = re.sub(r"[\n\r\t\v\f]", " ", text)
    keep = "" if one_line else "\n\t"
    text = "".join(ch for ch in text if ch in keep or unicodedata.category(ch) not in ("Cc", "Cf"))
    return " ".join(text.split()) if one_line else text


def apply_overrides(workflow: dict, sets: list[str]) -> dict:
    """`NODE.input=value` (value parsed as JSON when it can be: numbers, booleans, lists)."""
    wf = json.loads(json.dumps(workflow))
    for s in sets:
        key, sep, raw = s.partition("=")
        node, dot, name = key.partition(".")
        if not sep or not dot or node not in wf:
            raise WorkflowError(f"--set {s!r}: use NODE_ID.input=value with a node id of the workflow "
                                f"({', '.join(sorted(wf))})")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        wf[node].setdefault("inputs", {})[name] = value
    return wf


# ------------------------------------------------------------------ the run
def queue(server: str, workflow: dict, out_dir: str | None = None, timeout: float = 3600, log=print) -> dict:
    """Queue, follow, report -> {"prompt_id", "outputs": {node_id: {...}}, "files": [paths downloaded]}.
    log gets lines already cleaned of control characters."""
    if "nodes" in workflow and "links" in workflow:
        raise WorkflowError("this is a UI-format workflow (what the ComfyUI editor saves); queue the API-format "
                            "file (this pack's are in workflows/api/), or export one with 'Export (API)'")
    say = lambda s: log(clean(s))  # noqa: E731
    server = server.rstrip("/")
    if urllib.parse.urlsplit(server).scheme not in ("http", "https"):
        raise WorkflowError(f"--server {server!r}: give an http:// or https:// address, e.g. http://127.0.0.1:8188")
    deadline = time.monotonic() + timeout
    client_id, prompt_id = str(uuid.uuid4()), str(uuid.uuid4())
    ws_url = server.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
    with WebSocket(ws_url, timeout=min(timeout, 60)) as ws:  # before queueing: no message is missed
        status, body = _request(server, "/prompt", {"prompt": workflow, "client_id": client_id,
                                                     "prompt_id": prompt_id}, timeout=min(timeout, 120))
        if status != 200:
            raise WorkflowError(_rejection(status, body))
        _follow(ws, prompt_id, workflow, say, deadline, timeout)
    entry = _history(server, prompt_id)
    files = []
    for node_id, out in entry.get("outputs", {}).items():
        for text in out.get("text", []):
            say(f"[{node_id} {workflow.get(node_id, {}).get('class_type', '')}]\n{text}")
        for item in [f for k in ("images", "gifs", "videos", "audio") for f in out.get(k, [])]:
            if out_dir and isinstance(item, dict) and "filename" in item:
                files.append(download(server, item, out_dir))
                say(f"[{node_id}] saved {files[-1]}")
    return {"prompt_id": prompt_id, "outputs": entry.get("outputs", {}), "files": files}


async def run(server: str, workflow: dict, out_dir: str | None = None, timeout: float = 3600, log=print) -> dict:
    """queue() for asyncio callers (`asyncio.run(client.run(...))`); it blocks the loop while it runs."""
    return queue(server, workflow, out_dir, timeout, log)


def _follow(ws, prompt_id, workflow, say, deadline, timeout):
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the workflow did not finish within {timeout:g} s (--timeout)")
        msg = ws.recv(min(left, KEEPALIVE_S))
        if msg is None:
            raise WorkflowError("the server closed the websocket before the workflow finished")
        if msg is WebSocket.IDLE or not isinstance(msg, str):
            continue  # nothing for a while (a ping went out), or a binary preview
        try:
            m = json.loads(msg)
        except json.JSONDecodeError:
            continue
        d = m.get("data") if isinstance(m, dict) else None
        if not isinstance(d, dict) or d.get("prompt_id") != prompt_id:
            continue  # other clients' work, and status broadcasts
        kind = m.get("type")
        if kind == "executing" and d.get("node") is not None:
            node = d["node"]
            say(f"running {node} ({workflow.get(str(node), {}).get('class_type', '?')})")
        elif kind == "progress":
            say(f"  {d.get('node')}: {d.get('value')}/{d.get('max')}")
        elif kind == "execution_error":
            raise WorkflowError(f"node {d.get('node_id')} ({d.get('node_type')}) failed: "
                                f"{d.get('exception_type')}: {d.get('exception_message')}")
        elif kind == "execution_interrupted":
            raise WorkflowError(f"interrupted at node {d.get('node_id')}")
        elif kind == "execution_success" or (kind == "executing" and d.get("node") is None):
            return


def _history(server, prompt_id, tries=50):
    """The history entry is written just after the last websocket message: wait for it briefly."""
    for _ in range(tries):
        status, h = _request(server, f"/history/{urllib.parse.quote(prompt_id)}")
        if status != 200 or not isinstance(h, dict):
            raise WorkflowError(f"GET /history answered HTTP {status}: {str(h)[:200]}")
        if prompt_id in h:
            return h[prompt_id]
        time.sleep(0.1)
    raise WorkflowError(f"prompt {prompt_id} finished but is not in the server's history")


def _rejection(status, body) -> str:
    if not isinstance(body, dict):
        return f"the server rejected the workflow (HTTP {status}): {str(body)[:300]}"
    err = body.get("error")
    lines = [f"the server rejected the workflow: {err.get('message', err) if isinstance(err, dict) else body}"]
    for node_id, e in (body.get("node_errors") or {}).items():
        for er in (e.get("errors", []) if isinstance(e, dict) else []):
            lines.append(f"node {node_id} ({e.get('class_type')}): {er.get('message')} {er.get('details', '')}")
    return "; ".join(lines)


# ------------------------------------------------------------------ HTTP (urllib)
def _request(server: str, path: str, payload=None, timeout: float = 60):
    """GET (or POST payload as JSON) -> (status, parsed JSON or the text when it is not JSON)."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(server + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read(MAX_MESSAGE)
    except urllib.error.HTTPError as e:  # 4xx/5xx: ComfyUI puts its reasons in the body
        status, raw = e.code, e.read(MAX_MESSAGE)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def safe_name(filename) -> str:
    """The last part of a server-given file name; refused when empty, '.', '..' or holding control characters."""
    name = re.split(r"[\\/]", str(filename))[-1]
    if name in ("", ".", "..") or clean(name, one_line=True) != name or len(name.encode()) > 255:
        raise WorkflowError(f"the server sent an unusable file name {clean(repr(filename), True)}")
    return name


def download(server: str, item: dict, out_dir: str, timeout: float = 600) -> str:
    """GET /view of one output into out_dir: HTTP status and length checked, streamed in chunks into a
    new temp file (O_EXCL | O_NOFOLLOW), renamed over the target only if that is absent or a regular file."""
    name = safe_name(item["filename"])
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise WorkflowError(f"{path} is {kind}: not replaced (remove it or choose another --out)")
    params = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                     "type": item.get("type", "output")})
    try:
        r = urllib.request.urlopen(f"{server}/view?{params}", timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        raise WorkflowError(f"downloading {name}: the server answered HTTP {e.code} {clean(e.reason, True)}; "
                            "nothing saved") from None
    tmp = os.path.join(out_dir, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o644)
    done = False
    try:
        with r, os.fdopen(fd, "wb") as f:
            if r.status != 200:
                raise WorkflowError(f"downloading {name}: the server answered HTTP {r.status}; nothing saved")
            size = 0
            while chunk := r.read(CHUNK):
                f.write(chunk)
                size += len(chunk)
            want = r.headers.get("Content-Length")
            if want is not None and want.isdigit() and int(want) != size:
                raise WorkflowError(f"downloading {name}: got {size} of {want} bytes (connection cut); nothing saved")
        os.replace(tmp, path)  # replaces a directory entry; a link planted meanwhile is replaced, not followed
        done = True
    finally:
        if not done:
            try:
                os.remove(tmp)
            except OSError:
                pass
    return path


# ------------------------------------------------------------------ websocket (RFC 6455, client side)
class WebSocket:
    """The little of a websocket client ComfyUI's /ws needs: connect, receive text/binary messages
    (fragments joined, pings answered), ping when idle, close. No extensions, no compression."""

    IDLE = object()  # recv(): nothing arrived within the wait

    def __init__(self, url: str, timeout: float = 60):
        u = urllib.parse.urlsplit(url)
        secure = u.scheme == "wss"
        port = u.port or (443 if secure else 80)
        self.buf = bytearray()
        self.parts: list[bytes] = []
        self.opcode = 0
        try:
            sock = socket.create_connection((u.hostname, port), timeout=timeout)
        except OSError as e:
            raise ConnectionError(f"cannot reach the server at {u.hostname}:{port}: {e.strerror or e} "
                                  "(is ComfyUI running there? --server)") from None
        if secure:
            import ssl

            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        self.sock = sock
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        host = u.hostname if u.port is None else f"{u.hostname}:{u.port}"
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > 65536:
                raise WorkflowError("the server's websocket handshake is too long")
            self._fill(len(self.buf) + 1)
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        if lines[0].split(" ")[1:2] != ["101"] or headers.get("sec-websocket-accept") != accept.decode():
            self.close()
            raise WorkflowError(f"{url}: not a websocket (the server answered {clean(lines[0], True)!r}); "
                                "is this a ComfyUI server?")

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def _fill(self, n: int) -> None:
        """Until the buffer holds n bytes; a timeout leaves what arrived in the buffer."""
        while len(self.buf) < n:
            data = self.sock.recv(max(65536, n - len(self.buf)))
            if not data:
                raise EOFError
            self.buf += data

    def _frame(self):
        """(fin, opcode, payload) of the next whole frame; raises socket.timeout with the buffer intact."""
        self._fill(2)
        b0, b1 = self.buf[0], self.buf[1]
        n, at = b1 & 0x7F, 2
        if n == 126:
            self._fill(4)
            n, at = struct.unpack(">H", self.buf[2:4])[0], 4
        elif n == 127:
            self._fill(10)
            n, at = struct.unpack(">Q", self.buf[2:10])[0], 10
        if n > MAX_MESSAGE:
            raise WorkflowError(f"the server sent a websocket message of {n} bytes")
        mask = b""
        if b1 & 0x80:  # servers do not mask; accept it anyway
            self._fill(at + 4)
            mask, at = bytes(self.buf[at:at + 4]), at + 4
        self._fill(at + n)
        payload = bytes(self.buf[at:at + n])
        del self.buf[:at + n]
        if mask:
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)  # a client masks every frame
        n = len(payload)
        head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
        self.sock.sendall(head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))

    def recv(self, wait: float):
        """The next message (str for text, bytes for binary), None once the server closed, IDLE if
        nothing came within wait seconds (a ping is sent then, to keep the connection alive)."""
        self.sock.settimeout(wait)
        while True:
            try:
                fin, op, payload = self._frame()
            except socket.timeout:
                if not self.buf:
                    self._send(0x9)
                return self.IDLE
            except (EOFError, ConnectionError):
                return None
            if op == 0x8:  # close
                return None
            if op == 0x9:  # ping
                self._send(0xA, payload)
                continue
            if op == 0xA:  # pong
                continue
            if op in (0x1, 0x2):
                self.opcode, self.parts = op, []
            self.parts.append(payload)
            if sum(map(len, self.parts)) > MAX_MESSAGE:
                raise WorkflowError("the server sent an oversized websocket message")
            if fin:
                data = b"".join(self.parts)
                self.parts = []
                return data.decode("utf-8", "replace") if self.opcode == 0x1 else data

    def close(self) -> None:
        try:
            self._send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------------------------ command line
def _positive(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{s}: must be a number of seconds > 0")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (`{self.prog} -h` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="liteffn-queue", description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", help="API-format workflow JSON (this pack's are in workflows/api/)")
    ap.add_argument("--server", default="http://127.0.0.1:8188",
                    help="the ComfyUI server's address (default http://127.0.0.1:8188)")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.input=value",
                    help="set one input of one node before queueing, e.g. 3.seed=42 or 6.text=\"a red fox\" "
                         "(value read as JSON when it parses: numbers, true/false, lists); repeatable")
    ap.add_argument("--out", help="download the images/videos the workflow outputs into this folder")
    ap.add_argument("--timeout", type=_positive, default=3600,
                    help="seconds the workflow may take, queueing to last output (default 3600)")
    ap.add_argument("--debug", action="store_true", help="on failure, print the Python traceback as well")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:  # -h (0), or a usage error argparse has printed (2)
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    try:
        try:
            with open(a.workflow, encoding="utf-8") as f:
                wf = json.load(f)
        except json.JSONDecodeError as e:
            raise WorkflowError(f"{a.workflow} is not JSON ({e}); give an API-format workflow") from None
        if not isinstance(wf, dict):
            raise WorkflowError(f"{a.workflow} is not a workflow (a JSON object of nodes)")
        result = queue(a.server, apply_overrides(wf, a.set), a.out, a.timeout)
    except KeyboardInterrupt:
        print("\nliteffn-queue: interrupted (the workflow may still run on the server: ComfyUI's Cancel stops it)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001: every failure is one line; --debug shows where
        if a.debug:
            import traceback

            traceback.print_exc()
        if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
            text = f"cannot reach the server at {a.server}: {e.reason} (is ComfyUI running there? --server)"
        elif isinstance(e, OSError) and e.strerror:
            text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
        elif isinstance(e, (WorkflowError, OSError, ValueError)):
            text = str(e) or type(e).__name__
        else:
            text = f"{type(e).__name__}: {e}" + ("" if a.debug else " (unexpected; run with --debug for the traceback)")
        print(f"liteffn-queue: error: {clean(text, one_line=True)}", file=sys.stderr)
        return EXIT_ERROR
    print(f"done: prompt {result['prompt_id']}, {len(result['outputs'])} output node(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
