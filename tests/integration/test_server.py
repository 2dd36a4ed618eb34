"""The pack inside a real ComfyUI server (`main.py --cpu`), as users install it: a folder in
custom_nodes/. ComfyUI's own tests drive the server the same way."""
from __future__ import annotations

import pytest

from conftest import get


def test_object_info_lists_the_nodes_with_their_inputs(server):
    url, base = server
    info = get(url + "/object_info")
    want = {
        "LiteFFNCalibrate": {"model", "positive", "negative", "latent_image", "seed", "steps", "cfg", "sampler_name",
                             "scheduler", "seeds", "streams", "layers", "blocks", "memory_budget_gb", "storage", "filename",
                             "append", "stats"},
        "LiteFFNCompressModel": {"model", "stats", "stats_file", "rank", "energy", "residual", "streams", "layers",
                                 "blocks", "save_name", "match_fp8"},
        "LowRankFFNLoader": {"model", "compressed_file"},
        "LiteFFNCompare": {"reference", "test", "label"},
    }
    for nid, inputs in want.items():
        assert nid in info, f"{nid} missing; server log:\n" + (base / "server.log").read_text()[-3000:]
        got = set(info[nid]["input"]["required"]) | set(info[nid]["input"].get("optional", {}))
        assert got == inputs, (nid, got ^ inputs)
        assert info[nid]["category"] == "LiteFFN"
    assert info["LiteFFNCompressModel"]["output"] == ["MODEL", "STRING"]
    # inputs added later are optional, so API prompts written before them still validate
    assert {"layers", "match_fp8"} <= set(info["LiteFFNCompressModel"]["input"]["optional"])
    assert info["LiteFFNCalibrate"]["output"][0] == "LITEFFN_STATS"
    assert info["LiteFFNCompressModel"]["input"]["required"]["residual"][1]["options"] == ["fp8", "nvfp4", "mxfp4", "bf16"]
    assert "liteffn" in get(url + "/models")  # registered with folder_paths
    log = (base / "server.log").read_text()
    assert "IMPORT FAILED" not in log and "ComfyUI-LiteFFN" in log


def _compress_workflow(rank=4, save_name="headless_r4"):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "ltx2_tiny.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "LiteFFNCompressModel",
              "inputs": {"model": ["1", 0], "stats_file": "(none)", "rank": rank, "energy": 0.0, "residual": "fp8",
                         "streams": "all", "blocks": "all", "save_name": save_name, "layers": "ffn"}},
    }


def test_headless_client_queues_follows_and_reports(pack, server):
    import asyncio

    from liteffn.headless import client
    url, base = server
    seen = []
    result = asyncio.run(client.run(url, _compress_workflow(), log=seen.append, timeout=300))
    report = result["outputs"]["2"]["text"][0]
    assert "8 linears, residual fp8, rank 4-4" in report
    assert any(s.startswith("running 2 (LiteFFNCompressModel)") for s in seen)
    assert (base / "models" / "liteffn" / "headless_r4.safetensors").is_file()
    history = get(url + "/history/" + result["prompt_id"])[result["prompt_id"]]
    assert history["status"]["status_str"] == "success"


def test_loader_reads_a_rewritten_file_again_instead_of_comfyuis_cached_result(pack, server):
    """The same Loader graph queued again after its file was rewritten under the same name (as the shipped
    calibrate-and-compress workflow does on every run) loads the new file."""
    import asyncio

    from liteffn.headless import client
    url, _ = server
    run = lambda wf: asyncio.run(client.run(url, wf, log=lambda *_: None, timeout=300))  # noqa: E731
    load = {"1": {"class_type": "UNETLoader",
                  "inputs": {"unet_name": "ltx2_tiny.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "LowRankFFNLoader",
                  "inputs": {"model": ["1", 0], "compressed_file": "reload.safetensors"}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}
    run(_compress_workflow(rank=4, save_name="reload"))
    assert "rank 4-4" in run(load)["outputs"]["3"]["text"][0]
    assert "rank 4-4" in run(load)["outputs"]["3"]["text"][0]  # unchanged file: ComfyUI's cache serves it
    run(_compress_workflow(rank=2, save_name="reload"))
    assert "rank 2-2" in run(load)["outputs"]["3"]["text"][0]


def test_headless_client_reports_failures_with_comfyuis_message(pack, server):
    import asyncio

    from liteffn.headless import client
    url, base = server
    with pytest.raises(client.WorkflowError, match="LiteFFNCompressModel.*rank 999 is larger than layer") as e:
        asyncio.run(client.run(url, _compress_workflow(rank=999, save_name=""), log=lambda *_: None, timeout=300))
    assert "failed: ValueError: rank 999" in str(e.value)  # no module path before the message
    load = {"1": {"class_type": "UNETLoader",
                  "inputs": {"unet_name": "ltx2_tiny.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "LowRankFFNLoader",
                  "inputs": {"model": ["1", 0], "compressed_file": "bad.safetensors"}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}
    (base / "models" / "liteffn").mkdir(parents=True, exist_ok=True)
    (base / "models" / "liteffn" / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(client.WorkflowError) as e:  # a FileError of the pack's: shown as a ValueError
        asyncio.run(client.run(url, load, log=lambda *_: None, timeout=120))
    assert "failed: ValueError: " in str(e.value) and "truncated or corrupt" in str(e.value), str(e.value)
    bad = _compress_workflow()
    bad["2"]["class_type"] = "NoSuchNode"
    with pytest.raises(client.WorkflowError, match="rejected"):
        asyncio.run(client.run(url, bad, log=lambda *_: None, timeout=60))
