"""Replacement modules for LTX-2's FFN: same call signature, compressed tensors as buffers.

Buffers (not parameters) so that ComfyUI's model management moves, counts and frees them
with the model, and nothing in them is trainable. forward() asks dispatch.py for the path:
the fused Triton kernels on GPUs with FP8 tensor cores, the torch reference elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from . import dispatch, ops
from . import formats as F
from .fp8_ffn import static_scale
from .reference import compressed_ffn_ref, compressed_linear_ref

# input_amax: the calibrated max |input| of the linear (absent without statistics).
TENSOR_NAMES = ("A", "B", "q", "q_scale", "q_scale2", "bias", "input_amax")


class CompressedLinear(torch.nn.Module):
    def __init__(self, fmt: str, in_features: int, out_features: int, tensors: dict, act_quant: bool = True):
        super().__init__()
        self.fmt = F.check_format(fmt)
        self.in_features, self.out_features = in_features, out_features
        self.act_quant = act_quant
        for name in TENSOR_NAMES:
            self.register_buffer(name, tensors.get(name))
        self.rank = 0 if self.A is None else int(self.A.shape[1])

    def tensors(self) -> dict:
        return {n: getattr(self, n) for n in TENSOR_NAMES if getattr(self, n) is not None}

    def kernel_layer(self):
        return (self.fmt, self.act_quant, self.tensors())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref = lambda: compressed_linear_ref(x, self.fmt, self.tensors(), self.act_quant)  # noqa: E731
        if dispatch.choose(x, [self.kernel_layer()]) == "triton":
            return dispatch.run("linear", lambda: ops.fp8_linear(x, self.q, self.q_scale, self.A, self.B,
                                                                 self.bias).to(x.dtype), ref)
        dispatch.note_reference("linear")
        return ref()

    def dense_weight(self, dtype=torch.float32) -> torch.Tensor:
        """W' = A B + dequant(Q), for inspection and tests."""
        w = F.decode(self.fmt, self.tensors(), dtype)
        return w + (self.A.to(dtype) @ self.B.to(dtype)) if self.rank else w

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, rank={self.rank}, residual={self.fmt}"


class CompressedFFN(torch.nn.Module):
    """Linear -> GELU(tanh) -> Linear, as LTX-2's FeedForward (dropout is identity at inference).

    The hidden activation is quantized to FP8 with a static scale (h_scale) when the down
    linear's input range was calibrated, which lets the kernels fuse the whole FFN into three
    launches (fp8_ffn.py says why); otherwise per token, as a separate pass. Both paths, fused
    and reference, use the same scheme, so they compute the same function."""

    def __init__(self, up: CompressedLinear, down: CompressedLinear):
        super().__init__()
        self.up, self.down = up, down
        amax = down.input_amax
        self.register_buffer("h_scale", static_scale(amax) if amax is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.up, self.down
        if up.act_quant != down.act_quant:  # mixed activation handling: each linear on its own
            return down(Fn.gelu(up(x), approximate="tanh"))
        ref = lambda: compressed_ffn_ref(x, up.fmt, up.tensors(), down.fmt, down.tensors(), self.h_scale,  # noqa: E731
                                         act_quant=up.act_quant)
        if dispatch.choose(x, [up.kernel_layer(), down.kernel_layer()]) == "triton":
            return dispatch.run("ffn", lambda: ops.fp8_ffn_op(
                x, up.q, up.q_scale, up.A, up.B, up.bias, down.q, down.q_scale, down.A, down.B, down.bias,
                self.h_scale).to(x.dtype), ref)
        dispatch.note_reference("ffn")
        return ref()
