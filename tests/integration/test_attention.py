"""Attention projections as compressed units (`layers` = ffn+attention / attention) on small LTX-2
models loaded by ComfyUI itself: which modules the patched MODEL runs, the baseline branch, the
saved file, calibration, and LoRAs on the projections through ComfyUI's own loaders."""
from __future__ import annotations

import pytest
import torch
from test_interop import lora_file, tol, with_lora  # noqa: F401  (lora_file: the fixture, shared)
from test_nodes import calibrate, compress, rel, sample

LORA_RANK = 4
# projections of every attention kind, to_out.0 (a Linear inside an nn.Sequential) among them
PROJ = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_k", "transformer_blocks.0.audio_attn1.to_v",
        "transformer_blocks.1.audio_attn2.to_out.0", "transformer_blocks.0.audio_to_video_attn.to_out.0",
        "transformer_blocks.1.video_to_audio_attn.to_q"]
# what a LoRA in the attention file below patches
LORA_ON = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_v",
           "transformer_blocks.0.audio_to_video_attn.to_out.0", "transformer_blocks.1.video_to_audio_attn.to_k"]


@pytest.fixture(scope="module")
def units(pack):
    """{layers: [units]} of the tiny model (2 blocks), from the pack's own layout module."""
    ltx2 = pack.calibration.ltx2
    return {k: ltx2.units(2, layers=k) for k in ("ffn", "ffn+attention", "attention")}


def attention_units(units):
    return [u for u in units["ffn+attention"] if u not in units["ffn"]]


def full_rank(node, model, layers="ffn+attention", **kw):
    """Full rank with a bf16 residual: every compressed linear computes the dense function (CPU, fp32)."""
    return compress(node, model, None, rank=8192, energy=1.0, residual="bf16", layers=layers, **kw).result


def _count_calls(modules):
    calls = {n: 0 for n in modules}
    handles = []
    for n, m in modules.items():
        def hook(mod, args, out, n=n):
            calls[n] += 1
        handles.append(m.register_forward_hook(hook))
    return calls, handles


def test_ffn_attention_runs_compressed_projections_and_leaves_the_baseline_alone(pack, node, ltx2, units):
    M = pack.nodes.model
    CompressedLinear = pack.kernels.modules.CompressedLinear
    model = ltx2()
    dm = model.model.diffusion_model
    attn = attention_units(units)
    assert len(attn) == 2 * 6 * 4 and set(PROJ) <= set(attn)  # 2 blocks x 6 attentions x q, k, v, out
    originals = {u: dm.get_submodule(u) for u in attn}
    assert all(isinstance(m, torch.nn.Linear) for m in originals.values())
    weights = {u: m.weight.detach().clone() for u, m in originals.items()}
    before = sample(model)

    patched, report = full_rank(node, model)
    mods = M.compressed_modules(patched)
    assert sorted(mods) == sorted(units["ffn+attention"]), report
    assert sorted(u for u in mods if pack.calibration.ltx2.is_ffn_unit(u)) == sorted(units["ffn"])
    assert "56 linears" in report, report  # 2 x (2 FFNs x 2 + 24 projections)
    for u in attn:
        proxy = patched.object_patches["diffusion_model." + u]
        assert isinstance(mods[u], CompressedLinear) and proxy.target is mods[u] and proxy.original is originals[u]
        assert (mods[u].in_features, mods[u].out_features) == (originals[u].in_features, originals[u].out_features)
    assert not model.object_patches  # the input MODEL carries no patch

    # while the patched MODEL samples, each projection runs its CompressedLinear, never the dense Linear
    ran, h1 = _count_calls({u: mods[u] for u in attn})
    dense, h2 = _count_calls(originals)
    dispatch = pack.kernels.dispatch
    dispatch.counts.clear()
    try:
        out = sample(patched)
    finally:
        for h in h1 + h2:
            h.remove()
    assert all(ran.values()), [u for u, c in ran.items() if not c]
    assert not any(dense.values()), [u for u, c in dense.items() if c]
    path = "triton" if dispatch.fp8_tensor_cores(torch.device(patched.load_device)) else "reference"
    assert dispatch.counts[f"linear:{path}"] >= sum(ran.values()) > 0, dict(dispatch.counts)

    # the baseline: the same output bit for bit, from its own Linear objects with their weights unchanged
    assert not model.object_patches
    assert torch.equal(sample(model), before)
    for u in attn:
        assert dm.get_submodule(u) is originals[u], u  # the baseline is the one loaded now
        assert torch.equal(originals[u].weight, weights[u]), u
    err = rel(out, before)
    print(f"ffn+attention, full rank, bf16 residual: {err:.2e} from the dense model")
    assert err < tol(model)
    ffn_only = full_rank(node, model, layers="ffn")[0]
    assert patched.model_size() < ffn_only.model_size() < model.model_size()  # VRAM planned without the dense projections


def test_attention_only_and_one_stream(pack, node, ltx2, units):
    M = pack.nodes.model
    model = ltx2()
    patched, report = compress(node, model, None, rank=4, layers="attention", streams="audio").result
    got = sorted(M.compressed_modules(patched))
    want = sorted(u for u in attention_units(units) if u.split(".")[2] in ("audio_attn1", "audio_attn2",
                                                                           "video_to_audio_attn"))
    assert got == want and len(want) == 2 * 3 * 4, got
    assert not any(".ff" in k or ".attn1." in k for k in patched.object_patches), list(patched.object_patches)
    err = rel(sample(patched), sample(model))
    print(f"audio attention only, r=4 fp8 uncalibrated: {err:.4f}")
    assert 0 < err < 0.2


def test_calibrate_ffn_attention_records_the_projections_and_compress_uses_them(pack, node, ltx2, units):
    ltx2_layout = pack.calibration.ltx2
    model = ltx2()
    stats, summary = calibrate(node, model, seeds=1, layers="ffn+attention").result
    names = ltx2_layout.linears(units["ffn+attention"])
    assert sorted(stats.names()) == sorted(names) and len(names) == 56, summary
    assert all(stats[n].rows > 0 for n in names), [n for n in names if not stats[n].rows]
    dm = model.model.diffusion_model
    for n in PROJ:
        assert stats[n].width == dm.get_submodule(n).in_features, n
    # cross attention reads the other stream: keys of audio_to_video are audio-wide, of video_to_audio video-wide
    assert stats["transformer_blocks.0.audio_to_video_attn.to_k"].width == 32
    assert stats["transformer_blocks.0.video_to_audio_attn.to_k"].width == 64
    # rows: video self-attention sees the video tokens, audio self-attention the audio tokens
    assert stats["transformer_blocks.0.attn1.to_q"].rows == stats["transformer_blocks.0.ff.net.0.proj"].rows
    assert stats["transformer_blocks.0.audio_attn1.to_q"].rows == stats["transformer_blocks.0.audio_ff.net.0.proj"].rows

    base = sample(model)
    patched, report = compress(node, model, stats, rank=16, layers="ffn+attention").result
    assert "56 linears" in report and "56 calibrated" in report, report
    err = rel(sample(patched), base)
    print(f"ffn+attention r=16 fp8 calibrated: {err:.4f} from the dense model")
    assert 0 < err < 0.05

    # statistics of the FFNs only: the projections are compressed uncalibrated, and the report says so
    ffn_stats, _ = calibrate(node, model, seeds=1).result
    _, report = compress(node, model, ffn_stats, rank=16, layers="ffn+attention").result
    assert "8 calibrated" in report and "48 linears have no statistics" in report, report
    att, _ = calibrate(node, model, seeds=1, layers="attention", streams="video").result
    assert sorted(att.names()) == sorted(n for n in names if n.split(".")[2] in ("attn1", "attn2",
                                                                                 "audio_to_video_attn"))


def test_saved_ffn_attention_file_loads_to_the_same_model(pack, node, ltx2, units):
    import os

    from test_nodes import folder

    M = pack.nodes.model
    model = ltx2()
    stats, _ = calibrate(node, model, seeds=1, layers="ffn+attention").result
    patched, _ = compress(node, model, stats, rank=8, save_name="attn/ltx2_fa_r8", layers="ffn+attention").result
    path = os.path.join(folder(), "attn", "ltx2_fa_r8.safetensors")
    meta = pack.calibration.compressed_file.read_meta(path)
    assert sorted(meta["layers"]) == sorted(pack.calibration.ltx2.linears(units["ffn+attention"]))
    loaded, report = node("LowRankFFNLoader").execute(model=model, compressed_file="attn/ltx2_fa_r8.safetensors").result
    assert "loaded ltx2_fa_r8.safetensors" in report and "56 linears" in report, report
    a, b = M.compressed_modules(patched), M.compressed_modules(loaded)
    assert sorted(a) == sorted(b) == sorted(units["ffn+attention"])
    for k, m in a.items():
        assert type(m) is type(b[k]), k
        other = dict(b[k].named_parameters())
        assert other.keys() == dict(m.named_parameters()).keys(), k
        for n, p in m.named_parameters():
            assert torch.equal(p.view(torch.uint8), other[n].view(torch.uint8)), (k, n)
    assert torch.equal(sample(patched), sample(loaded))
    assert not model.object_patches


@pytest.fixture(scope="module")
def attention_lora(pack, tmp_path_factory):
    """A LoRA (diffusers layout: lora_A = down, lora_B = up, alpha) on four attention projections only
    (LORA_ON), registered in ComfyUI's `loras` folder."""
    import folder_paths
    from safetensors.torch import save_file

    import ltx2_tiny

    d = tmp_path_factory.mktemp("attn_loras")
    folder_paths.add_model_folder_path("loras", str(d), is_default=False)
    sd = ltx2_tiny.state_dict()
    g = torch.Generator().manual_seed(5)
    out = {}
    for u in LORA_ON:
        n, k = sd[f"model.diffusion_model.{u}.weight"].shape
        out[f"diffusion_model.{u}.lora_A.weight"] = torch.randn(LORA_RANK, k, generator=g) / k ** 0.5
        out[f"diffusion_model.{u}.lora_B.weight"] = torch.randn(n, LORA_RANK, generator=g) * 0.5
        out[f"diffusion_model.{u}.alpha"] = torch.tensor(float(LORA_RANK))
    save_file({k: v.to(torch.bfloat16) if v.dim() else v for k, v in out.items()}, str(d / "attn_lora.safetensors"))
    return "attn_lora.safetensors"


def _loras_set(pack, patched):
    return [u for u, m in pack.nodes.model.compressed_modules(patched).items()
            if any(getattr(x, "_extra", None) is not None for x in m.modules())]


def test_lora_on_attention_projections_acts_as_on_the_dense_model(pack, node, ltx2, attention_lora):
    model = ltx2()
    patched = full_rank(node, model)[0]
    ref = sample(patched)
    base, dense = sample(model), sample(with_lora(model, attention_lora, 0.8))
    assert rel(dense, base) > 0.02  # the LoRA changes the result
    lora = with_lora(patched, attention_lora, 0.8)
    assert sorted(k.removeprefix("diffusion_model.").removesuffix(".weight") for k in lora.patches) == sorted(LORA_ON)
    out = sample(lora)
    print(f"attention LoRA after ffn+attention compression: {rel(out, dense):.2e} from the dense model with it "
          f"({rel(ref, dense):.2e} without it)")
    assert rel(out, dense) < tol(model) and rel(ref, dense) > 0.02
    assert not _loras_set(pack, patched)  # cleared when sampling ended
    assert torch.equal(sample(patched), ref)  # no LoRA left behind
    # loaded now (its proxies in the live tree): another strength needs no re-compression
    neg = sample(with_lora(patched, attention_lora, -1.0))
    assert rel(neg, sample(with_lora(model, attention_lora, -1.0))) < tol(model)


def test_lora_patch_added_by_add_patches_on_an_attention_weight(pack, node, ltx2):
    """The 'lora' patch as ComfyUI's LoRA loaders put it (comfy.weight_adapter.LoRAAdapter), added with
    ModelPatcher.add_patches on transformer_blocks.0.attn1.to_q.weight and .to_out.0.weight."""
    from comfy.weight_adapter.lora import LoRAAdapter

    model = ltx2()
    patched = full_rank(node, model)[0]
    ref = sample(patched)
    g = torch.Generator().manual_seed(11)
    patches = {}
    for u in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_out.0"):
        w = model.model.diffusion_model.get_submodule(u).weight
        up, down = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w.shape[1], generator=g) / w.shape[1] ** 0.5
        patches[f"diffusion_model.{u}.weight"] = LoRAAdapter(set(), (up, down, 1.0, None, None, None))

    def with_patch(m, strength):
        m = m.clone()
        assert sorted(m.add_patches(patches, strength)) == sorted(patches)  # keys ComfyUI accepts for this model
        return m

    dense = sample(with_patch(model, 1.5))
    assert rel(dense, sample(model)) > 0.02
    out = sample(with_patch(patched, 1.5))
    print(f"add_patches LoRA on attn1.to_q and to_out.0: {rel(out, dense):.2e} from the dense model with it")
    assert rel(out, dense) < tol(model)
    assert not _loras_set(pack, patched) and torch.equal(sample(patched), ref)


def test_lora_before_compression_of_ffn_attention(pack, node, ltx2, attention_lora):
    model = ltx2()
    lora = with_lora(model, attention_lora, 0.8)
    dense = sample(lora)
    patched, report = full_rank(node, lora)
    assert f"a LoRA patches {len(LORA_ON)} of the compressed units" in report, report
    assert rel(sample(patched), dense) < tol(model)
    # compressed from the base weights, not the LoRA-patched ones: the LoRA runs at sampling time only
    mods = pack.nodes.model.compressed_modules(patched)
    u = LORA_ON[0]
    w = model.model.diffusion_model.get_submodule(u).weight.float()
    assert rel(mods[u].dense_weight(), w) < 1e-2
    # FFNs compressed, the projections dense: the LoRA on them is ComfyUI's usual weight patch
    ffn_only, report = full_rank(node, lora, layers="ffn")
    assert "a LoRA patches" not in report, report
    assert rel(sample(ffn_only), dense) < tol(model)


def test_mixed_lora_on_an_attention_only_model(pack, node, ltx2, lora_file):
    """test_interop's LoRA patches every FFN linear and attn1.to_q of block 0: on a MODEL whose attention
    projections alone are compressed, ComfyUI patches the dense FFNs and the pack runs the to_q part."""
    model = ltx2()
    patched = full_rank(node, model, layers="attention")[0]
    dense = sample(with_lora(model, lora_file, 0.8))
    lora = with_lora(patched, lora_file, 0.8)
    assert "diffusion_model.transformer_blocks.0.attn1.to_q.weight" in lora.patches
    err = rel(sample(lora), dense)
    print(f"FFN + attn1.to_q LoRA on an attention-only compressed model: {err:.2e}")
    assert err < tol(model)


def test_patches_a_compressed_projection_cannot_apply_are_refused_clearly(pack, node, ltx2):
    model = ltx2()
    dm = model.model.diffusion_model
    patched = compress(node, model, None, rank=4, layers="ffn+attention").result[0]
    for key in ("transformer_blocks.0.attn1.to_out.0.weight", "transformer_blocks.1.audio_to_video_attn.to_q.bias"):
        t = dm.get_submodule(key.rsplit(".", 1)[0]).get_parameter(key.rsplit(".", 1)[1])
        late = patched.clone()
        late.add_patches({"diffusion_model." + key: (torch.ones_like(t) * 1e-3,)}, 1.0)
        what = "a full weight diff" if key.endswith("weight") else "a patch of a tensor other than the weight"
        with pytest.raises(ValueError, match=key.replace(".", r"\.") + " carries " + what):
            sample(late)
    sample(patched)  # the failed runs left nothing behind


def test_comfyui_model_management_leaves_the_compressed_projections_alone(pack, node, ltx2, units, attention_lora):
    """A compressed projection's unit is a proxy in place of a Linear; ComfyUI must not take it for one of its
    own weight-casting Linears: its loaders (legacy and dynamic VRAM) pick their modules with _load_list, and
    would count the dense weight as loaded, move and patch it through the proxy (a LoRA's key names that
    weight). Here ComfyUI's partial (low-VRAM) load with the patches forced onto the weights, as
    load_models_gpu(force_patch_weights=True) does with little VRAM, then its unpatch: the compressed model still
    runs the LoRA through the pack, and the originals come out of it unchanged."""
    model = ltx2()
    dm = model.model.diffusion_model
    attn = attention_units(units)
    originals = {u: dm.get_submodule(u) for u in attn}
    weights = {u: m.weight.detach().clone() for u, m in originals.items()}
    patched = full_rank(node, model)[0]
    lora = with_lora(patched, attention_lora, 0.8)
    dense = sample(with_lora(model, attention_lora, 0.8))
    sample(lora)  # loaded: the proxies sit in the live tree
    loaded = {x[-3] for x in lora._load_list()}
    assert not loaded & {"diffusion_model." + u for u in attn}, sorted(loaded & {"diffusion_model." + u for u in attn})
    cpu = torch.device("cpu")
    lora.unpatch_model(cpu)
    lora.patch_model(device_to=cpu, lowvram_model_memory=1, load_weights=True, force_patch_weights=True)
    try:
        for u in attn:
            proxy = lora.object_patches["diffusion_model." + u]
            assert dm.get_submodule(u) is proxy and not list(proxy.parameters()), u  # no weight of its own
    finally:
        lora.unpatch_model(cpu)
    for u in attn:
        assert dm.get_submodule(u) is originals[u] and torch.equal(originals[u].weight, weights[u]), u
    assert rel(sample(lora), dense) < tol(model)
    # loaded again: a weight that ComfyUI sets by name (dynamic VRAM restores weight backups so, whichever clone
    # is patched in) lands on the original Linear, not on the proxy
    import comfy.utils

    u = "transformer_blocks.1.audio_to_video_attn.to_out.0"
    proxy = dm.get_submodule(u)
    assert proxy is lora.object_patches["diffusion_model." + u]
    comfy.utils.set_attr_param(lora.model, f"diffusion_model.{u}.weight", weights[u].clone())
    assert not list(proxy.parameters()) and torch.equal(originals[u].weight, weights[u])
    assert comfy.utils.get_attr(lora.model, f"diffusion_model.{u}.weight") is originals[u].weight


def test_attention_compressed_onto_a_model_with_compressed_ffns_keeps_both(pack, node, ltx2, units):
    """Low-Rank FFN Loader with an FFN file, then Compress Model (layers = attention) on its output: the MODEL
    carries both, every compressed tensor in a model that ComfyUI loads, offloads and counts with it (its
    additional models), and it is the one-step ffn+attention compression."""
    M = pack.nodes.model
    model = ltx2()
    compress(node, model, None, rank=8, save_name="attn/ffn_only_r8")
    ffn, _ = node("LowRankFFNLoader").execute(model=model, compressed_file="attn/ffn_only_r8.safetensors").result
    both, _ = compress(node, ffn, None, rank=8, layers="attention").result
    one, _ = compress(node, model, None, rank=8, layers="ffn+attention").result
    mods = M.compressed_modules(both)
    assert sorted(mods) == sorted(units["ffn+attention"])
    managed = {id(p) for extra in both.get_nested_additional_models() for p in extra.model.parameters()}
    unmanaged = [u for u, m in mods.items() if any(id(p) not in managed for p in m.parameters())]
    assert not unmanaged, unmanaged
    assert both.model_size() == one.model_size()
    from comfy.patcher_extension import CallbacksMP

    assert len(both.get_callbacks(CallbacksMP.ON_PRE_RUN, "liteffn")) == 1  # the pack's hooks run once per sampling
    assert torch.equal(sample(both), sample(one))
    with pytest.raises(ValueError, match="already compressed by LiteFFN"):
        compress(node, both, None, rank=8)


# FP8 checkpoints: ComfyUI's scaled FP8 layout (E4M3 codes + per-tensor weight_scale + _quantization_metadata)
# on the attention projections, read by ComfyUI as comfy-kitchen QuantizedTensors

def _quantized(t) -> bool:
    return type(t).__name__ == "QuantizedTensor"


def _fp8_model(ltx2):
    pytest.importorskip("comfy_kitchen", reason="ComfyUI reads FP8 checkpoints through comfy-kitchen")
    return ltx2(fp8_ffn=True, fp8_attention=True)


def test_fp8_checkpoint_as_source_of_attention_projections(pack, node, ltx2, units):
    import os

    import ltx2_tiny
    from test_nodes import folder

    M = pack.nodes.model
    fp8 = _fp8_model(ltx2)
    dm = fp8.model.diffusion_model
    attn = attention_units(units)
    qt = {u: dm.get_submodule(u).weight for u in attn}
    assert all(_quantized(w) for w in qt.values()), [u for u, w in qt.items() if not _quantized(w)]
    assert _quantized(dm.transformer_blocks[0].ff.net[0].proj.weight)
    # ComfyUI's dequantized weight is the bf16 checkpoint's to E4M3 precision (3 mantissa bits)
    bf16 = ltx2().model.diffusion_model
    deq = {u: w.detach().dequantize().float() for u, w in qt.items()}
    for u in PROJ:
        d = rel(deq[u], bf16.get_submodule(u).weight.detach().float())
        assert 0 < d < 0.05, (u, d)

    # the source a compressed projection is built from is the FP8 weight, its scale applied
    exact, report = full_rank(node, fp8)
    mods = M.compressed_modules(exact)
    assert sorted(mods) == sorted(units["ffn+attention"]) and "56 linears" in report, report
    for u in attn:
        d = rel(mods[u].dense_weight().detach(), deq[u])
        assert d < 1e-2, (u, d)
    base = sample(fp8)
    err_exact = rel(sample(exact), base)
    print(f"FP8 attention source, full rank bf16 residual: {err_exact:.2e} from the FP8 model")
    assert err_exact < tol(fp8)

    # calibrate and compress ffn+attention from the FP8 model: close to the FP8 model's own output
    stats, summary = calibrate(node, fp8, seeds=1, layers="ffn+attention").result
    names = pack.calibration.ltx2.linears(units["ffn+attention"])
    assert sorted(stats.names()) == sorted(names) and all(stats[n].rows > 0 for n in names), summary
    patched, report = compress(node, fp8, stats, rank=16, layers="ffn+attention").result
    assert "56 linears" in report and "56 calibrated" in report, report
    err = rel(sample(patched), base)
    print(f"FP8 attention source, ffn+attention r=16 fp8 calibrated: {err:.4f} from the FP8 model")
    assert 0 < err < 0.05
    assert all(_quantized(dm.get_submodule(u).weight) for u in attn)  # the FP8 model is as ComfyUI loaded it

    # saved, then loaded onto the FP8 model: the file's fingerprints are those of the FP8 codes of the checkpoint
    saved, _ = compress(node, fp8, stats, rank=8, save_name="attn/fp8_fa_r8", layers="ffn+attention").result
    meta = pack.calibration.compressed_file.read_meta(os.path.join(folder(), "attn", "fp8_fa_r8.safetensors"))
    sd = ltx2_tiny.state_dict()
    ltx2_tiny.quantize_fp8(sd, [f"model.diffusion_model.{u}.weight" for u in attn])
    codes = pack.calibration.fingerprint.fingerprint([(u, sd[f"model.diffusion_model.{u}.weight"]) for u in attn])
    assert {u: meta["fingerprint"][u] for u in attn} == codes
    assert M.model_fingerprint(fp8, list(attn)) == codes
    loaded, report = node("LowRankFFNLoader").execute(model=fp8, compressed_file="attn/fp8_fa_r8.safetensors").result
    assert "loaded fp8_fa_r8.safetensors" in report and "56 linears" in report, report
    a, b = M.compressed_modules(saved), M.compressed_modules(loaded)
    assert sorted(a) == sorted(b) == sorted(units["ffn+attention"])
    for k, m in a.items():
        other = dict(b[k].named_parameters())
        for n, p in m.named_parameters():
            assert torch.equal(p.view(torch.uint8), other[n].view(torch.uint8)), (k, n)
    assert torch.equal(sample(saved), sample(loaded))
    assert not fp8.object_patches
    # onto the checkpoint whose FFNs alone are FP8: exactly the 48 projections differ (bf16 there)
    with pytest.raises(ValueError, match=r"48 layers hold different weights \(e\.g\. transformer_blocks\.\d+\.\w+\.to_"):
        node("LowRankFFNLoader").execute(model=ltx2(fp8_ffn=True), compressed_file="attn/fp8_fa_r8.safetensors")


@pytest.mark.parametrize("layers", ["ffn", "attention"])
def test_fp8_layers_left_uncompressed_keep_comfyuis_quantized_weights(pack, node, ltx2, units, layers):
    """A MODEL from an FP8 checkpoint (video FFNs and every projection FP8) compressed on one kind of layer: the
    other kind keeps ComfyUI's own modules, with the same QuantizedTensor weights, in the patched clone's tree
    (while it samples, and after), and runs them. (ComfyUI re-wraps a QuantizedTensor parameter when it first
    loads the model, over the same FP8 storage: the weight is compared by storage and value, not identity.)"""
    M = pack.nodes.model
    fp8 = _fp8_model(ltx2)
    dm = fp8.model.diffusion_model
    other = [u for u in units["ffn+attention"] if u not in units[layers]]
    linears = {n: dm.get_submodule(n) for n in pack.calibration.ltx2.linears(other)}
    kept = {n: m for n, m in linears.items() if _quantized(m.weight)}  # audio_ff is bf16 in this checkpoint
    assert len(kept) == (48 if layers == "ffn" else 4), sorted(kept)
    before = {n: (m.weight.data_ptr(), m.weight.dequantize().clone()) for n, m in kept.items()}
    patched, report = compress(node, fp8, None, rank=8, layers=layers).result
    assert sorted(M.compressed_modules(patched)) == sorted(units[layers])
    assert not any(k.removeprefix("diffusion_model.").startswith(tuple(other)) for k in patched.object_patches)
    ran, handles = _count_calls(kept)
    try:
        out = sample(patched)  # loaded: the live tree is the patched clone's
        tree = patched.model.diffusion_model
        for n, m in kept.items():
            w = tree.get_submodule(n).weight
            assert tree.get_submodule(n) is m and _quantized(w) and w.data_ptr() == before[n][0], n
    finally:
        for h in handles:
            h.remove()
    assert all(ran.values()), [n for n, c in ran.items() if not c]
    for n, m in kept.items():
        assert patched.get_model_object("diffusion_model." + n) is m and m.weight.data_ptr() == before[n][0], n
        assert _quantized(m.weight) and torch.equal(m.weight.dequantize(), before[n][1]), n
    assert not any(k.removeprefix("diffusion_model.").removesuffix(".weight") in kept for k in patched.backup)
    err = rel(out, sample(fp8))
    print(f"FP8 checkpoint, layers={layers} r=8 fp8: {err:.4f} from the FP8 model")
    assert 0 < err < 0.2


def test_shared_input_passes_in_comfyuis_attention(pack, node, ltx2):
    """On the kernels' path (Triton's interpreter here), ComfyUI's own attention calls q, k and v of its
    self-attentions (k and v of its cross-attentions) so that one input pass serves them: every group
    computes once per attention call, none of its later members alone, and the samples are those of
    unlinked projections."""
    modules, dispatch, ltx2_layout = pack.kernels.modules, pack.kernels.dispatch, pack.calibration.ltx2
    model = ltx2()
    patched = compress(node, model, None, rank=8, residual="fp8", layers="ffn+attention").result[0]
    mods = pack.nodes.model.compressed_modules(patched)
    groups = ltx2_layout.shared_inputs(list(mods))
    assert len(groups) == 2 * 6 and all(mods[g[0]]._shared is not None for g in groups)
    dispatch.set_mode("triton")
    try:
        dispatch.counts.clear()
        linked = sample(patched)
        counts = dict(dispatch.counts)
        modules.SHARE_INPUTS = False
        dispatch.counts.clear()
        alone = sample(patched)
        alone_counts = dict(dispatch.counts)
    finally:
        modules.SHARE_INPUTS = True
        dispatch.set_mode(None)
    calls = alone_counts["linear:triton"] // 48  # attention calls: 24 projections each per block and step
    # per block 6 groups serve 14 of the 24 projections; the 10 others (6 outs, 4 cross-attention qs) run alone
    assert counts["shared:triton"] == 6 * 2 * calls and counts["linear:triton"] == 10 * 2 * calls, (counts, alone_counts)
    assert torch.equal(linked, alone)
