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

The graph: `window.app` is the ComfyApp; `app.rootGraph` (also `app.graph` and `window.graph` while
the canvas shows the root) is the litegraph LGraph with `.nodes`; subgraph definitions are
`app.rootGraph.subgraphs` (a Map id -> Subgraph with its own `.nodes`). Unknown node types become
placeholder LGraphNodes (`has_errors`, type not in `LiteGraph.registered_node_types`). The pinia
stores are reachable through `#vue-app.__vue_app__.config.globalProperties.$pinia`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
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
        if self.page_errors:
            out.append(f"page errors: {self.page_errors}")
        if self.console:
            out.append(f"console errors: {self.console}")
        return out

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
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        ctx = self.browser.new_context(viewport=self.viewport)
        ctx.set_default_timeout(timeout * 1000)
        try:
            ctx.add_init_script(RECORDER)
            page = ctx.new_page()
            console, page_errors, warnings = [], [], []
            inflight = set()

            def on_console(m):
                if m.type in ("error", "warning"):
                    (console if m.type == "error" else warnings).append(f"{m.text} @ {m.location.get('url', '')}")

            page.on("console", on_console)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("request", lambda r: inflight.add(r))
            page.on("requestfinished", lambda r: inflight.discard(r))
            page.on("requestfailed", lambda r: inflight.discard(r))
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
            page.evaluate("1")  # deliver the console events so far, then start counting ours
            mark = page.evaluate("performance.now()")
            n_console, n_errors, n_warnings = len(console), len(page_errors), len(warnings)

            t_mark = time.monotonic()
            loaded = page.evaluate(LOAD, {"module": module, "name": name})
            t_loaded = time.monotonic()
            if "error" in loaded:
                raise AssertionError(f"{name}: {loaded['error']}")
            _quiet(page, inflight)  # the missing-model check finishes after a request (/api/folder_paths)
            page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
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
            if screenshot:
                os.makedirs(os.path.dirname(screenshot) or ".", exist_ok=True)
                page.screenshot(path=screenshot)
                result.screenshot = screenshot
                copy_to = os.environ.get("LITEFFN_SCREENSHOT_DIR")
                if copy_to:
                    os.makedirs(copy_to, exist_ok=True)
                    shutil.copy(screenshot, os.path.join(copy_to, os.path.basename(screenshot)))
            return result
        finally:
            ctx.close()


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
