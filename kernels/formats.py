"""Storage formats of the quantized residual, with their plain-torch codecs.

Every format is described by the grid values it stores ("codes", already on the format's
value grid, before scaling) and the scales that map them back to weights:

    fp8    E4M3 codes [N, K], one fp32 scale per output row (per-channel)
    nvfp4  E2M1 codes packed two per byte [N, K/2], E4M3 scale per 16 inputs, one fp32
           tensor scale (scale of a block = tensor_scale * e4m3_block_scale)
    mxfp4  E2M1 codes packed two per byte [N, K/2], E8M0 (power of two) scale per 32 inputs
    bf16   the residual itself, no scale

Quantization here is round-to-nearest for given scales. Choosing scales and error feedback
(GPTQ) live in calibration/residual.py; they call the rounding functions below so both
paths share one definition of each format.
"""
from __future__ import annotations

import torch

FORMATS = ("fp8", "nvfp4", "mxfp4", "bf16")
FP8_MAX = 448.0  # largest finite E4M3 (fn) value
FP4_MAX = 6.0  # largest E2M1 value
# Magnitudes of the 8 E2M1 codes (sign is bit 3).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BLOCK = {"fp8": None, "nvfp4": 16, "mxfp4": 32, "bf16": None}
ACT_QUANT = {"fp8": True, "nvfp4": True, "mxfp4": True, "bf16": False}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown residual format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


# ---------------------------------------------------------------- element rounding
def round_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E4M3 value, saturating at +-448 (torch's cast does not saturate)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def round_fp4(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (ties to the even code), saturating at +-6."""
    return e2m1_decode(e2m1_encode(x)).to(x.dtype)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8, 0..15) of x, round to nearest, ties to even code."""
    a = x.abs().float()
    # Thresholds between neighbouring magnitudes; '>' where the tie goes down to an even
    # code, '>=' where it goes up to one.
    code = (
        (a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75)
        + (a > 2.5) + (a >= 3.5) + (a > 5.0)
    ).to(torch.uint8)
    sign = (x < 0).to(torch.uint8) << 3
    return code | torch.where(code == 0, torch.zeros_like(sign), sign)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes; element 2i in the low nibble (OCP / torch order)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


# ---------------------------------------------------------------- block scales
def e8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales -> biased exponents (uint8, 127 = 2^0)."""
    e = torch.log2(scale.float()).round().clamp(-127, 127)
    return (e + 127).to(torch.uint8)


def e8m0_decode(e: torch.Tensor) -> torch.Tensor:
    return torch.exp2(e.float() - 127.0)


def mxfp4_scale(amax: torch.Tensor) -> torch.Tensor:
    """Smallest power of two that maps amax into E2M1 range (no clipping)."""
    amax = amax.float().clamp_min(2.0**-126)
    return torch.exp2(torch.ceil(torch.log2(amax / FP4_MAX))).clamp(2.0**-127, 2.0**127)


def nvfp4_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """Global fp32 scale so that every block scale fits E4M3."""
    return (amax.float() / (FP8_MAX * FP4_MAX)).clamp_min(1e-30)


def nvfp4_block_scale(amax: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """Effective block scale: tensor_scale * (block scale rounded to E4M3, never zero)."""
    s = round_fp8(amax.float() / (FP4_MAX * tensor_scale))
    s = torch.where(s > 0, s, torch.full_like(s, 2.0**-9))  # smallest E4M3 subnormal
    return s * tensor_scale


# ---------------------------------------------------------------- whole-tensor codec
def encode(fmt: str, grid: torch.Tensor, scale: torch.Tensor | None, tensor_scale=None) -> dict:
    """Stored tensors of a residual whose values are grid * scale.

    grid: [N, K] values already on the format's grid; scale: [N] (fp8) or [N, K/block]
    effective block scales (nvfp4: tensor_scale * e4m3 scale; mxfp4: powers of two)."""
    check_format(fmt)
    if fmt == "bf16":
        return {"q": grid.to(torch.bfloat16)}
    if fmt == "fp8":
        return {"q": grid.to(torch.float8_e4m3fn), "q_scale": scale.float().reshape(-1)}
    packed = pack_fp4(e2m1_encode(grid))
    if fmt == "mxfp4":
        return {"q": packed, "q_scale": e8m0_encode(scale)}
    ts = tensor_scale.float().reshape(1)
    return {"q": packed, "q_scale": (scale.float() / ts).to(torch.float8_e4m3fn), "q_scale2": ts}


def decode(fmt: str, t: dict, dtype=torch.float32) -> torch.Tensor:
    """Stored tensors -> dense residual [N, K] in dtype."""
    check_format(fmt)
    q = t["q"]
    if fmt == "bf16":
        return q.to(dtype)
    if fmt == "fp8":
        return (q.float() * t["q_scale"].float()[:, None]).to(dtype)
    grid = e2m1_decode(unpack_fp4(q))
    if fmt == "mxfp4":
        scale = e8m0_decode(t["q_scale"])
    else:
        scale = t["q_scale"].float() * t["q_scale2"].float()
    blk = BLOCK[fmt]
    n, k = grid.shape
    return (grid.view(n, k // blk, blk) * scale[:, :, None]).view(n, k).to(dtype)


def stored_bytes(t: dict) -> int:
    return sum(v.numel() * v.element_size() for v in t.values())


# ---------------------------------------------------------------- activations
def quantize_act_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) E4M3 quantization: returns (fp8 codes, fp32 scale [..., 1])."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fake_quant_act_fp8(x: torch.Tensor) -> torch.Tensor:
    q, s = quantize_act_fp8(x)
    return q.float() * s
