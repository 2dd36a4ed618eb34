"""Integration tier: our nodes inside a real ComfyUI (COMFYUI_PATH = a ComfyUI checkout whose
Python environment runs these tests; docs/development.md, "Tests"). Skipped, with the reason, without it."""
from __future__ import annotations

import asyncio
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMFYUI = os.environ.get("COMFYUI_PATH")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # ltx2_tiny


def _why_not() -> str | None:
    if not COMFYUI:
        return "integration tier: COMFYUI_PATH is not set (point it at a ComfyUI checkout; docs/development.md, 'Tests')"
    if not os.path.isfile(os.path.join(COMFYUI, "main.py")):
        return f"integration tier: COMFYUI_PATH={COMFYUI} has no main.py"
    try:
        import torchvision  # noqa: F401  (ComfyUI imports it; the CPU wheel of torch has no match)
    except Exception as e:  # pragma: no cover
        return f"integration tier: ComfyUI's dependencies are not importable here ({e})"
    return None


def pytest_collection_modifyitems(config, items):
    why = _why_not()
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def pack(tmp_path_factory):
    """ComfyUI imported as a library (CPU unless a GPU is wanted), with models/liteffn in a temp
    folder and this pack loaded by ComfyUI's own custom-node loader. Returns the loaded pack."""
    sys.path.insert(0, COMFYUI)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = os.environ.get("LITEFFN_TEST_GPU") != "1"
    dynamic = os.environ.get("LITEFFN_TEST_DYNAMIC") == "1"  # ComfyUI's dynamic VRAM (comfy-aimdo), as main.py
    if dynamic:
        import comfy_aimdo.control

        comfy_aimdo.control.init()
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher
    import folder_paths
    import nodes

    if dynamic:
        assert comfy_aimdo.control.init_device(comfy.model_management.get_torch_device().index), "comfy-aimdo failed"
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True

    folder_paths.add_model_folder_path("liteffn", str(tmp_path_factory.mktemp("liteffn")), is_default=True)
    assert asyncio.run(nodes.load_custom_node(ROOT)), "ComfyUI could not load the pack (see the log above)"
    return sys.modules[ROOT.replace(".", "_x_")]


@pytest.fixture(scope="session")
def node(pack):
    import nodes

    return lambda node_id: nodes.NODE_CLASS_MAPPINGS[node_id]


@pytest.fixture(scope="session")
def ltx2(pack, tmp_path_factory):
    """Loader of small LTX-2 checkpoints through ComfyUI's diffusion-model loader (as UNETLoader)."""
    import comfy.sd

    import ltx2_tiny

    d = tmp_path_factory.mktemp("ckpt")
    cache = {}

    def load(**kw):
        key = repr(sorted(kw.items()))
        if key not in cache:
            cache[key] = ltx2_tiny.save(str(d / f"ltx2_{len(cache)}.safetensors"), **kw)
        return comfy.sd.load_diffusion_model(cache[key])

    return load


def get(url):
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="session")
def server(pack, tmp_path_factory):
    """A real ComfyUI server (`main.py --cpu`) with this pack in custom_nodes/, as users install it,
    and a temp models folder holding the small LTX-2 model set under the file names the shipped
    workflows use (ltx2_models; tiny_gemma is loaded beside the pack) and ltx2_tiny as a diffusion
    model. -> (url, base directory)."""
    import socket
    import subprocess
    import time
    import urllib.request

    import ltx2_models
    import ltx2_tiny

    here = os.path.dirname(os.path.abspath(__file__))
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "models" / "diffusion_models").mkdir(parents=True)
    ltx2_tiny.save(str(base / "models" / "diffusion_models" / "ltx2_tiny.safetensors"))
    ltx2_models.write_model_set(str(base / "models"))
    os.symlink(ROOT, base / "custom_nodes" / "ComfyUI-LiteFFN")
    os.symlink(os.path.join(here, "tiny_gemma"), base / "custom_nodes" / "tiny_gemma")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base), "--disable-auto-launch"],
                            cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(url + "/system_stats", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("ComfyUI did not start in 120 s")
        if proc.poll() is not None:
            pytest.fail("ComfyUI exited:\n" + (base / "server.log").read_text()[-3000:])
        yield url, base
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


# A CPU-size run of the shipped workflows: these inputs are overridden the way `liteffn-queue --set`
# does; everything else runs as shipped.
CPU_SIZE = {"EmptyLTXVLatentVideo": {"width": 64, "height": 64, "length": 9},
            "LTXVEmptyLatentAudio": {"frames_number": 9},
            "LTXVScheduler": {"steps": 2}, "LiteFFNCalibrate": {"steps": 2}}
RUN_ORDER = ["ltx2_calibrate_and_compress", "ltx2_compare_ranks", "ltx2_t2v_liteffn"]


def load_workflow(*parts):
    import json

    with open(os.path.join(ROOT, "workflows", *parts)) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def ran(server, tmp_path_factory):
    """Every shipped API workflow queued on the server, in the order a user runs them:
    calibrate_and_compress writes the statistics and the compressed file that compare_ranks and
    t2v_liteffn read. -> {name: client.run's result}. client.run raises WorkflowError with
    ComfyUI's message when the server rejects the workflow or a node fails."""
    from liteffn.headless import client

    out = {}
    for name in RUN_ORDER:
        wf = load_workflow("api", name + ".json")
        sets = [f"{nid}.{k}={v}" for nid, n in wf.items() for k, v in CPU_SIZE.get(n["class_type"], {}).items()]
        out[name] = asyncio.run(client.run(server[0], client.apply_overrides(wf, sets), log=lambda *_: None,
                                           out_dir=str(tmp_path_factory.mktemp(name)), timeout=scaled(900)))
    return out


def scaled(seconds: float) -> float:
    """A time limit for work on this machine: longer when the CPUs are busy with other work (a loaded machine
    once turned a slow but correct run into 10 errors), and LITEFFN_TEST_TIMEOUT_SCALE times it."""
    try:
        busy = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # no load average on this system
        busy = 1.0
    return seconds * max(1.0, busy) * float(os.environ.get("LITEFFN_TEST_TIMEOUT_SCALE", "1"))
