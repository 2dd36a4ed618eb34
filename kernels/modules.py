"""Replacement modules for LTX-2's FFN: same call signature, compressed tensors inside.

The tensors are frozen nn.Parameters, not buffers: ComfyUI's model management only moves,
counts and offloads modules that own parameters (ModelPatcher._load_list), including under
dynamic VRAM. A dtype move (`module.to(torch.float16)`) never changes them: codes, scales and
factors keep their stored dtypes. When the tensors live on another device than the input
(a partially loaded model keeps some modules offloaded), forward copies them for that call.

forward() asks dispatch.py for the path: the fused Triton kernels on GPUs with FP8 tensor
cores (through ops.py: called directly in eager mode, as custom ops under torch.compile), the
torch reference elsewhere. Few-token calls on the kernels are captured into a CUDA graph and
replayed (graphs.py says when, and when not); a replay skips the rest of forward. On such
machines an MXFP4/NVFP4 residual is converted once, when the module is built, to the W4A8
kernel's layout (w4a8.py: same bytes, codes repacked, block scales as table bytes); the
reference then computes with the same weights.
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as Fn

from . import dispatch, ops
from . import formats as F
from .fp8_ffn import static_scale
from .fused import split_shared
from .graphs import GRAPHS
from .programs import PROGRAMS
from .reference import compressed_ffn_ref, compressed_linear_ref, dequant_weight

# LITEFFN_SHARED_INPUT=0: linked linears (SharedInput) each run alone, as unlinked (benches compare both)
SHARE_INPUTS = os.environ.get("LITEFFN_SHARED_INPUT", "1") != "0"
# LITEFFN_STATIC_INPUT=1: a linear with a calibrated input range quantizes its input with that one static scale
# (input_scale, as the fused FFN's hidden activation) instead of per token, on both paths, so its input pass
# reads x once. On all-MiniLM-L6-v2's real activations it costs +1-4% relative error at rank 64
# (bench/real_layers_cpu.md) for 0-14 us per 4096-wide linear at 6144 tokens and about 0.5% of a step on the H200
# (bench/attn_static_h200.md, bench/ltx2_step_static_h200.md), so it is off by default. Read per call: flipping it
# changes the operands' key (graphs.py, programs.py), so nothing recorded under the other setting replays.
STATIC_INPUT = os.environ.get("LITEFFN_STATIC_INPUT", "0") == "1"

# The low-rank factors, every registered format's residual tensors (first seen in registry
# order: q, q_scale, q_scale2), then:
# sb: block bytes of an FP4 residual in the W4A8 layout (q_scale is then its per-channel factor);
# input_amax: the calibrated max |input| of the linear (absent without statistics).
# The modules' parameters and compressed_file.load's keys; a format registered after this import
# must store no other names (CompressedLinear checks).
TENSOR_NAMES = ("A", "B", *dict.fromkeys(n for f in F.FORMATS.values() for n in f.tensor_names),
                "sb", "bias", "input_amax")


def _on(t, device):
    """t on device for this call (a copy when the module sits offloaded elsewhere)."""
    return t if t is None or device is None or t.device == device else t.to(device, non_blocking=True)


def _replay(store, module, key, x, name: str):
    """The output of module's CUDA graph (store GRAPHS) or recorded launch program (PROGRAMS) for this
    call, or None (no key, none recorded, kernels off)."""
    if key is None or not dispatch.triton_allowed():
        return None
    y = store.replay(module, key, x)
    if y is not None:
        dispatch.counts[name] += 1
    return y


def _replayed(module, operands, x, name: str):
    """(output or None, graph key, program key) of a call: a CUDA graph for few tokens, else a program."""
    key = GRAPHS.key(x, operands)
    y = _replay(GRAPHS, module, key, x, name)
    if y is not None:
        return y, key, None
    pkey = PROGRAMS.key(x, operands) if key is None else None
    return _replay(PROGRAMS, module, pkey, x, name), key, pkey


def _eager(module, gkey, pkey, x, fn, operands, rows):
    """The kernels' call on x: through a CUDA graph (few tokens), a recorded program, or plainly."""
    if gkey is not None:
        return GRAPHS.run(module, gkey, x, rows())
    if pkey is not None:
        return PROGRAMS.run(module, pkey, x, rows(), operands)
    return fn()


def _w4a8_layout(f: F.ResidualFormat, tensors: dict) -> dict:
    """The residual in the W4A8 kernel's layout, converted on the GPU when there is one (a second
    on the CPU for a 4096x16384 linear, milliseconds on the GPU), left on the tensors' device."""
    from . import w4a8

    dev = tensors["q"].device
    work = torch.device("cuda") if torch.cuda.is_available() else dev
    res = {k: v.to(work) for k, v in tensors.items() if k in f.tensor_names}
    w = w4a8.prepare(f, res)
    # the stored residual's tensors give way to the kernel's q, sb and q_scale
    out = {k: v for k, v in tensors.items() if k not in f.tensor_names}
    out.update(q=w["q"].to(dev), sb=w["sb"].to(dev), q_scale=w["q_scale"].to(dev))
    return out


class CompressedLinear(torch.nn.Module):
    """y = dequant(q) xq + (x B^T) A^T + bias. With a calibrated input range (input_amax) it
    also holds `input_scale`, the static FP8 scale of its input used inside a fused FFN."""

    def __init__(self, fmt: str, in_features: int, out_features: int, tensors: dict, act_quant: bool = True):
        super().__init__()
        self.format = F.get(fmt)
        self.fmt = self.format.name  # what files and messages carry
        if not set(self.format.tensor_names) <= set(TENSOR_NAMES):
            raise ValueError(f"residual format {self.fmt!r} stores {self.format.tensor_names}; "
                             f"CompressedLinear holds {TENSOR_NAMES} (formats registered after import)")
        self.in_features, self.out_features = in_features, out_features
        self.act_quant = act_quant
        if not self.format.in_w4a8_layout(tensors) and dispatch.w4a8_possible(self.format, in_features, act_quant):
            tensors = _w4a8_layout(self.format, tensors)
        for name in TENSOR_NAMES:
            self._frozen(name, tensors.get(name))
        amax = tensors.get("input_amax")
        self._frozen("input_scale", static_scale(amax) if amax is not None else None)
        self.rank = 0 if self.A is None else int(self.A.shape[1])
        self._extra = None  # (A, B) with a runtime LoRA's terms appended (set_lora), else None
        self._shared = None  # (SharedInput, index) when linked with linears that read the same input

    def _frozen(self, name, t):
        self.register_parameter(name, None if t is None else torch.nn.Parameter(t, requires_grad=False))

    def _apply(self, fn, recurse=True):
        GRAPHS.drop(self)  # the tensors move: the graph's addresses go stale
        PROGRAMS.drop(self)
        if self._shared is not None:
            self._shared[0].forget()
        dtypes = {n: p.dtype for n, p in self._parameters.items() if p is not None}
        super()._apply(fn, recurse)
        for n, dt in dtypes.items():
            p = self._parameters[n]
            if p.dtype != dt:  # stored formats are exact in any wider dtype: casting back is lossless
                p.data = p.data.to(dt)
        return self

    def tensors(self, device=None) -> dict:
        p = self._parameters  # what getattr would return, without nn.Module.__getattr__ per name
        t = {n: _on(p[n], device) for n in TENSOR_NAMES if p[n] is not None}
        if self._extra is not None:
            t["A"], t["B"] = (_on(e, device) for e in self._extra)
        if STATIC_INPUT and p["input_scale"] is not None and self.act_quant:
            t["x_scale"] = _on(p["input_scale"], device)
        return t

    def _operands(self) -> tuple:
        """The kernels' operand tensors as stored (None where absent), for graphs.py's key."""
        p = self._parameters
        a, b = (p["A"], p["B"]) if self._extra is None else self._extra
        return (p["q"], p["q_scale"], p["q_scale2"], p["sb"], p["bias"], a, b,
                p["input_scale"] if STATIC_INPUT else None)

    def set_lora(self, up: torch.Tensor | None, down: torch.Tensor | None = None) -> None:
        """Add a LoRA's delta up @ down ([N, r'] with its scale folded in, [r', K]) to the low-rank
        branch until cleared with None: the branch becomes [A, up] [B; down], so the fused kernels
        run it as a rank r + r' branch. The stored factors are not modified."""
        if self._shared is not None:
            self._shared[0].forget()
        if up is None:
            self._extra = None
            return
        if up.shape[0] != self.out_features or down.shape[1] != self.in_features or up.shape[1] != down.shape[0]:
            raise ValueError(f"LoRA of shape {tuple(up.shape)} x {tuple(down.shape)} does not fit a "
                             f"{self.in_features}->{self.out_features} linear")
        dev = (self.A if self.A is not None else self.q).device
        up, down = up.to(dev, torch.bfloat16), down.to(dev, torch.bfloat16)
        if self.A is not None:
            up, down = torch.cat([self.A.to(torch.bfloat16), up], 1), torch.cat([self.B.to(torch.bfloat16), down], 0)
        self._extra = (up.contiguous(), down.contiguous())

    def scale_on(self, device):
        return _on(self.input_scale, device)

    def kernel_layer(self, t: dict | None = None):
        return (self.format, self.act_quant, self.tensors() if t is None else t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed with the linears that read the same x, or None (never under torch.compile: dynamo sees none
        # of the link's weak references and identity tests)
        if self._shared is not None and not torch.compiler.is_compiling():
            y = self._shared[0].output(self._shared[1], x)
            if y is not None:
                return y
        operands = self._operands()
        y, key, pkey = _replayed(self, operands, x, "linear:triton")
        if y is not None:
            return y
        t = self.tensors(x.device)
        ref = lambda: compressed_linear_ref(x, self.format, t, self.act_quant, act_scale=t.get("x_scale"))  # noqa: E731
        if dispatch.choose(x, [self.kernel_layer(t)]) == "triton":
            # few tokens: eager once, then a CUDA graph (graphs.py); many: recorded once, then repeated
            # (programs.py)
            rows = lambda: ops.linear_rows(t, self.block)  # noqa: E731
            fn = lambda: ops.linear(x, t, self.block).to(x.dtype)  # noqa: E731
            return dispatch.run("linear", lambda: _eager(self, key, pkey, x, fn, operands, rows), ref)
        dispatch.note_reference("linear")
        return ref()

    @property
    def block(self) -> int:
        return self.format.block or 0

    def dense_weight(self, dtype=torch.float32) -> torch.Tensor:
        """W' = A B + dequant(Q) (with a runtime LoRA's terms, if set), for inspection and tests."""
        t = self.tensors()
        w = dequant_weight(self.format, t, dtype)
        return w + (t["A"].to(dtype) @ t["B"].to(dtype)) if "A" in t else w

    def extra_repr(self) -> str:
        lora = f", lora rank={self._extra[0].shape[1] - self.rank}" if self._extra is not None else ""
        return f"{self.in_features}->{self.out_features}, rank={self.rank}, residual={self.fmt}{lora}"


class SharedInput:
    """Compressed linears that read the same input tensor (an attention's q, k and v; k and v of a
    cross-attention's context: calibration/ltx2.shared_inputs), run as one input pass and a GEMM each
    (fused.shared_linear) when the first of them is called, instead of an input pass per linear: on the
    H200 a 4096-wide input pass at 6144 tokens costs 52-57 us against 176 us for a 4096x4096 GEMM.

    The callers stay ComfyUI's: the attention calls to_q(x), to_k(context), to_v(context). The first
    member's call computes every member's output for x and keeps the others'; a later member called with
    that same tensor object gets its output (once), one called with another tensor (a cross-attention's
    context, another pack's attention) drops what was kept and computes alone, as without the link. So
    linking never changes a result beyond the kernels' own rounding, only how often x is read. The tensor
    is held by a weak reference and matched by identity (and, outside inference mode, its version): an
    in-place change of an inference tensor between the calls is not seen (ComfyUI's LTX attention makes
    none). Fused only on the kernels' path, outside torch.compile, with equal ranks (a runtime LoRA on one
    member makes the ranks differ: then each computes alone). Outputs kept and never asked for stay until
    the next first-member call. Few tokens replay a CUDA graph of the fused call, many a launch program."""

    def __init__(self, members: list):
        if not 2 <= len(members) <= 3 or not all(isinstance(m, CompressedLinear) for m in members):
            raise ValueError("a shared input links 2 or 3 CompressedLinears")
        if len({m.in_features for m in members}) != 1:
            raise ValueError("linears with a shared input have one input width")
        for m in members:
            if m._shared is not None:
                m._shared[0].unlink()
        self.members = list(members)
        for i, m in enumerate(self.members):
            m._shared = (self, i)
        self._kept = None  # (weakref to x, x's version or None, [outputs, None once taken])
        # one input pass, one quantization: with static input scales (STATIC_INPUT) only if theirs are one
        scales = [m.input_scale for m in self.members]
        self._one_scale = all(s is None for s in scales) or (
            all(s is not None for s in scales) and all(torch.equal(s.cpu(), scales[0].cpu()) for s in scales))

    def unlink(self) -> None:
        for m in self.members:
            m._shared = None
        self.members, self._kept = [], None

    def forget(self) -> None:
        """Drop kept outputs and this group's graph and programs (a member moved or got a LoRA)."""
        self._kept = None
        GRAPHS.drop(self)
        PROGRAMS.drop(self)

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member i's output for x if this group computes it, else None (the member computes alone)."""
        kept = self._kept
        if kept is not None:
            ref, ver, outs = kept
            if ref() is x and ver == _version(x) and outs[i] is not None:
                y, outs[i] = outs[i], None
                if all(o is None for o in outs):
                    self._kept = None
                return y
            self._kept = None
        if i != 0:
            return None
        ys = self._fused(x)
        if ys is None:
            return None
        self._kept = (weakref.ref(x), _version(x), [None, *ys[1:]])
        return ys[0]

    def _fused(self, x: torch.Tensor):
        if not SHARE_INPUTS or torch.compiler.is_compiling() or x.dim() == 0:
            return None
        ms = self.members
        operands = tuple(o for m in ms for o in m._operands())
        y, key, pkey = _replayed(self, operands, x, "shared:triton")
        if y is None:
            ts = [m.tensors(x.device) for m in ms]
            ranks = {0 if t.get("A") is None else t["A"].shape[1] for t in ts}
            # (one input width for all: __init__; choose checks x against it)
            if (len(ranks) != 1 or (STATIC_INPUT and not self._one_scale)
                    or dispatch.choose(x, [m.kernel_layer(t) for m, t in zip(ms, ts)]) != "triton"):
                return None
            blocks = [m.block for m in ms]
            rows = lambda: ops.shared_rows(ts, blocks)  # noqa: E731
            fn = lambda: ops.shared_linear(x, ts, blocks).to(x.dtype)  # noqa: E731
            y = dispatch.run("shared", lambda: _eager(self, key, pkey, x, fn, operands, rows), lambda: None)
            if y is None:  # the kernels failed and are off now: each member takes the reference
                return None
        return split_shared(y, [m.out_features for m in ms])


def _version(x: torch.Tensor):
    return None if x.is_inference() else x._version


class CompressedFFN(torch.nn.Module):
    """Linear -> GELU(tanh) -> Linear, as LTX-2's FeedForward (dropout is identity at inference).

    The hidden activation is quantized to FP8 with a static scale (down.input_scale) when the
    down linear's input range was calibrated, which lets the kernels fuse the whole FFN into
    three launches (fp8_ffn.py says why); otherwise per token, as a separate pass. Both paths,
    fused and reference, use the same scheme, so they compute the same function."""

    def __init__(self, up: CompressedLinear, down: CompressedLinear):
        super().__init__()
        self.up, self.down = up, down

    def _apply(self, fn, recurse=True):
        GRAPHS.drop(self)  # the tensors move: the graph's addresses go stale
        PROGRAMS.drop(self)
        return super()._apply(fn, recurse)

    @property
    def h_scale(self):
        return self.down.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.up, self.down
        if up.act_quant != down.act_quant:  # mixed activation handling: each linear on its own
            return down(Fn.gelu(up(x), approximate="tanh"))
        operands = (*up._operands(), *down._operands(), down._parameters["input_scale"])
        y, key, pkey = _replayed(self, operands, x, "ffn:triton")
        if y is not None:
            return y
        t1, t2, hs = up.tensors(x.device), down.tensors(x.device), down.scale_on(x.device)
        ref = lambda: compressed_ffn_ref(x, up.format, t1, down.format, t2, hs, act_quant=up.act_quant,  # noqa: E731
                                         x_scale=t1.get("x_scale"))
        if dispatch.choose(x, [up.kernel_layer(t1), down.kernel_layer(t2)]) == "triton":
            rows = lambda: ops.ffn_rows(t1, t2, hs, up.block, down.block)  # noqa: E731
            fn = lambda: ops.ffn(x, t1, t2, hs, up.block, down.block).to(x.dtype)  # noqa: E731
            return dispatch.run("ffn", lambda: _eager(self, key, pkey, x, fn, operands, rows), ref)
        dispatch.note_reference("ffn")
        return ref()


def linear_from_layer(c) -> CompressedLinear:
    """CompressedLinear from a CompressedLayer (calibration/compress.py)."""
    return CompressedLinear(c.info["format"], c.info["in_features"], c.info["out_features"], c.tensors)


def ffn_from_layers(up, down) -> CompressedFFN:
    """CompressedFFN from the two CompressedLayers (calibration/compress.py) of one FFN."""
    return CompressedFFN(linear_from_layer(up), linear_from_layer(down))


def module_from_layers(layers) -> CompressedLinear | CompressedFFN:
    """The module that runs a unit's CompressedLayers, given in the order they run: one linear, or
    an FFN's two (up, down)."""
    if len(layers) == 1:
        return linear_from_layer(layers[0])
    if len(layers) == 2:
        return ffn_from_layers(*layers)
    raise ValueError(f"a unit holds one linear or an FFN's two, not {len(layers)}")


def share_inputs(modules: dict, groups) -> list[SharedInput]:
    """Link the CompressedLinears of modules {unit: module} named in each group (calibration/ltx2.shared_inputs)
    as SharedInputs; groups with fewer than two such linears, or of unequal input width, stay unlinked."""
    out = []
    for g in groups:
        ms = [modules.get(u) for u in g]
        ms = [m for m in ms if isinstance(m, CompressedLinear)]
        if len(ms) > 1 and len({m.in_features for m in ms}) == 1:
            out.append(SharedInput(ms))
    return out
