"""On a CUDA GPU (LITEFFN_TEST_GPU=1): the compressed modules load, offload and unload with the
model through ComfyUI's model management, and the patched model runs the Triton path."""
from __future__ import annotations

import pytest
import torch

from test_nodes import compress, sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and LITEFFN_TEST_GPU=1)")


def test_load_and_unload_move_and_free_the_compressed_tensors(pack, node, ltx2):
    import comfy.model_management as mm

    model = ltx2()
    patched, _ = compress(node, model, None, rank=8).result
    mods = pack.nodes.model.compressed_modules(patched)
    mm.unload_all_models()
    base = torch.cuda.memory_allocated()
    mm.load_models_gpu([patched] + patched.get_nested_additional_models())  # as sampling does
    print(f"patcher {type(patched).__name__}, loaded {patched.loaded_size()} B, size {patched.model_size()} B")
    assert all(p.device.type == "cuda" for m in mods.values() for p in m.parameters())
    loaded = torch.cuda.memory_allocated()
    ours = sum(p.nbytes for m in mods.values() for p in m.parameters())
    assert loaded - base >= ours
    mm.unload_all_models()
    mm.soft_empty_cache()
    assert all(p.device.type == "cpu" for m in mods.values() for p in m.parameters())
    assert type(model.model.diffusion_model.transformer_blocks[0].ff).__name__ == "FeedForward"
    print(f"allocated: {base} B before, {loaded} B loaded (ours {ours} B), {torch.cuda.memory_allocated()} B unloaded")
    assert loaded - torch.cuda.memory_allocated() >= ours  # our tensors' memory came back


def test_offloaded_module_runs_on_gpu_inputs(pack, node, ltx2):
    """A partially loaded model may leave our modules on the CPU: forward copies them per call."""
    patched, _ = compress(node, ltx2(), None, rank=8).result
    ffn = pack.nodes.model.compressed_modules(patched)["transformer_blocks.0.ff"]
    x = torch.randn(2, 40, ffn.up.in_features, device="cuda", dtype=torch.bfloat16)
    y_off = ffn(x)  # parameters on the CPU
    y_on = ffn.to("cuda")(x)
    ffn.to("cpu")
    assert y_off.device.type == "cuda" and torch.equal(y_off, y_on)


def test_sampling_on_gpu_uses_the_triton_path(pack, node, ltx2):
    dispatch = pack.kernels.dispatch
    model = ltx2()
    patched, _ = compress(node, model, None, rank=8).result
    dispatch.counts.clear()
    out = sample(patched)
    print(f"kernel paths: {dict(dispatch.counts)}")
    assert dispatch.counts["ffn:triton"] > 0 and dispatch.counts["ffn:reference"] == 0
    assert torch.isfinite(out).all()
    err = float((out - sample(model)).norm() / sample(model).norm())
    print(f"r=8 fp8 uncalibrated on GPU: relative difference to baseline {err:.4f}")
    assert err < 0.1


def test_attention_units_load_with_the_model_and_leave_the_dense_projections(pack, node, ltx2):
    """layers = ffn+attention: the CompressedLinears load to the GPU with the model (they are in its additional
    model); the dense projections they replace are not ComfyUI's to load (with legacy and dynamic VRAM alike,
    LITEFFN_TEST_DYNAMIC=1): they stay on the CPU, and the model samples close to the dense one."""
    import comfy.model_management as mm

    model = ltx2()
    patched, _ = compress(node, model, None, rank=8, layers="ffn+attention").result
    mods = pack.nodes.model.compressed_modules(patched)
    attn = {u: m for u, m in mods.items() if not pack.calibration.ltx2.is_ffn_unit(u)}
    assert len(attn) == 2 * 6 * 4
    dense = [patched.object_patches["diffusion_model." + u].original for u in attn]
    mm.unload_all_models()
    mm.load_models_gpu([patched] + patched.get_nested_additional_models())
    assert all(p.device.type == "cuda" for m in attn.values() for p in m.parameters())
    assert all(d.weight.device.type == "cpu" for d in dense)
    out = sample(patched)
    assert all(d.weight.device.type == "cpu" for d in dense)
    err = float((out - sample(model)).norm() / sample(model).norm())
    print(f"ffn+attention r=8 fp8 uncalibrated on GPU: relative difference to baseline {err:.4f} (CPU: 0.023)")
    assert torch.isfinite(out).all() and err < 0.1
