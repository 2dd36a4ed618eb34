"""Drive ComfyUI's real web frontend (the `comfyui-frontend-package` a ComfyUI server serves) in
headless Chromium with Playwright, load a UI-format workflow into it the way the Templates browser
does, and report what a user would see: the missing-nodes / missing-models / error overlay, error
dialogs, error toasts, page errors, and the graph the frontend built.

Written against frontend 1.43 (ComfyUI 0.22). In this frontend missing nodes and missing models are
no longer a modal dialog: `app.loadGraphData` puts them in the pinia stores `missingNodesError` and
`missingModel` and opens the *error overlay* (components/error/ErrorOverlay.vue): a card
`[data-testid="error-overlay"]` (role="alert") at the top right, "1 ERROR", one line per kind of
problem ("Some nodes are missing and need to be installed", "2 required models are missing") and a
"Show missing nodes" / "Show missing models" / "See Errors" button that opens the Errors tab of the
right side panel. Exceptions while loading go to the global PrimeVue dialog (`.p-dialog.global-dialog`
with key "global-error", content `[data-testid="error-dialog"]`); other problems go to PrimeVue toasts
(`.p-toast-message-<severity>`).

Frontend 1.49 (ComfyUI 0.33): the overlay (role="status") only counts several problems ("2 errors found /
Resolve them before running the workflow. / View details"), and dialogs use Reka (`[role="dialog"]`,
aria-labelledby = the dialog key) instead of PrimeVue. In both, the overlay's button
(`error-overlay-see-errors`) opens the Errors tab, one group per kind of problem
(`[data-testid="error-group-<kind>"]`: missing-node, missing-model, missing-media, swap-nodes, execution):
the load opens it and the detector reads the kinds there as well as from the overlay's lines.

Running from the browser (Frontend.run): the Run button of the action bar (`[data-testid="queue-button"]`, both
frontends) queues the open graph (POST /api/prompt with the page's client id); the server's websocket messages
reach the page as `app.api` events (execution_start / executed / execution_success / execution_error), and
`executed` fills the Preview as Text (PreviewAny) node's `preview_text` widget: in 1.43 a textarea DOM widget (with
a hidden `preview_markdown` twin), in 1.49 a Vue "textPreview" widget drawn as a textarea over the canvas.

The graph: `window.app` is the ComfyApp; `app.rootGraph` (also `app.graph` and `window.graph` while
the canvas shows the root) is the litegraph LGraph with `.nodes`; subgraph definitions are
`app.rootGraph.subgraphs` (a Map id -> Subgraph with its own `.nodes`). Unknown node types become
placeholder LGraphNodes (`has_errors`, type not in `LiteGraph.registered_node_types`). The pinia
stores are reachable through `#vue-app.__vue_app__.config.globalProperties.$pinia`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import urllib.parse
import urllib.request
from collections import Counter

PACK = "ComfyUI-LiteFFN"  # the folder name in custom_nodes/, also the Templates browser's "module"

MISSING_NODES_TEXT = "Some nodes are missing"      # errorOverlay.missingNodes (en)
MISSING_MODELS_TEXT = "required model"             # errorOverlay.missingModels: "{n} required model(s) is/are missing"

# Settings of a fresh ComfyUI user that would open popups over the graph.
SETTINGS = {
    "Comfy.TutorialCompleted": True,            # else: blank graph + the Templates browser dialog on first run
    "Comfy.RightSidePanel.ShowErrorsTab": True,  # the default; the error overlay is only shown with it
    "Comfy.Validation.Workflows": True,         # the default; validate (and repair) workflows as users get it
    # For the screenshots only: node text drawn at any zoom (big graphs are fitted at ~30 %), no minimap.
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Minimap.Visible": False,
}


def chromium_executable() -> str | None:
    """$CHROMIUM, else Debian's Chromium. Playwright's own browser downloads are not used."""
    for path in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


# ---------------------------------------------------------------------------------------------
# The workflow file side


def subgraph_definitions(workflow: dict) -> dict[str, dict]:
    """All subgraph definitions of a UI-format workflow (nested ones included), by id."""
    found: dict[str, dict] = {}
    stack = list(workflow.get("definitions", {}).get("subgraphs", []))
    while stack:
        sg = stack.pop()
        if sg.get("id") not in found:
            found[sg["id"]] = sg
            stack.extend(sg.get("definitions", {}).get("subgraphs", []))
    return found


def node_types(workflow: dict) -> dict[str, Counter]:
    """Node types per graph: "root" and each subgraph id -> Counter(type)."""
    graphs = {"root": Counter(str(n["type"]) for n in workflow.get("nodes", []))}
    for sid, sg in subgraph_definitions(workflow).items():
        graphs[sid] = Counter(str(n["type"]) for n in sg.get("nodes", []))
    return graphs


def prepare_user(url: str, settings: dict = SETTINGS) -> None:
    """Store the settings of the server's default user (POST /api/settings), as if the user had
    closed the first-run popups once."""
    req = urllib.request.Request(url + "/api/settings", data=json.dumps(settings).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200, r.status


# ---------------------------------------------------------------------------------------------
# The browser side

# Runs in every page before the frontend: records each overlay / dialog / toast the frontend shows,
# with its text, even the ones that go away by themselves (toasts have a life time).
RECORDER = r"""
(() => {
  const KINDS = [
    ['overlay', '[data-testid="error-overlay"]'],
    ['dialog', '.p-dialog, [role="dialog"], [role="alertdialog"]'],  // PrimeVue (1.43), Reka (1.49)
    ['panel', '[data-testid^="error-group-"]'],  // the Errors tab's groups, one per kind of problem
    ['toast', '.p-toast-message'],
    ['legacy-dialog', '.comfy-modal'],
  ];
  const rec = window.__liteffnUi = { seen: [] };
  const known = new Map();
  const visible = (el) => el.isConnected && !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length)
    && getComputedStyle(el).visibility !== 'hidden';
  let queued = false;
  const scan = () => {
    queued = false;
    for (const [kind, sel] of KINDS) {
      for (const el of document.querySelectorAll(sel)) {
        if (!visible(el)) continue;
        let e = known.get(el);
        if (!e) {
          e = { kind, t: performance.now(), text: '', cls: String(el.className || ''),
                key: el.getAttribute('aria-labelledby') || '',
                testid: (kind === 'panel' ? el : el.querySelector('[data-testid]'))?.dataset.testid || '' };
          const sev = /p-toast-message-(\w+)/.exec(e.cls);
          if (sev) e.severity = sev[1];
          known.set(el, e);
          rec.seen.push(e);
        }
        const text = (el.innerText || '').trim();
        if (text.length >= e.text.length) e.text = text;
      }
    }
  };
  rec.scan = scan;
  new MutationObserver(() => { if (!queued) { queued = true; setTimeout(scan, 20); } })
    .observe(document, { childList: true, subtree: true, characterData: true, attributes: true,
                         attributeFilter: ['style', 'class'] });
})();
"""

# The app is up: node definitions from /object_info registered, the startup workflow open.
READY = """() => !!(window.app && app.vueAppReady && app.rootGraph && window.LiteGraph
  && Object.keys(LiteGraph.registered_node_types).length > 100
  && app.extensionManager?.workflow?.activeWorkflow)"""

STORES = """() => {
  const pinia = document.getElementById('vue-app')?.__vue_app__?.config.globalProperties.$pinia;
  return pinia ? pinia._s : new Map();
}"""

# What `useTemplateWorkflows().loadWorkflowTemplate(name, module)` does when a user clicks a template
# in the Templates browser (or opens /?template=<name>&source=<module>): fetch the JSON from the
# server, close the dialog, `app.loadGraphData(json, true, true, name, {openSource: 'template'})`.
LOAD = """async ({module, name}) => {
  const url = module === 'default' ? app.api.fileURL(`/templates/${name}.json`)
                                   : app.api.apiURL(`/workflow_templates/${module}/${name}.json`);
  const res = await fetch(url);
  if (!res.ok) return {error: `GET ${url}: HTTP ${res.status}`};
  const json = await res.json();
  try {
    (%s)().get('dialog')?.closeDialog();
    await app.loadGraphData(json, true, true, name, {openSource: 'template'});
  } catch (error) {  // loadWorkflowTemplate catches it the same way (and the load silently stops)
    console.error('Error loading workflow template:', error);
    return {url, threw: String(error && error.stack || error)};
  }
  return {url};
}""" % STORES

# Close the right side panel (1.43 and 1.49: the pinia store `rightSidePanel`) -> whether it was open.
CLOSE_PANEL = """() => {
  const panel = (%s)().get('rightSidePanel');
  if (!panel?.isOpen) return false;
  panel.closePanel();
  return true;
}""" % STORES

# What the frontend shows and holds after the load.
STATE = """() => {
  window.__liteffnUi.scan();
  const stores = (%s)();
  const nodes = (g) => g.nodes.map((n) => ({id: n.id, type: String(n.type), title: n.title,
    has_errors: !!n.has_errors, subgraph: !!n.isSubgraphNode?.(),
    registered: String(n.type) in LiteGraph.registered_node_types}));
  const g = app.rootGraph;
  const missingNodes = stores.get('missingNodesError')?.missingNodesError;
  const missingModels = stores.get('missingModel')?.missingModelCandidates;
  const missingMedia = stores.get('missingMedia')?.missingMediaCandidates;
  return {
    graphs: {root: nodes(g), ...Object.fromEntries([...g.subgraphs].map(([id, sg]) => [id, nodes(sg)]))},
    ui: window.__liteffnUi.seen,
    missing_node_types: (missingNodes?.nodeTypes || []).map((t) => typeof t === 'string' ? t : t.type),
    missing_models: (missingModels || []).map((m) => `${m.directory ?? '?'}/${m.name}`),
    missing_media: (missingMedia || []).map((m) => `${m.nodeType ?? ''}:${m.name ?? ''}`),
    workflow: app.extensionManager.workflow.activeWorkflow?.path,
    stores_found: ['missingNodesError', 'missingModel', 'missingMedia', 'executionError'].filter((k) => stores.has(k)),
  };
}""" % STORES


# ---------------------------------------------------------------------------------------------
# Running a workflow from the browser

# Set widget values as a user types them: {node type: {widget name: value}} on every node of that type
# (subgraphs included); the widget's callback runs as after an edit. -> ["<id>.<name>=<value>", ...] and
# "<id>.<name>: no such widget" for a name the node does not have.
SET_INPUTS = """(inputs) => {
  const done = [];
  const graphs = [app.rootGraph, ...(app.rootGraph.subgraphs ? app.rootGraph.subgraphs.values() : [])];
  for (const g of graphs) for (const n of g.nodes) {
    const want = inputs[String(n.type)];
    if (!want) continue;
    for (const [name, value] of Object.entries(want)) {
      const w = (n.widgets || []).find((w) => w.name === name);
      if (!w) { done.push(`${n.id}.${name}: no such widget`); continue; }
      w.value = value;
      w.callback?.(w.value, app.canvas, n);
      done.push(`${n.id}.${name}=${w.value}`);
    }
  }
  app.canvas.setDirty(true, true);
  return done;
}"""

# The end of each prompt as the page sees it: the websocket events the frontend's api dispatches.
LISTEN = """() => {
  const run = window.__liteffnRun = {end: {}, events: []};
  for (const type of ['execution_start', 'execution_success', 'execution_error', 'execution_interrupted']) {
    app.api.addEventListener(type, (e) => {
      const d = e.detail || {};
      run.events.push({type, prompt_id: d.prompt_id, t: performance.now()});
      if (type !== 'execution_start') run.end[d.prompt_id] = {type, detail: JSON.stringify(d).slice(0, 4000)};
    });
  }
}"""

# Each Preview as Text node (PreviewAny), the node feeding it and the text its `preview_text` widget holds
# (1.43: a textarea DOM widget, with a hidden `preview_markdown` twin; 1.49: a Vue textPreview widget).
PREVIEWS = """() => {
  const out = [];
  const graphs = [app.rootGraph, ...(app.rootGraph.subgraphs ? app.rootGraph.subgraphs.values() : [])];
  for (const g of graphs) for (const n of g.nodes) {
    if (String(n.type) !== 'PreviewAny') continue;
    const src = n.getInputNode?.(0);
    const w = (n.widgets || []).find((w) => w.name === 'preview_text');
    out.push({id: String(n.id), title: n.title, graph: g === app.rootGraph ? 'root' : String(g.id),
              source_id: src ? String(src.id) : null, source_type: src ? String(src.type) : null,
              source_title: src ? src.title : null,
              widget: w ? String(w.type) : null,
              text: w ? (typeof w.value === 'string' ? w.value : String(w.value ?? '')) : ''});
  }
  return out;
}"""

# The graph's extent (nodes with their titles, and groups), or that of the nodes `ids`: [x0, y0, x1, y1].
BOUNDS = """(ids) => {
  const g = app.rootGraph;
  const boxes = [];
  for (const n of g.nodes) {
    if (ids && !ids.includes(String(n.id))) continue;
    const b = n.getBounding ? Array.from(n.getBounding()) : [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
                                                             n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT];
    boxes.push(b);
  }
  if (!ids) for (const gr of g.groups || []) boxes.push(Array.from(gr._bounding || gr.boundingRect || gr.bounding));
  if (!boxes.length) return null;
  return [Math.min(...boxes.map((b) => b[0])), Math.min(...boxes.map((b) => b[1])),
          Math.max(...boxes.map((b) => b[0] + b[2])), Math.max(...boxes.map((b) => b[1] + b[3]))];
}"""

# Show graph point (x, y) at screen point (sx, sy) of the page at `scale`.
VIEW = """([scale, x, y, sx, sy]) => {
  const ds = app.canvas.ds, c = app.canvas.canvas.getBoundingClientRect();
  ds.scale = scale;
  ds.offset[0] = (sx - c.x) / scale - x;
  ds.offset[1] = (sy - c.y) / scale - y;
  app.canvas.setDirty(true, true);
  return [ds.scale, ds.offset[0], ds.offset[1]];
}"""

# The visible textareas inside each node `ids` on screen: what the page shows in its text widgets, and
# what covers each (the element on top at its centre and at 4 inner points, when not the textarea itself:
# another DOM widget such as a video preview drawn over it).
DOM_TEXTS = """(ids) => {
  const ds = app.canvas.ds, c = app.canvas.canvas.getBoundingClientRect();
  const shown = (el) => { const s = getComputedStyle(el); const r = el.getBoundingClientRect();
    return el.isConnected && r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none'
      && Number(s.opacity) > 0 && r.right > 0 && r.bottom > 0 && r.left < innerWidth && r.top < innerHeight; };
  const areas = [...document.querySelectorAll('textarea')].filter(shown).map((t) => [t, t.getBoundingClientRect()]);
  const name = (el) => !el ? 'nothing'
    : `${el.tagName.toLowerCase()}.${String(el.className || '').split(' ').slice(0, 3).join('.')}`;
  const out = {};
  for (const id of ids) {
    const n = app.rootGraph.getNodeById(id);
    if (!n) { out[id] = null; continue; }
    const x0 = c.x + (n.pos[0] + ds.offset[0]) * ds.scale, y0 = c.y + (n.pos[1] + ds.offset[1]) * ds.scale;
    const x1 = x0 + n.size[0] * ds.scale, y1 = y0 + n.size[1] * ds.scale;
    out[id] = areas.filter(([, r]) => { const cx = r.x + r.width / 2, cy = r.y + r.height / 2;
                                         return cx >= x0 && cx <= x1 && cy >= y0 && cy <= y1; })
      .map(([t, r]) => {
        const points = [[0.5, 0.5], [0.1, 0.1], [0.9, 0.1], [0.1, 0.9], [0.9, 0.9]].map(([fx, fy]) =>
          [Math.min(innerWidth - 1, r.x + fx * r.width), Math.min(innerHeight - 1, r.y + fy * r.height)]);
        const covered = points.map(([x, y]) => document.elementFromPoint(x, y))
          .filter((el) => !(el && (el === t || t.contains(el)))).map(name);
        return {value: t.value, covered: [...new Set(covered)], center_covered: covered.length > 0
          && !(() => { const el = document.elementFromPoint(...points[0]); return el === t || t.contains(el); })()};
      });
  }
  return out;
}"""

# Nodes whose box (title included) overlaps that of a node `ids` by 10 px or more after the run (a video preview
# makes its node taller): [[id, title, other id, other title], ...].
OVERLAPS = """(ids) => {
  const g = app.rootGraph;
  const box = (n) => n.getBounding ? Array.from(n.getBounding())
    : [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT];
  const out = [];
  for (const id of ids) {
    const a = g.getNodeById(id); if (!a) continue;
    const [ax, ay, aw, ah] = box(a);
    for (const b of g.nodes) {
      if (b === a || ids.includes(String(b.id)) && String(b.id) < String(id)) continue;
      const [bx, by, bw, bh] = box(b);
      if (bx < ax + aw - 10 && ax < bx + bw - 10 && by < ay + ah - 10 && ay < by + bh - 10)  // 10: not a title's edge
        out.push([String(a.id), a.title, String(b.id), b.title]);
    }
  }
  return out;
}"""

# Room the frontend's own bars take on the canvas in a screenshot: the sidebar at the left, the tabs and the
# action bar at the top, the zoom controls at the bottom (px).
MARGINS = {"left": 80, "top": 110, "right": 30, "bottom": 70}
MAX_VIEWPORT = (2560, 2560)  # a screenshot's size at most: large graphs are drawn smaller
MIN_VIEWPORT = (1280, 720)


def _fit(page, ids, viewport, scale):
    """Size the page and set the canvas view so that the graph (ids None) or the nodes `ids` fill it at
    `scale`, or less where MAX_VIEWPORT would be exceeded. -> {"viewport", "scale", "bounds"}."""
    bounds = page.evaluate(BOUNDS, ids)
    if bounds is None:
        return {"viewport": [viewport["width"], viewport["height"]], "scale": None, "bounds": None}
    m = MARGINS
    bw, bh = bounds[2] - bounds[0], bounds[3] - bounds[1]
    fit = min(scale, (MAX_VIEWPORT[0] - m["left"] - m["right"]) / bw, (MAX_VIEWPORT[1] - m["top"] - m["bottom"]) / bh)
    w = max(MIN_VIEWPORT[0], int(bw * fit) + m["left"] + m["right"])
    h = max(MIN_VIEWPORT[1], int(bh * fit) + m["top"] + m["bottom"])
    page.set_viewport_size({"width": w, "height": h})
    _frames(page)
    page.wait_for_timeout(300)  # the canvas follows the window's size
    cx = m["left"] + (w - m["left"] - m["right"]) / 2
    cy = m["top"] + (h - m["top"] - m["bottom"]) / 2
    page.evaluate(VIEW, [fit, (bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2, cx, cy])
    _frames(page)
    page.wait_for_timeout(500)  # DOM widgets (the text boxes) follow the canvas on the next frames
    _frames(page)
    return {"viewport": [w, h], "scale": fit, "bounds": bounds}


FRAMES = "(n) => new Promise((r) => { const f = (k) => k ? requestAnimationFrame(() => f(k - 1)) : r(); f(n); })"


def _frames(page, n=2):
    """Wait until the page drew `n` frames."""
    page.evaluate(FRAMES, n)


def _screenshot(page, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    page.screenshot(path=path)
    copy_to = os.environ.get("LITEFFN_SCREENSHOT_DIR")
    if copy_to:
        os.makedirs(copy_to, exist_ok=True)
        shutil.copy(path, os.path.join(copy_to, os.path.basename(path)))
    return path


def compact_png(src: str, dst: str, colors: int = 256) -> str:
    """A copy of screenshot `src` at `dst` with a palette of `colors` (no dithering: flat UI colours and text stay
    sharp), about a third of the size; for the copies under docs/. Needs Pillow."""
    from PIL import Image

    with Image.open(src) as im:
        im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                   dither=Image.Dither.NONE).save(dst, optimize=True)
    return dst


def _json(response):
    try:
        body = response.json()
        return body if isinstance(body, dict) else {"body": body}
    except Exception:  # noqa: BLE001  (not JSON: keep the text for the message)
        return {"text": response.text()[:2000]}


def page_problems(page_errors, console) -> list[str]:
    """What the page itself reported (uncaught errors, console errors), as LoadResult and RunResult list it."""
    return ([f"page errors: {page_errors}"] if page_errors else []) + (
        [f"console errors: {console}"] if console else [])


class LoadResult:
    """What one workflow load showed. `problems()` lists what a user would call a failure."""

    def __init__(self, name, state, console, page_errors, warnings, elapsed, origin):
        self.name, self.state, self.page_errors = name, state, page_errors
        # This machine may be offline: requests the frontend makes to other hosts (the registry
        # api.comfy.org about a missing node, huggingface.co for a missing model's size) fail there
        # with net::ERR_*. Those follow from what the other checks report; they are not page errors.
        self.offline = [c for c in console if "net::ERR_" in c and not c.split(" @ ")[-1].startswith(origin)]
        self.console = [c for c in console if c not in self.offline]
        self.warnings, self.elapsed = warnings, elapsed
        self.screenshot, self.timing = None, {}
        ui = [e for e in state["ui"] if e["t"] >= state["mark"]]
        self.ui = ui
        overlays = [e["text"] for e in ui if e["kind"] == "overlay"]
        # Kinds of problem in the Errors tab (1.49's overlay only counts them when there are several)
        groups = self.error_groups = sorted({e["testid"].removeprefix("error-group-") for e in ui
                                             if e["kind"] == "panel"} - {"display-message"})
        self.missing_nodes_shown = "missing-node" in groups or any(MISSING_NODES_TEXT in t for t in overlays)
        self.missing_models_shown = "missing-model" in groups or any(MISSING_MODELS_TEXT in t for t in overlays)
        self.error_overlay = overlays
        self.error_dialogs = [e["text"] for e in ui if e["kind"] in ("dialog", "legacy-dialog")]
        self.error_toasts = [e["text"] for e in ui if e["kind"] == "toast" and e.get("severity") == "error"]
        # Warnings too: the frontend's workflow validation says "Invalid workflow against zod schema"
        # or "Workflow Validation ... Deleting link" in a warn toast, and then repairs or loads anyway.
        self.warn_toasts = [e["text"] for e in ui if e["kind"] == "toast" and e.get("severity") == "warn"]
        self.other_toasts = [(e.get("severity"), e["text"]) for e in ui
                             if e["kind"] == "toast" and e.get("severity") not in ("error", "warn")]

    @property
    def graphs(self) -> dict[str, Counter]:
        return {gid: Counter(n["type"] for n in nodes) for gid, nodes in self.state["graphs"].items()}

    @property
    def placeholder_nodes(self) -> list[str]:
        """Nodes of a type the frontend does not know (it keeps them as red placeholder nodes)."""
        return [f"{gid}:{n['id']} {n['type']}" for gid, nodes in self.state["graphs"].items() for n in nodes
                if not (n["registered"] or n["subgraph"])]

    @property
    def flagged_nodes(self) -> list[str]:
        """Nodes the frontend marked `has_errors` (drawn with a red outline: unknown type, missing model)."""
        return [f"{gid}:{n['id']} {n['type']}" for gid, nodes in self.state["graphs"].items() for n in nodes
                if n["has_errors"]]

    def problems(self) -> list[str]:
        out = [f"app.loadGraphData threw: {self.state['threw']}"] if self.state.get("threw") else []
        if self.missing_nodes_shown or self.state["missing_node_types"]:
            out.append(f"missing nodes {self.state['missing_node_types']} (overlay: {self.error_overlay})")
        if self.placeholder_nodes:
            out.append(f"nodes the frontend could not create: {self.placeholder_nodes}")
        if self.missing_models_shown or self.state["missing_models"]:
            out.append(f"missing models {self.state['missing_models']} (overlay: {self.error_overlay})")
        if self.error_overlay and not (self.missing_nodes_shown or self.missing_models_shown):
            out.append(f"error overlay: {self.error_overlay}")
        other = [g for g in self.error_groups if g not in ("missing-node", "missing-model")]
        if other:
            out.append(f"errors tab: {other}")
        if self.error_dialogs:
            out.append(f"dialogs: {self.error_dialogs}")
        if self.state["missing_media"]:
            out.append(f"missing inputs {self.state['missing_media']}")
        if self.error_toasts:
            out.append(f"error toasts: {self.error_toasts}")
        if self.warn_toasts:
            out.append(f"warning toasts: {self.warn_toasts}")
        return out + page_problems(self.page_errors, self.console)

    def summary(self) -> str:
        n = sum(sum(c.values()) for c in self.graphs.values())
        return (f"{self.name}: {n} nodes in {len(self.graphs)} graph(s), {self.elapsed:.1f} s "
                f"(app up {self.timing['app']:.1f} s, load {self.timing['load']:.1f} s), tab {self.state['workflow']}; "
                f"missing-nodes overlay {'SHOWN' if self.missing_nodes_shown else 'not shown'}, "
                f"missing-models overlay {'SHOWN' if self.missing_models_shown else 'not shown'}"
                + (f"; errors tab: {self.error_groups}" if self.error_groups else "")
                + (f" {self.state['missing_models']}" if self.state["missing_models"] else "")
                + (f"; problems: {self.problems()}" if self.problems() else "")
                + (f"; red nodes: {self.flagged_nodes}" if self.flagged_nodes else "")
                + (f"; {len(self.warnings)} console warnings: {self.warnings[:3]}" if self.warnings else "")
                + (f"; failed offline: {self.offline}" if self.offline else "")
                + (f"; other toasts: {self.other_toasts}" if self.other_toasts else ""))


class Frontend:
    """One headless Chromium for many workflows; each load gets its own browser context and page
    (fresh localStorage, so no workflow restored from an earlier page)."""

    def __init__(self, url: str, executable: str, viewport=(1920, 1080)):
        from playwright.sync_api import sync_playwright

        self.url, self.viewport = url, {"width": viewport[0], "height": viewport[1]}
        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except Exception:
            self._pw.stop()
            raise

    def close(self):
        try:
            self.browser.close()
        finally:
            self._pw.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def load(self, module: str, name: str, *, serve: dict | None = None, screenshot: str | None = None,
             timeout: float = 60) -> LoadResult:
        """Open the frontend in a new page, wait until it is up, then load template `name` of
        `module` (PACK: the server's /api/workflow_templates/<PACK>/<name>.json, i.e.
        custom_nodes/<PACK>/workflows/<name>.json; 'default': ComfyUI's own templates) as the
        Templates browser does. `serve`: a workflow dict the browser gets for that URL instead of
        asking the server (for workflows that are not files of the pack)."""
        with self._page(timeout) as page:
            result = self._load(page, module, name, serve=serve, timeout=timeout)
            if screenshot:
                result.screenshot = _screenshot(page, screenshot)
            return result

    @contextlib.contextmanager
    def _page(self, timeout: float):
        """A new browser context (fresh localStorage) and page, recording the console, page errors and the
        requests in flight (page.liteffn_log)."""
        ctx = self.browser.new_context(viewport=self.viewport)
        ctx.set_default_timeout(timeout * 1000)
        try:
            ctx.add_init_script(RECORDER)
            page = ctx.new_page()
            log = page.liteffn_log = {"console": [], "page_errors": [], "warnings": [], "inflight": set()}

            def on_console(m):
                if m.type in ("error", "warning"):
                    (log["console"] if m.type == "error" else log["warnings"]).append(
                        f"{m.text} @ {m.location.get('url', '')}")

            page.on("console", on_console)
            page.on("pageerror", lambda e: log["page_errors"].append(str(e)))
            page.on("request", lambda r: log["inflight"].add(r))
            page.on("requestfinished", lambda r: log["inflight"].discard(r))
            page.on("requestfailed", lambda r: log["inflight"].discard(r))
            yield page
        finally:
            ctx.close()

    def _load(self, page, module: str, name: str, *, serve: dict | None, timeout: float) -> LoadResult:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        log = page.liteffn_log
        console, page_errors, warnings, inflight = log["console"], log["page_errors"], log["warnings"], log["inflight"]
        if serve is not None:
            path = f"/api/workflow_templates/{module}/{name}.json"
            body = json.dumps(serve)
            page.route(f"**{path}", lambda route: route.fulfill(status=200, content_type="application/json",
                                                               body=body))
        t0 = time.monotonic()
        page.goto(self.url + "/")
        page.wait_for_function(READY, timeout=timeout * 1000)
        t_ready = time.monotonic()
        _quiet(page, inflight)
        # The startup graph (ComfyUI's default SD1.5 graph) has its own missing model; close its
        # overlay as a user would, so that what is shown afterwards comes from our load.
        dismiss = page.locator('[data-testid="error-overlay-dismiss"]')
        if dismiss.count():
            dismiss.first.click()
            page.locator('[data-testid="error-overlay"]').wait_for(state="hidden")
        # The right side panel stays open from an earlier page (its open state is a setting of the user: an earlier
        # load with problems opened its Errors tab); close it as the user would, so that it covers nothing now.
        if page.evaluate(CLOSE_PANEL):
            _frames(page)
        page.evaluate("1")  # deliver the console events so far, then start counting ours
        mark = page.evaluate("performance.now()")
        n_console, n_errors, n_warnings = len(console), len(page_errors), len(warnings)

        t_mark = time.monotonic()
        loaded = page.evaluate(LOAD, {"module": module, "name": name})
        t_loaded = time.monotonic()
        if "error" in loaded:
            raise AssertionError(f"{name}: {loaded['error']}")
        _quiet(page, inflight)  # the missing-model check finishes after a request (/api/folder_paths)
        _frames(page)
        page.wait_for_timeout(300)  # let the overlay's transition and the toasts render
        see = page.locator('[data-testid="error-overlay-see-errors"]')
        if see.count() and see.first.is_visible():  # what the overlay sums up: the Errors tab lists each kind
            see.first.click()
            try:
                page.locator('[data-testid^="error-group-"]').first.wait_for(timeout=10_000)
            except PlaywrightTimeout:  # no group: problems() still reports the overlay
                pass
            page.wait_for_timeout(300)
        state = page.evaluate(STATE)
        state["mark"] = mark
        state["threw"] = loaded.get("threw")
        result = LoadResult(name, state, console[n_console:], page_errors[n_errors:], warnings[n_warnings:],
                            time.monotonic() - t0, self.url)
        result.timing = {"app": t_ready - t0, "load": t_loaded - t_mark, "settle": time.monotonic() - t_loaded}
        return result

    def run(self, module: str, name: str, *, inputs: dict, text_sources: set[str], shots: dict[str, str] | None = None,
            fresh: bool = True, timeout: float = 1800, load_timeout: float = 60) -> RunResult:
        """Load template `name` as load() does, set widget values as a user would type them (`inputs`:
        {node type: {widget name: value}}), press the frontend's Run button (the queue button of the action
        bar), follow the prompt on the server (/api/history) and in the page (the websocket events the frontend
        got) until it ends, then read what each Preview as Text node fed by a node of type in `text_sources`
        shows. `shots`: {"all": path, "reports": path}: a screenshot of the whole graph, and a close-up of
        those preview nodes and their sources, each fitted into a viewport sized so that node text stays
        readable. Needs a clean load: when the load shows problems, nothing is queued (RunResult.loaded).
        `fresh`: first empty the server's execution cache and unload its models (POST /api/free, what the
        frontend's "Unload models and execution cache" does), so that every node runs again rather than
        answering from the outputs of an earlier run of the same graph."""
        with self._page(load_timeout) as page:
            loaded = self._load(page, module, name, serve=None, timeout=load_timeout)
            res = RunResult(name, loaded)
            if loaded.problems():
                return res
            log = page.liteffn_log
            mark = page.evaluate("performance.now()")
            n_console, n_errors = len(log["console"]), len(log["page_errors"])
            res.inputs_set = page.evaluate(SET_INPUTS, inputs)
            page.evaluate(LISTEN)
            if fresh:
                req = urllib.request.Request(self.url + "/api/free", method="POST",
                                             data=json.dumps({"unload_models": True, "free_memory": True}).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as r:
                    assert r.status == 200, r.status
                page.wait_for_timeout(2000)  # the server's prompt worker wakes up and clears its cache
            t0 = time.monotonic()
            button = page.locator('[data-testid="queue-button"]')  # 1.43 and 1.49: the Run button of the action bar
            with page.expect_response(lambda r: r.request.method == "POST" and r.url.split("?")[0].endswith("/prompt"),
                                      timeout=60_000) as posted:
                if button.count() and button.first.is_visible():
                    button.first.click()
                    res.queued_by = "Run button"
                else:  # a frontend without that button: what its Queue button calls
                    page.evaluate("() => app.queuePrompt(0, 1)")
                    res.queued_by = "app.queuePrompt(0, 1)"
            page.mouse.move(page.viewport_size["width"] // 2, 12)  # off the button: no tooltip in the screenshots
            reply = posted.value
            res.queue_reply = {"status": reply.status, **_json(reply)}
            res.prompt_id = res.queue_reply.get("prompt_id")
            if reply.status == 200 and res.prompt_id:
                res.history, res.page_end = self._follow(page, res.prompt_id, timeout)
            res.elapsed = time.monotonic() - t0
            _frames(page)
            page.wait_for_timeout(500)  # the frontend sets the widget values, then draws
            res.previews = page.evaluate(PREVIEWS, sorted(text_sources))
            state = page.evaluate(STATE)
            res.ui = [e for e in state["ui"] if e["t"] >= mark]
            res.console, res.page_errors = log["console"][n_console:], log["page_errors"][n_errors:]
            res.offline = [c for c in res.console if "net::ERR_" in c and not c.split(" @ ")[-1].startswith(self.url)]
            res.console = [c for c in res.console if c not in res.offline]
            preview_ids = [p["id"] for p in res.previews if p["source_type"] in text_sources]
            report_nodes = preview_ids + [p["source_id"] for p in res.previews if p["id"] in preview_ids]
            res.overlaps = page.evaluate(OVERLAPS, report_nodes)
            for kind, path in (shots or {}).items():
                if kind == "all":
                    view = _fit(page, None, self.viewport, scale=0.8)
                else:  # the reports with the nodes they come from; only the reports where those would not fit at 100 %
                    view = _fit(page, report_nodes, self.viewport, scale=1.25)
                    if view["scale"] is not None and view["scale"] < 1:
                        view = _fit(page, preview_ids, self.viewport, scale=1.25)
                res.dom[kind] = page.evaluate(DOM_TEXTS, preview_ids)
                res.views[kind] = view
                res.shots[kind] = _screenshot(page, path)
            page.set_viewport_size(self.viewport)
            return res

    def _follow(self, page, prompt_id: str, timeout: float):
        """Wait until the server's history holds the prompt's end (success or error) and the page got the
        matching websocket event (execution_success / execution_error / execution_interrupted).
        -> (the /api/history entry or None, the page's last event for the prompt or None)."""
        end = time.monotonic() + timeout
        entry = None
        while time.monotonic() < end:
            page.wait_for_timeout(1000)
            page_end = page.evaluate("(id) => window.__liteffnRun.end[id] || null", prompt_id)
            if entry is None:
                try:
                    with urllib.request.urlopen(f"{self.url}/api/history/{urllib.parse.quote(prompt_id)}",
                                                timeout=30) as r:
                        got = json.loads(r.read()).get(prompt_id)
                except OSError:
                    got = None
                status = (got or {}).get("status") or {}
                if got and (status.get("completed") or status.get("status_str") in ("success", "error")):
                    entry, end = got, min(end, time.monotonic() + 60)  # the page's event comes right after
            if entry is not None and page_end is not None:
                return entry, page_end
        return entry, page.evaluate("(id) => window.__liteffnRun.end[id] || null", prompt_id)


class RunResult:
    """What a run from the browser did and showed: the prompt the Run button queued, how it ended on the
    server and in the page, and each Preview as Text node's text (widget value, and the text of its DOM
    textarea in each screenshot's view)."""

    def __init__(self, name: str, loaded: LoadResult):
        self.name, self.loaded = name, loaded
        self.inputs_set, self.queued_by, self.queue_reply, self.prompt_id = [], None, {}, None
        self.history, self.page_end, self.elapsed = None, None, 0.0
        self.previews, self.ui, self.console, self.page_errors, self.offline = [], [], [], [], []
        self.dom, self.views, self.shots, self.overlaps = {}, {}, {}, []

    @property
    def status(self) -> str | None:
        return ((self.history or {}).get("status") or {}).get("status_str")

    @property
    def cached_nodes(self) -> list[str]:
        """The nodes the server answered from its cache rather than running them (its execution_cached message)."""
        return [str(n) for kind, msg in ((self.history or {}).get("status") or {}).get("messages", [])
                if kind == "execution_cached" for n in msg.get("nodes", [])]

    def server_texts(self) -> dict[str, str]:
        """{node id: the text the server sent for it} from /api/history's outputs."""
        outs = (self.history or {}).get("outputs", {})
        return {nid: "\n\n".join(o["text"]) if isinstance(o.get("text"), list) else str(o.get("text"))
                for nid, o in outs.items() if "text" in o}

    def problems(self) -> list[str]:
        out = []
        if self.history is None:
            out.append(f"no end of prompt {self.prompt_id} in /api/history (queue reply {self.queue_reply})")
        elif self.status != "success":
            msgs = [m for m in (self.history.get("status") or {}).get("messages", []) if m[0] != "execution_cached"]
            out.append(f"the server's run ended {self.status}: {msgs}")
        if self.history is not None and (self.page_end or {}).get("type") != "execution_success":
            out.append(f"the page did not get execution_success for {self.prompt_id}: {self.page_end}")
        dialogs = [e["text"] for e in self.ui if e["kind"] in ("dialog", "legacy-dialog")]
        if dialogs:
            out.append(f"dialogs: {dialogs}")
        errors = [e["text"] for e in self.ui if e["kind"] in ("overlay", "panel")
                  or (e["kind"] == "toast" and e.get("severity") in ("error", "warn"))]
        if errors:
            out.append(f"errors shown: {errors}")
        return out + page_problems(self.page_errors, self.console)

    def summary(self) -> str:
        shown = [p for p in self.previews if p["text"].strip()]
        return (f"{self.name}: queued by {self.queued_by} ({', '.join(self.inputs_set)}), prompt {self.prompt_id} "
                f"ended {self.status} in {self.elapsed:.0f} s (page: {(self.page_end or {}).get('type')}), "
                f"{len(self.cached_nodes)} node(s) from the cache; "
                f"{len(shown)}/{len(self.previews)} Preview as Text nodes show text; views "
                + ", ".join(f"{k} {v['viewport'][0]}x{v['viewport'][1]} at {v['scale']:.2f}"
                            for k, v in self.views.items())
                + (f"; problems: {self.problems()}" if self.problems() else "")
                + ("; nodes overlapping the pack's nodes or their reports: "
                   + "; ".join(f"{t2!r} ({i2}) over {t1!r} ({i1})" for i1, t1, i2, t2 in self.overlaps)
                   if self.overlaps else "")
                + (f"; failed offline: {self.offline}" if self.offline else ""))


def _quiet(page, inflight: set, quiet: float = 0.4, timeout: float = 20) -> None:
    """Wait until the page has had no request in flight for `quiet` seconds."""
    end = time.monotonic() + timeout
    calm_since = time.monotonic()
    while time.monotonic() < end:
        page.wait_for_timeout(50)
        if inflight:
            calm_since = time.monotonic()
        elif time.monotonic() - calm_since >= quiet:
            return
