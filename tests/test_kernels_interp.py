"""Triton kernels' logic on CPU (TRITON_INTERPRET=1, set in conftest) against their torch
references; on a GPU the same tests run compiled."""
import pytest
import torch

from liteffn.calibration.lowrank import Whitening
from liteffn.calibration.residual import quantize_residual
from liteffn.calibration.synthetic import SyntheticActivations, synthetic_weight
from liteffn.kernels import gptq

pytestmark = pytest.mark.skipif(not gptq.available(), reason="triton is not installed")


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4", "mxfp4"])
def test_gptq_block_kernel_matches_torch_loop(fmt):
    n, k = 24, 160  # one full 128-column block and a padded 32-column tail
    E = synthetic_weight(n, k, seed=3) * torch.logspace(-2, 1, n)[:, None]
    X = SyntheticActivations(k, 1).sample(1024, 0)
    Hinv = Whitening(X.T @ X / 1024).inverse()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    (q_ref, d_ref), (q_tri, d_tri) = (quantize_residual(E.to(dev), fmt, Hinv.to(dev), backend=b)
                                      for b in ("torch", "triton"))
    assert float((d_ref == d_tri).float().mean()) > 0.99
    for key in q_ref:
        same = (q_ref[key].view(torch.uint8) == q_tri[key].view(torch.uint8)).float().mean()
        assert float(same) > 0.99, key


def test_kernel_e4m3_rounding_matches_torch_cast():
    """The arithmetic rounding the kernel uses, checked through a one-column fp8 GPTQ with an
    identity factor (plain rounding): every E4M3 binade, subnormals and saturation."""
    vals = torch.cat([torch.linspace(-500, 500, 2001), torch.logspace(-12, 2.6, 400), -torch.logspace(-12, 2.6, 400)])
    n = vals.numel()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    W1 = torch.zeros(n, gptq.BLOCK_COLS)
    W1[:, 0] = vals
    rows = 1024 if dev == "cpu" else 16  # the interpreter is fast with few programs
    G, _, _ = gptq.gptq_block_triton(W1.to(dev), torch.eye(gptq.BLOCK_COLS, device=dev), "fp8",
                                     torch.ones(n, device=dev), rows_per_program=rows)
    want = vals.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(G[:, 0].cpu(), want)
