"""The scaled-GEMM machinery that the FP8 GEMM (fp8_ffn.py) and the W4A8 GEMM (w4a8.py) share:
the @triton.jit pieces of their epilogue (scales, the low-rank term in the same accumulator,
bias, GELU, the output, the next linear's low-rank input), the host side that prepares their
operands, and the launcher with its per-shape cache of compiled kernels. Imports neither kernel.

Launching: a Triton launch through `kernel[grid](...)` (or an autotuner) binds ~30 arguments,
specializes each one and looks the kernel up again on every call: ~140 us of host time per GEMM
on the H200's host at M=126 (bench/gemm_explore_h200.log), more than the GEMM itself. So the
first launch per key goes the normal way (tuning if it is on) and its CompiledKernel is kept;
later launches call `compiled[grid](*all arguments)` directly (`launch_kernel`, `launch_gemm`).
The key holds everything Triton specializes a compiled kernel on (spec_key): constexpr values,
integer arguments by (== 1, divisible by 16, 32-bit) and by value where they pick the tuned config,
tensors by (dtype, 16-byte aligned data), plus the device. Under the interpreter (CPU tests) and
on Triton versions other than the ones this was written against, every launch is a normal one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading

import torch

from . import graphs

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .gptq import _round_e4m3
except ImportError:  # torch-only installs: dispatch never picks these kernels
    triton = None

log = logging.getLogger("liteffn")

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
# LITEFFN_AUTOTUNE=0: skip autotuning (a few seconds per new shape) and use the fixed defaults.
AUTOTUNE = os.environ.get("LITEFFN_AUTOTUNE", "1") != "0"
# LITEFFN_FAST_LAUNCH=0: every launch through Triton's normal path (for comparison and debugging).
FAST_LAUNCH = os.environ.get("LITEFFN_FAST_LAUNCH", "1") != "0"
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


    @triton.jit
    def _split_k_sum(acc, rows, cols, M, N, WS, CNT, tile, SPLIT_K: tl.constexpr):
        """Split K: this program's part of a [rows, cols] tile is added into the fp32 workspace WS [M, N];
        the last of the tile's SPLIT_K programs to arrive (counter CNT[tile]) gets the sum back (last =
        True), and leaves WS and CNT zeroed for the next launch (so a CUDA graph can replay it)."""
        ws = WS + rows[:, None].to(tl.int64) * N + cols[None, :]
        inside = (rows < M)[:, None] & (cols < N)[None, :]
        tl.atomic_add(ws, acc, mask=inside, sem="relaxed")
        # As cooperative groups' grid sync: a CTA barrier, then one thread's acq_rel atomic (cumulative:
        # it publishes the whole CTA's adds, and its acquire covers all threads' reads after the next barrier).
        tl.debug_barrier()
        last = tl.atomic_add(CNT + tile, 1, sem="acq_rel") == SPLIT_K - 1
        if last:
            tl.debug_barrier()
            acc = tl.load(ws, mask=inside, other=0.0, cache_modifier=".cg")
            tl.store(ws, tl.zeros_like(acc), mask=inside)
            tl.store(CNT + tile, 0)
        return acc, last


# ---------------------------------------------------------------- host side
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host side: triton.cdiv is a constexpr function whose call costs ~4 us of Python,
    and launch paths take several per GEMM (bench/host_overhead_h200.md: host time is what few-token calls
    wait for)."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def capability(index: int | None) -> tuple[int, int]:
    """The device's compute capability, asked once (dispatch and fp8_ws check it per call)."""
    return torch.cuda.get_device_capability(index)


PERSISTENT: dict = {}  # data_ptr -> bytes of buffers kept for the process, whose addresses programs.py may keep


def persistent(t: torch.Tensor) -> torch.Tensor:
    PERSISTENT[t.data_ptr()] = t.numel() * t.element_size()
    return t


@functools.lru_cache(maxsize=None)
def scratch(device: torch.device) -> torch.Tensor:
    """A small fp32 buffer for the kernels' unused pointer arguments."""
    return persistent(torch.zeros(16, device=device, dtype=torch.float32))


_WORKSPACES: dict = {}
_RETIRED: list = []  # replaced workspaces: kept, as programs (programs.py) may hold their addresses


def split_workspace(device, M: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split K's fp32 sums [M, N] and per-tile counters (_split_k_sum), kept per device and zero between
    launches (the kernels zero what they used). One stream at a time, as ComfyUI samples. Kept for the
    process (persistent) so that a call with split K can become a launch program (programs.py): before, the
    audio FFN at 126 tokens without CUDA graphs could not, and took 328 us per call from Python on the H200
    (bench/host_overhead_126_h200.md). Split K runs at few tokens only: a few MiB."""
    tiles = cdiv(M, 32) * cdiv(N, 32)  # the smallest tiles (the interpreter's)
    ws, cnt = _WORKSPACES.get(device, (None, None))
    if ws is None or ws.numel() < M * N or cnt.numel() < tiles:
        if ws is not None:
            _RETIRED.append((ws, cnt))
        ws = persistent(torch.zeros(max(M * N, 0 if ws is None else ws.numel()), device=device,
                                    dtype=torch.float32))
        cnt = persistent(torch.zeros(max(tiles, 0 if cnt is None else cnt.numel()), device=device,
                                     dtype=torch.int32))
        _WORKSPACES[device] = (ws, cnt)
    graphs.keep_alive(ws, cnt)  # a graph capturing this launch keeps them, should they be replaced
    return ws, cnt


def split_operands(device, M: int, N: int, config: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (WS, CNT) arguments of a scaled-GEMM launch: split K's workspace for a config with
    SPLIT_K > 1, else placeholders the kernel never touches."""
    if (config or {}).get("SPLIT_K", 1) > 1:
        return split_workspace(device, M, N)
    return scratch(device), scratch(device)


def split_k(tiles: int, sms: int) -> int:
    """K split 4 or 2 ways when a launch has that many times fewer tiles than SMs (few tokens, few
    output channels: the audio FFN's 8192->2048 at M=126 has 16-32 tiles for 132 SMs)."""
    return 4 if 4 * tiles <= sms else 2 if 2 * tiles <= sms else 1


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
        out = new((M, N), torch.float8_e4m3fn if fp8_out else out_dtype, xq.device)
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
def spec_key(args) -> tuple | None:
    """What Triton specializes a compiled kernel on, per non-constexpr argument: an int by
    whether it is 1 (then a constant), divisible by 16 and 32-bit; a tensor by dtype and whether
    its data is 16-byte aligned. None if an argument is of another kind (no fast launch then)."""
    key = []
    for a in args:
        if type(a) is int:
            key.append(1 if a == 1 else (2 if a % 16 == 0 else 3) + (0 if -0x80000000 <= a <= 0x7FFFFFFF else 2))
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            return None
    return tuple(key)


def _fast_launch_supported() -> bool:
    """The compiled-kernel launch is as Triton 3.6 does it (runtime/jit.py JITFunction.run,
    compiler.py CompiledKernel.__getitem__: every argument in parameter order, constexprs
    included); other versions keep the normal path until checked."""
    if triton is None or INTERP:
        return False
    try:
        major, minor = (int(v) for v in triton.__version__.split(".")[:2])
        from triton.compiler.compiler import CompiledKernel
    except (ValueError, ImportError):
        return False
    return (3, 6) <= (major, minor) <= (3, 9) and hasattr(CompiledKernel, "__getitem__")


_FAST_OK = FAST_LAUNCH and _fast_launch_supported()
_FAST_MAX = 4096  # entries; shapes vary little in a run (a few token counts per model)


def _compiled_kernel_type():
    try:
        from triton.compiler.compiler import CompiledKernel
        return CompiledKernel
    except ImportError:
        return ()


class _Raw:
    """Triton 3.6's launch of a compiled kernel without its Python layers: the C launcher (what
    CudaLauncher.__call__ and wrap_handle_tensordesc end in) called with tensors' addresses as ints
    (it would call data_ptr() and cuPointerGetAttribute for each) and each TMA descriptor's
    CUtensorMap kept per (address, shape, strides): what the map encodes besides the kernel's block
    and swizzle, so a kept map is the one Triton would make (a weight's never changes; an
    activation's recurs as the caching allocator hands out the same blocks). Those layers cost
    more host time than the launch itself: a descriptor object and its map ~3 us each, seven per
    GEMM (bench/host_many_h200.log). Made only for kernels that need no scratch memory and whose
    every descriptor was lowered to a TMA map; used only while no launch hook is set (a profiler's)."""
    __slots__ = ("compiled", "c_launch", "function", "packed", "coop", "pdl", "kinds", "tail", "maps")

    _MAX_MAPS = 256  # per descriptor parameter; cleared when full (a map is ~1 us to remake)

    def __init__(self, compiled, tail: tuple):
        run = compiled.run  # CudaLauncher (after _init_handles, which the first launch ran)
        if type(run).__name__ != "CudaLauncher" or run.global_scratch_size or run.profile_scratch_size:
            raise TypeError("launcher needs scratch memory or is not CUDA's")
        c_launch, metas = run.launch, getattr(compiled.metadata, "tensordesc_meta", None) or ()
        if getattr(c_launch, "__closure__", None):  # wrap_handle_tensordesc's inner(): its C launcher
            cells = dict(zip(c_launch.__code__.co_freevars, (c.cell_contents for c in c_launch.__closure__)))
            c_launch = cells["launcher"]
        if type(c_launch).__name__ != "builtin_function_or_method":
            raise TypeError("no C launcher")
        sig = list(compiled.src.signature.values())
        n = len(sig) - len(tail)  # the arguments a call passes; the constexprs' values follow (tail)
        if len(sig) != len(compiled.src.fn.arg_names) or n < 0 or any(not isinstance(s, str) for s in sig):
            raise TypeError("signature not flat")
        if any(s.startswith(("*", "tensordesc")) for s in sig[n:]):
            raise TypeError("a tensor among the constexprs")
        from triton.backends.nvidia.driver import TMA_DTYPE_DEVICE_TO_HOST
        kinds, d = [], 0
        for s in sig[:n]:  # 0: pointer, 1: value (passed as is: ints, constexprs), else a descriptor's
            if s.startswith("tensordesc"):
                m = metas[d] if d < len(metas) else None
                if m is None:
                    raise TypeError("descriptor not lowered to a TMA map")
                kinds.append((m["swizzle"], m["elem_size"], TMA_DTYPE_DEVICE_TO_HOST[m["elem_type"]],
                              list(m["block_size"]), bool(m["fp4_padded"]), d))
                d += 1
            else:
                kinds.append(0 if s.startswith("*") else 1)
        if d != len(metas):
            raise TypeError("descriptor count")
        self.compiled = compiled  # (its module stays loaded while a recorded program holds this)
        self.c_launch, self.function, self.packed = c_launch, compiled.function, compiled.packed_metadata
        self.coop, self.pdl = run.launch_cooperative_grid, run.launch_pdl
        self.kinds, self.tail, self.maps = tuple(kinds), tuple(tail), [{} for _ in range(d)]

    @classmethod
    def of(cls, compiled, tail: tuple):
        if not _RAW_OK:
            return None
        try:
            return cls(compiled, tail)
        except Exception:  # noqa: BLE001  (another Triton's internals: the compiled kernel's runner)
            return None

    def map_of(self, kind, ptr: int, shape: tuple, strides: tuple) -> tuple:
        """(CUtensorMap, *shape, *strides) of a descriptor over [ptr, shape, strides], as Triton's
        make_tensordesc_arg expands it, kept per (address, shape, strides)."""
        maps = self.maps[kind[5]]
        key = (ptr, shape, strides)
        m = maps.get(key)
        if m is None:
            swizzle, elem_size, elem_type, block, fp4_padded, _ = kind
            shape, strides = list(shape), list(strides)
            if fp4_padded:
                shape[-1] *= 2
            tmap = _fill_tma(ptr, swizzle, elem_size, elem_type, block, shape, strides, 0)
            if len(maps) >= self._MAX_MAPS:
                maps.clear()
            m = maps[key] = (tmap, *shape, *strides)
        return m

    def __call__(self, grid, args) -> None:
        flat = []
        add, ext = flat.append, flat.extend
        for kind, a in zip(self.kinds, args):
            if kind == 0:
                add(a.data_ptr())  # (a None pointer is specialized as a constexpr: kind 1)
            elif kind == 1:
                add(a)
            else:
                ext(self.map_of(kind, a.data_ptr(), a.shape, a.stride()))
        self.launch_flat(grid, flat, _raw_stream(torch.cuda.current_device()))  # the device Triton's runner uses

    def launch_flat(self, grid, flat: list, stream: int) -> None:
        """The launch with the arguments already expanded (pointers as ints, descriptors as their maps)."""
        g = (*grid, 1, 1)
        self.c_launch(g[0], g[1], g[2], stream, self.function, self.coop, self.pdl, None, None, self.packed,
                      None, None, None, *flat, *self.tail)


def _raw_supported() -> bool:
    """The C launcher is called as Triton 3.6 calls it (backends/nvidia/driver.py: _BASE_ARGS_FORMAT,
    make_tensordesc_arg): checked against the installed Triton's own constants."""
    if triton is None or INTERP:
        return False
    try:
        from triton.backends.nvidia import driver as D
        return (triton.__version__.startswith("3.6.") and D._BASE_ARGS_FORMAT == "iiiKKppOOOOOO"
                and hasattr(D, "TMA_DTYPE_DEVICE_TO_HOST"))
    except (ImportError, AttributeError):
        return False


# LITEFFN_RAW_LAUNCH=0: cached launches through the compiled kernel's runner (for comparison; benches and
# tests set the module's RAW_LAUNCH, read at each launch).
RAW_LAUNCH = os.environ.get("LITEFFN_RAW_LAUNCH", "1") != "0"
_RAW_OK = _raw_supported()


def _fill_tma(*a):
    return triton.runtime.driver.active.utils.fill_tma_descriptor(*a)


def _raw_stream(dev: int) -> int:
    return torch._C._cuda_getCurrentRawStream(dev)


def _hooks_set() -> bool:
    rt = triton.knobs.runtime
    return bool(rt.launch_enter_hook.calls or rt.launch_exit_hook.calls)


class Recording:
    """What one call launched and allocated, for programs.py: (raw launch or None, grid, args) per launch
    in order, and the buffers made through new() (tensor, zeroed). None among the launches: one that
    went another way (Triton's normal path, the runner), which a program cannot repeat."""

    def __init__(self):
        self.launches: list = []
        self.allocs: list = []
        self.thread = threading.get_ident()

    def launch(self, raw, grid, args) -> None:
        if threading.get_ident() == self.thread:
            self.launches.append((raw, None if grid is None else tuple(grid), args))


_rec: Recording | None = None  # the recording underway (programs.py), else None


@contextlib.contextmanager
def recording():
    global _rec
    if _rec is not None:
        raise RuntimeError("a recording is already underway")
    _rec = r = Recording()
    try:
        yield r
    finally:
        _rec = None


def unrepeatable() -> None:
    """Called by a launch that goes neither through a Launch nor a LaunchCache (a kernel[grid] call of
    its own): a recording underway cannot be made a program."""
    if _rec is not None:
        _rec.launch(None, None, None)


def new(shape, dtype: torch.dtype, device, zero: bool = False) -> torch.Tensor:
    """torch.empty (zero: torch.zeros) for a kernel's per-call buffer; a recording notes it, so that a
    program makes a fresh one per call."""
    t = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
    if _rec is not None and threading.get_ident() == _rec.thread:
        _rec.allocs.append((t, zero))
    return t


class Launch:
    """A compiled kernel and what its later launches need: the constexpr values (passed as
    placeholders after the other arguments, in parameter order), the config, the descriptors'
    block shapes, and the function that makes a descriptor (tensor, block) where the compiled
    kernel's runner needs one. The descriptor parameters come first; callers pass their tensors."""
    __slots__ = ("compiled", "tail", "cfg", "blocks", "desc", "raw")

    def __init__(self, compiled, tail, cfg=None, blocks=(), desc=None):
        self.compiled, self.tail, self.cfg, self.blocks = compiled, tail, cfg, blocks
        self.desc = desc or make_desc
        self.raw = _Raw.of(compiled, tail)

    def __call__(self, grid, args):
        if self.raw is not None and RAW_LAUNCH and not _hooks_set():
            if _rec is not None:
                _rec.launch(self.raw, grid, args)
            return self.raw(grid, args)
        if _rec is not None:
            _rec.launch(None, grid, args)  # a launch a program cannot repeat
        if self.blocks:
            n = len(self.blocks)
            args = (*(self.desc(t, b) for t, b in zip(args[:n], self.blocks)), *args[n:])
        # CompiledKernel's runner reads grid[0..2] (JITFunction.run pads the grid; this path must too)
        self.compiled[(*grid, 1, 1)[:3]](*args, *self.tail)


class LaunchCache:
    """Per-key Launch entries of one or more kernels; `stats` counts fast and normal launches."""

    def __init__(self):
        self.entries: dict = {}
        self.stats = {"fast": 0, "normal": 0}

    def get(self, key):
        e = None if key is None else self.entries.get(key)
        self.stats["fast" if e is not None else "normal"] += 1
        if e is None and _rec is not None:
            _rec.launch(None, None, None)  # a normal launch: Triton's own path, which a program cannot repeat
        return e

    def put(self, key, kernel, compiled, n_args: int, consts: dict, cfg=None, blocks=(), desc=None):
        """Keep `compiled` (what kernel[grid](...) returned) under key, if it is a CompiledKernel whose
        parameters past the first n_args are all constexprs given in consts (or defaulted)."""
        if key is None or not isinstance(compiled, _compiled_kernel_type()):
            return None
        tail = []
        for p in kernel.params[n_args:]:
            if not p.is_constexpr:
                return None
            if p.name in consts:
                tail.append(consts[p.name])
            elif p.has_default:
                tail.append(p.default)
            else:
                return None
        if len(self.entries) >= _FAST_MAX:
            self.entries.clear()
        e = self.entries[key] = Launch(compiled, tuple(tail), cfg, blocks, desc)
        return e


LAUNCHES = LaunchCache()


def _disable_fast(e: Exception) -> None:
    global _FAST_OK
    _FAST_OK = False
    log.warning("LiteFFN: launching compiled kernels directly failed (%s: %s); using Triton's normal "
                "launch path from now on", type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")


def launch_kernel(kernel, grid, args: tuple, consts: dict, num_warps: int = 4, num_stages: int = 3,
                  cache: LaunchCache = LAUNCHES, blocks: tuple = ()) -> None:
    """kernel[grid](*args, **consts, num_warps=, num_stages=), the compiled kernel cached per
    (kernel, device, constexprs, warps, stages, blocks, spec_key(args)). args: every non-constexpr
    argument in parameter order (tensors and ints), args[0] a tensor on the launch device. blocks: the
    block shapes of the kernel's first len(blocks) parameters, tensor descriptors, for which args holds
    their tensors."""
    key = None
    if _FAST_OK:
        spec = spec_key(args)
        if spec is not None:
            key = (kernel, args[0].device.index, num_warps, num_stages, *consts.values(), blocks, spec)
    e = cache.get(key)
    if e is not None:
        try:
            return e(grid, args)
        except Exception as ex:  # noqa: BLE001  (a launch that raises has not run)
            _disable_fast(ex)
    n = len(blocks)
    descs = tuple(TensorDescriptor.from_tensor(t, list(b)) for t, b in zip(args[:n], blocks))
    compiled = kernel[grid](*descs, *args[n:], **consts, num_warps=num_warps, num_stages=num_stages)
    cache.put(key, kernel, compiled, len(args), consts, blocks=[list(b) for b in blocks])


def make_desc(t: torch.Tensor, block_shape) -> "TensorDescriptor":
    """TensorDescriptor.from_tensor without its checks (a third of its cost), for launches whose
    key already passed them: same dtype, 16-byte aligned data, same sizes (TMA refuses bad strides)."""
    if _DESC_FIELDS is None:
        return TensorDescriptor.from_tensor(t, block_shape)
    d = object.__new__(TensorDescriptor)
    d.__dict__.update(_DESC_FIELDS, base=t, shape=t.shape, strides=t.stride(), block_shape=block_shape)
    return d


def _desc_fields():
    """TensorDescriptor's defaulted fields, if it is the plain dataclass of Triton 3.6 (base, shape,
    strides, block_shape and defaulted ones)."""
    if triton is None or not dataclasses.is_dataclass(TensorDescriptor):
        return None
    f = dataclasses.fields(TensorDescriptor)
    if [x.name for x in f[:4]] != ["base", "shape", "strides", "block_shape"]:
        return None
    if any(x.default is dataclasses.MISSING for x in f[4:]):
        return None
    return {x.name: x.default for x in f[4:]}


_DESC_FIELDS = _desc_fields()


class GemmKernel:
    """A scaled-GEMM kernel as launch_gemm runs it: the kernel, its autotuned wrapper, fixed
    configs (few rows, many rows) for LITEFFN_AUTOTUNE=0, the interpreter's config, the hook
    that sets its descriptors' block shapes from a config, and the descriptors' names (its first
    parameters, in order)."""

    def __init__(self, kernel, tuned, defaults, interp_config, set_block_shapes, desc_names):
        self.kernel, self.tuned, self.defaults, self.interp_config = kernel, tuned, defaults, interp_config
        self.set_block_shapes, self.desc_names = set_block_shapes, tuple(desc_names)

    def blocks(self, consts: dict) -> tuple:
        """The descriptors' block shapes for a config and flags (what the config's pre_hook sets)."""
        class _D:
            block_shape = None
        ns = {n: _D() for n in self.desc_names}
        self.set_block_shapes({**consts, **ns})
        return tuple(ns[n].block_shape for n in self.desc_names)


def _meta(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages", "programs")}


def _grid(cfg: dict, M: int, N: int, sms: int) -> tuple:
    tiles = cdiv(M, cfg["BM"]) * cdiv(N, cfg["BN"]) * cfg.get("SPLIT_K", 1)
    return (cfg.get("programs") or (min(tiles, sms) if cfg["PERSIST"] else tiles),)


def launch_gemm(g: GemmKernel, tensors: tuple, args: tuple, flags: dict, M: int, N: int, device, config=None,
                u_next=None, cache: LaunchCache = LAUNCHES) -> None:
    """Launch a scaled-GEMM kernel: descriptors of `tensors` (with the config's block shapes), then
    args (the other non-constexpr arguments, ending with M, N, K, R, R2, M_KEY), then flags.

    Config: given (completing the interpreter's small one), else autotuned by g.tuned, or with
    LITEFFN_AUTOTUNE=0 the fixed g.defaults[M > 256]. Once a config ran for a key (the tuned key
    N, K, R, R2, M_KEY and flags by value, M and every tensor by spec_key, the given config), the
    compiled kernel is launched directly with it; tuning happens once per key, in the first call."""
    sms = num_sms(device.index or 0) if device.type == "cuda" else 3  # persistent: few programs, many tiles
    key = None
    if _FAST_OK:
        spec = spec_key(tensors + args)
        if spec is not None:
            key = (g, device.index, None if config is None else tuple(config.items()), *flags.values(), *args[-5:],
                   spec)
    e = cache.get(key)
    if e is not None:
        try:
            return e(_grid(e.cfg, M, N, sms), (*tensors, *args))
        except Exception as ex:  # noqa: BLE001  (a launch that raises has not run)
            _disable_fast(ex)
    if config is None and not INTERP and not AUTOTUNE:
        config = g.defaults[M > 256]
    # Block shapes are placeholders here; the config (its pre_hook for the tuner) sets the real ones.
    descs = tuple(TensorDescriptor.from_tensor(t, [16, 16]) for t in tensors)
    if config is None and not INTERP:
        n = len(g.tuned.cache)
        grid = lambda m: _grid(m, M, N, sms)  # noqa: E731
        compiled = g.tuned[grid](*descs, *args, **flags)
        if u_next is not None and len(g.tuned.cache) != n:
            # This call tuned: its timing runs added into u_next too, and Triton 3.6 leaves their
            # sum there (newer versions zero it); seen on the H100 as a wrong first FFN per shape.
            u_next.zero_()
            compiled = g.tuned[grid](*descs, *args, **flags)
        best = g.tuned.best_config
        cfg = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
    else:
        cfg = dict(g.interp_config, **(config or {}))
        g.set_block_shapes({**dict(zip(g.desc_names, descs)), **_meta(cfg), **flags})
        compiled = g.kernel[_grid(cfg, M, N, sms)](*descs, *args, **_meta(cfg), **flags, num_warps=cfg["num_warps"],
                                                  num_stages=cfg["num_stages"])
    consts = {**_meta(cfg), **flags}
    cache.put(key, g.kernel, compiled, len(tensors) + len(args), consts, cfg, g.blocks(consts))
