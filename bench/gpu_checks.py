"""GPU check of the Triton GPTQ block kernel against the torch loop (same inputs), run on the
device machine before the timing: python bench/gpu_checks.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401  (registers the package)
from liteffn.calibration.lowrank import Whitening  # noqa: E402
from liteffn.calibration.residual import quantize_residual  # noqa: E402
from liteffn.kernels import gptq  # noqa: E402
from liteffn.kernels.formats import FORMATS  # noqa: E402

torch.manual_seed(0)
for fmt in [name for name, f in FORMATS.items() if gptq.supports(f)]:  # fp8, nvfp4, mxfp4
    n, k = 1024, 2048 + 96
    E = torch.randn(n, k, device="cuda") * torch.rand(n, 1, device="cuda")
    X = torch.randn(4096, k, device="cuda") @ (torch.randn(k, k, device="cuda") / k**0.5)
    wh = Whitening(X.T @ X / 4096)
    (q1, d1), (q2, d2) = (quantize_residual(E, fmt, wh.inverse(), backend=b) for b in ("torch", "triton"))
    H = wh.damped()
    e1, e2 = (float((((E - d) @ H) * (E - d)).sum()) for d in (d1, d2))
    same = float((d1 == d2).float().mean())
    print(f"{fmt}: identical elements {100 * same:.3f}%, H-weighted error torch {e1:.4g} triton {e2:.4g}")
    assert same > 0.99 and abs(e1 - e2) / e1 < 0.02, fmt
print("GPU GPTQ kernel check passed")
