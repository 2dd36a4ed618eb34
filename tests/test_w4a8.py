"""W4A8: FP4 residuals (MXFP4, NVFP4) converted in registers to E4M3 and multiplied on FP8
tensor cores (kernels/w4a8.py). The repacking and the weights' reference on CPU; the kernel
against the fp32 reference of the same FP4 tensors, under Triton's interpreter on CPU and
compiled on a GPU."""
import pytest
import torch
import torch.nn.functional as Fn

from liteffn.calibration.compress import compress_linear
from liteffn.kernels import formats as F
from liteffn.kernels import fp8_ffn, fused, gemm, w4a8
from liteffn.kernels import reference as R

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not fp8_ffn.available(), reason="triton is not installed")
GPU_SPLIT = {"BM": 128} if DEV == "cuda" else {}  # the GPU takes split K with 128-token tiles only
CONFIGS = [{}, dict(EPI_SPLIT=False, PERSIST=False), dict(PROMOTE=2, programs=2), dict(SPLIT_K=2, PERSIST=False, **GPU_SPLIT),
           dict(SPLIT_K=3, PROMOTE=2, PERSIST=False, **GPU_SPLIT)]


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _fp4_layer(fmt, n, k, rank, seed=0, spread=2.0):
    """A compressed linear with an FP4 residual; columns of very different magnitude (10^spread),
    so block scales and the per-channel factor both matter."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) / k**0.5
    W = W * torch.logspace(-spread / 2, spread / 2, k)[torch.randperm(k, generator=g)][None, :]
    b = torch.randn(n, generator=g) / 4
    return compress_linear(W, b, None, rank, fmt).tensors


def test_repack_layout():
    """One word holds codes 4j..4j+3 of a group's first half (magnitudes in nibbles 0-3, signs on
    bits 7/15/23/31) and 4j..4j+3 of its second half (nibbles 4-7, signs on bits 3/11/19/27)."""
    codes = torch.zeros(1, 128, dtype=torch.uint8)
    codes[0, 4 + 1] = 0xB  # first half, word 1, i = 1: magnitude 3, negative
    codes[0, 64 + 4 + 2] = 0x6  # second half, word 1, i = 2: magnitude 6, positive
    codes[0, 64 + 4 + 3] = 0x8  # -0
    w = w4a8.repack(F.pack_fp4(codes)).view(torch.int32)[0, 1].item() & 0xFFFFFFFF
    assert w == (3 << 4) | (1 << 15) | (6 << 24) | (1 << 27)
    q = F.pack_fp4(torch.randint(0, 16, (5, 384), dtype=torch.uint8))
    assert torch.equal(w4a8.unrepack(w4a8.repack(q)), q)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_kernel_weights_equal_the_fp4_weights(fmt):
    """MXFP4: the kernel's E4M3 weights are exactly the stored ones. NVFP4: one more E4M3 rounding
    of code x block-scale mantissa, at most 2^-4 per weight."""
    t = _fp4_layer(fmt, 48, 256, 0)
    w4 = w4a8.prepare(fmt, t)
    exact = F.decode(fmt, t)
    folded = w4a8.dequant(w4)
    assert folded.abs().max() <= 448 * w4["q_scale"].max()
    if fmt == "mxfp4":
        assert torch.equal(folded, exact)
    else:
        err = (folded - exact).abs()
        assert bool((err <= exact.abs() * 2.0**-4 + 1e-12).all())
        assert 0 < rel(folded, exact) < 0.03, rel(folded, exact)


def test_mxfp4_range_and_flush():
    """Blocks down to 2^-emax of a channel's largest are exact; smaller ones become zero."""
    n, k, e = 16, 512, w4a8.emax(F.get("mxfp4"))
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    ex = 127 + torch.randint(-e, 1, (n, k // 32))
    ex[:, 0] = 127
    t = {"q": F.pack_fp4(codes), "q_scale": ex.to(torch.uint8)}
    assert torch.equal(w4a8.dequant(w4a8.prepare("mxfp4", t)), F.decode("mxfp4", t))
    ex[:, 1] = 127 - e - 1
    t["q_scale"] = ex.to(torch.uint8)
    d, exact = w4a8.dequant(w4a8.prepare("mxfp4", t)), F.decode("mxfp4", t)
    assert not d[:, 32:64].any() and exact[:, 32:64].any()
    assert torch.equal(d[:, 64:], exact[:, 64:])


def test_emax_is_the_largest_exponent_the_table_holds():
    """emax(f): the largest E whose table (largest magnitude 6, block mantissa j = 7 unless the
    scales are powers of two) stays within E4M3."""
    for f in (f for f in F.FORMATS.values() if f.w4a8):
        top = lambda e: float(w4a8._mag_table(torch.tensor(0 if f.pow2_scales else 7), torch.tensor(e)).max())  # noqa: E731, B023
        assert top(w4a8.emax(f)) <= F.FP8_MAX < top(w4a8.emax(f) + 1), f


def test_nvfp4_tensor_scale_is_exact():
    """NVFP4's fp32 tensor scale goes to the epilogue, not into the rounded weights."""
    t = _fp4_layer("nvfp4", 32, 128, 0)
    t2 = dict(t, q_scale2=t["q_scale2"] * 1.2345)
    a, b = w4a8.dequant(w4a8.prepare("nvfp4", t)), w4a8.dequant(w4a8.prepare("nvfp4", t2))
    assert torch.allclose(b, a * 1.2345, rtol=1e-6, atol=0)


def test_rejects_what_it_cannot_run():
    t = _fp4_layer("mxfp4", 16, 96, 0)
    with pytest.raises(ValueError, match="divisible by 128"):
        w4a8.prepare("mxfp4", t)
    with pytest.raises(ValueError, match="W4A8 takes nvfp4 or mxfp4 residuals, not 'fp8'"):
        w4a8.prepare("fp8", t)


def _layer(fmt, n, k, r, seed=0):
    return {k_: v.to(DEV) for k_, v in _fp4_layer(fmt, n, k, r, seed).items()}


@needs_triton
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("n,k", [(96, 384), (80, 128)])
def test_to_fp8_writes_the_kernels_weights(fmt, n, k):
    """The transient E4M3 copy (many tokens) holds exactly the in-register kernel's weights."""
    w4 = w4a8.prepare(fmt, _layer(fmt, n, k, 0))
    q8 = w4a8.to_fp8(w4)
    assert q8.dtype == torch.float8_e4m3fn and q8.shape == (n, k)
    assert torch.equal(q8.float() * w4["q_scale"][:, None], w4a8.dequant(w4))


@needs_triton
@pytest.mark.parametrize("cfg", CONFIGS + ["materialize"])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m,k,n,r", [(50, 256, 96, 20), (40, 128, 128, 0), (33, 384, 64, 8)])
def test_w4a8_gemm_matches_reference(fmt, cfg, m, k, n, r):
    t = _layer(fmt, n, k, r)
    w4 = w4a8.prepare(fmt, t)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 2).to(torch.bfloat16).to(DEV)
    xq, sx, u = fp8_ffn.act_quant_lowrank(x, t.get("B"))
    kw = dict(materialize=True) if cfg == "materialize" else dict(config=cfg, materialize=False)
    y = w4a8.scaled_gemm(xq, sx, w4, u=u, A=t.get("A"), bias=t.get("bias"), **kw)
    # reference: the same quantized activations and the kernel's weights in fp32; the low rank
    # sees the unquantized x
    ref = Fn.linear(xq.float() * sx[:, None], w4a8.dequant(w4)) + t["bias"].float()
    if r:
        ref = ref + Fn.linear(Fn.linear(x.float(), t["B"].float()), t["A"].float())
    assert y.shape == (m, n) and torch.isfinite(y.float()).all()
    assert rel(y, ref) < 1e-2, rel(y, ref)
    if fmt == "mxfp4":  # and the FP4 layer itself, through the reference path
        assert rel(y, R.compressed_linear_ref(x, fmt, t, dtype=torch.float32)) < 1e-2


@needs_triton
def test_split_k_sums_in_a_workspace_it_leaves_zeroed():
    """Split K adds the parts into a shared fp32 workspace and the last program of each tile runs
    the epilogue: a second launch on the same workspace gives the same output, and it is zero after."""
    t = _layer("mxfp4", 96, 512, 8)
    w4 = w4a8.prepare("mxfp4", t)
    x = torch.randn(20, 512, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(DEV)
    xq, sx, u = fp8_ffn.act_quant_lowrank(x, t["B"])
    run = lambda cfg: w4a8.scaled_gemm(xq, sx, w4, u=u, A=t["A"], bias=t["bias"], config=cfg,  # noqa: E731
                                       materialize=False)
    one = run(dict(PERSIST=False, **GPU_SPLIT))
    a, b = run(dict(SPLIT_K=4, PERSIST=False, **GPU_SPLIT)), run(dict(SPLIT_K=4, PERSIST=False, **GPU_SPLIT))
    ws, cnt = gemm._WORKSPACES[xq.device]
    assert not ws.any() and not cnt.any()
    assert torch.equal(a, b) or rel(a, b) < 1e-3  # fp32 atomics: the order of the four parts may vary
    assert rel(a, one) < 5e-3, rel(a, one)


@needs_triton
def test_split_k_refuses_small_token_tiles_on_the_gpu(monkeypatch):
    """64-token tiles with split K gave wrong rows on the H100: the compiled path refuses them
    before launching anything."""
    monkeypatch.setattr(gemm, "INTERP", False)
    t = _layer("mxfp4", 64, 256, 0)
    w4 = w4a8.prepare("mxfp4", t)
    xq = torch.zeros(8, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="BM=128"):
        w4a8.scaled_gemm(xq, torch.ones(8), w4, config=dict(BM=64, SPLIT_K=2), materialize=False)


@needs_triton
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("materialize_m", [1 << 30, 1])
def test_w4a8_fused_ffn_matches_reference(fmt, materialize_m, monkeypatch):
    """Up-projection with GELU, static FP8 output and the down-projection's low rank (atomics),
    then the down-projection: fused.ffn's three launches with FP4 weights, in registers
    and (as with many tokens) through transient E4M3 copies."""
    monkeypatch.setattr(w4a8, "MATERIALIZE_M", materialize_m)
    m, d, hdim, r = 40, 128, 256, 16
    up, down = _layer(fmt, hdim, d, r, 1), _layer(fmt, d, hdim, r, 2)
    x = (torch.randn(m, d, generator=torch.Generator().manual_seed(3)) * 2).to(torch.bfloat16).to(DEV)
    h = Fn.gelu(R.compressed_linear_ref(x, fmt, up, dtype=torch.float32), approximate="tanh")
    h_scale = fp8_ffn.static_scale(h.abs().amax().reshape(1).to(DEV))
    y = fused.ffn(x, w4a8.prepare(fmt, up), w4a8.prepare(fmt, down), h_scale)
    ref = R.compressed_ffn_ref(x, fmt, up, fmt, down, h_scale=h_scale, dtype=torch.float32)
    assert y.dtype == torch.bfloat16 and rel(y, ref) < (2e-2 if fmt == "mxfp4" else 5e-2), rel(y, ref)


@needs_triton
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4_modules_run_the_w4a8_kernels(fmt):
    """A compressed FFN with FP4 residuals, built where the kernels can run: its tensors are
    converted to the kernel's layout once, the fused path runs, and the reference path of the
    same module computes the same function."""
    from liteffn.kernels import dispatch
    from liteffn.kernels.modules import CompressedFFN, CompressedLinear

    d, hdim, r = 128, 256, 16
    up, down = _fp4_layer(fmt, hdim, d, r, 1), _fp4_layer(fmt, d, hdim, r, 2)
    x = (torch.randn(2, 20, d, generator=torch.Generator().manual_seed(3)) * 2).to(torch.bfloat16)
    h = Fn.gelu(R.compressed_linear_ref(x.float(), fmt, up), approximate="tanh")
    down["input_amax"] = h.abs().amax().reshape(1)
    dispatch.set_mode("triton")
    try:
        ffn = CompressedFFN(CompressedLinear(fmt, d, hdim, up), CompressedLinear(fmt, hdim, d, down)).to(DEV)
        assert ffn.up.sb is not None and ffn.up.q_scale2 is None and ffn.up.q.shape == up["q"].shape
        if fmt == "mxfp4":  # same residual weights as stored
            assert torch.equal(R.dequant_weight(fmt, ffn.up.tensors(), torch.float32).cpu(), F.decode(fmt, up))
        before = dispatch.counts["ffn:triton"]
        y = ffn(x.to(DEV))
        assert dispatch.counts["ffn:triton"] == before + 1
        dispatch.set_mode("reference")
        ref = ffn(x.to(DEV))
        assert y.shape == x.shape and rel(y, ref) < 2e-2, rel(y, ref)
    finally:
        dispatch.set_mode(None)
    # built where no kernel runs, the module keeps the stored layout
    dispatch.set_mode("reference")
    try:
        assert CompressedLinear(fmt, d, hdim, up).sb is None
    finally:
        dispatch.set_mode(None)
