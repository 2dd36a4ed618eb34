"""The pack's workflows (workflows/*.json) in the real ComfyUI web frontend, as a user opens them:
ComfyUI serves custom_nodes/ComfyUI-LiteFFN/workflows/<name>.json at
/api/workflow_templates/ComfyUI-LiteFFN/<name>.json and lists it in the Templates browser; a click
there (or a /?template=<name>&source=ComfyUI-LiteFFN link) fetches it and calls
`app.loadGraphData(json, ..., {openSource: 'template'})`. We do the same in headless Chromium against
a real server and check what the user would see: no missing-nodes or missing-models warning, no
error dialog or error toast, no page error, and every node of the file in the frontend's graph
(subgraphs included). One screenshot per workflow (tmp dir; also $LITEFFN_SCREENSHOT_DIR if set).
Then each shipped workflow is run from the browser (Run button, CPU-size inputs set in its widgets) and every
Preview as Text node of the pack's reports must show the text the server sent; screenshots after the run: the
whole graph (frontend_<name>_after_run.png) and the reports close up (..._after_run_reports.png). The copies
in docs/ are frontend.compact_png of these (256 colours, a third of the size).
The server holds the small LTX-2 model set and, once the shipped API workflows ran (`ran`), the
files calibrate_and_compress writes, as for a user who ran it: no placeholder files.

Needs Python playwright (pip install playwright) and a Chromium ($CHROMIUM, /usr/bin/chromium or
/usr/bin/chromium-browser; Playwright's own browser downloads are not used). Development aid:
LITEFFN_FRONTEND_TEMPLATES="default/video_ltx2_t2v,..." also checks those templates (module/name,
"default" = ComfyUI's own)."""
from __future__ import annotations

import glob
import os
import urllib.parse
import urllib.request

import pytest

pytest.importorskip("playwright.sync_api", exc_type=ImportError,
                    reason="frontend tier: Python playwright is not importable "
                    "(pip install playwright; Chromium from the system, no `playwright install`)")

import frontend as fe  # noqa: E402
from conftest import CPU_SIZE, ROOT, RUN_ORDER, get, load_workflow, scaled  # noqa: E402

WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
EXTRA = [t.strip() for t in os.environ.get("LITEFFN_FRONTEND_TEMPLATES", "").split(",") if t.strip()]
CASES = [pytest.param("pack", os.path.splitext(os.path.basename(p))[0], id=os.path.basename(p)) for p in WORKFLOWS]
CASES += [pytest.param(*t.split("/", 1), id=t) for t in EXTRA]
if not CASES:
    CASES = [pytest.param(None, None, marks=pytest.mark.skip(reason="no workflows/*.json in the pack yet"))]


def template_url(url, module, name):
    if module == "default":
        return f"{url}/templates/{urllib.parse.quote(name)}.json"
    return f"{url}/api/workflow_templates/{urllib.parse.quote(module)}/{urllib.parse.quote(name)}.json"


@pytest.fixture(scope="module")
def chromium():
    exe = fe.chromium_executable()
    if not exe:
        pytest.skip("frontend tier: no Chromium ($CHROMIUM, /usr/bin/chromium, /usr/bin/chromium-browser); "
                    "apt-get install chromium")
    return exe


@pytest.fixture(scope="module")
def frontend(chromium, server, ran):  # chromium first: skip before starting a server
    url, base = server
    fe.prepare_user(url)
    with fe.Frontend(url, chromium) as f:
        yield f


@pytest.fixture(scope="module")
def pack_module(server):
    """The pack's folder name in the server's custom_nodes/: ComfyUI serves workflows/ under it."""
    _, base = server
    custom = os.path.join(str(base), "custom_nodes")
    found = [d for d in os.listdir(custom) if os.path.realpath(os.path.join(custom, d)) == os.path.realpath(ROOT)]
    return found[0] if found else fe.PACK


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("frontend_screenshots")


def node(nid, type_, pos, widgets=None, inputs=(), outputs=(), **extra):
    n = {"id": nid, "type": type_, "pos": list(pos), "size": [320, 160], "flags": {}, "order": nid - 1, "mode": 0,
         "inputs": inputs if isinstance(inputs, int) else list(inputs), "outputs": list(outputs),
         "properties": {"Node name for S&R": type_}, **extra}
    if widgets is not None:
        n["widgets_values"] = widgets
    return n


def ui_workflow(nodes, links=()):
    """A UI-format (litegraph, version 0.4) workflow, as the frontend saves one."""
    return {"id": "00000000-0000-4000-8000-00000000f00d", "revision": 0,
            "last_node_id": max(n["id"] for n in nodes), "last_link_id": max([lk[0] for lk in links], default=0),
            "nodes": nodes, "links": [list(lk) for lk in links], "groups": [], "config": {}, "extra": {},
            "version": 0.4}


def pack_nodes_workflow():
    """All four nodes of the pack, the model output of Compress wired into the loader; widgets at their
    defaults (no widgets_values), so this file does not go stale when a node gains an input."""
    return ui_workflow(
        [node(1, "LiteFFNCalibrate", (0, 0)),
         node(2, "LiteFFNCompressModel", (420, 0), outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}]),
         node(3, "LowRankFFNLoader", (840, 0), inputs=[{"name": "model", "type": "MODEL", "link": 1}]),
         node(4, "LiteFFNCompare", (840, 300)),
         node(5, "MarkdownNote", (0, 500), widgets=["Positive control of tests/integration/test_frontend.py"])],
        links=[(1, 2, 0, 3, 0, "MODEL")])


def bad_workflow():
    """A node type nobody provides, next to a real node of the pack, and a loader set to a model file
    that is not there: the frontend must warn about both."""
    return ui_workflow(
        [node(1, "UNETLoader", (0, 0), widgets=["no_such_liteffn_model.safetensors", "default"],
              outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}]),
         node(2, "LowRankFFNLoader", (420, 0), inputs=[{"name": "model", "type": "MODEL", "link": 1}]),
         node(3, "NoSuchLiteFFNNode", (420, 300))],
        links=[(1, 1, 0, 2, 0, "MODEL")])


def missing_model_workflow():
    """Only a loader set to a model file that is not there: one kind of problem, which frontend 1.49's overlay
    words differently from several (no "N errors found")."""
    return ui_workflow([node(1, "UNETLoader", (0, 0), widgets=["no_such_liteffn_model.safetensors", "default"],
                             outputs=[{"name": "MODEL", "type": "MODEL", "links": []}])])


def broken_workflow():
    """A node whose `inputs` is not a list: the frontend's schema check warns (toast), then
    LGraph.configure throws and the frontend shows its error dialog ("Loading aborted ...")."""
    return ui_workflow([node(1, "LowRankFFNLoader", (0, 0), inputs=5)])


def check_clean(result, workflow):
    assert result.state["stores_found"] == ["missingNodesError", "missingModel", "missingMedia", "executionError"], \
        f"frontend internals moved (pinia stores found: {result.state['stores_found']}); update frontend.py"
    assert not result.missing_nodes_shown, f"{result.name}: the frontend shows missing nodes: {result.problems()}"
    assert not result.missing_models_shown, (
        f"{result.name}: the frontend shows {result.error_overlay} for {sorted(set(result.state['missing_models']))}"
        ": the server fixture must provide these files")
    assert not result.problems(), f"{result.name}: {result.problems()}"
    assert result.state["workflow"] == f"workflows/{result.name}.json", f"the active tab is {result.state['workflow']}"
    want, got = fe.node_types(workflow), result.graphs
    assert got == want, f"{result.name}: graphs in the frontend differ from the file: " + "; ".join(
        f"{g}: file {dict(want.get(g, {}))} frontend {dict(got.get(g, {}))}" for g in set(want) | set(got)
        if want.get(g) != got.get(g))


def test_detector_sees_missing_nodes_and_models(frontend, shots):
    """The negative control: the same load and checks see an unknown node type and a missing model."""
    r = frontend.load(fe.PACK, "NoSuchLiteFFNNode", serve=bad_workflow(),
                      screenshot=str(shots / "frontend_negative_missing.png"))
    print("\n" + r.summary())
    assert r.missing_nodes_shown, f"no missing-nodes overlay for NoSuchLiteFFNNode; UI seen: {r.ui}"
    assert r.state["missing_node_types"] == ["NoSuchLiteFFNNode"]
    assert r.placeholder_nodes == ["root:3 NoSuchLiteFFNNode"]
    assert r.missing_models_shown, f"no missing-models overlay; UI seen: {r.ui}"
    assert "diffusion_models/no_such_liteffn_model.safetensors" in r.state["missing_models"]
    assert r.graphs == fe.node_types(bad_workflow())  # the unknown node is kept, as a placeholder
    with pytest.raises(AssertionError, match="shows missing nodes"):
        check_clean(r, bad_workflow())


def test_detector_sees_a_missing_model_alone(frontend, shots):
    r = frontend.load(fe.PACK, "missing_model", serve=missing_model_workflow(),
                      screenshot=str(shots / "frontend_negative_missing_model.png"))
    print("\n" + r.summary())
    assert r.missing_models_shown and not r.missing_nodes_shown, f"UI seen: {r.ui}"
    with pytest.raises(AssertionError, match="the frontend shows"):
        check_clean(r, missing_model_workflow())


def test_detector_sees_a_broken_workflow(frontend, shots):
    """The negative control for dialogs and toasts: a workflow the frontend cannot load."""
    r = frontend.load(fe.PACK, "broken", serve=broken_workflow(),
                      screenshot=str(shots / "frontend_negative_broken.png"))
    print("\n" + r.summary())
    assert r.warn_toasts or r.error_toasts, f"no toast for an invalid workflow; UI seen: {r.ui}"
    assert any(e["kind"] == "dialog" and e["key"] == "global-error" for e in r.ui), \
        f"no error dialog for a workflow that cannot load; UI seen: {r.ui}"
    with pytest.raises(AssertionError):
        check_clean(r, broken_workflow())


def test_pack_nodes_load_in_the_frontend(frontend, shots):
    """The positive control: every node of the pack is known to the frontend and loads cleanly."""
    wf = pack_nodes_workflow()
    r = frontend.load(fe.PACK, "liteffn_nodes", serve=wf, screenshot=str(shots / "frontend_liteffn_nodes.png"))
    print("\n" + r.summary())
    check_clean(r, wf)


@pytest.mark.parametrize("module,name", CASES)
def test_workflow_loads_in_the_frontend(frontend, shots, server, pack_module, module, name):
    url, _ = server
    module = pack_module if module == "pack" else module
    wf = get(template_url(url, module, name))  # what the server serves, i.e. the file
    r = frontend.load(module, name, screenshot=str(shots / f"frontend_{name}.png"))
    print("\n" + r.summary())
    check_clean(r, wf)
    if module == pack_module:
        assert name in get(url + "/workflow_templates").get(module, []), "not listed in the Templates browser"


# ---------------------------------------------------------------------------------------------
# After a run: each shipped workflow queued from the browser, its reports on the graph


@pytest.fixture(scope="module")
def text_sources(server, pack_module):
    """The pack's node types (their text outputs are what the Preview as Text nodes show)."""
    info = get(server[0] + "/object_info")
    found = {t for t, d in info.items() if d.get("python_module") == f"custom_nodes.{pack_module}"}
    assert {"LiteFFNCalibrate", "LiteFFNCompressModel", "LowRankFFNLoader", "LiteFFNCompare"} <= found, found
    return found


RUNS = [pytest.param(n, id=n + ".json") for n in RUN_ORDER]  # in a user's order: calibrate writes what the others read


@pytest.mark.parametrize("name", RUNS)
def test_workflow_runs_from_the_frontend_and_shows_its_reports(frontend, shots, pack_module, text_sources, name):
    """Issue 21. Each shipped workflow opened from the Templates browser, its sizes set to a CPU-size run
    (conftest.CPU_SIZE, as `liteffn-queue --set` and the API workflow tests) in the page's widgets, queued with
    the Run button (the server's cache emptied first: every node runs), followed until the server's history
    says it ended: then every Preview as Text node fed by a node of the pack shows that node's text (the text
    the server sent, in the widget and in the text box on screen, not covered). Screenshots: the whole graph
    after the run, and a close-up of the reports."""
    ui = load_workflow(name + ".json")
    r = frontend.run(pack_module, name, inputs=CPU_SIZE, text_sources=text_sources, timeout=scaled(1200),
                     shots={"all": str(shots / f"frontend_{name}_after_run.png"),
                            "reports": str(shots / f"frontend_{name}_after_run_reports.png")})
    print("\n" + r.summary())
    assert not r.loaded.problems(), f"{name}: {r.loaded.problems()}"
    want = sorted(f"{n['id']}.{k}={v}" for n in ui["nodes"] for k, v in CPU_SIZE.get(n["type"], {}).items())
    assert want and sorted(r.inputs_set) == want, f"widgets set: {r.inputs_set}, wanted {want}"
    assert not r.problems(), f"{name}: {r.problems()}"

    reports = [p for p in r.previews if p["source_type"] in text_sources]
    pack_nodes = {str(n["id"]) for n in ui["nodes"] if n["type"] in text_sources}
    assert {p["source_id"] for p in reports} == pack_nodes, "a node of the pack whose text no Preview as Text shows"
    assert not pack_nodes & set(r.cached_nodes), f"nodes of the pack did not run (from the cache): {r.cached_nodes}"
    sent = r.server_texts()
    for p in reports:
        what = f"{name}: {p['title']!r} (node {p['id']}, fed by {p['source_title']!r})"
        assert p["text"].strip(), f"{what} shows no text after the run"
        assert p["text"] == sent.get(p["id"]), f"{what} shows {p['text']!r}, the server sent {sent.get(p['id'])!r}"
        for view, boxes in r.dom.items():  # the text box on screen, its middle not under another element
            shown = [b for b in boxes.get(p["id"]) or [] if b["value"].strip() == p["text"].strip()]
            assert shown, f"{what}: no text box on screen ({view} view) holds the text: {boxes.get(p['id'])}"
            assert not all(b["center_covered"] for b in shown), \
                f"{what}: its text box is covered ({view} view): {shown}"
    assert set(r.shots) == {"all", "reports"} and all(os.path.getsize(f) > 10_000 for f in r.shots.values())
