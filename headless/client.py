"""Queue an API-format workflow on a running ComfyUI, follow it over the websocket, report outputs.

    python -m liteffn.headless.client workflow_api.json --server http://127.0.0.1:8188 \
        --set 3.seed=42 --set 6.text="a red fox" --out results/
    (or: python custom_nodes/ComfyUI-LiteFFN/headless/client.py ...)

Prints progress per node, the outputs each output node recorded in /history (texts, and the
files it saved or previewed, downloaded into --out), and exits non-zero with ComfyUI's own
message when the server rejects the workflow or a node fails. Needs aiohttp (ComfyUI's).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid


class WorkflowError(RuntimeError):
    pass


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


async def run(server: str, workflow: dict, out_dir: str | None = None, timeout: float = 3600, log=print) -> dict:
    """-> {"prompt_id", "outputs": {node_id: {...}}, "files": [paths downloaded]}."""
    if "nodes" in workflow and "links" in workflow:
        raise WorkflowError("this is a UI-format workflow (what the ComfyUI editor saves); queue the API-format "
                            "file (this pack's are in workflows/api/), or export one with 'Export (API)'")
    import aiohttp

    server = server.rstrip("/")
    client_id, prompt_id = str(uuid.uuid4()), str(uuid.uuid4())
    ws_url = server.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url, heartbeat=30) as ws:  # before queueing: no message is missed
            async with session.post(f"{server}/prompt", json={"prompt": workflow, "client_id": client_id,
                                                               "prompt_id": prompt_id}) as r:
                body = await r.json(content_type=None)
                if r.status != 200:
                    raise WorkflowError(_rejection(body))
            await asyncio.wait_for(_follow(ws, prompt_id, workflow, log), timeout)
        entry = await _history(session, server, prompt_id)
        files = []
        for node_id, out in entry.get("outputs", {}).items():
            for text in out.get("text", []):
                log(f"[{node_id} {workflow.get(node_id, {}).get('class_type', '')}]\n{text}")
            for item in [f for k in ("images", "gifs", "videos", "audio") for f in out.get(k, [])]:
                if out_dir and isinstance(item, dict) and "filename" in item:
                    files.append(await _download(session, server, item, out_dir))
                    log(f"[{node_id}] saved {files[-1]}")
        return {"prompt_id": prompt_id, "outputs": entry.get("outputs", {}), "files": files}


async def _follow(ws, prompt_id, workflow, log):
    import aiohttp

    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue  # binary messages are previews
        m = json.loads(msg.data)
        d = m.get("data", {})
        if d.get("prompt_id") != prompt_id:
            continue  # other clients' work, and status broadcasts
        kind = m.get("type")
        if kind == "executing" and d.get("node") is not None:
            log(f"running {d['node']} ({workflow.get(d['node'], {}).get('class_type', '?')})")
        elif kind == "progress":
            log(f"  {d.get('node')}: {d.get('value')}/{d.get('max')}")
        elif kind == "execution_error":
            raise WorkflowError(f"node {d.get('node_id')} ({d.get('node_type')}) failed: "
                                f"{d.get('exception_type')}: {d.get('exception_message')}")
        elif kind == "execution_interrupted":
            raise WorkflowError(f"interrupted at node {d.get('node_id')}")
        elif kind == "execution_success" or (kind == "executing" and d.get("node") is None):
            return
    raise WorkflowError("the server closed the websocket before the workflow finished")


async def _history(session, server, prompt_id, tries=50):
    """The history entry is written just after the last websocket message: wait for it briefly."""
    for _ in range(tries):
        async with session.get(f"{server}/history/{prompt_id}") as r:
            h = await r.json()
        if prompt_id in h:
            return h[prompt_id]
        await asyncio.sleep(0.1)
    raise WorkflowError(f"prompt {prompt_id} finished but is not in the server's history")


def _rejection(body) -> str:
    if not isinstance(body, dict):
        return f"the server rejected the workflow: {body}"
    lines = [f"the server rejected the workflow: {body.get('error', {}).get('message', body)}"]
    for node_id, e in (body.get("node_errors") or {}).items():
        for err in e.get("errors", []):
            lines.append(f"  node {node_id} ({e.get('class_type')}): {err.get('message')} {err.get('details', '')}")
    return "\n".join(lines)


async def _download(session, server, item, out_dir) -> str:
    os.makedirs(out_dir, exist_ok=True)
    params = {"filename": item["filename"], "subfolder": item.get("subfolder", ""), "type": item.get("type", "output")}
    async with session.get(f"{server}/view", params=params) as r:
        data = await r.read()
    path = os.path.join(out_dir, os.path.basename(item["filename"]))
    with open(path, "wb") as f:
        f.write(data)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="liteffn-queue", description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", help="API-format workflow JSON")
    ap.add_argument("--server", default="http://127.0.0.1:8188")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.input=value")
    ap.add_argument("--out", help="download the images/videos the workflow outputs into this folder")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds (default 3600)")
    a = ap.parse_args(argv)
    try:
        with open(a.workflow) as f:
            wf = apply_overrides(json.load(f), a.set)
        result = asyncio.run(run(a.server, wf, a.out, a.timeout))
    except (WorkflowError, OSError, json.JSONDecodeError, asyncio.TimeoutError) as e:
        print(f"liteffn-queue: error: {e or 'timed out'}", file=sys.stderr)
        return 2
    print(f"done: prompt {result['prompt_id']}, {len(result['outputs'])} output node(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
