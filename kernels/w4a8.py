"""FP4 residuals on FP8 tensor cores (W4A8): MXFP4 / NVFP4 codes stay 4-bit in memory and are
converted in registers to E4M3, multiplied with the FP8 activations on the FP8 MMA, the
low-rank branch fused as in the FP8 path (fp8_ffn.py, gemm.py). Reference beside it: `prepare`
makes the kernel's operands from a stored residual, `dequant` gives the dense weights they encode.

Two paths (scaled_gemm picks by token count; bench/w4a8.py):
- Few tokens: the in-register kernel below (weights read once, 4-bit), K split across programs
  when its tiles would leave SMs idle.
- From MATERIALIZE_M tokens: to_fp8 writes the same E4M3 weights to a transient copy and
  fp8_ffn's GEMM runs on it. The in-register kernel stays near 0.7x that GEMM there: it is
  latency-bound in Triton 3.6 (bench/w4a8_ncu_h100.txt, bench/w4a8_explore_h100.log).

The in-register kernel:
- The weights are wgmma's A operand, from registers (out^T = W x^T: weight rows are the MMA's
  M, tokens its N). The codes come in through TMA like any tile, and so do the block bytes
  (stored group-major for that); the converted E4M3 bytes never go back to shared memory.
- Scales and the low-rank term are applied in that swapped orientation too (gemm._scale_lowrank),
  before the shared epilogue (gemm._store_tile) does bias, GELU, output and the next low-rank input.
- Accumulation: PROMOTE counts 128-K groups: the tensor cores' partial sum goes into the fp32
  accumulator every PROMOTE * 128 elements of K (256 for the tuned configs, 128 for few tokens),
  never less often than LITEFFN_PROMOTE_K asks (fp8_ffn.py: what each interval costs in error);
  with LITEFFN_PROMOTE_K=0 these intervals stay. The many-token path (the FP8 GEMM on the
  transient copy) promotes as the FP8 GEMM does.
- Conversion is integer work per 32-bit word of 8 codes: one PRMT byte lookup per 4 codes into
  an 8-entry table of E4M3 bytes, the sign OR-ed in. `prepare` repacks the codes so that each
  word holds 4 codes of the group's first half (magnitudes in nibbles 0-3, signs on bits
  7/15/23/31) and 4 of its second half (magnitudes in nibbles 4-7, signs on bits 3/11/19/27),
  groups being 128 values of K: the halves are two MMAs against two 64-wide activation tiles.
- Block scales are folded into the table: each block has one byte b = E << 3 | j, its scale
  2^E (1 + j/8) relative to a per-channel factor p[n] applied in the epilogue. The table holds
  round_e4m3(v * 2^(E-5) * (1 + j/8)) for the 8 E2M1 magnitudes v, built from b with a few
  integer operations per block. MXFP4 (j = 0) is exact; NVFP4's block mantissa makes v * (1 + j/8)
  need up to 5 mantissa bits, so weights round once to E4M3 (its tensor scale is exact, in p).
  Blocks more than 2^emax below the channel's largest cannot be represented (E < 0) and are
  set to zero: their weights are below 2^-emax of the channel's largest block's, far under
  FP4's own rounding error.
"""
from __future__ import annotations

import functools

import torch

from . import formats as F
from . import fp8_ffn
from . import gemm as G

try:
    import triton
    import triton.language as tl

    from .gemm import _grouped_tile, _scale_lowrank, _split_k_sum, _store_tile
except ImportError:
    triton = None

GROUP = 128  # values of K per repacked group: two halves of 64, one MMA each
# From this many tokens the weights go through a transient E4M3 copy and the FP8 GEMM (scaled_gemm).
MATERIALIZE_M = 1024
# Up to this many tokens the in-register kernel takes a fixed tile and splits K when its tiles
# would leave SMs idle (few_tokens_config; the tuner's timings of these tiny launches were erratic).
SPLIT_K_MAX_M = 256


def emax(f: F.ResidualFormat) -> int:
    """Largest block exponent E of format f in the table: its largest entry, 6 * 2^(E-5) with
    power-of-two (E8M0) scales, round_e4m3(6 * 1.875 * 2^-5) * 2^E = 11 * 2^(E-5) with a block
    mantissa (j = 7, NVFP4's E4M3 scales), must stay <= 448, E4M3's largest value."""
    return 11 if f.pow2_scales else 10


def _promote(groups: int) -> int:
    """A config's PROMOTE (128-K groups between promotions), at most LITEFFN_PROMOTE_K's interval."""
    return max(1, min(groups, G.PROMOTE_K // GROUP)) if G.PROMOTE_K else groups


def _mag_table(j: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """E4M3 values of the 8 E2M1 magnitudes times 2^(e-5) (1 + j/8): [..., 8] fp32."""
    v = torch.tensor(F.E2M1_VALUES, device=j.device)
    return F.round_fp8(v * (1 + j.float()[..., None] / 8) * 2.0**-5) * torch.exp2(e.float()[..., None])


def _r15() -> tuple[int, int]:
    """E4M3 bytes of round(1.5 (1 + j/8) 2^-5), j = 0..7, as two little-endian words (PRMT's table)."""
    b = F.round_fp8(1.5 * (1 + torch.arange(8) / 8) * 2.0**-5).to(torch.float8_e4m3fn).view(torch.uint8)
    w = [int(sum(int(b[4 * h + i]) << (8 * i) for i in range(4))) for h in (0, 1)]
    return w[0], w[1]


R15 = _r15()


def _words(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard packed codes [N, K/2] (element 2i in byte i's low nibble) -> the 16-bit pieces
    (4 codes each) of every group's first and second half, int32 [N, K/128, 16] each."""
    n = q.shape[0]
    h = q.contiguous().view(n, -1, 2, 16, 2).to(torch.int32)  # [n, group, half, piece, byte]
    h = h[..., 0] | (h[..., 1] << 8)
    return h[:, :, 0], h[:, :, 1]


def repack(q: torch.Tensor) -> torch.Tensor:
    """Standard packed codes [N, K/2] (K a multiple of GROUP) -> the kernel's layout [N, K/2]:
    word j of a group = codes 4j..4j+3 of its first half (magnitudes in nibbles 0-3, signs on bits
    7/15/23/31) and of its second half (magnitudes in nibbles 4-7, signs on bits 3/11/19/27)."""
    n = q.shape[0]
    a, b = _words(q)
    w = (a & 0x7777) | ((b & 0x7777) << 16)
    for i in range(4):
        w |= ((a >> (4 * i + 3)) & 1) << (8 * i + 7)
        w |= ((b >> (4 * i + 3)) & 1) << (8 * i + 3)
    return w.contiguous().view(torch.uint8).view(n, -1)


def unrepack(q: torch.Tensor) -> torch.Tensor:
    """Inverse of repack: the kernel's layout -> standard packed codes [N, K/2]."""
    n = q.shape[0]
    w = q.contiguous().view(torch.int32).view(n, -1, 16)
    a, b = w & 0x7777, (w >> 16) & 0x7777
    for i in range(4):
        a |= ((w >> (8 * i + 7)) & 1) << (4 * i + 3)
        b |= ((w >> (8 * i + 3)) & 1) << (4 * i + 3)
    h = torch.stack([a, b], 2)  # [n, group, half, piece]
    return torch.stack([h & 0xFF, (h >> 8) & 0xFF], -1).to(torch.uint8).view(n, -1)


def prepare(fmt: str | F.ResidualFormat, t: dict) -> dict:
    """Kernel operands of a stored FP4 residual t (q packed [N, K/2], q_scale block scales,
    q_scale2 NVFP4's tensor scale): q repacked, sb (uint8 [K/128, N, 128/block], b = E << 3 | j per block,
    group-major so that a tile's bytes of one group are one TMA box),
    q_scale (fp32 [N], p[n] for the epilogue), and t's A, B, bias: a layer for fused.linear
    and fused.ffn."""
    f = F.get(fmt)
    if not f.w4a8:
        takes = " or ".join(g.name for g in F.FORMATS.values() if g.w4a8)
        raise ValueError(f"W4A8 takes {takes} residuals, not {f.name!r}")
    if f.block == 32 and not f.pow2_scales:
        # the kernel (_group_weights) takes 32-value blocks for power-of-two scales (j = 0): its
        # tables would drop such a format's block mantissas
        raise ValueError(f"W4A8 runs 32-value blocks with power-of-two scales only, not {f.name!r}'s")
    q = t["q"]
    n, k = q.shape[0], q.shape[1] * 2
    if k % GROUP:
        raise ValueError(f"W4A8 needs in_features divisible by {GROUP}, got {k}")
    bs, ts = f.decode_scales(t)  # block scales in fp32; the tensor scale (NVFP4's) or None
    m, e = torch.frexp(bs)  # bs = m 2^e, m in [0.5, 1): 2^(e-1) (1 + j/8) with j = 16 m - 8
    j = torch.where(bs > 0, (16 * m - 8).round(), torch.zeros_like(m)).to(torch.int32)
    e = e - 1
    e = torch.where(bs > 0, e, torch.full_like(e, -(1 << 20)))
    top = e.amax(1, keepdim=True).clamp_min(-(1 << 19))
    top_e = emax(f)
    E = e - top + top_e
    dead = E < 0  # below the table's range (or zero scale): the block's weights become zero
    blk = f.block
    q = torch.where(dead[:, :, None], torch.zeros_like(q).view(n, -1, blk // 2), q.view(n, -1, blk // 2)).view(n, -1)
    E = E.clamp_min(0)
    p = torch.exp2((top - top_e + 5).float()).view(n)
    if ts is not None:  # exact in the per-channel factor
        p = p * ts.reshape(())
    extra = {k_: t[k_] for k_ in ("A", "B", "bias") if t.get(k_) is not None}
    sb = ((E << 3) | j).to(torch.uint8).view(n, k // GROUP, GROUP // blk).transpose(0, 1).contiguous()
    return {"block": blk, "q": repack(q), "sb": sb,
            "q_scale": p.float().contiguous(), **extra}


def layer(fmt: str | F.ResidualFormat, t: dict) -> dict:
    """Kernel operands of module tensors already in the kernel's layout (q, sb, q_scale = p)."""
    return {**t, "block": F.get(fmt).block}


def _sb_rows(sb: torch.Tensor) -> torch.Tensor:
    """Block bytes [K/128, N, 128/block] -> [N, K/block]."""
    return sb.transpose(0, 1).reshape(sb.shape[1], -1)


def _sb_block(bn: int, block: int) -> list:
    """TMA block of the block bytes, seen as rows of 16 bytes (sb.view(-1, 16)): a tile's bytes of one
    group of 128 are bn * (128 / block) / 16 of them."""
    return [bn * 8 // block, 16]


def dequant(w4: dict) -> torch.Tensor:
    """Dense fp32 weights [N, K] the kernel computes with (its reference)."""
    codes = F.unpack_fp4(unrepack(w4["q"])).long()
    sb = _sb_rows(w4["sb"]).long()
    table = _mag_table(sb & 7, sb >> 3)  # [N, K/block, 8]
    n, k = codes.shape
    blk = w4["block"]
    mag = torch.gather(table, 2, (codes & 7).view(n, k // blk, blk))
    w = torch.where((codes >= 8).view(n, k // blk, blk), -mag, mag).view(n, k)
    return w * w4["q_scale"][:, None]


if triton is not None:
    R15_0 = tl.constexpr(R15[0])
    R15_1 = tl.constexpr(R15[1])

    @triton.jit
    def _tables(sb, MX: tl.constexpr, INTERP: tl.constexpr):
        """PRMT tables (codes 0-3, codes 4-7) of blocks with bytes sb = E << 3 | j (int32):
        [0, 0.5, 1, 1.5] and [2, 3, 4, 6] times 2^(E-5) (1 + j/8) as E4M3 bytes. The entries of
        0.5, 1, 2, 4 are the block byte plus a constant; those of 1.5, 3, 6 are r = round(1.5 (1 + j/8))
        (one PRMT lookup by j) plus the exponent."""
        if MX:  # j = 0, r = 0x14 + sb: two multiply-adds per block
            t0 = 0x14100800 + sb * 0x01010100
            t1 = 0x24201C18 + sb * 0x01010101
        else:
            j = sb & 7
            if INTERP:  # no inline asm in the interpreter
                r = (tl.where(j < 4, R15_0, R15_1) >> ((j & 3) * 8)) & 0xFF
            else:  # selector nibbles 1-3 = 8: the sign of byte 0 (positive), so the upper bytes are 0
                r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                              [tl.full(sb.shape, R15_0, tl.int32), tl.full(sb.shape, R15_1, tl.int32),
                                               j | 0x8880], dtype=tl.int32, is_pure=True, pack=1)
            r = r + sb - j
            t0 = 0x00100800 + sb * 0x00010100 + (r << 24)
            t1 = 0x10200818 + sb * 0x00010001 + r * 0x01000100
        return t0, t1

    @triton.jit
    def _convert(w, t0a, t1a, t0b, t1b, INTERP: tl.constexpr):
        """Repacked codes [BN, 64] uint8 and the tables of each byte's block -> E4M3 weights of the
        group's two halves, [BN, 64] each. Every 4 bytes (one word, 4 consecutive K in one register
        of wgmma's A fragment) are converted together."""
        if INTERP:
            bn: tl.constexpr = w.shape[0]
            w3 = tl.reshape(w.to(tl.int32), (bn, 16, 4))
            word = tl.sum(w3 << (tl.arange(0, 4) * 8)[None, None, :], 2)[:, :, None]
            i = tl.arange(0, 4)[None, None, :]
            ta0 = tl.reshape(t0a, (bn, 16, 4))
            ta1 = tl.reshape(t1a, (bn, 16, 4))
            tb0 = tl.reshape(t0b, (bn, 16, 4))
            tb1 = tl.reshape(t1b, (bn, 16, 4))
            ma = (word >> (4 * i)) & 7
            mb = (word >> (4 * i + 16)) & 7
            a = (tl.where(ma < 4, ta0, ta1) >> ((ma & 3) * 8)) & 0xFF
            b = (tl.where(mb < 4, tb0, tb1) >> ((mb & 3) * 8)) & 0xFF
            a = a | ((word >> (8 * i)) & 0x80)
            b = b | (((word << 4) >> (8 * i)) & 0x80)
            a = tl.reshape(a, (bn, 64)).to(tl.uint8)
            b = tl.reshape(b, (bn, 64)).to(tl.uint8)
        else:
            a, b = tl.inline_asm_elementwise(
                """{
                .reg .b32 s, m, g;
                and.b32 s, $2, 0x7777;
                prmt.b32 m, $3, $7, s;
                and.b32 g, $2, 0x80808080;
                or.b32 $0, m, g;
                shr.u32 s, $2, 16;
                and.b32 s, s, 0x7777;
                prmt.b32 m, $11, $15, s;
                shl.b32 g, $2, 4;
                and.b32 g, g, 0x80808080;
                or.b32 $1, m, g;
                }""",
                "=r,=r,r" + ",r" * 16, [w, t0a, t1a, t0b, t1b], dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
        return a.to(tl.float8e4nv, bitcast=True), b.to(tl.float8e4nv, bitcast=True)

    @triton.jit
    def _spread(t, BN: tl.constexpr, NBH: tl.constexpr, SB: tl.constexpr):
        """[BN, NBH] per-block values -> [BN, NBH * SB] (each block's value over its columns)."""
        return tl.reshape(tl.broadcast_to(t[:, :, None], (BN, NBH, SB)), (BN, NBH * SB))

    @triton.jit
    def _scales(sb_desc, on, g, N, BN: tl.constexpr, NB: tl.constexpr):
        """Block bytes [BN, NB] of K group g, through TMA like the codes (rows past N: another group's
        bytes or zeros, multiplying zero codes)."""
        return tl.reshape(sb_desc.load([(g * N + on) * NB // 16, 0]), (BN, NB))

    @triton.jit
    def _group_weights(w_desc, sb, on, g, BN: tl.constexpr, NB: tl.constexpr, NBH: tl.constexpr,
                       SB: tl.constexpr, INTERP: tl.constexpr):
        """E4M3 weights [BN, 128] of K group g from its codes and block bytes sb."""
        t0, t1 = _tables(sb.to(tl.int32), SB == 32, INTERP)
        t0a, t0b = tl.split(tl.permute(tl.reshape(t0, (BN, 2, NBH)), (0, 2, 1)))
        t1a, t1b = tl.split(tl.permute(tl.reshape(t1, (BN, 2, NBH)), (0, 2, 1)))
        wa, wb = _convert(w_desc.load([on, g * 64]), _spread(t0a, BN, NBH, SB), _spread(t1a, BN, NBH, SB),
                          _spread(t0b, BN, NBH, SB), _spread(t1b, BN, NBH, SB), INTERP)
        return tl.reshape(tl.permute(tl.join(wa, wb), (0, 2, 1)), (BN, 128))

    @triton.jit
    def _w4a8_kernel(x_desc, w_desc, c_desc, sb_desc, SX, SW, U, LA, BIAS, LB2, U2, SH, WS, CNT,
                     M, N, K, R, R2, M_KEY,
                     BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr, PERSIST: tl.constexpr,
                     EPI_SPLIT: tl.constexpr, PROMOTE: tl.constexpr, SPLIT_K: tl.constexpr,
                     ROW_SCALAR: tl.constexpr, HAS_BIAS: tl.constexpr, RB: tl.constexpr,
                     R_CHUNKS: tl.constexpr, GELU: tl.constexpr, OUT_FP8: tl.constexpr,
                     R2B: tl.constexpr, R2_CHUNKS: tl.constexpr, SB: tl.constexpr, INTERP: tl.constexpr):
        """out = x W^T (W: repacked FP4, weight rows as the MMA's M) with the FP8 GEMM's epilogue.
        Tiles: BN weight rows x BM tokens, K in groups of 128 (two 64-wide MMAs).
        SPLIT_K > 1 (few tokens, few tiles): SPLIT_K programs per tile share K; each adds its part
        into the fp32 workspace WS [M, N], and the last one to arrive (counter CNT[tile]) runs the
        epilogue on the sum and leaves WS and CNT zeroed for the next launch."""
        NB: tl.constexpr = 128 // SB  # blocks per group
        NBH: tl.constexpr = NB // 2
        num_pid_m = tl.cdiv(M, BM)
        num_pid_n = tl.cdiv(N, BN)
        num_tiles = num_pid_m * num_pid_n
        groups = K // 128
        gps = tl.cdiv(tl.cdiv(groups, SPLIT_K), PROMOTE) * PROMOTE  # groups per split
        for item in tl.range(tl.program_id(0), num_tiles * SPLIT_K, tl.num_programs(0)):
            tile = item // SPLIT_K
            g_lo = (item % SPLIT_K) * gps
            # grouped order over weight-row tiles: neighbouring programs share weight tiles in L2
            pid_n, pid_m = _grouped_tile(tile, num_pid_n, num_pid_m, GROUP_M)
            om = pid_m * BM
            on = pid_n * BN
            acc = tl.zeros([BN, BM], tl.float32)
            for g0 in range(g_lo, min(g_lo + gps, groups), PROMOTE):
                for j in tl.static_range(PROMOTE):
                    g = g0 + j
                    w = _group_weights(w_desc, _scales(sb_desc, on, g, N, BN, NB), on, g, BN, NB, NBH, SB, INTERP)
                    x = x_desc.load([om, g * 128])  # past K: zeros (TMA bounds)
                    if j == 0:
                        part = tl.dot(w, x.T)
                    else:
                        part = tl.dot(w, x.T, part)
                acc += part
            # Scales and the low-rank term in the swapped orientation (in [BM, BN], as the FP8 GEMM does, the
            # low-rank MMA needed the accumulator moved through shared memory, and registers spilled),
            # and before any sum over splits (the first split adds the low-rank term): the program
            # finishing a tile then only loads the sum and runs the rest of the epilogue.
            rows = om + tl.arange(0, BM)
            cols = on + tl.arange(0, BN)
            if g_lo == 0:
                acc = _scale_lowrank(acc, rows, cols, M, N, SX, SW, U, LA, R, ROW_SCALAR, RB, R_CHUNKS, True, INTERP)
            else:
                acc = _scale_lowrank(acc, rows, cols, M, N, SX, SW, U, LA, R, ROW_SCALAR, RB, 0, True, INTERP)
            acc = tl.trans(acc)  # [BM tokens, BN channels], as _store_tile takes it
            last = True
            if SPLIT_K > 1:
                acc, last = _split_k_sum(acc, rows, cols, M, N, WS, CNT, tile, SPLIT_K)
            if last:
                _store_tile(acc, om, on, c_desc, M, N, SX, SW, U, LA, BIAS, LB2, U2, SH, R, R2, BM, BN,
                            EPI_SPLIT, ROW_SCALAR, HAS_BIAS, RB, R_CHUNKS, GELU, OUT_FP8, R2B, R2_CHUNKS, INTERP, True)

    @triton.jit
    def _to_fp8_kernel(w_desc, o_desc, sb_desc, N, K, BN: tl.constexpr, GPP: tl.constexpr, SB: tl.constexpr,
                       INTERP: tl.constexpr):
        """The E4M3 weights the GEMM above computes with, written out: [N, K] (GPP groups per program)."""
        NB: tl.constexpr = 128 // SB
        on = tl.program_id(0) * BN
        for i in tl.static_range(GPP):
            g = tl.program_id(1) * GPP + i
            if g < K // 128:
                w = _group_weights(w_desc, _scales(sb_desc, on, g, N, BN, NB), on, g, BN, NB, NB // 2, SB, INTERP)
                o_desc.store([on, g * 128], w)

    def _set_block_shapes(nargs):
        bm, bn = nargs["BM"], nargs["BN"]
        nargs["x_desc"].block_shape = [bm, 128]
        nargs["w_desc"].block_shape = [bn, 64]
        nargs["sb_desc"].block_shape = _sb_block(bn, nargs["SB"])
        nargs["c_desc"].block_shape = [bm, bn // 2 if nargs["EPI_SPLIT"] else bn]

    def _config(bn, bm, warps, stages, promote=2, split=False, persist=True, split_k=1):
        return triton.Config(dict(BN=bn, BM=bm, GROUP_M=8, PERSIST=persist, EPI_SPLIT=split,
                                  PROMOTE=_promote(promote), SPLIT_K=split_k),
                             num_warps=warps, num_stages=stages, pre_hook=_set_block_shapes)

    # Candidates autotuned per shape; bench/w4a8.py --sweep times each (H100: 64x128 tiles, two
    # CTAs per SM, win most shapes; 64x64 the audio down-projection at M = 126).
    GEMM_CONFIGS = [
        _config(128, 128, 8, 3, promote=2),
        _config(64, 128, 4, 2, promote=2, persist=False),
        _config(64, 128, 4, 3, promote=1, persist=False),
        _config(64, 64, 4, 2, promote=2, persist=False),
        _config(64, 64, 4, 4, promote=2, persist=False),
    ]

    # The tuner and LITEFFN_AUTOTUNE=0's fixed configuration only see more than SPLIT_K_MAX_M tokens:
    # scaled_gemm gives fewer few_tokens_config.
    _tuned = triton.autotune(GEMM_CONFIGS, key=["M_KEY", "N", "K", "R", "R2", "GELU", "OUT_FP8", "SB"],
                             reset_to_zero=["U2"])(_w4a8_kernel)
    _MANY_TOKENS = dict(BN=64, BM=128, GROUP_M=8, PERSIST=False, EPI_SPLIT=False, PROMOTE=_promote(2), SPLIT_K=1,
                        num_warps=4, num_stages=2)
    DEFAULT_CONFIGS = (_MANY_TOKENS, _MANY_TOKENS)
    INTERP_CONFIG = dict(BN=32, BM=32, GROUP_M=2, PERSIST=True, EPI_SPLIT=True, PROMOTE=1, SPLIT_K=1, num_warps=4, num_stages=2)
    W4A8_GEMM = G.GemmKernel(_w4a8_kernel, _tuned, DEFAULT_CONFIGS, INTERP_CONFIG, _set_block_shapes,
                             ("x_desc", "w_desc", "c_desc", "sb_desc"))


@functools.lru_cache(maxsize=1024)  # asked on every few-token call: no dict built per call (shared: read only)
def few_tokens_config(M: int, N: int, sms: int) -> dict:
    """64 x 128 tiles, K split 2 or 4 ways when there are fewer tiles than SMs (H100: 8192->2048 at
    M=126, 32 tiles, 31 -> 14 us; 2048->8192, 128 tiles, stays unsplit; bench/w4a8_explore_h100.log)."""
    split = G.split_k(G.cdiv(M, 128) * G.cdiv(N, 64), sms)
    return dict(BN=64, BM=128, GROUP_M=8, PERSIST=False, EPI_SPLIT=False, PROMOTE=1, SPLIT_K=split, num_warps=4,
                num_stages=4 if split > 1 else 3)


def to_fp8(w4: dict) -> torch.Tensor:
    """The E4M3 weights [N, K] the W4A8 GEMM computes with (times q_scale per channel), on the GPU:
    dequant's values without the fp32 detour, as the FP8 GEMM's operand. The copy is a per-call buffer
    (gemm.new) and the launch a cached one, so that programs.py can repeat a many-token W4A8 call: it
    could not while this launch went through Triton's runner, and such calls (MXFP4 attention projections at
    6144 tokens) cost their whole Python path every time."""
    q = w4["q"]
    n, k = q.shape[0], q.shape[1] * 2
    out = G.new((n, k), torch.float8_e4m3fn, q.device)
    bn, gpp = (32, 1) if G.INTERP else (64, 4)
    blocks = ((bn, 64), (bn, 128), tuple(_sb_block(bn, w4["block"])))
    G.launch_kernel(_to_fp8_kernel, (G.cdiv(n, bn), G.cdiv(k // GROUP, gpp)), (q, out, w4["sb"].view(-1, 16), n, k),
                    dict(BN=bn, GPP=gpp, SB=w4["block"], INTERP=G.INTERP), blocks=blocks)
    return out


def scaled_gemm(xq, sx, w4, *, u=None, A=None, bias=None, gelu=False, h_scale=None, next_B=None, u_next=None,
                out=None, out_dtype=torch.bfloat16, config: dict | None = None, materialize: bool | None = None):
    """fp8_ffn.scaled_gemm with FP4 weights w4 (prepare's dict) instead of FP8 ones.

    Many tokens (M >= MATERIALIZE_M, or materialize=True): the weights are converted once into a
    transient E4M3 copy (to_fp8) for fp8_ffn's GEMM, whose larger tiles the in-register kernel
    cannot reach (bench/w4a8.py). Few tokens: the in-register kernel, which reads half the bytes.
    config: the in-register kernel's."""
    M = xq.shape[0]
    if materialize is None:
        materialize = M >= MATERIALIZE_M
    if materialize:
        return fp8_ffn.scaled_gemm(xq, sx, to_fp8(w4), w4["q_scale"], u=u, A=A, bias=bias, gelu=gelu,
                                   h_scale=h_scale, next_B=next_B, u_next=u_next, out=out, out_dtype=out_dtype)
    N = w4["q"].shape[0]
    out, ptrs, sizes, flags = G.gemm_operands(xq, sx, N, u, A, bias, gelu, h_scale, next_B, u_next, out, out_dtype)
    if config is None and M <= SPLIT_K_MAX_M and not G.INTERP:
        config = few_tokens_config(M, N, G.num_sms(xq.device.index or 0))
    split = (config or {}).get("SPLIT_K", 1) > 1
    bm = dict(INTERP_CONFIG, **(config or {}))["BM"]
    if split and bm != 128 and not G.INTERP:
        # On the H100, 64-token tiles with split K gave wrong pairs of rows in some launches (with
        # the low-rank term; bench/w4a8_explore_h100.log section 4); 128-token tiles were exact.
        raise ValueError(f"W4A8 split K needs 128-token tiles (BM=128), got BM={bm}")
    ws, cnt = G.split_operands(xq.device, M, N, config)
    # the block bytes as TMA sees them: rows of 16 bytes (_sb_block)
    G.launch_gemm(W4A8_GEMM, (xq, w4["q"], out, w4["sb"].view(-1, 16)), (sx, w4["q_scale"], *ptrs, ws, cnt, *sizes),
                  dict(flags, SB=w4["block"]), M, N, xq.device, config, u_next if next_B is not None else None)
    return out
