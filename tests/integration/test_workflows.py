"""The shipped workflows against a real ComfyUI server holding a small LTX-2 model set under the
file names the workflows use: UI files are valid for the server's nodes, UI and API describe the
same graph, the generator still writes what is committed, and every API workflow runs to the end."""
from __future__ import annotations

import glob
import json
import os

import pytest

from conftest import ROOT, RUN_ORDER, get, load_workflow

WORKFLOWS = os.path.join(ROOT, "workflows")
NAMES = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(WORKFLOWS, "*.json")))
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # drawn by the frontend, never sent to the server


@pytest.fixture(scope="module")
def info(server):
    return get(server[0] + "/object_info")


# Input types the frontend draws as widgets (COMFY_DYNAMICCOMBO_V3, ComfyUI 0.33: a combo that adds the inputs of
# the option chosen); an input of another type with a widgetType (a MultiType such as "FLOAT,INT") is one too.
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "COMFY_DYNAMICCOMBO_V3")
MISSING = object()


def widgets(schema, values, group=None, prefix=""):
    """(name, spec, value, optional) of each widget in the order the UI stores widgets_values, popping the values
    from `values` (a control_after_generate value is checked and dropped). A dynamic combo is followed by the
    inputs of the option its value picks, named "<combo>.<input>". value is MISSING past the end of the list:
    for an optional input the frontend and the server then take its default (a file written for a ComfyUI
    without that input, e.g. CreateVideo.bit_depth of 0.33)."""
    if group is None:
        group, order = schema["input"], schema["input_order"]["required"] + schema["input_order"].get("optional", [])
    else:
        order = [*group.get("required", {}), *group.get("optional", {})]
    spec = {**group.get("required", {}), **group.get("optional", {})}
    for name in order:
        typ, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
        if not (isinstance(typ, list) or typ in WIDGET_TYPES or opts.get("widgetType")) or opts.get("forceInput"):
            continue
        value = values.pop(0) if values else MISSING
        if opts.get("control_after_generate") and values:
            assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), prefix + name
        yield prefix + name, spec[name], value, name in group.get("optional", {})
        if typ == "COMFY_DYNAMICCOMBO_V3" and value is not MISSING:
            chosen = next((o["inputs"] for o in opts["options"] if o["key"] == value), {})
            yield from widgets(schema, values, chosen, prefix + name + ".")


def ui_to_api(ui, info):
    """What the frontend queues for a UI workflow: widget values by name, links as [node, slot]. A dynamic combo's
    input that the node also takes flat (SaveVideo's hidden `codec`, kept for API prompts written before) goes
    by the flat name, as in our API files."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        schema, inputs, values = info[n["type"]], {}, list(n.get("widgets_values", []))
        flat = {**schema["input"]["required"], **schema["input"].get("optional", {})}
        for name, _, value, _ in widgets(schema, values):
            short = name.rsplit(".", 1)[-1]
            if value is not MISSING:
                inputs.setdefault(short if short in flat else name, value)
        assert not values, f"node {n['id']} ({n['type']}) has {len(values)} widget values too many"
        for i in n["inputs"]:
            if i.get("link") is not None:
                link = links[i["link"]]
                assert link[3] == n["id"], f"link {link} does not end at node {n['id']}"
                inputs[i["name"]] = [str(link[1]), link[2]]
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


def valid(value, spec) -> str | None:
    typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    typ = opts.get("widgetType") or typ  # a MultiType input is checked as the widget it draws
    options = typ if isinstance(typ, list) else opts.get("options")
    if options is not None:
        options = [o["key"] if isinstance(o, dict) else o for o in options]  # a dynamic combo's options are dicts
        return None if value in options else f"{value!r} is not one of {options[:6]}..."
    if typ == "INT" and not (isinstance(value, int) and opts.get("min", value) <= value <= opts.get("max", value)):
        return f"{value!r} is not an INT in [{opts.get('min')}, {opts.get('max')}]"
    if typ == "FLOAT" and not (isinstance(value, (int, float)) and opts.get("min", value) <= value <= opts.get("max", value)):
        return f"{value!r} is not a FLOAT in [{opts.get('min')}, {opts.get('max')}]"
    if typ == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a BOOLEAN"
    if typ == "STRING" and not isinstance(value, str):
        return f"{value!r} is not a STRING"
    return None


def test_every_workflow_ships_in_both_formats():
    assert set(NAMES) >= {"ltx2_compare_ranks", "ltx2_calibrate_and_compress", "ltx2_t2v_liteffn"}
    assert sorted(RUN_ORDER) == NAMES, "a new workflow: add it to conftest.RUN_ORDER, so that it runs"
    assert NAMES == sorted(os.path.splitext(os.path.basename(p))[0]
                           for p in glob.glob(os.path.join(WORKFLOWS, "api", "*.json")))


def test_templates_browser_lists_each_workflow_with_its_thumbnail(server):
    """The Templates browser lists this pack's workflows by file name (GET /workflow_templates) and shows
    <name>.jpg beside each as its card's picture (frontends 1.43 and 1.49: .../workflow_templates/<pack>/<name>.jpg)."""
    import urllib.request

    listed = get(server[0] + "/workflow_templates")
    pack = next(k for k, v in listed.items() if set(NAMES) <= set(v))
    for name in NAMES:
        with urllib.request.urlopen(f"{server[0]}/api/workflow_templates/{pack}/{name}.jpg", timeout=60) as r:
            data = r.read()
        assert data[:3] == b"\xff\xd8\xff" and 5_000 < len(data) < 200_000, name  # a JPEG, thumbnail-sized


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_nodes_exist_with_valid_widget_values(server, ran, name):
    info = get(server[0] + "/object_info")  # after `ran`: lists the files calibrate_and_compress wrote
    ui = load_workflow(name + ".json")
    problems = []
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        if n["type"] not in info:
            problems.append(f"node {n['id']}: {n['type']} is not known to the server")
            continue
        for wname, spec, value, optional in widgets(info[n["type"]], list(n.get("widgets_values", []))):
            why = (None if optional else "missing") if value is MISSING else valid(value, spec)
            if why:
                problems.append(f"node {n['id']} {n['type']}.{wname}: {why}")
        sockets = {name for name, spec in {**info[n["type"]]["input"]["required"],
                                           **info[n["type"]]["input"].get("optional", {})}.items()}
        problems += [f"node {n['id']} {n['type']}: no input {i['name']}" for i in n["inputs"] if i["name"] not in sockets]
    for link in ui["links"]:  # the type of each link is the type its source gives and its target takes
        src = next(n for n in ui["nodes"] if n["id"] == link[1])
        dst = next(n for n in ui["nodes"] if n["id"] == link[3])
        given = info[src["type"]]["output"][link[2]]
        taken = dst["inputs"][link[4]]["type"]
        if not (given == link[5] and taken in (given, "*")):  # ("*": an input that takes any type, PreviewAny's)
            problems.append(f"link {link[0]}: {src['type']} gives {given}, {dst['type']} takes {taken}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_describe_the_same_graph(info, name):
    api = load_workflow("api", name + ".json")
    want = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert ui_to_api(load_workflow(name + ".json"), info) == want


def test_generator_writes_what_is_committed(info, tmp_path):
    """workflows/build.py against this server's node schemas writes the committed files byte for byte:
    a node whose inputs changed, or a hand edit that build.py does not know, fails here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("liteffn_build", os.path.join(WORKFLOWS, "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for path in build.write(info, str(tmp_path)):
        rel = os.path.relpath(path, tmp_path)
        with open(path) as a, open(os.path.join(WORKFLOWS, rel)) as b:
            new, old = a.read(), b.read()
        # Else the same but for outputs nothing links to at a node's end: both frontends (1.43, 1.49) add those
        # from the node's definition, so the file fits a ComfyUI whose node gained one (0.33: SaveVideo, PreviewImage).
        same = new == old or (not rel.startswith("api") and unlinked_dropped(new) == unlinked_dropped(old))
        assert same, f"workflows/{rel} differs from what build.py writes; run build.py"


def unlinked_dropped(text):
    ui = json.loads(text)
    for n in ui["nodes"]:
        while n["outputs"] and not n["outputs"][-1]["links"]:
            n["outputs"].pop()
    return ui


def test_api_workflows_run_to_the_end_with_their_outputs(server, ran):
    _, base = server
    out = ran
    liteffn = base / "models" / "liteffn"
    assert (liteffn / "ltx-2-19b-dev_liteffn_stats.safetensors").is_file()
    assert (liteffn / "ltx-2-19b-dev_liteffn_r64.safetensors").is_file()

    cal = out["ltx2_calibrate_and_compress"]["outputs"]
    wf = load_workflow("api", "ltx2_calibrate_and_compress.json")
    last = [k for k, n in wf.items() if n["class_type"] == "LiteFFNCalibrate" and n["inputs"]["filename"]][0]
    assert "with 2 earlier run(s)" in cal[last]["text"][0]  # three prompts in one file

    cmp_ = out["ltx2_compare_ranks"]["outputs"]
    wf = load_workflow("api", "ltx2_compare_ranks.json")
    videos = [k for k, n in wf.items() if n["class_type"] == "SaveVideo"]
    assert all(cmp_[k]["images"] or cmp_[k].get("videos") for k in videos), cmp_
    reports = {wf[k]["inputs"]["label"]: cmp_[k]["text"][0] for k, n in wf.items() if n["class_type"] == "LiteFFNCompare"}
    assert sorted(reports) == ["r=32 fp8", "r=512 fp8", "r=64 fp8"]
    psnr = {}
    for label, text in sorted(reports.items()):
        assert text.startswith(label + ": PSNR") and "SSIM" in text, text
        print(f"\n{text.splitlines()[0]}")
        psnr[label] = float(text.split("PSNR ")[1].split(" dB")[0])
    # seen: r=32 46.6 dB, r=64 47.8 dB, r=512 76.7 dB (the model set's FFNs are 512 wide: full rank)
    assert min(psnr.values()) > 30, psnr
    assert psnr["r=512 fp8"] > max(psnr["r=32 fp8"], psnr["r=64 fp8"]) + 10, psnr
    plots = [k for k, n in wf.items() if n["class_type"] == "PreviewImage"]
    assert len(plots) == 3 and all(cmp_[k]["images"] for k in plots)

    t2v = out["ltx2_t2v_liteffn"]["outputs"]
    wf = load_workflow("api", "ltx2_t2v_liteffn.json")
    (save,) = [k for k, n in wf.items() if n["class_type"] == "SaveVideo"]
    assert t2v[save]
    (video,) = out["ltx2_t2v_liteffn"]["files"]  # downloaded by the headless client
    assert video.endswith(".mp4") and os.path.getsize(video) > 1000

    # every report and summary reaches a Preview as Text node: the frontend shows a node's text only there
    text_slot = {"LiteFFNCalibrate": 1, "LiteFFNCompressModel": 1, "LowRankFFNLoader": 1, "LiteFFNCompare": 2}
    for name in RUN_ORDER:
        wf, outputs = load_workflow("api", name + ".json"), out[name]["outputs"]
        shown = {tuple(n["inputs"]["source"]): k for k, n in wf.items() if n["class_type"] == "PreviewAny"}
        for k, n in wf.items():
            if n["class_type"] in text_slot:
                viewer = shown.get((k, text_slot[n["class_type"]]))
                assert viewer is not None, f"{name}: {n['_meta']['title']}'s text is shown nowhere"
                assert outputs[viewer]["text"][0].strip(), (name, n["_meta"]["title"])
    loader_text = [out["ltx2_t2v_liteffn"]["outputs"][k]["text"][0] for k, n in wf.items()
                   if n["class_type"] == "PreviewAny"]
    assert any(t.startswith("loaded ltx-2-19b-dev_liteffn_r64.safetensors") for t in loader_text), loader_text
