"""Compressed MODELs with the rest of ComfyUI: LoRAs through ComfyUI's own loader, torch.compile
through ComfyUI's compile path, and other packs' patches on the FFNs."""
from __future__ import annotations

import pytest
import torch
from test_nodes import compress, rel, sample

LORA_RANK = 4


@pytest.fixture(scope="module")
def lora_file(pack, tmp_path_factory):
    """A LoRA in the diffusers layout LTX-2 LoRAs use (lora_A = down, lora_B = up, alpha), on every FFN
    linear of the tiny model and on one attention projection, registered in ComfyUI's `loras` folder."""
    import folder_paths
    from safetensors.torch import save_file

    import ltx2_tiny

    d = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(d), is_default=True)
    sd = ltx2_tiny.state_dict()
    g = torch.Generator().manual_seed(3)
    out = {}
    for k, w in sd.items():
        name = k[len("model."):-len(".weight")]
        if not k.endswith(".weight") or not (".ff.net." in k or ".audio_ff.net." in k or k.endswith("transformer_blocks.0.attn1.to_q.weight")):
            continue
        n, kk = w.shape
        out[f"{name}.lora_A.weight"] = torch.randn(LORA_RANK, kk, generator=g) / kk ** 0.5
        out[f"{name}.lora_B.weight"] = torch.randn(n, LORA_RANK, generator=g) * 0.5
        out[f"{name}.alpha"] = torch.tensor(2.0)
    save_file({k: v.to(torch.bfloat16) if v.dim() else v for k, v in out.items()}, str(d / "tiny_lora.safetensors"))
    return "tiny_lora.safetensors"


def with_lora(model, name, strength):
    import nodes

    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


def exact(node, model):
    """Full rank with a bf16 residual: the compressed FFNs compute the dense function (CPU, fp32)."""
    return compress(node, model, None, rank=8192, energy=1.0, residual="bf16").result[0]


def tol(model):
    return 1e-3 if model.load_device.type == "cpu" else 2e-2  # bf16 compute on a GPU (test_nodes says why)


def test_lora_after_the_compressed_model_acts_as_on_the_dense_model(pack, node, ltx2, lora_file):
    model = ltx2()
    patched = exact(node, model)
    base, dense = sample(model), sample(with_lora(model, lora_file, 0.8))
    assert rel(dense, base) > 0.02  # the LoRA changes the result
    out = sample(with_lora(patched, lora_file, 0.8))
    print(f"LoRA after compression: {rel(out, dense):.2e} from the dense model with the LoRA")
    assert rel(out, dense) < tol(model)
    assert torch.equal(sample(patched), sample(exact(node, model)))  # cleared after the run: no LoRA left behind


def test_lora_before_compression_and_before_the_loader(pack, node, ltx2, lora_file):
    model = ltx2()
    lora = with_lora(model, lora_file, 0.8)
    dense = sample(lora)
    patched, report = compress(node, lora, None, rank=8192, energy=1.0, residual="bf16").result
    assert "a LoRA patches 4 of the compressed units" in report, report
    assert rel(sample(patched), dense) < tol(model)
    compress(node, model, None, rank=8192, energy=1.0, residual="bf16", save_name="lora_base")  # from the base weights
    loaded, report = node("LowRankFFNLoader").execute(model=lora, compressed_file="lora_base.safetensors").result
    assert "a LoRA patches" in report and rel(sample(loaded), dense) < tol(model)


def test_strength_changes_need_no_recompression(pack, node, ltx2, lora_file):
    model = ltx2()
    patched = exact(node, model)
    sample(patched)  # the compressed model is now the one loaded: its proxies sit in the live module tree
    outs = {}
    for s in (0.3, -1.0):
        outs[s] = sample(with_lora(patched, lora_file, s))
        assert rel(outs[s], sample(with_lora(model, lora_file, s))) < tol(model), s
    assert rel(outs[0.3], outs[-1.0]) > 0.02


def test_lora_on_fp8_compressed_ffns_runs_the_kernels_path(pack, node, ltx2, lora_file):
    """FP8 residual, r=16: the LoRA rides in the fused branch (rank 16 + 4) on a GPU, the reference on CPU."""
    model = ltx2()
    patched = compress(node, model, None, rank=16).result[0]
    dense = sample(with_lora(model, lora_file, 1.0))
    err_with = rel(sample(with_lora(patched, lora_file, 1.0)), dense)
    err_without = rel(sample(patched), dense)
    print(f"fp8 r=16: {err_with:.4f} from the dense model with the LoRA ({err_without:.4f} without the LoRA)")
    assert err_with < 0.05 and err_with < err_without / 3


def test_patches_a_compressed_ffn_cannot_apply_are_refused_clearly(pack, node, ltx2):
    model = ltx2()
    key = "diffusion_model.transformer_blocks.0.ff.net.2.weight"
    w = model.model.diffusion_model.transformer_blocks[0].ff.net[2].weight
    diff = model.clone()
    diff.add_patches({key: (torch.ones_like(w) * 1e-3,)}, 1.0)
    with pytest.raises(ValueError, match="full weight diff.*cannot apply"):
        compress(node, diff, None, rank=4)
    patched = compress(node, model, None, rank=4).result[0]
    late = patched.clone()
    late.add_patches({key: (torch.ones_like(w) * 1e-3,)}, 1.0)
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.ff\.net\.2\.weight carries a full weight diff"):
        sample(late)
    sample(patched)  # the failed run left nothing behind


@pytest.mark.parametrize("layers", ["ffn", "ffn+attention"])
def test_torch_compile_through_comfyui_has_no_graph_break_in_our_modules(pack, node, ltx2, layers):
    """ComfyUI's compile path (what its TorchCompileModel node calls) over a compressed MODEL (FFNs, or FFNs
    and every attention projection): the same result, and dynamo's explanation of one step lists no graph
    break inside this pack's code."""
    import os
    import re

    from comfy_api.torch_helpers import set_torch_compile_wrapper

    model = ltx2()
    patched = compress(node, model, None, rank=8, layers=layers).result[0]
    units = pack.calibration.ltx2.units(2, layers=layers)
    assert sorted(pack.nodes.model.compressed_modules(patched)) == sorted(units)  # 4 FFNs, or + 48 projections
    eager = sample(patched)
    ours = tuple(os.path.join(os.path.dirname(pack.__file__), d, "") for d in ("nodes", "kernels", "calibration"))
    explained = []

    def explain(apply_model, args):
        if not explained:
            torch._dynamo.reset()
            explained.append(torch._dynamo.explain(apply_model)(args["input"], args["timestep"], **args["c"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    probe = patched.clone()
    probe.set_model_unet_function_wrapper(explain)
    sample(probe)
    ex = explained[0]
    inside = [r for r in ex.break_reasons if any(f.filename.startswith(ours) for f in r.user_stack)]
    print(f"dynamo: {ex.graph_count} graphs, {ex.graph_break_count} breaks, in LiteFFN: {len(inside)}")
    for r in ex.break_reasons[:5]:
        print("  ComfyUI's:", r.reason.splitlines()[0][:100], "@", r.user_stack[-1].filename if r.user_stack else "")
    assert not inside, inside[0].reason
    # our modules are traced into dynamo's graphs (not run around them): the paths of the compressed modules in them
    traced = {v[0] for g in ex.graphs for n in g.graph.nodes for v in (n.meta.get("nn_module_stack") or {}).values()
              if getattr(v[1], "__name__", str(v[1])).rsplit(".", 1)[-1] in ("CompressedFFN", "CompressedLinear")}
    print(f"compressed modules in the graphs: {len(traced)}, e.g. {sorted(traced)[:2]}")
    assert any(".ff" in p for p in traced), sorted(traced)
    assert any(re.search(r"\.to_(q|k|v|out)\b", p) for p in traced) == (layers == "ffn+attention"), sorted(traced)
    compiled = patched.clone()
    backend = "inductor" if compiled.load_device.type == "cuda" else "aot_eager"  # inductor on CPU needs a C++ toolchain
    set_torch_compile_wrapper(model=compiled, backend=backend)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = sample(compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    print(f"torch.compile ({backend}) vs eager: {rel(out, eager):.2e}")
    assert rel(out, eager) < (1e-4 if compiled.load_device.type == "cpu" else 3e-2)


def test_other_packs_ffn_forward_patch_after_ours_is_ignored_with_a_warning(pack, node, ltx2, caplog):
    """KJNodes' LTXV Chunk FeedForward style: an object patch of `ff.forward` bound to whatever module is
    at `ff` when that node runs; on a compressed FFN it would call the dense FFN, which is not loaded."""
    import types

    model = ltx2()
    patched = compress(node, model, None, rank=4).result[0]
    ref = sample(patched)
    calls = []
    for bound_to_live in (False, True):
        other = patched.clone()
        dm = other.get_model_object("diffusion_model")
        for i, block in enumerate(dm.transformer_blocks):
            def chunked(self_module, x):
                calls.append(1)
                return torch.cat([self_module.net(c) for c in x.chunk(2, dim=1)], 1)
            other.add_object_patch(f"diffusion_model.transformer_blocks.{i}.ff.forward",
                                   types.MethodType(chunked, block.ff))
        assert torch.equal(sample(other), ref)
        sample(patched)  # loaded: the live tree now holds our proxies, so the next patch binds to one
    assert not calls
    assert "another node's patch diffusion_model.transformer_blocks.0.ff.forward is ignored" in caplog.text
