"""Storage formats of the quantized residual, with their plain-torch codecs.

Every format is described by the grid values it stores ("codes", already on the format's
value grid, before scaling) and the scales that map them back to weights:

    fp8    E4M3 codes [N, K], one fp32 scale per output row (per-channel)
    nvfp4  E2M1 codes packed two per byte [N, K/2], E4M3 scale per 16 inputs, one fp32
           tensor scale (scale of a block = tensor_scale * e4m3_block_scale)
    mxfp4  E2M1 codes packed two per byte [N, K/2], E8M0 (power of two) scale per 32 inputs
    bf16   the residual itself, no scale

Each format is one ResidualFormat object in the registry FORMATS (name -> object); code asks
it (fmt.block, fmt.act_quant, fmt.encode, ...) rather than comparing names, so adding a
format is a register() call here (and, for the fused kernels, their own support). Names are
what compressed files store. Quantization here is round-to-nearest for given scales; the
GPTQ search (calibration/residual.py) asks the format for its rounding and scale candidates,
so both paths share one definition of each format.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

FP8_MAX = 448.0  # largest finite E4M3 (fn) value
FP4_MAX = 6.0  # largest E2M1 value
# Magnitudes of the 8 E2M1 codes (sign is bit 3).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# NVFP4 block-scale candidates: amax * (1 - 0.05 c), c < 6 (least MSE wins); the GPTQ kernel
# (gptq.py) unrolls the same count.
NVFP4_CANDIDATES = 6
NVFP4_SHRINK = tuple(1.0 - 0.05 * c for c in range(NVFP4_CANDIDATES))


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


# ---------------------------------------------------------------- the formats
@dataclass(frozen=True)
class ResidualFormat:
    """One residual storage format. Fields are what differs between instances of a kind; the
    class (a subclass below) holds the kind's codec, rounding and scale choice, and the
    constants that follow from them. Code asks these instead of comparing format names, so a
    format is described here once."""

    name: str  # stored in compressed files' metadata: never rename one
    block: int | None  # values of K per scale block; None: one scale per output row, or none
    act_quant: bool  # activations are quantized to FP8 E4M3 with this residual (FP8 tensor cores)
    bits: int  # bits per stored value

    tensor_names: ClassVar[tuple[str, ...]] = ("q",)  # the residual's stored tensors
    tensor_scale: ClassVar[bool] = False  # an fp32 tensor scale (q_scale2) above the block scales
    pow2_scales: ClassVar[bool] = False  # block scales are powers of two (E8M0)
    fp8_kernel: ClassVar[bool] = False  # the FP8 kernels (fp8_ffn.py) take q, q_scale as stored
    w4a8: ClassVar[bool] = False  # may be converted to the W4A8 kernel's layout (w4a8.py)
    # GPTQ error feedback and compress.py's low-rank refit apply; bf16 is always rounded to
    # nearest (its rounding error is far below the FP8/FP4 formats', nothing to feed back).
    error_feedback: ClassVar[bool] = True
    # compress.py's refits (the low-rank factors refit to what the quantized residual misses, the residual
    # quantized again): at most this many, stopping once one buys less than refit_gain of the weighted error
    refits: ClassVar[int] = 2
    refit_gain: ClassVar[float] = 0.0

    def __str__(self) -> str:  # messages print the name, as when formats were plain strings
        return self.name

    @property
    def packed(self) -> bool:
        """Several values per byte along K (q is [N, K * bits / 8])."""
        return self.bits < 8

    def in_features(self, t: dict) -> int:
        """K of stored tensors t (either layout: the W4A8 one keeps q's shape)."""
        return t["q"].shape[1] * 8 // self.bits if self.packed else t["q"].shape[1]

    def in_w4a8_layout(self, t: dict) -> bool:
        """Whether t holds this residual in the W4A8 kernel's layout (its block bytes "sb";
        modules.py converts FP4 residuals on GPUs that run the kernel). An sb of None counts as
        absent, as fused.layout reads it, so dispatch and the kernels agree on the layout."""
        return self.w4a8 and t.get("sb") is not None

    # -- scales
    def tensor_scale_for(self, amax: torch.Tensor) -> torch.Tensor | None:
        """The fp32 tensor scale of a residual whose max |value| is amax (None: none)."""
        return None

    def init_scales(self, E: torch.Tensor):
        """Scales of residual E [N, K] before quantizing: per-row scales as final, block scales
        as zeros [N, K/block] that the quantizer fills block by block, or None."""
        return None

    def scale_candidates(self, amax: torch.Tensor, tensor_scale=None) -> list[torch.Tensor]:
        """Block scales [N] to try for blocks of max |value| amax [N], the round-to-nearest one
        first; the quantizer keeps the least-MSE."""
        raise TypeError(f"{self.name} has no block scales")

    def block_scale(self, amax: torch.Tensor, tensor_scale=None) -> torch.Tensor:
        """The round-to-nearest block scale (no search): the first candidate."""
        raise TypeError(f"{self.name} has no block scales")

    def apply_scale(self, grid: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """grid [N, K] times its scales (per row [N], per block [N, K/block], or None)."""
        if scale is None:
            return grid
        if self.block is None:
            return grid * scale[:, None]
        n, k = grid.shape
        return (grid.view(n, k // self.block, self.block) * scale[:, :, None]).view(n, k)

    # -- values and codec
    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest value of the format's grid (before scaling), in x's dtype."""
        raise NotImplementedError

    def encode(self, grid: torch.Tensor, scale: torch.Tensor | None, tensor_scale=None) -> dict:
        """Stored tensors of a residual whose values are apply_scale(grid, scale). grid: [N, K]
        on the format's grid; scale: [N] or [N, K/block] effective scales (tensor scale
        included); tensor_scale: the fp32 one where the format has it."""
        raise NotImplementedError

    def decode_scales(self, t: dict):
        """(scales as stored, decoded to fp32, or None; tensor scale or None)."""
        return None, None

    def decode_grid(self, q: torch.Tensor) -> torch.Tensor:
        """Stored codes -> fp32 grid values [N, K]."""
        raise NotImplementedError

    def decode(self, t: dict, dtype=torch.float32) -> torch.Tensor:
        """Stored tensors -> dense residual [N, K] in dtype."""
        scale, ts = self.decode_scales(t)
        if ts is not None:
            scale = scale * ts
        return self.apply_scale(self.decode_grid(t["q"]), scale).to(dtype)


@dataclass(frozen=True)
class ChannelFP8(ResidualFormat):
    """E4M3 codes [N, K], one fp32 scale per output row."""

    tensor_names: ClassVar[tuple[str, ...]] = ("q", "q_scale")
    fp8_kernel: ClassVar[bool] = True

    def init_scales(self, E):
        return (E.abs().amax(1) / FP8_MAX).clamp_min(1e-12)

    def round(self, x):
        return round_fp8(x)

    def encode(self, grid, scale, tensor_scale=None):
        return {"q": grid.to(torch.float8_e4m3fn), "q_scale": scale.float().reshape(-1)}

    def decode_scales(self, t):
        return t["q_scale"].float(), None

    def decode_grid(self, q):
        return q.float()


@dataclass(frozen=True)
class BlockFP4(ResidualFormat):
    """E2M1 codes packed two per byte [N, K/2] (element 2i in the low nibble), a scale per block
    of K; subclasses say how block scales are chosen and stored."""

    w4a8: ClassVar[bool] = True
    # FP4 loses more to rounding, and refits buy more of it back while rank 64 is a sizeable part of the layer:
    # all-MiniLM-L6-v2's 384-wide linears (bench/real_layers.py), MXFP4 2.26x -> 1.94x FP8's error, NVFP4 1.87x -> 1.66x;
    # random 4096-wide LTX-2-sized ones gained 1-2% for twice the time (bench/compress_time_refit8_h200.md), so
    # refits stop once one buys less than 1%
    refits: ClassVar[int] = 8
    refit_gain: ClassVar[float] = 0.01

    def init_scales(self, E):
        n, k = E.shape
        return E.new_zeros(n, k // self.block)

    def round(self, x):
        return round_fp4(x)

    def encode(self, grid, scale, tensor_scale=None):
        return {"q": pack_fp4(e2m1_encode(grid)), **self.encode_scales(scale, tensor_scale)}

    def encode_scales(self, scale, tensor_scale) -> dict:
        raise NotImplementedError

    def decode_grid(self, q):
        return e2m1_decode(unpack_fp4(q))


@dataclass(frozen=True)
class NVFP4(BlockFP4):
    """E4M3 block scales below one fp32 tensor scale (block scale = tensor_scale * e4m3)."""

    tensor_names: ClassVar[tuple[str, ...]] = ("q", "q_scale", "q_scale2")
    tensor_scale: ClassVar[bool] = True

    def tensor_scale_for(self, amax):
        return nvfp4_tensor_scale(amax)

    def block_scale(self, amax, tensor_scale=None):
        return nvfp4_block_scale(amax, tensor_scale)

    def scale_candidates(self, amax, tensor_scale=None):
        return [nvfp4_block_scale(amax * c, tensor_scale) for c in NVFP4_SHRINK]

    def encode_scales(self, scale, tensor_scale):
        ts = tensor_scale.float().reshape(1)
        return {"q_scale": (scale.float() / ts).to(torch.float8_e4m3fn), "q_scale2": ts}

    def decode_scales(self, t):
        return t["q_scale"].float(), t["q_scale2"].float()


@dataclass(frozen=True)
class MXFP4(BlockFP4):
    """E8M0 (power of two) block scales."""

    tensor_names: ClassVar[tuple[str, ...]] = ("q", "q_scale")
    pow2_scales: ClassVar[bool] = True

    def block_scale(self, amax, tensor_scale=None):
        return mxfp4_scale(amax)

    def scale_candidates(self, amax, tensor_scale=None):
        base = mxfp4_scale(amax)
        return [base, base / 2]  # ceil's power of two, or one below it (clips the largest)

    def encode_scales(self, scale, tensor_scale):
        return {"q_scale": e8m0_encode(scale)}

    def decode_scales(self, t):
        return e8m0_decode(t["q_scale"]), None


@dataclass(frozen=True)
class Dense(ResidualFormat):
    """The residual itself, rounded to bf16, no scale; activations stay unquantized."""

    error_feedback: ClassVar[bool] = False

    def round(self, x):
        return x.to(torch.bfloat16).to(x.dtype)

    def encode(self, grid, scale=None, tensor_scale=None):
        return {"q": grid.to(torch.bfloat16)}

    def decode(self, t, dtype=torch.float32):
        return t["q"].to(dtype)


# ---------------------------------------------------------------- registry
# name -> format; the order is the UI's (Compress Model's residual choices).
FORMATS: dict[str, ResidualFormat] = {}


def register(fmt: ResidualFormat) -> ResidualFormat:
    """Add a format; its name is what compressed files will store."""
    if fmt.name in FORMATS:
        raise ValueError(f"residual format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    del FORMATS[name]


register(ChannelFP8("fp8", block=None, act_quant=True, bits=8))
register(NVFP4("nvfp4", block=16, act_quant=True, bits=4))
register(MXFP4("mxfp4", block=32, act_quant=True, bits=4))
register(Dense("bf16", block=None, act_quant=False, bits=16))


def get(fmt: str | ResidualFormat) -> ResidualFormat:
    """The format of a name (or the format itself); ValueError naming the choices."""
    if isinstance(fmt, ResidualFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unknown residual format {fmt!r}; choose one of {', '.join(FORMATS)}") from None


def check_format(fmt: str | ResidualFormat) -> str:
    """The name of a valid format (ValueError otherwise)."""
    return get(fmt).name


class _Attribute(Mapping):
    """name -> one attribute of the registered formats, read live (formats registered later
    appear): the old BLOCK / ACT_QUANT dicts."""

    def __init__(self, attr: str):
        self._attr = attr

    def __getitem__(self, fmt):
        f = fmt if isinstance(fmt, ResidualFormat) else FORMATS[fmt]  # KeyError, as the dicts
        return getattr(f, self._attr)

    def __iter__(self) -> Iterator[str]:
        return iter(FORMATS)

    def __len__(self) -> int:
        return len(FORMATS)

    def __repr__(self) -> str:
        return repr(dict(self))


BLOCK = _Attribute("block")
ACT_QUANT = _Attribute("act_quant")


# ---------------------------------------------------------------- whole-tensor codec
def encode(fmt: str | ResidualFormat, grid: torch.Tensor, scale: torch.Tensor | None, tensor_scale=None) -> dict:
    """get(fmt).encode(...), kept for callers by name."""
    return get(fmt).encode(grid, scale, tensor_scale)


def decode(fmt: str | ResidualFormat, t: dict, dtype=torch.float32) -> torch.Tensor:
    """get(fmt).decode(...), kept for callers by name."""
    return get(fmt).decode(t, dtype)


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
