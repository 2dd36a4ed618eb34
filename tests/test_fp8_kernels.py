"""The fused FP8 FFN kernels (kernels/fp8_ffn.py, gemm.py, fused.py) against their torch references.

On CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest) on small shapes
that still cover every branch: row, column and K tails, rank tails, split and whole
epilogues, persistent and one-tile-per-program grids. On a GPU the same tests run compiled.
Outputs are poisoned with NaN first so that an unwritten element fails the test."""
import logging

import pytest
import torch

from liteffn.calibration.compress import compress_linear
from liteffn.calibration.synthetic import INPUT_KINDS, dense_weight, kernel_inputs, random_fp8_layer
from liteffn.calibration.stats import LayerStats
from liteffn.kernels import dispatch, fp8_ffn, fused, gemm, ops
from liteffn.kernels import reference as R
from liteffn.kernels.modules import CompressedFFN, CompressedLinear

pytestmark = pytest.mark.skipif(not fp8_ffn.available(), reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# {} is the interpreter's default configuration (also pinned on a GPU, to keep compiles few)
# PROMOTE=2 with an odd number of K tiles reads a tile past K (zeros); PROMOTE=0: no promotion
# SPLIT_K: K shared by 2-3 programs per tile, summed in a workspace (few-token launches on the GPU, 128-token tiles)
GPU_SPLIT = {"BM": 128} if DEV == "cuda" else {}
CONFIGS = [{}, dict(EPI_SPLIT=False), dict(PERSIST=False), dict(BK=64, BN=32, programs=2), dict(PROMOTE=2),
           dict(PROMOTE=0), dict(SPLIT_K=2, PERSIST=False, **GPU_SPLIT),
           dict(SPLIT_K=3, PROMOTE=2, PERSIST=False, **GPU_SPLIT)]
FP8_NAN = 0x7F


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _x(m, k, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitude: per-token scales matter
    return (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).pow(3) * 8).to(dtype).to(DEV)


def _layer(n, k, rank, seed=0, stats_amax=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) / 4
    t = compress_linear(W, b, None, rank, "fp8").tensors
    if stats_amax is not None:
        t["input_amax"] = torch.tensor([stats_amax])
    return {k_: v.to(DEV) for k_, v in t.items()}


def _poisoned(shape, dtype):
    t = torch.empty(shape, device=DEV, dtype=dtype)
    if dtype == torch.float8_e4m3fn:
        t.view(torch.uint8).fill_(FP8_NAN)
    else:
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)
    dispatch.set_mode(None)


@pytest.mark.parametrize("m,k,r", [(50, 96, 20), (33, 64, 0), (17, 128, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("single", [True, False])
def test_act_quant_lowrank_matches_reference(m, k, r, dtype, single):
    x = _x(m, k, dtype=dtype)
    B = (torch.randn(r, k) / 10).bfloat16().to(DEV) if r else None
    xq, sx = _poisoned((m, k), torch.float8_e4m3fn), _poisoned((m,), torch.float32)
    # two launches: several K splits (CPU); one launch: 4 rows per program, so a row tail
    xq, sx, u = fp8_ffn.act_quant_lowrank(x, B, xq=xq, sx=sx, split=32, single=single)
    q0, s0, u0 = R.act_quant_lowrank_ref(x, B)
    codes, codes0 = xq.view(torch.uint8).long(), q0.view(torch.uint8).long()
    if DEV == "cpu":  # same IEEE division, same rounding
        assert torch.equal(sx, s0) and torch.equal(codes, codes0)
    else:  # CUDA torch divides by a scalar through its reciprocal: scales may differ by an ulp
        torch.testing.assert_close(sx, s0, rtol=3e-7, atol=0)
        assert float((codes == codes0).float().mean()) > 0.99 and int((codes - codes0).abs().max()) <= 1
    if r:
        # u: the fp32 sum rounded to bf16 once (as the reference's); fp16 x enters the bf16 MMA as bf16
        assert u.dtype == torch.bfloat16 and torch.isfinite(u).all()
        assert rel(u, u0) < (3e-3 if dtype == torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("nb", [2, 3])
@pytest.mark.parametrize("m,k,r", [(50, 96, 20), (70, 160, 64)])
def test_act_quant_shared_input_equals_one_at_a_time(nb, m, k, r):
    """Factors of 2-3 linears that read the same x (q, k, v): one pass gives the codes and scale of a single
    pass exactly, and each u[g] as x B_g^T (each [M, r] contiguous, in the returned [nb, M, r])."""
    x = _x(m, k, seed=nb)
    Bs = [(torch.randn(r, k) / 10).bfloat16().to(DEV) for _ in range(nb)]
    xq, sx, u = fp8_ffn.act_quant_lowrank(x, Bs, split=64)
    assert u.shape == (nb, m, r) and u.is_contiguous()
    for g, B in enumerate(Bs):
        q1, s1, u1 = fp8_ffn.act_quant_lowrank(x, B, split=64)
        assert torch.equal(q1.view(torch.uint8), xq.view(torch.uint8)) and torch.equal(s1, sx)
        torch.testing.assert_close(u[g].float(), u1.float(), rtol=2**-7, atol=1e-5)
        assert rel(u[g], R.act_quant_lowrank_ref(x, B)[2]) < 3e-3


@pytest.mark.parametrize("m,k,r,rows", [(50, 96, 20, 4), (37, 160, 64, 8), (20, 64, 0, 16), (5, 64, 8, 1)])
def test_act_quant_one_launch_equals_two(m, k, r, rows):
    """The few-row single launch gives the two-launch path's codes and scales exactly (same row max,
    same division) and its u up to fp32 summation order; both zero the next linear's u buffer."""
    x = _x(m, k, seed=m, dtype=torch.float32)
    B = (torch.randn(r, k) / 10).bfloat16().to(DEV) if r else None
    out = []
    for single in (True, False):
        z = torch.full((m, 40), float("nan"), device=DEV)
        out.append((*fp8_ffn.act_quant_lowrank(x, B, zero=z, single=single, rows=rows, split=64), z))
    (q1, s1, u1, z1), (q2, s2, u2, z2) = out
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)
    assert not z1.any() and not z2.any()
    if r:  # u: fp32 sums in another order, rounded to bf16 once: at most one bf16 step apart, nearly all equal
        torch.testing.assert_close(u1.float(), u2.float(), rtol=2**-7, atol=1e-5)
        assert float((u1 == u2).float().mean()) > 0.97
    else:
        assert u1 is None and u2 is None


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("m,k,n,r", [(50, 80, 96, 20), (40, 64, 128, 0), (70, 64, 64, 40)])
def test_linear_kernel_matches_reference(cfg, m, k, n, r):
    x = _x(m, k, seed=m)
    t = _layer(n, k, r, seed=n)
    xq, sx, u = fp8_ffn.act_quant_lowrank(x, t.get("B"))
    y = fp8_ffn.scaled_gemm(xq, sx, t["q"], t["q_scale"], u=u, A=t.get("A"), bias=t["bias"],
                            out=_poisoned((m, n), torch.bfloat16), config=cfg)
    assert torch.isfinite(y.float()).all()
    want = R.compressed_linear_ref(x, "fp8", t, dtype=torch.float32)
    assert rel(y, want) < 5e-3
    # and it is not just close to anything: without the low-rank branch it is far off
    if r:
        assert rel(R.compressed_linear_ref(x, "fp8", {**t, "A": None}, dtype=torch.float32), want) > 0.05


def test_split_k_sums_in_a_workspace_it_leaves_zeroed():
    """Split K: the parts go into a shared fp32 workspace and the last program of each tile runs the
    epilogue on the sum; the workspace and counters are zero again after (a CUDA graph replays it)."""
    m, k, n, r = 40, 256, 96, 16
    x, t = _x(m, k, seed=9), _layer(n, k, r, seed=9)
    xq, sx, u = fp8_ffn.act_quant_lowrank(x, t["B"])
    run = lambda cfg: fp8_ffn.scaled_gemm(xq, sx, t["q"], t["q_scale"], u=u, A=t["A"], bias=t["bias"],  # noqa: E731
                                          out=_poisoned((m, n), torch.bfloat16), config=cfg)
    one = run(dict(PERSIST=False, **GPU_SPLIT))
    a, b = run(dict(SPLIT_K=4, PERSIST=False, **GPU_SPLIT)), run(dict(SPLIT_K=4, PERSIST=False, **GPU_SPLIT))
    ws, cnt = gemm._WORKSPACES[xq.device]
    assert not ws.any() and not cnt.any()
    assert torch.equal(a, b) or rel(a, b) < 1e-3  # fp32 atomics: the order of the parts may vary
    assert 0 < rel(a, one) < 5e-3 or torch.equal(a, one), rel(a, one)
    assert rel(a, R.compressed_linear_ref(x, "fp8", t, dtype=torch.float32)) < 5e-3


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_gemm_matches_fp64_product_of_its_codes(kind):
    """As the GPU test at LTX-2 shapes (test_gpu_fp8.py), small: the GEMM alone against the fp64
    product of the same FP8 codes and scales, on stress inputs (calibration/synthetic.py)."""
    m, k, n = 64, 256, 128
    t = {k_: v.to(DEV) for k_, v in random_fp8_layer(n, k, 0, seed=3).items()}
    x = kernel_inputs(kind, m, k, dense_weight(t).cpu(), seed=3).to(DEV)
    xq, sx, _ = fp8_ffn.act_quant_lowrank(x)
    y = fp8_ffn.scaled_gemm(xq, sx, t["q"], t["q_scale"], out=_poisoned((m, n), torch.bfloat16))
    want = (xq.double() * sx.double()[:, None]) @ (t["q"].double() * t["q_scale"].double()[:, None]).T
    assert torch.isfinite(y.float()).all()
    assert rel(y, want) <= 5e-3, rel(y, want)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_fused_up_projection_writes_fp8_hidden_and_next_lowrank(cfg):
    """The FFN's first GEMM: FP8 codes of GELU(up(x)) / h_scale, and u2 = GELU(up(x)) B2^T."""
    m, d, r1, r2 = 45, 64, 24, 40
    x = _x(m, d, seed=5)
    up, down = _layer(4 * d, d, r1, seed=1), _layer(d, 4 * d, r2, seed=2)
    h_ref = torch.nn.functional.gelu(R.compressed_linear_ref(x, "fp8", up, dtype=torch.float32), approximate="tanh")
    hs = fp8_ffn.static_scale(h_ref.abs().amax())
    xq, sx, u = fp8_ffn.act_quant_lowrank(x, up["B"])
    u2 = torch.zeros(m, r2, device=DEV)
    hq = fp8_ffn.scaled_gemm(xq, sx, up["q"], up["q_scale"], u=u, A=up["A"], bias=up["bias"], gelu=True,
                             h_scale=hs, next_B=down["B"], u_next=u2, out=_poisoned((m, 4 * d), torch.float8_e4m3fn),
                             config=cfg)
    codes_ref = (h_ref / hs).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert not torch.isnan(hq.float()).any()
    same = (hq.view(torch.uint8) == codes_ref.view(torch.uint8)).float().mean()
    # the kernel's values differ from the fp32 reference's by bf16 roundings (u, the MMA operands) and GELU's
    # last bits, about 4e-4 of the largest value (small values sum large terms that cancel): every code is
    # within one FP8 step of the reference's plus 2e-3 of the largest, and most are equal (0.90-0.92 seen,
    # by Triton version; a threshold of 0.9 sat at that edge)
    a, b = hq.float(), codes_ref.float()
    step = torch.exp2(torch.floor(torch.log2(torch.maximum(a.abs(), b.abs()).clamp_min(2.0**-6))) - 3)
    assert bool(((a - b).abs() <= step + 2e-3 * b.abs().max()).all())
    assert float(same) > 0.8
    assert rel(hq.float() * hs, h_ref) < 0.05  # FP8 is 3 mantissa bits
    assert rel(u2, h_ref.bfloat16().float() @ down["B"].float().T) < 1e-2


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("ranks", [(24, 40), (0, 0)])
@pytest.mark.parametrize("bias", [True, False])  # LTX-2.5's FFNs may have none
def test_ffn_kernels_match_reference(static, ranks, bias):
    m, d = 61, 64
    x = _x(m, d, seed=7)
    up, down = _layer(4 * d, d, ranks[0], seed=3), _layer(d, 4 * d, ranks[1], seed=4)
    if not bias:
        up, down = {k: v for k, v in up.items() if k != "bias"}, {k: v for k, v in down.items() if k != "bias"}
    hs = fp8_ffn.static_scale(torch.tensor([2.0])) if static else None
    y = fused.ffn(x, up, down, hs.to(DEV) if static else None)
    # the unfused path stores the hidden activation in bf16 before quantizing it per token
    want = R.compressed_ffn_ref(x, "fp8", up, "fp8", down, h_scale=hs, dtype=torch.float32,
                                h_dtype=None if static else torch.bfloat16)
    other = R.compressed_ffn_ref(x, "fp8", up, "fp8", down, h_scale=None if static else fp8_ffn.static_scale(
        torch.tensor([2.0])), dtype=torch.float32)
    assert torch.isfinite(y.float()).all()
    err = rel(y, want)
    assert err < 1e-2
    assert err < rel(other, want)  # closer to its own scheme than to the other one


def test_u2_rounded_to_bf16_before_the_down_projection_changes_nothing(monkeypatch):
    """Where the warp-specialized GEMM runs the down-projection, u2 is rounded to bf16 in a launch of its own
    (fused.U2_BF16; that kernel takes bf16 U through its K ring): both GEMMs round U to bf16 for the MMA, so
    the FFN's output is the same to the bit. Here the switch is forced on the Triton kernels."""
    x = _x(61, 64, seed=9)
    up, down = _layer(256, 64, 24, seed=3), _layer(64, 256, 40, seed=4)
    hs = fp8_ffn.static_scale(torch.tensor([2.0])).to(DEV)
    u2 = torch.randn(37, 40, device=DEV)
    assert torch.equal(fp8_ffn.round_bf16(u2), u2.bfloat16())
    want = fused.ffn(x, up, down, hs)
    seen = []
    monkeypatch.setattr(fused, "_u2_bf16", lambda dev, m: seen.append(m) or True)
    got = fused.ffn(x, up, down, hs)
    assert seen == [61] and torch.equal(got, want)


@pytest.mark.parametrize("ranks", [(24, 40), (0, 0)])
def test_kernels_leave_the_layer_tensors_alone(ranks):
    """On a GPU with autotuning (the default), the tuner zeroes the U2 buffer before each timing
    run: it once got the layer's q_scale when the FFN had no second low rank (H100)."""
    up, down = _layer(4 * 64, 64, ranks[0], seed=5), _layer(64, 4 * 64, ranks[1], seed=6)
    before = {(i, k): v.clone() for i, t in enumerate((up, down)) for k, v in t.items()}
    for hs in (fp8_ffn.static_scale(torch.tensor([2.0])).to(DEV), None):
        fused.ffn(_x(300, 64, seed=8), up, down, hs)
    for (i, k), v in before.items():
        assert torch.equal((up, down)[i][k].view(torch.uint8), v.view(torch.uint8)), (i, k)


def test_static_scale_is_a_power_of_two_with_headroom():
    for amax in (1e-3, 0.7, 3.0, 448.0, 1e4):
        s = float(fp8_ffn.static_scale(torch.tensor([amax]))[0])
        assert s == 2.0 ** round(torch.log2(torch.tensor(s)).item())
        assert 2 * amax / 448 <= s < 4 * amax / 448


def _ffn_module(d=64, ranks=(16, 16), calibrated=True):
    up = _layer(4 * d, d, ranks[0], seed=11)
    down = _layer(d, 4 * d, ranks[1], seed=12, stats_amax=1.5 if calibrated else None)
    mk = lambda t, k, n: CompressedLinear("fp8", k, n, t)  # noqa: E731
    return CompressedFFN(mk(up, d, 4 * d), mk(down, 4 * d, d))


@pytest.mark.parametrize("calibrated", [True, False])
def test_module_kernel_path_equals_reference_path(calibrated):
    ffn = _ffn_module(calibrated=calibrated)
    assert (ffn.h_scale is not None) == calibrated
    x = _x(2 * 19, 64, seed=3).reshape(2, 19, 64)
    dispatch.set_mode("reference")
    y_ref = ffn(x)
    dispatch.set_mode("triton")
    dispatch.counts.clear()
    y_tri = ffn(x)
    assert dispatch.counts["ffn:triton"] == 1
    assert y_tri.shape == x.shape and y_tri.dtype == x.dtype
    assert rel(y_tri, y_ref) < 2e-2


def test_auto_mode_uses_the_reference_without_fp8_gpu():
    ffn = _ffn_module()
    x = torch.randn(5, 64, device=DEV)
    path = "triton" if dispatch.fp8_tensor_cores(x.device) else "reference"
    dispatch.counts.clear()
    y = ffn(x)
    ffn.up(x)
    assert dispatch.counts[f"ffn:{path}"] == 1 and dispatch.counts[f"linear:{path}"] == 1
    assert torch.isfinite(y).all()


def test_kernel_failure_falls_back_to_reference_once(monkeypatch):
    ffn = _ffn_module()
    x = _x(9, 64)
    dispatch.set_mode("reference")
    want = ffn(x)
    dispatch.set_mode(None)

    def broken(*a, **k):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(dispatch, "fp8_tensor_cores", lambda device: True)  # pretend: FP8 GPU
    monkeypatch.setattr(dispatch, "_disabled_reason", None)
    monkeypatch.setattr(fused, "ffn", broken)
    y = ffn(x)
    assert torch.equal(y, want)
    assert dispatch._disabled_reason and "no kernel image" in dispatch._disabled_reason
    assert dispatch.choose(x, [ffn.up.kernel_layer()]) == "reference"  # stays off


def test_ops_pass_torch_library_checks():
    """Fake (meta) implementation and AOT dispatch of the custom ops (test_schema multiplies
    inputs, which CPU torch cannot do in FP8)."""
    d = 64
    up, down = _layer(4 * d, d, 16, seed=1), _layer(d, 4 * d, 16, seed=2)
    x = _x(24, d).reshape(2, 12, d)
    args = (x, up["q"], up["q_scale"], up["A"], up["B"], up["bias"],
            down["q"], down["q_scale"], down["A"], down["B"], down["bias"], torch.tensor([0.0078125], device=DEV))
    torch.library.opcheck(ops.fp8_ffn_op, args, test_utils=("test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(ops.fp8_linear, (x, up["q"], up["q_scale"], up["A"], up["B"], up["bias"]),
                          test_utils=("test_faketensor", "test_aot_dispatch_static"))


def test_eager_modules_skip_the_custom_ops_and_compiled_ones_use_them(monkeypatch):
    """The custom op's dispatch costs more host time than a small layer: eager calls run fused.py
    directly; torch.compile still gets the op (one opaque node, its fake for tracing)."""
    ffn = _ffn_module()
    dispatch.set_mode("triton")
    x = _x(2 * 7, 64, seed=9).reshape(2, 7, 64)
    calls = []
    for name in ("fp8_ffn_op", "fp8_linear"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    y = ffn(x)
    ffn.up(x)
    assert calls == [] and dispatch.counts["ffn:triton"] >= 1
    torch._dynamo.reset()
    y_c = torch.compile(ffn, fullgraph=True, backend="aot_eager")(x)
    assert calls == ["fp8_ffn_op"] and rel(y_c, y) < 1e-6


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_torch_compile_has_no_graph_break(mode):
    ffn = _ffn_module()
    dispatch.set_mode(mode)
    x = _x(2 * 7, 64, seed=9).reshape(2, 7, 64)
    eager = ffn(x)
    torch._dynamo.reset()
    compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    y = compiled(x)
    assert rel(y, eager) < 1e-6


def test_compression_records_the_input_range_for_the_static_scale():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=g) * 3
    st = LayerStats.empty(32)
    st.xtx += X.T @ X
    st.absmax = X.abs().amax(0)
    st.rows = 256
    c = compress_linear(torch.randn(64, 32, generator=g), None, st, 8, "fp8")
    assert torch.equal(c.tensors["input_amax"], X.abs().max().reshape(1))
    assert "input_amax" not in compress_linear(torch.randn(64, 32, generator=g), None, None, 8, "fp8").tensors


@pytest.mark.parametrize("ranks", [(16, 16), (0, 0)])
def test_runtime_lora_joins_the_low_rank_branch(ranks):
    """set_lora(up, down): the module computes with W' + up down, in the fused kernels (rank r + r')
    and the reference alike; clearing it gives back the stored function exactly."""
    d = 64
    ffn = _ffn_module(d, ranks)
    x = _x(2 * 13, d, seed=4).reshape(2, 13, d)
    g = torch.Generator().manual_seed(5)
    lora = {m: (torch.randn(m.out_features, 6, generator=g) * 0.3, torch.randn(6, m.in_features, generator=g) / 8)
            for m in (ffn.up, ffn.down)}
    dispatch.set_mode("reference")
    before = ffn(x)
    w_up = ffn.up.dense_weight()
    for m, (u, v) in lora.items():
        m.set_lora(u, v)
    want = w_up + (lora[ffn.up][0].bfloat16().float() @ lora[ffn.up][1].bfloat16().float()).to(w_up.device)
    assert torch.allclose(ffn.up.dense_weight(), want, atol=1e-6)
    y_ref = ffn(x)
    dispatch.set_mode("triton")
    y_tri = ffn(x)
    assert rel(y_ref, before) > 0.05 and rel(y_tri, y_ref) < 2e-2
    assert "lora rank=6" in repr(ffn)
    with pytest.raises(ValueError, match="does not fit"):
        ffn.up.set_lora(lora[ffn.down][0], lora[ffn.down][1])
    for m in lora:
        m.set_lora(None)
    dispatch.set_mode("reference")
    assert torch.equal(ffn(x), before)


@pytest.mark.parametrize("nb", [0, 1, 3])
@pytest.mark.parametrize("m,k,r", [(50, 96, 20), (37, 160, 0)])
def test_act_quant_static_scale_reads_x_once(nb, m, k, r):
    """With one static scale (a power of two) the codes are x / s saturated at +-448, exactly as the
    reference's quant_act_static; u as in the per-token pass (one factor or several); the zeroed buffer."""
    x = _x(m, k, seed=3)
    s = fp8_ffn.static_scale(x.abs().amax().float().reshape(1) / 8)  # an eighth of the range: some saturate
    Bs = [(torch.randn(r, k) / 10).bfloat16().to(DEV) for _ in range(max(nb, 1))] if r else None
    B = None if Bs is None else (Bs if nb > 1 else Bs[0])
    z = torch.full((m, 24), float("nan"), device=DEV)
    xq, sx, u = fp8_ffn.act_quant_lowrank(x, B, static=s, zero=z, split=64)
    assert sx.numel() == 1 and float(sx) == float(s) and not z.any()
    want = R.quant_act_static(x, s)
    assert torch.equal(xq.float() * float(s), want) if DEV == "cpu" else rel(xq.float() * float(s), want) < 1e-6
    assert float((x.float().abs() > 448 * float(s)).float().mean()) > 0.005  # the clamp was exercised
    if r:
        us = [u[g] for g in range(nb)] if nb > 1 else [u]
        for ug, Bg in zip(us, Bs):
            _, _, u1 = fp8_ffn.act_quant_lowrank(x, Bg, split=64)
            torch.testing.assert_close(ug.float(), u1.float(), rtol=2**-7, atol=1e-5)
    else:
        assert u is None


def test_static_input_scale_on_both_paths(monkeypatch):
    """LITEFFN_STATIC_INPUT (modules.STATIC_INPUT): calibrated linears quantize their input with their static
    input_scale on the kernels' path and the reference alike (the linear, the FFN's up-projection, q/k/v
    linked by a SharedInput; the custom ops take it too); without a calibrated range, per token as before."""
    from liteffn.kernels import modules as Mo

    d = 64
    x = _x(2 * 19, d, seed=4).reshape(2, 19, d)
    amax = float(x.abs().amax()) / 2  # half the range: the static scale clips what is above
    lin = CompressedLinear("fp8", d, 96, _layer(96, d, 16, seed=1, stats_amax=amax))
    plain = CompressedLinear("fp8", d, 96, _layer(96, d, 16, seed=1))
    ffn = CompressedFFN(CompressedLinear("fp8", d, 4 * d, _layer(4 * d, d, 16, seed=11, stats_amax=amax)),
                        CompressedLinear("fp8", 4 * d, d, _layer(d, 4 * d, 16, seed=12, stats_amax=1.5)))
    qkv = [CompressedLinear("fp8", d, 64, _layer(64, d, 8, seed=20 + i, stats_amax=amax)) for i in range(3)]
    Mo.SharedInput(qkv)
    per_token = {"lin": lin(x), "plain": plain(x), "ffn": ffn(x)}
    monkeypatch.setattr(Mo, "STATIC_INPUT", True)
    assert "x_scale" in lin.tensors() and "x_scale" not in plain.tensors()
    s = lin.input_scale
    want = R.compressed_linear_ref(x, "fp8", lin.tensors(), act_scale=s)
    want_ffn = R.compressed_ffn_ref(x, "fp8", ffn.up.tensors(), "fp8", ffn.down.tensors(), ffn.h_scale, x_scale=s)
    for mode in ("reference", "triton"):
        dispatch.set_mode(mode)
        dispatch.counts.clear()
        y, y_ffn, y_plain = lin(x), ffn(x), plain(x)
        assert rel(y, want) < 1e-2 and rel(y_ffn, want_ffn) < 2e-2, mode
        assert rel(y_plain, per_token["plain"]) < 1e-2  # no calibrated range: per token still
        assert rel(y, per_token["lin"]) > 1e-3  # the scale clips: another function than per token
        ys = [m(x) for m in qkv]
        for m, yq in zip(qkv, ys):
            assert rel(yq, R.compressed_linear_ref(x, "fp8", m.tensors(), act_scale=m.input_scale)) < 1e-2
        if mode == "triton":
            assert dispatch.counts["shared:triton"] == 1 and dispatch.counts["ffn:triton"] == 1
    # the custom op (torch.compile's path) takes the scale as well
    t = lin.tensors()
    y_op = ops.fp8_linear(x, t["q"], t["q_scale"], t["A"], t["B"], t["bias"], None, 0, t["x_scale"])
    assert rel(y_op, want) < 1e-2
