"""Recorded launch programs: a compressed call's kernel launches repeated without the Python that
decided them (CompressedFFN / CompressedLinear calls that no CUDA graph serves: many tokens).

Why: at many tokens each call is decided again in Python (dispatch, operand dicts, the input pass's
and the GEMMs' plans, launch keys, descriptors), and each decision costs host time on every call: on
the H200's host a compressed FFN call at 1400-6144 tokens cost 260-400 us of Python against 60-80 us
for the dense FFN (bench/host_many_h200.log), enough to leave the GPU waiting in a step whose other
layers are host-bound too. The device work is the same on every call with the same key.

How: per module (weakly held) and key, where

    key = (x.shape, x.dtype, x's device, x's strides and 16-byte alignment, per kernel operand of the
           module (data_ptr, shape, dtype; None where absent), the kernels' module settings)

the first call runs eagerly under gemm.recording(): every launch through a cached compiled kernel's
raw launch (gemm._Raw) is noted with its grid and arguments, and every per-call buffer made through
gemm.new() with its shape, dtype and whether it was zeroed. If every launch was such a raw launch and
every tensor argument lies in x, a noted buffer, an operand of the module or a buffer kept for the
process (gemm.PERSISTENT), the call becomes a Program: its launches with their arguments as slots
(constants, buffer + byte offset, TMA descriptors of either). Later calls with that key allocate the
buffers afresh (zeroed where they were), fill the slots and call the C launchers: no dispatch, no
plans, no keys. A program keeps no tensor, only addresses: the key guarantees that the operands are
where it reads them (their values are read as they are now), and x and the buffers are the call's
own. Like graphs.py's graphs, a module's programs are dropped when it moves (nn.Module._apply).

No program (the eager path, as before): LITEFFN_PROGRAMS=0; under torch.compile; an input that is not
on the current CUDA device, needs grad, or is captured into someone's graph; operands not on x's
device (a partially loaded model copies them per call); raw launches unavailable (Triton other than
3.6, LITEFFN_RAW_LAUNCH=0, a profiler's launch hooks set); a call that launched any other way (its
first call compiles) or used a
buffer the recording cannot account for (neither the call's own, nor an operand, nor persistent: split K's
workspace is persistent, gemm.split_workspace). A failing replay is logged once, turns programs off for the
process, and the call runs eagerly.
"""
from __future__ import annotations

import logging
import os
import weakref
from collections import Counter

import torch

from . import fp8_ws
from . import gemm as G
from .graphs import CudaBackend, _shaped, operand_key

log = logging.getLogger("liteffn")

ENV = "LITEFFN_PROGRAMS"
PER_MODULE = 4  # keys kept per module (a program holds no memory: token counts that alternate keep theirs)
TRIES = 3  # recordings per key before its calls stay eager

class Program:
    """A recorded call: its buffers laid out in two allocations (one zeroed) plus the output, and its
    launches as (raw, grid, template, patches): the expanded argument list (less the constexprs, which
    raw.launch_flat appends) with the call's own addresses left to patch, a patch being (position, base, byte offset) for a pointer or (position,
    base, byte offset, shape, strides, kind) for a descriptor (its map, shape and strides fill
    1 + 2 * ndim positions). Bases: 0 the workspace, 1 the zeroed workspace, 2 the output, 3 the input."""
    __slots__ = ("ws", "zs", "out", "launches")

    ALIGN = 256  # bytes between buffers in a workspace (TMA needs 16; allocations are 512-aligned)

    def __init__(self, ws: int, zs: int, out: tuple, launches: tuple):
        self.ws, self.zs, self.out, self.launches = ws, zs, out, launches

    @classmethod
    def build(cls, rec: G.Recording, x2: torch.Tensor, y2: torch.Tensor, operands) -> "Program | None":
        if not rec.launches or any(raw is None for raw, _, _ in rec.launches):
            return None
        bufs = [t for t, _ in rec.allocs]
        if not any(t is y2 for t in bufs):
            return None
        spans = [(t.data_ptr(), t.numel() * t.element_size()) for t in bufs]
        ends = sorted((b, b + n) for b, n in spans if n)
        if any(e0 > b1 for (_, e0), (b1, _) in zip(ends, ends[1:])):
            return None  # a buffer freed within the call and its memory reused: the slots would be ambiguous
        # where each recorded buffer goes: (base, byte offset of its start)
        place, size = [], [0, 0]
        for (t, zero), (_, n) in zip(rec.allocs, spans):
            if t is y2:
                place.append((2, 0))
                continue
            b = 1 if zero else 0
            place.append((b, size[b]))
            size[b] += -(-n // cls.ALIGN) * cls.ALIGN
        own = [(p, n, b, o) for (p, n), (b, o) in zip(spans, place)] + [(x2.data_ptr(), x2.numel() * x2.element_size(),
                                                                          3, 0)]
        consts = [(t.data_ptr(), t.numel() * t.element_size()) for t in operands if t is not None]
        consts += list(G.PERSISTENT.items())

        def where(t: torch.Tensor):
            p = t.data_ptr()
            for start, n, b, o in own:  # the call's own memory first: a buffer is never a constant
                if start <= p < start + max(n, 1):
                    return b, o + p - start
            for start, n in consts:
                if start <= p < start + max(n, 1):
                    return None, p
            raise LookupError

        launches = []
        try:
            for raw, grid, args in rec.launches:
                template, patches = [], []
                for kind, a in zip(raw.kinds, args):
                    if kind == 1:
                        if isinstance(a, torch.Tensor):
                            return None
                        template.append(a)
                        continue
                    b, off = where(a)
                    if kind == 0:
                        if b is not None:
                            patches.append((len(template), b, off))
                        template.append(off if b is None else 0)
                    else:
                        m = raw.map_of(kind, off, a.shape, a.stride()) if b is None else None
                        if b is not None:
                            patches.append((len(template), b, off, a.shape, a.stride(), kind))
                            m = (None,) * (1 + 2 * a.dim())
                        template.extend(m)
                launches.append((raw, (*grid, 1, 1)[:3], template, tuple(patches)))
        except LookupError:
            return None
        return cls(size[0], size[1], (y2.shape, y2.dtype), tuple(launches))

    def run(self, x2: torch.Tensor) -> torch.Tensor:
        dev = x2.device
        out = torch.empty(self.out[0], dtype=self.out[1], device=dev)
        ws = torch.empty(self.ws, dtype=torch.uint8, device=dev) if self.ws else None
        zs = torch.zeros(self.zs, dtype=torch.uint8, device=dev) if self.zs else None
        base = (0 if ws is None else ws.data_ptr(), 0 if zs is None else zs.data_ptr(), out.data_ptr(),
                x2.data_ptr())
        stream = G._raw_stream(dev.index)
        for raw, grid, template, patches in self.launches:
            flat = template.copy()
            for p in patches:
                if len(p) == 3:
                    flat[p[0]] = base[p[1]] + p[2]
                else:
                    i, m = p[0], raw.map_of(p[5], base[p[1]] + p[2], p[3], p[4])
                    flat[i:i + len(m)] = m
            raw.launch_flat(grid, flat, stream)
        return out


class Programs:
    """Per-module programs (the module docstring has the policy). modules.py: key = key(x, operands);
    replay(module, key, x) when not None, else (Triton path chosen) run(module, key, x, fn, operands)."""

    def __init__(self):
        self.enabled: bool | None = None  # None: LITEFFN_PROGRAMS decides (default on)
        self.disabled: str | None = None
        # module -> {key: Program, or the number of recordings that could not become one}
        self.states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.stats: Counter = Counter()  # record, replay, unrepeatable

    def on(self) -> bool:
        if self.disabled is not None or not (G._FAST_OK and G.RAW_LAUNCH and G._RAW_OK):
            return False
        return self.enabled if self.enabled is not None else os.environ.get(ENV, "1") != "0"

    def key(self, x: torch.Tensor, operands) -> tuple | None:
        if torch.compiler.is_compiling() or not self.on() or x.dim() == 0 or x.requires_grad:
            return None
        dev = CudaBackend.device(x)
        if dev is None:
            return None
        k = operand_key(x, operands, dev)
        if k is None:
            return None
        return (*k, x.stride(), x.data_ptr() % 16 == 0, fp8_ws._knobs(), G.PROMOTE_K)

    def replay(self, owner, key: tuple, x: torch.Tensor) -> torch.Tensor | None:
        st = self.states.get(owner)
        p = None if st is None else st.get(key)
        if type(p) is not Program or G._hooks_set():
            return None
        try:
            y2 = p.run(x.reshape(-1, x.shape[-1]).contiguous())
        except Exception as ex:  # noqa: BLE001
            self._disable(ex)
            return None
        self.stats["replay"] += 1
        return _shaped(y2, x)

    def run(self, owner, key: tuple, x: torch.Tensor, fn, operands) -> torch.Tensor:
        """A call with no program for its key: eagerly, recorded; a program from it if it can be one.
        fn(x2 [M, K]) -> [M, N] is the eager call; its failures propagate (the caller falls back)."""
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        st = self.states.get(owner)
        if st is None:
            st = self.states[owner] = {}
        tried = st.get(key, 0)
        if type(tried) is Program or tried >= TRIES or G._rec is not None:  # (a replay refused: hooks set)
            return _shaped(fn(x2), x)
        with G.recording() as rec:
            y2 = fn(x2)
        try:
            p = Program.build(rec, x2, y2, operands)
        except Exception as ex:  # noqa: BLE001
            self._disable(ex)
            return _shaped(y2, x)
        if key not in st and len(st) >= PER_MODULE:
            st.clear()
        # (the first calls of a shape compile and tune: recorded again on the next call, a few times)
        st[key] = p if p is not None else tried + 1
        self.stats["record" if p is not None else "unrepeatable"] += 1
        return _shaped(y2, x)

    def drop(self, owner) -> None:
        self.states.pop(owner, None)

    def _disable(self, ex: Exception) -> None:
        if self.disabled is None:
            self.disabled = f"{type(ex).__name__}: {ex}"
            log.warning("LiteFFN: repeating a recorded launch program failed (%s); compressed calls are decided "
                        "in Python from now on (same results, more host time per call)",
                        self.disabled.splitlines()[0][:300])
        self.states = weakref.WeakKeyDictionary()


PROGRAMS = Programs()
