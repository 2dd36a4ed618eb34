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
    """Holds a format's scales for one residual and rounds columns with them. The format object
    (kernels/formats.py) gives the grid, the initial scales and the block-scale candidates."""

    def __init__(self, fmt: str | F.ResidualFormat, E: torch.Tensor):
        self.format = F.get(fmt)
        self.fmt = self.format.name
        self.block = self.format.block
        n, k = E.shape
        if self.block and k % self.block:
            raise ValueError(f"{self.fmt} needs the input width ({k}) to be a multiple of {self.block}")
        self.tensor_scale = self.format.tensor_scale_for(E.abs().amax()) if self.format.tensor_scale else None
        self.scale = self.format.init_scales(E)  # per row (final), per block (filled below) or None
        self._cur = None  # scale of the block being quantized

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        return self.format.round(x)

    def fit_block(self, Wb: torch.Tensor, j: int) -> torch.Tensor:
        """Choose the scales [N] of block j from its current values Wb [N, block] (least MSE)."""
        amax = Wb.abs().amax(1)
        best, best_err = None, None
        for s in self.format.scale_candidates(amax, self.tensor_scale):
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
        if self.scale is None:
            q = self.grid(w)
            return q, q
        s = self.scale if self.block is None else self._cur
        g = self.grid(w / s)
        return g, g * s

    def rtn(self, E: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest of the whole matrix; returns grid values."""
        if self.scale is None:
            return self.grid(E)
        if self.block is None:
            return self.grid(E / self.scale[:, None])
        n, k = E.shape
        Eb = E.view(n, k // self.block, self.block)
        for j in range(k // self.block):
            self.fit_block(Eb[:, j], j)
        return self.grid(Eb / self.scale[:, :, None]).view(n, k)

    def dequant(self, G: torch.Tensor) -> torch.Tensor:
        return self.format.apply_scale(G, self.scale)

    def encode(self, G: torch.Tensor) -> dict:
        return self.format.encode(G, self.scale, self.tensor_scale)


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
    G1, Err, S = gptq_kernel.gptq_block_triton(W1, U1, qz.format, qz.scale if qz.block is None else None, ts,
                                               qz.block or 1)
    if S is not None:
        j0 = i1 // qz.block
        nb = -(-width // qz.block)
        qz.scale[:, j0 : j0 + nb] = S[:, :nb]
    return G1[:, :width], Err[:, :width]


def _use_triton(E: torch.Tensor, fmt: F.ResidualFormat, backend: str) -> bool:
    if backend == "triton":
        if not gptq_kernel.available():
            raise RuntimeError("backend='triton' asked for, but triton is not installed")
        if not gptq_kernel.supports(fmt):
            raise RuntimeError(f"backend='triton' asked for, but the GPTQ kernel does not quantize {fmt.name}")
        return True
    return backend == "auto" and E.is_cuda and gptq_kernel.available() and gptq_kernel.supports(fmt)


@torch.no_grad()
def quantize_residual(E: torch.Tensor, fmt: str | F.ResidualFormat, Hinv: torch.Tensor | None = None, blocksize: int = 128,
                      backend: str = "auto"):
    """Quantize E [N, K] in format fmt. Hinv: inverse of the damped input covariance; with it,
    GPTQ error feedback, without it round-to-nearest. backend: auto (Triton on CUDA), torch,
    triton. Returns (stored tensors, dequantized E)."""
    E = E.float()
    qz = Quantizer(fmt, E)
    if Hinv is None or not qz.format.error_feedback:
        G = qz.rtn(E)
        return qz.encode(G), qz.dequant(G)
    n, k = E.shape
    U = upper_cholesky(Hinv.float())
    W = E.clone()
    G = torch.empty_like(W)
    triton_path = _use_triton(E, qz.format, backend)
    block_fn = _block_triton if triton_path else _block_torch
    blocksize = gptq_kernel.BLOCK_COLS if triton_path else max(qz.block or 1, blocksize // (qz.block or 1) * (qz.block or 1))
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        G1, Err = block_fn(qz, W[:, i1:i2].clone(), U[i1:i2, i1:i2], i1)
        G[:, i1:i2] = G1
        W[:, i2:].sub_(Err @ U[i1:i2, i2:])
    return qz.encode(G), qz.dequant(G)
