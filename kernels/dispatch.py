"""Which path runs a compressed linear or FFN: the fused Triton kernels (fused.py) or the
torch reference (reference.py).

Triton runs when the input is on a CUDA GPU with FP8 tensor cores (compute capability >= 8.9),
Triton is installed, every residual is one the FP8 kernels take as stored (its format's
fp8_kernel), or FP4 in the W4A8 kernel's layout (w4a8.py; modules.py converts residuals whose
format says w4a8 when `w4a8_possible`), and the shapes suit the kernels' tensor descriptors.
The formats (formats.py) are asked, never their names, so a registered copy runs the same way. Everything else (CPU, older GPUs, bf16 residuals) takes the
reference, which computes the same function. If a kernel fails to compile or launch
on this GPU, the failure is logged once and the reference takes over for the rest of the
process: a pack that falls back never crashes a workflow.

LITEFFN_KERNELS=reference|triton|auto (default auto) overrides the choice; `triton` on a CPU
runs the kernels in Triton's interpreter (set TRITON_INTERPRET=1), for tests.
"""
from __future__ import annotations

import logging
import os
from collections import Counter

import torch

from . import formats as F
from . import fp8_ffn
from .gemm import capability

log = logging.getLogger("liteffn")

MODES = ("auto", "triton", "reference")
_mode_override: str | None = None
_disabled_reason: str | None = None
counts: Counter = Counter()  # which path ran, by name (not updated inside torch.compile)


def set_mode(mode: str | None) -> None:
    """Force a path for this process (None: back to LITEFFN_KERNELS / auto)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"kernel mode {mode!r}: choose one of {', '.join(MODES)}")
    global _mode_override
    _mode_override = mode


def mode() -> str:
    m = _mode_override or os.environ.get("LITEFFN_KERNELS", "auto")
    if m not in MODES:
        raise ValueError(f"LITEFFN_KERNELS={m!r}: choose one of {', '.join(MODES)}")
    return m


def fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and capability(device.index) >= (8, 9)


def _suits(x: torch.Tensor, fmt: str | F.ResidualFormat, tensors: dict) -> bool:
    q, s = tensors.get("q"), tensors.get("q_scale")
    if q is None or s is None or s.dtype != torch.float32 or q.device != x.device:
        return False
    n, k = q.shape
    f = F.get(fmt)
    if f.fp8_kernel:
        return q.dtype == torch.float8_e4m3fn and n % 16 == 0 and k % 16 == 0
    return f.in_w4a8_layout(tensors) and n % 16 == 0 and (2 * k) % 128 == 0


def w4a8_possible(fmt: str | F.ResidualFormat, in_features: int, act_quant: bool = True) -> bool:
    """Whether an FP4 residual should be kept in the W4A8 kernel's layout on this machine:
    Triton and a GPU with FP8 tensor cores present, kernels not turned off, shapes it takes."""
    return (F.get(fmt).w4a8 and act_quant and in_features % 128 == 0 and mode() != "reference"
            and fp8_ffn.available() and (mode() == "triton" or (torch.cuda.is_available()
                                                               and fp8_tensor_cores(torch.device("cuda")))))


def choose(x: torch.Tensor, layers) -> str:
    """layers: (format or its name, act_quant, tensors) of each linear the call would fuse."""
    m = mode()
    if m == "reference" or not fp8_ffn.available():
        return "reference"
    if not all(aq and _suits(x, fmt, t) for fmt, aq, t in layers):
        return "reference"
    fmt, _, t = layers[0]
    if x.shape[-1] != F.get(fmt).in_features(t) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return "reference"  # let the reference raise its own shape error
    if m == "triton":
        return "triton"
    if _disabled_reason is not None or not fp8_tensor_cores(x.device):
        return "reference"
    return "triton"


def triton_allowed() -> bool:
    """Whether choose() can still pick the kernels, as far as it depends on more than the call's
    tensors (mode, a failure that turned them off): a CUDA graph captured when it did is valid
    while this holds and its key (the tensors) matches."""
    m = mode()
    return m == "triton" or (m == "auto" and _disabled_reason is None)


def run(name: str, kernel, reference):
    """Run kernel(); on its first failure log why, disable kernels and run reference()."""
    global _disabled_reason
    if torch.compiler.is_compiling():
        return kernel()
    try:
        y = kernel()
        counts[f"{name}:triton"] += 1
        return y
    except Exception as e:  # compile or launch failure on this GPU / Triton version
        if mode() == "triton":
            raise
        _disabled_reason = f"{type(e).__name__}: {e}"
        log.warning("LiteFFN: the Triton kernels failed on this GPU (%s); using the torch reference "
                    "path from now on (slower, same results)", _disabled_reason.splitlines()[0][:300])
        return reference()


def note_reference(name: str) -> None:
    if not torch.compiler.is_compiling():
        counts[f"{name}:reference"] += 1
