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
