"""Compression of one linear: activation-aware low rank + quantized residual.

    W ~= A B + dequant(Q)       A [N, r] bf16, B [r, K] bf16, Q in fmt
A B is the whitened truncated SVD (lowrank.py); the residual is computed from the rounded
bf16 factors, so the factors' own rounding is quantized away with it; Q uses the same
statistics as its Hessian (residual.py). Without statistics: plain SVD and round-to-nearest.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..kernels import formats as F
from .lowrank import RankPolicy, Whitening, lowrank_factors
from .residual import quantize_residual
from .stats import LayerStats

log = logging.getLogger("liteffn")


@dataclass
class CompressedLayer:
    # A, B (rank > 0), q, q_scale, q_scale2 (nvfp4), bias (if any), input_amax (calibrated max |x|
    # of the input, with statistics: the kernels' static FP8 scale of the FFN's hidden activation)
    tensors: dict
    info: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return F.stored_bytes({k: v for k, v in self.tensors.items() if k not in ("bias", "input_amax")})


def source_weight(weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 weight from bf16 / fp16 / fp32, or FP8 with ComfyUI's `weight_scale` (scalar or
    per output row)."""
    if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        if scale is None:
            raise ValueError("FP8 weight without its scale: pass the checkpoint's `weight_scale` tensor")
        s = scale.float().to(weight.device)
        if s.numel() == 1:
            return weight.float() * s.reshape(())
        if s.numel() == weight.shape[0]:
            return weight.float() * s.reshape(-1, 1)
        raise ValueError(f"FP8 weight scale of {s.numel()} values fits neither per-tensor nor per-row")
    if not weight.is_floating_point():
        raise TypeError(f"unsupported weight dtype {weight.dtype} (expected bf16, fp16, fp32 or FP8)")
    return weight.float()


def weighted_rel_err(dW: torch.Tensor, W: torch.Tensor, R: torch.Tensor | None) -> float:
    """sqrt(tr(dW R dW^T) / tr(W R W^T)): expected relative output error on the calibration
    distribution (weights only); plain Frobenius ratio without R."""
    if R is None:
        return float(dW.norm() / W.norm().clamp_min(1e-30))
    num = ((dW @ R) * dW).sum()
    den = ((W @ R) * W).sum()
    return float((num / den.clamp_min(1e-30)).clamp_min(0).sqrt())


@torch.no_grad()
def compress_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stats: LayerStats | None = None,
    policy: RankPolicy | int = 64,
    fmt: str | F.ResidualFormat = "fp8",
    damp: float = 0.01,
    gptq: bool = True,
    device: str | torch.device | None = None,
    name: str = "",
    weight_scale: torch.Tensor | None = None,
    refit: int = 2,
    whiten: str = "cholesky",
) -> CompressedLayer:
    form = F.get(fmt)
    policy = RankPolicy(rank=policy) if isinstance(policy, int) else policy
    device = torch.device(device) if device is not None else weight.device
    W = source_weight(weight.to(device), weight_scale)
    if not torch.isfinite(W).all():
        raise ValueError(f"weight of {name or 'layer'} contains NaN or Inf")
    n, k = W.shape
    wh = R = None
    if stats is not None:
        if stats.width != k:
            raise ValueError(f"statistics of {name or 'layer'} are {stats.width} wide, the weight takes {k} inputs")
        stats.check_finite(name)
        R = stats.covariance().to(device).float()
        wh = Whitening(R, damp, whiten)
    else:
        log.debug("LiteFFN: no statistics for %s: plain SVD and round-to-nearest residual", name or "layer")

    A, B, info = lowrank_factors(W, wh, policy, name)
    A, B = A.bfloat16(), B.bfloat16()
    Hinv = wh.inverse() if (wh is not None and gptq) else None
    q, Eq = quantize_residual(W - A.float() @ B.float(), form, Hinv)
    refit = refit if (Hinv is not None and info["rank"] and form.error_feedback) else 0
    for it in range(refit):
        # The best rank-r correction of what the quantized residual misses: the low-rank branch
        # buys back part of the rounding error (most useful for FP4).
        A, B, _ = lowrank_factors(W - Eq, wh, RankPolicy(rank=info["rank"]), name)
        A, B = A.bfloat16(), B.bfloat16()
        if it < refit - 1:
            q, Eq = quantize_residual(W - A.float() @ B.float(), form, Hinv)
    dW = W - A.float() @ B.float() - Eq
    tensors = {k_: v.contiguous().cpu() for k_, v in q.items()}
    if info["rank"]:
        tensors["A"], tensors["B"] = A.contiguous().cpu(), B.contiguous().cpu()
    if stats is not None:
        tensors["input_amax"] = stats.absmax.float().max().reshape(1).cpu()
    if bias is not None:
        tensors["bias"] = bias.detach().to(torch.bfloat16).contiguous().cpu()
    info.update(
        format=form.name,  # the name: what the compressed file stores
        calibrated=stats is not None,
        gptq=bool(stats is not None and gptq and form.error_feedback),
        refit=refit,
        whiten=whiten if stats is not None else None,
        in_features=k,
        out_features=n,
        rel_err=weighted_rel_err(dW, W, R),
        rel_err_kind="R-weighted" if R is not None else "frobenius",
    )
    layer = CompressedLayer(tensors, info)
    info["bytes"] = layer.nbytes
    return layer
