"""Replacement modules for LTX-2's FFN: same call signature, compressed tensors as buffers.

Buffers (not parameters) so that ComfyUI's model management moves, counts and frees them
with the model, and nothing in them is trainable. forward() goes through dispatch, which
picks the fused kernel where one exists and the reference elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from . import formats as F
from .reference import compressed_linear_ref

TENSOR_NAMES = ("A", "B", "q", "q_scale", "q_scale2", "bias")


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return compressed_linear_ref(x, self.fmt, self.tensors(), self.act_quant)

    def dense_weight(self, dtype=torch.float32) -> torch.Tensor:
        """W' = A B + dequant(Q), for inspection and tests."""
        w = F.decode(self.fmt, self.tensors(), dtype)
        return w + (self.A.to(dtype) @ self.B.to(dtype)) if self.rank else w

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, rank={self.rank}, residual={self.fmt}"


class CompressedFFN(torch.nn.Module):
    """Linear -> GELU(tanh) -> Linear, as LTX-2's FeedForward (dropout is identity at inference)."""

    def __init__(self, up: CompressedLinear, down: CompressedLinear):
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(Fn.gelu(self.up(x), approximate="tanh"))
