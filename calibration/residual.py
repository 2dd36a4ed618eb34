"""Quantization of the residual W - A B, round-to-nearest or with error feedback (GPTQ).

With statistics, the residual's columns are quantized one by one and each column's rounding
error is pushed onto the columns not yet quantized through the inverse of the input
covariance (the Hessian of ||(E - Q) X^T||^2), as in GPTQ (Frantar et al. 2022). Block scales
(NVFP4/MXFP4) are chosen when the quantizer enters a block, from the already-updated values.
Measured on held-out activations this is what makes calibration pay off in the final layer:
whitened SVD alone improves the low-rank part, but rounding the residual erases the gain.
"""
from __future__ import annotations

import torch

from ..kernels import formats as F
from ..kernels import gptq as gptq_kernel


class Quantizer:
    """Holds a format's scales for one residual and rounds columns with them."""

    def __init__(self, fmt: str, E: torch.Tensor):
        self.fmt = F.check_format(fmt)
        self.block = F.BLOCK[fmt]
        n, k = E.shape
        if self.block and k % self.block:
            raise ValueError(f"{fmt} needs the input width ({k}) to be a multiple of {self.block}")
        self.tensor_scale = None
        if fmt == "fp8":
            self.scale = (E.abs().amax(1) / F.FP8_MAX).clamp_min(1e-12)
        elif fmt in ("nvfp4", "mxfp4"):
            self.scale = E.new_zeros(n, k // self.block)
            if fmt == "nvfp4":
                self.tensor_scale = F.nvfp4_tensor_scale(E.abs().amax())
        else:
            self.scale = None
        self._cur = None  # scale of the block being quantized

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        return F.round_fp8(x) if self.fmt == "fp8" else F.round_fp4(x)

    def fit_block(self, Wb: torch.Tensor, j: int) -> torch.Tensor:
        """Choose the scales [N] of block j from its current values Wb [N, block] (least MSE)."""
        amax = Wb.abs().amax(1)
        if self.fmt == "mxfp4":
            base = F.mxfp4_scale(amax)
            cands = [base, base / 2]
        else:
            cands = [F.nvfp4_block_scale(amax * c, self.tensor_scale) for c in gptq_kernel.NVFP4_SHRINK]
        best, best_err = None, None
        for s in cands:
            s = s[:, None]
            err = ((self.grid(Wb / s) * s - Wb) ** 2).sum(1)
            if best is None:
                best, best_err = s[:, 0].clone(), err
            else:
                better = err < best_err
                best = torch.where(better, s[:, 0], best)
                best_err = torch.where(better, err, best_err)
        self.scale[:, j] = best
        return best

    def round_col(self, w: torch.Tensor):
        """(grid value, dequantized value) of one column."""
        if self.fmt == "bf16":
            q = w.bfloat16().float()
            return q, q
        s = self.scale if self.fmt == "fp8" else self._cur
        g = self.grid(w / s)
        return g, g * s

    def rtn(self, E: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest of the whole matrix; returns grid values."""
        if self.fmt == "bf16":
            return E.bfloat16().float()
        if self.fmt == "fp8":
            return self.grid(E / self.scale[:, None])
        n, k = E.shape
        Eb = E.view(n, k // self.block, self.block)
        for j in range(k // self.block):
            self.fit_block(Eb[:, j], j)
        return self.grid(Eb / self.scale[:, :, None]).view(n, k)

    def dequant(self, G: torch.Tensor) -> torch.Tensor:
        if self.fmt == "bf16":
            return G
        if self.fmt == "fp8":
            return G * self.scale[:, None]
        n, k = G.shape
        return (G.view(n, k // self.block, self.block) * self.scale[:, :, None]).view(n, k)

    def encode(self, G: torch.Tensor) -> dict:
        return F.encode(self.fmt, G, self.scale, self.tensor_scale)


def upper_cholesky(Hinv: torch.Tensor) -> torch.Tensor:
    """GPTQ's factor: H^-1 = U^T U, U upper triangular."""
    return torch.linalg.cholesky(Hinv, upper=True)


def _block_torch(qz: Quantizer, W1: torch.Tensor, U1: torch.Tensor, i1: int):
    """Reference GPTQ over one column block: (grid values, scaled errors); fills qz.scale."""
    G1, Err = torch.empty_like(W1), torch.empty_like(W1)
    for i in range(W1.shape[1]):
        col = i1 + i
        if qz.block and col % qz.block == 0:
            qz._cur = qz.fit_block(W1[:, i : i + qz.block], col // qz.block)
        w = W1[:, i]
        g, q = qz.round_col(w)
        G1[:, i] = g
        err = (w - q) / U1[i, i]
        W1[:, i:].sub_(err[:, None] * U1[i, i:][None, :])
        Err[:, i] = err
    return G1, Err


def _block_triton(qz: Quantizer, W1: torch.Tensor, U1: torch.Tensor, i1: int):
    n, width = W1.shape
    bs = gptq_kernel.BLOCK_COLS
    if width < bs:  # tail block: zero columns with an identity factor quantize to nothing
        W1 = torch.cat([W1, W1.new_zeros(n, bs - width)], 1)
        U1p = torch.eye(bs, device=U1.device)
        U1p[:width, :width] = U1
        U1 = U1p
    ts = float(qz.tensor_scale) if qz.tensor_scale is not None else 1.0
    G1, Err, S = gptq_kernel.gptq_block_triton(W1, U1, qz.fmt, qz.scale if qz.fmt == "fp8" else None, ts,
                                               qz.block or 1)
    if S is not None:
        j0 = i1 // qz.block
        nb = -(-width // qz.block)
        qz.scale[:, j0 : j0 + nb] = S[:, :nb]
    return G1[:, :width], Err[:, :width]


def _use_triton(E: torch.Tensor, backend: str) -> bool:
    if backend == "triton":
        if not gptq_kernel.available():
            raise RuntimeError("backend='triton' asked for, but triton is not installed")
        return True
    return backend == "auto" and E.is_cuda and gptq_kernel.available()


@torch.no_grad()
def quantize_residual(E: torch.Tensor, fmt: str, Hinv: torch.Tensor | None = None, blocksize: int = 128,
                      backend: str = "auto"):
    """Quantize E [N, K] in format fmt. Hinv: inverse of the damped input covariance; with it,
    GPTQ error feedback, without it round-to-nearest. backend: auto (Triton on CUDA), torch,
    triton. Returns (stored tensors, dequantized E)."""
    E = E.float()
    qz = Quantizer(fmt, E)
    if Hinv is None or fmt == "bf16":
        G = qz.rtn(E)
        return qz.encode(G), qz.dequant(G)
    n, k = E.shape
    U = upper_cholesky(Hinv.float())
    W = E.clone()
    G = torch.empty_like(W)
    triton_path = _use_triton(E, backend)
    block_fn = _block_triton if triton_path else _block_torch
    blocksize = gptq_kernel.BLOCK_COLS if triton_path else max(qz.block or 1, blocksize // (qz.block or 1) * (qz.block or 1))
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        G1, Err = block_fn(qz, W[:, i1:i2].clone(), U[i1:i2, i1:i2], i1)
        G[:, i1:i2] = G1
        W[:, i2:].sub_(Err @ U[i1:i2, i2:])
    return qz.encode(G), qz.dequant(G)
