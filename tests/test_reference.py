import torch

from liteffn.calibration.compress import compress_linear
from liteffn.calibration.synthetic import SyntheticFFN
from liteffn.kernels.modules import CompressedFFN, CompressedLinear
from liteffn.kernels.reference import compressed_linear_ref


def _compress_ffn(ffn, rank, fmt):
    mods = []
    for lin in (ffn.net[0].proj, ffn.net[2]):
        c = compress_linear(lin.weight, lin.bias, None, rank, fmt)
        mods.append(CompressedLinear(fmt, lin.in_features, lin.out_features, c.tensors))
    return CompressedFFN(*mods)


def test_ffn_at_full_rank_without_quantization_matches_dense():
    ffn = SyntheticFFN(32, seed=0)
    x = torch.randn(2, 7, 32)
    c = _compress_ffn(ffn, 32, "bf16")
    y, yc = ffn(x), c(x)
    assert yc.shape == y.shape
    assert float((yc - y).norm() / y.norm()) < 1e-2  # bf16 factors and residual


def test_module_runs_on_cpu_in_bf16_and_keeps_dtype():
    ffn = SyntheticFFN(32, seed=1)
    c = _compress_ffn(ffn, 8, "fp8")
    x = torch.randn(3, 32).bfloat16()
    y = c(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert float((y.float() - ffn(x.float())).norm() / ffn(x.float()).norm()) < 0.1


def test_reference_formula():
    """y = dequant(Q) fp8(x) + (x B^T) A^T + bias, written out by hand."""
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(16, 64, generator=g), torch.randn(16, generator=g)
    c = compress_linear(W, b, None, 4, "fp8")
    t = c.tensors
    x = torch.randn(5, 64, generator=g)
    s = x.abs().amax(1, keepdim=True) / 448
    xq = (x / s).to(torch.float8_e4m3fn).float() * s
    want = xq @ (t["q"].float() * t["q_scale"][:, None]).T + (x @ t["B"].float().T) @ t["A"].float().T + t["bias"].float()
    torch.testing.assert_close(compressed_linear_ref(x, "fp8", t), want, rtol=1e-5, atol=1e-5)
    no_aq = compressed_linear_ref(x, "fp8", t, act_quant=False)
    assert not torch.allclose(no_aq, want)


def test_compressed_tensors_are_frozen_parameters_that_keep_their_dtypes():
    c = _compress_ffn(SyntheticFFN(32, seed=2), 8, "nvfp4")
    names = dict(c.named_parameters())
    # parameters: ComfyUI's model management moves and counts modules that own parameters
    assert "up.q" in names and "down.A" in names and not any(p.requires_grad for p in names.values())
    assert sum(v.numel() * v.element_size() for v in c.state_dict().values()) > 0
    before = {n: p.detach().clone() for n, p in names.items()}
    c.to(torch.float64)  # a dtype move must not touch codes, scales or factors
    after = dict(c.named_parameters())
    assert c.up.q.dtype == torch.uint8 and c.up.A.dtype == torch.bfloat16
    for n, p in before.items():
        assert after[n].dtype == p.dtype and torch.equal(after[n].view(torch.uint8), p.view(torch.uint8)), n
