"""The scaled-GEMM machinery that the FP8 GEMM (fp8_ffn.py) and the W4A8 GEMM (w4a8.py) share:
the @triton.jit pieces of their epilogue (scales, the low-rank term in the same accumulator,
bias, GELU, the output, the next linear's low-rank input), the host side that prepares their
operands, and the launcher (autotuned, fixed or the interpreter's config). Imports neither kernel.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .gptq import _round_e4m3
except ImportError:  # torch-only installs: dispatch never picks these kernels
    triton = None

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
# LITEFFN_AUTOTUNE=0: skip autotuning (a few seconds per new shape) and use the fixed defaults.
AUTOTUNE = os.environ.get("LITEFFN_AUTOTUNE", "1") != "0"
PROMOTE_K_DEFAULT = 512


def parse_promote_k(value: str | None) -> int:
    """LITEFFN_PROMOTE_K: K elements between promotions of the tensor cores' partial sums into
    the fp32 accumulator (fp8_ffn.py says what each costs); 0 = never. A multiple of 128, the
    GEMMs' smallest K tile."""
    if value is None or value.strip() == "":
        return PROMOTE_K_DEFAULT
    try:
        k = int(value)
    except ValueError:
        k = -1
    if k < 0 or k % 128:
        raise ValueError(f"LITEFFN_PROMOTE_K={value!r}: give 0 (no promotion) or a multiple of 128 "
                         f"(default {PROMOTE_K_DEFAULT})")
    return k


PROMOTE_K = parse_promote_k(os.environ.get("LITEFFN_PROMOTE_K"))


def promote_tiles(interval: int, bk: int) -> int | None:
    """PROMOTE of a GEMM config with K tiles of bk for a promotion interval of `interval` K
    elements: 0 (never) for 0, interval // bk where bk divides it, else None (config unusable)."""
    if interval == 0:
        return 0
    return interval // bk if interval % bk == 0 else None


def out_dtype(x: torch.Tensor) -> torch.dtype:
    """Output dtype of the kernels for input x: bf16 and fp16 stay, anything else gives bf16."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


if triton is not None:

    @triton.jit
    def _grouped_tile(tile, num_grouped, num_other, GROUP: tl.constexpr):
        """Tile index -> (pid along the grouped axis, pid along the other), GROUP tiles of the grouped
        axis at a time: neighbouring programs share the other axis's operand in L2."""
        group = GROUP * num_other
        first = (tile // group) * GROUP
        size = min(num_grouped - first, GROUP)
        return first + (tile % group) % size, (tile % group) // size

    @triton.jit
    def _dot(a, b, acc, INTERP: tl.constexpr):
        """bf16 MMA with fp32 accumulation (fp32 operands under the interpreter)."""
        if INTERP:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc)

    @triton.jit
    def _to_bf16(v, INTERP: tl.constexpr):
        """Round-to-nearest-even to bf16 (the interpreter's cast truncates)."""
        if INTERP:
            b = v.to(tl.float32).to(tl.uint32, bitcast=True)
            v = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return v.to(tl.bfloat16)

    @triton.jit
    def _to_fp8(v, INTERP: tl.constexpr):
        """Saturating round-to-nearest-even to E4M3."""
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        if INTERP:
            v = _round_e4m3(v)
        return v.to(tl.float8e4nv)

    @triton.jit
    def _gelu_tanh(y, INTERP: tl.constexpr):
        z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        if INTERP:  # no inline asm in the interpreter
            t = 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * z, 80.0)) + 1.0)
        else:  # one MUFU op per element (exp + reciprocal would be two: the epilogue is MUFU-bound)
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=tl.float32,
                                          is_pure=True, pack=1)
        return 0.5 * y * (1.0 + t)

    @triton.jit
    def _scale_lowrank(acc, rows, cols, M, N, SX, SW, U, LA, R, ROW_SCALAR: tl.constexpr, RB: tl.constexpr,
                       R_CHUNKS: tl.constexpr, SWAP: tl.constexpr, INTERP: tl.constexpr):
        """acc * sx[row] * sw[col] + U[rows] LA[cols]^T. SWAP: acc is [cols, rows] (w4a8's tiles) and
        the low-rank MMA runs as LA U^T, accumulating in acc's own layout."""
        rmask = rows < M
        cmask = cols < N
        if ROW_SCALAR:
            acc = acc * tl.load(SX)
        elif SWAP:
            acc = acc * tl.load(SX + rows, mask=rmask, other=0.0)[None, :]
        else:
            acc = acc * tl.load(SX + rows, mask=rmask, other=0.0)[:, None]
        if SWAP:
            acc = acc * tl.load(SW + cols, mask=cmask, other=0.0)[:, None]
        else:
            acc = acc * tl.load(SW + cols, mask=cmask, other=0.0)[None, :]
        for j in tl.static_range(R_CHUNKS):  # low-rank up-projection into the same accumulator
            rr = j * RB + tl.arange(0, RB)
            a = tl.load(LA + cols[:, None] * R + rr[None, :], mask=cmask[:, None] & (rr < R)[None, :], other=0.0)
            u = tl.load(U + rows[:, None] * R + rr[None, :], mask=rmask[:, None] & (rr < R)[None, :], other=0.0)
            u = _to_bf16(u, INTERP)  # u arrives as an fp32 sum
            if SWAP:
                acc = _dot(a, tl.trans(u), acc, INTERP)
            else:
                acc = _dot(u, tl.trans(a), acc, INTERP)
        return acc

    @triton.jit
    def _epilogue(acc, rows, cols, c_desc, om, on, M, N, SX, SW, U, LA, BIAS, SH, R,
                  ROW_SCALAR: tl.constexpr, HAS_BIAS: tl.constexpr, RB: tl.constexpr, R_CHUNKS: tl.constexpr,
                  GELU: tl.constexpr, OUT_FP8: tl.constexpr, INTERP: tl.constexpr, SCALED: tl.constexpr):
        """SCALED: acc already holds the scaled product plus the low-rank term (w4a8's tiles)."""
        cmask = cols < N
        if not SCALED:
            acc = _scale_lowrank(acc, rows, cols, M, N, SX, SW, U, LA, R, ROW_SCALAR, RB, R_CHUNKS, False, INTERP)
        if HAS_BIAS:
            acc = acc + tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = _gelu_tanh(acc, INTERP)
        if OUT_FP8:
            c_desc.store([om, on], _to_fp8(acc * (1.0 / tl.load(SH)), INTERP))
        elif c_desc.dtype == tl.bfloat16:
            c_desc.store([om, on], _to_bf16(acc, INTERP))
        else:
            c_desc.store([om, on], acc.to(c_desc.dtype))
        return _to_bf16(acc, INTERP)  # the unquantized output, for the next linear's low rank

    @triton.jit
    def _next_lowrank(h0, h1, cols0, cols1, rows, M, N, LB2, U2, R2, R2B: tl.constexpr, R2_CHUNKS: tl.constexpr,
                      TWO: tl.constexpr, INTERP: tl.constexpr):
        """u2[rows] += h B2[:, cols]^T over the tile's one or two column halves: one atomic per
        element of u2 per tile."""
        rmask = rows < M
        for j in tl.static_range(R2_CHUNKS):
            rr = j * R2B + tl.arange(0, R2B)
            b = tl.load(LB2 + rr[:, None] * N + cols0[None, :], mask=(rr < R2)[:, None] & (cols0 < N)[None, :], other=0.0)
            part = _dot(h0, tl.trans(b), None, INTERP)
            if TWO:
                b = tl.load(LB2 + rr[:, None] * N + cols1[None, :], mask=(rr < R2)[:, None] & (cols1 < N)[None, :],
                            other=0.0)
                part = _dot(h1, tl.trans(b), part, INTERP)
            tl.atomic_add(U2 + rows[:, None] * R2 + rr[None, :], part, mask=rmask[:, None] & (rr < R2)[None, :],
                          sem="relaxed")

    @triton.jit
    def _store_tile(acc, om, on, c_desc, M, N, SX, SW, U, LA, BIAS, LB2, U2, SH, R, R2,
                    BM: tl.constexpr, BN: tl.constexpr, EPI_SPLIT: tl.constexpr, ROW_SCALAR: tl.constexpr,
                    HAS_BIAS: tl.constexpr, RB: tl.constexpr, R_CHUNKS: tl.constexpr, GELU: tl.constexpr,
                    OUT_FP8: tl.constexpr, R2B: tl.constexpr, R2_CHUNKS: tl.constexpr, INTERP: tl.constexpr,
                    SCALED: tl.constexpr = False):
        """Epilogue of one [BM tokens, BN channels] accumulator tile (the FP8 GEMM's and W4A8's)."""
        rows = om + tl.arange(0, BM)
        if EPI_SPLIT:  # two half-width epilogues: fewer live registers, smaller store tile
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            cols0 = on + tl.arange(0, BN // 2)
            cols1 = cols0 + BN // 2
            h0 = _epilogue(acc0, rows, cols0, c_desc, om, on, M, N, SX, SW, U, LA, BIAS, SH, R,
                           ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, INTERP, SCALED)
            h1 = _epilogue(acc1, rows, cols1, c_desc, om, on + BN // 2, M, N, SX, SW, U, LA, BIAS, SH, R,
                           ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, INTERP, SCALED)
            if R2_CHUNKS > 0:
                _next_lowrank(h0, h1, cols0, cols1, rows, M, N, LB2, U2, R2, R2B, R2_CHUNKS, True, INTERP)
        else:
            cols = on + tl.arange(0, BN)
            h = _epilogue(acc, rows, cols, c_desc, om, on, M, N, SX, SW, U, LA, BIAS, SH, R,
                          ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, INTERP, SCALED)
            if R2_CHUNKS > 0:
                _next_lowrank(h, h, cols, cols, rows, M, N, LB2, U2, R2, R2B, R2_CHUNKS, False, INTERP)


# ---------------------------------------------------------------- host side
@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def scratch(device: torch.device) -> torch.Tensor:
    """A small fp32 buffer for the kernels' unused pointer arguments."""
    return torch.zeros(16, device=device, dtype=torch.float32)


def rank_chunk(r: int) -> tuple[int, int]:
    """(chunk, chunks) covering rank r with MMA-friendly chunks of 16..64 (masked tail)."""
    if r <= 0:
        return 16, 0
    chunk = 16 if r <= 16 else 32 if r <= 32 else 64
    return chunk, -(-r // chunk)


def p2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def gemm_operands(xq, sx, N, u, A, bias, gelu, h_scale, next_B, u_next, out, out_dtype):
    """What the scaled-GEMM kernels (FP8 and W4A8) take alike: the output, the epilogue's pointers
    (U, LA, BIAS, LB2, U2, SH), the sizes (M, N, K, R, R2, M_KEY) and the epilogue's flags."""
    M, K = xq.shape
    r = 0 if A is None else A.shape[1]
    r2 = 0 if next_B is None else next_B.shape[0]
    fp8_out = h_scale is not None
    if out is None:
        out = torch.empty(M, N, device=xq.device, dtype=torch.float8_e4m3fn if fp8_out else out_dtype)
    rb, rc = rank_chunk(r)
    r2b, r2c = rank_chunk(r2)
    # Unused pointers get a scratch buffer, never a caller's tensor: the tuner zeroes U2 before its
    # timing runs (reset_to_zero), which once zeroed the layer's q_scale when U2 had no use.
    dummy = scratch(xq.device)
    ptrs = (u if r else dummy, A if r else dummy, bias if bias is not None else dummy, next_B if r2 else dummy,
            u_next if r2 else dummy, h_scale if fp8_out else dummy)
    flags = dict(ROW_SCALAR=sx.numel() == 1, HAS_BIAS=bias is not None, RB=rb, R_CHUNKS=rc,
                 GELU=gelu, OUT_FP8=fp8_out, R2B=r2b, R2_CHUNKS=r2c, INTERP=INTERP)
    return out, ptrs, (M, N, K, r, r2, min(p2(M), 65536)), flags


# ---------------------------------------------------------------- launching
class GemmKernel:
    """A scaled-GEMM kernel as launch_gemm runs it: the kernel, its autotuned wrapper, fixed
    configs (few rows, many rows) for LITEFFN_AUTOTUNE=0, the interpreter's config, the hook
    that sets its descriptors' block shapes from a config, and the descriptors' names (its first
    parameters, in order)."""

    def __init__(self, kernel, tuned, defaults, interp_config, set_block_shapes, desc_names):
        self.kernel, self.tuned, self.defaults, self.interp_config = kernel, tuned, defaults, interp_config
        self.set_block_shapes, self.desc_names = set_block_shapes, tuple(desc_names)


def _meta(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages", "programs")}


def _grid(cfg: dict, M: int, N: int, sms: int) -> tuple:
    tiles = triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]) * cfg.get("SPLIT_K", 1)
    return (cfg.get("programs") or (min(tiles, sms) if cfg["PERSIST"] else tiles),)


def launch_gemm(g: GemmKernel, tensors: tuple, args: tuple, flags: dict, M: int, N: int, device, config=None,
                u_next=None) -> None:
    """Launch a scaled-GEMM kernel: descriptors of `tensors` (with the config's block shapes), then
    args (the other non-constexpr arguments), then flags. Config: given (completing the
    interpreter's small one), else autotuned by g.tuned, or with LITEFFN_AUTOTUNE=0 the fixed
    g.defaults[M > 256]."""
    sms = num_sms(device.index or 0) if device.type == "cuda" else 3  # persistent: few programs, many tiles
    if config is None and not INTERP and not AUTOTUNE:
        config = g.defaults[M > 256]
    # Block shapes are placeholders here; the config (its pre_hook for the tuner) sets the real ones.
    descs = tuple(TensorDescriptor.from_tensor(t, [16, 16]) for t in tensors)
    if config is None and not INTERP:
        n = len(g.tuned.cache)
        grid = lambda m: _grid(m, M, N, sms)  # noqa: E731
        g.tuned[grid](*descs, *args, **flags)
        if u_next is not None and len(g.tuned.cache) != n:
            # This call tuned: its timing runs added into u_next too, and Triton 3.6 leaves their
            # sum there (newer versions zero it); seen on the H100 as a wrong first FFN per shape.
            u_next.zero_()
            g.tuned[grid](*descs, *args, **flags)
        return
    cfg = dict(g.interp_config, **(config or {}))
    g.set_block_shapes({**dict(zip(g.desc_names, descs)), **_meta(cfg), **flags})
    g.kernel[_grid(cfg, M, N, sms)](*descs, *args, **_meta(cfg), **flags, num_warps=cfg["num_warps"],
                                   num_stages=cfg["num_stages"])
