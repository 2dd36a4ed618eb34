"""W4A8: FP4 residuals (MXFP4, NVFP4) converted in registers to E4M3 and multiplied on FP8
tensor cores (kernels/wfp4.py, fp8_ffn._load_w). On CPU under Triton's interpreter, on a GPU
compiled: the kernel against the torch reference of the same FP4 tensors."""
import pytest
import torch

from liteffn.calibration.compress import compress_linear
from liteffn.kernels import formats as F
from liteffn.kernels import fp8_ffn, wfp4
from liteffn.kernels import reference as R

pytestmark = pytest.mark.skipif(not fp8_ffn.available(), reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = [{}, dict(EPI_SPLIT=False, PERSIST=False), dict(BK=64, BN=32, programs=2), dict(PROMOTE=2)]


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _fp4_layer(fmt, n, k, rank, seed=0, spread=2.0):
    """A compressed linear with an FP4 residual; rows and column blocks of very different
    magnitude (10^spread), so block scales and the per-channel fold both matter."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) / k**0.5
    W = W * torch.logspace(-spread / 2, spread / 2, k)[torch.randperm(k, generator=g)][None, :]
    b = torch.randn(n, generator=g) / 4
    return compress_linear(W, b, None, rank, fmt).tensors


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_folded_weights_equal_the_fp4_weights(fmt):
    """MXFP4: the E4M3 fold is exact. NVFP4: one more E4M3 rounding, at most 2^-4 per weight."""
    t = _fp4_layer(fmt, 48, 256, 0)
    w4 = wfp4.prepare(fmt, t)
    exact = F.decode(fmt, t)
    folded = wfp4.dequant(w4)
    assert folded.abs().max() <= 448 * w4["q_scale"].max()
    if fmt == "mxfp4":
        assert torch.equal(folded, exact)
    else:
        err = (folded - exact).abs()
        assert bool((err <= exact.abs() * 2.0**-4 + 1e-12).all())
        assert 0 < rel(folded, exact) < 0.03, rel(folded, exact)


def test_mxfp4_fold_is_exact_over_a_wide_range_of_block_scales():
    """Blocks 2^-14 below a channel's largest block still fold exactly."""
    n, k = 16, 512
    grid = F.e2m1_decode(torch.randint(0, 16, (n, k)))
    e = 127 + torch.randint(-14, 1, (n, k // 32))
    t = {"q": F.pack_fp4(F.e2m1_encode(grid)), "q_scale": e.to(torch.uint8)}
    assert torch.equal(wfp4.dequant(wfp4.prepare("mxfp4", t)), F.decode("mxfp4", t))


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m,k,n,r", [(50, 128, 96, 20), (40, 64, 128, 0), (33, 96, 64, 8)])
def test_w4a8_gemm_matches_reference(fmt, cfg, m, k, n, r):
    t = {k_: v.to(DEV) for k_, v in _fp4_layer(fmt, n, k, r).items()}
    w4 = wfp4.prepare(fmt, t)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 2).to(torch.bfloat16).to(DEV)
    xq, sx, u = fp8_ffn.act_quant_lowrank(x, t.get("B"))
    y = fp8_ffn.scaled_gemm(xq, sx, None, None, u=u, A=t.get("A"), bias=t.get("bias"), w4=w4, config=cfg)
    # reference: the same quantized activations and the kernel's E4M3 weights, in fp32; the low rank
    # sees the unquantized x
    Fn = torch.nn.functional
    ref = Fn.linear(xq.float() * sx[:, None], wfp4.dequant(w4)) + t["bias"].float()
    if r:
        ref = ref + Fn.linear(Fn.linear(x.float(), t["B"].float()), t["A"].float())
    assert y.shape == (m, n) and torch.isfinite(y.float()).all()
    assert rel(y, ref) < 1e-2, rel(y, ref)
    if fmt == "mxfp4":  # and the FP4 layer itself, through the reference path
        assert rel(y, R.compressed_linear_ref(x, fmt, t, dtype=torch.float32)) < 1e-2
