"""Compression of one linear: activation-aware low rank + quantized residual.

    W ~= A B + dequant(Q)       A [N, r] bf16, B [r, K] bf16, Q in fmt
A B is the whitened truncated SVD (lowrank.py); the residual is computed from the rounded
bf16 factors, so the factors' own rounding is quantized away with it; Q uses the same
statistics as its Hessian (residual.py). Without statistics: plain SVD and round-to-nearest.

Where the statistics hold held-out rows (stats.py), the layer's info also carries the error users get:
the relative output error on those rows with the input quantized to FP8 as the kernels do it (per token;
an LTX-2 FFN's down linear at the static scale of its calibrated input range, as the fused FFN runs it),
for this result and for a plain compression of the same rank (no statistics), so that reports show what
calibration bought where it counts.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..kernels import formats as F
from ..kernels.fp8_ffn import static_scale
from ..kernels.reference import compressed_linear_ref
from . import ltx2
from .lowrank import MATCH_STEP, RankPolicy, Whitening, lowrank_factors, refine_factors
from .residual import quantize_residual
from .stats import LayerStats
from .validate import LayerError, check_header, check_values, header_of

log = logging.getLogger("liteffn")
# Larger weights are refused before the decomposition: their fp32 Gram products overflow (NaN
# factors). Trained weights are orders of magnitude smaller.
MAX_ABS_WEIGHT = 1e8


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


def check_changes_something(policy: RankPolicy, fmt) -> None:
    """Rank 0 with an unquantized residual stores every weight as it is: refused before any work (it made a
    file, and a patched model, that changed nothing)."""
    if policy.rank == 0 and isinstance(F.get(fmt), F.Dense):
        raise ValueError(f"rank 0 with a {F.get(fmt).name} residual keeps every weight exactly as it is: nothing "
                         "would be compressed; choose an fp8, nvfp4 or mxfp4 residual, or a rank above 0")


def without_statistics(policy: RankPolicy, fmt) -> str:
    """What compressing without statistics does, for the messages: only the steps that take place
    ("plain SVD and round-to-nearest"; rank 0: no SVD; a bf16 residual: no rounding)."""
    steps = (["plain SVD"] if policy.rank != 0 else []) + ([] if isinstance(F.get(fmt), F.Dense) else
                                                              ["round-to-nearest"])
    return " and ".join(steps)


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
    refit: int | None = None,
    whiten: str = "cholesky",
    compare_plain: bool = True,
) -> CompressedLayer:
    """One linear compressed (module docstring). compare_plain: with held-out rows in stats, also measure a
    plain compression of the same rank on them (info["heldout_err_plain"]; costs one more SVD)."""
    form = F.get(fmt)
    policy = RankPolicy(rank=policy) if isinstance(policy, int) else policy
    if policy.match is not None:
        return _compress_matched(weight, bias, stats, policy, form, name, compare_plain,
                                 dict(damp=damp, gptq=gptq, device=device, weight_scale=weight_scale, refit=refit,
                                      whiten=whiten))
    check_damp(damp)
    device = torch.device(device) if device is not None else weight.device
    if weight.dim() != 2:
        raise LayerError(f"weight of {name or 'layer'} has shape {list(weight.shape)}, not a 2-D linear weight")
    try:
        W = source_weight(weight.to(device), weight_scale)
    except TypeError as e:
        raise LayerError(f"{name or 'layer'}: {e}") from None
    if not torch.isfinite(W).all():
        raise LayerError(f"weight of {name or 'layer'} contains NaN or Inf: the checkpoint is damaged")
    amax = float(W.abs().max()) if W.numel() else 0.0
    if amax > MAX_ABS_WEIGHT:
        raise LayerError(f"weight of {name or 'layer'} holds a value of {amax:.3g}, far outside a trained model's "
                         f"(LiteFFN refuses |w| > {MAX_ABS_WEIGHT:.0e}: the decomposition's fp32 products would "
                         "overflow and give NaN); check this layer in the checkpoint; nothing was written")
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

    try:
        A, B, info = lowrank_factors(W, wh, policy, name)
    except torch.linalg.LinAlgError as e:
        raise LayerError(f"the decomposition of layer {name or '?'} failed ({str(e).splitlines()[0]}); its weight's "
                         f"largest |value| is {amax:.3g}: check this layer in the checkpoint (and its statistics); "
                         "nothing was written") from None
    A, B = A.bfloat16(), B.bfloat16()
    Hinv = wh.inverse() if (wh is not None and gptq) else None
    q, Eq = quantize_residual(W - A.float() @ B.float(), form, Hinv)
    # refits: the format's (at most form.refits, stopping once one gains less than form.refit_gain), or exactly
    # `refit` when given
    most, gain = (form.refits, form.refit_gain) if refit is None else (refit, 0.0)
    most = most if (Hinv is not None and info["rank"] and form.error_feedback) else 0
    refit, prev = 0, None
    while refit < most:
        # The best rank-r correction of what the quantized residual misses: the low-rank branch
        # buys back part of the rounding error (most useful for FP4). Started from the last factors.
        A, B, missed = refine_factors(W - Eq, wh, A, B)
        A, B = A.bfloat16(), B.bfloat16()
        refit += 1
        if refit == most or (prev is not None and missed > (1 - gain) ** 2 * prev):
            break
        prev = missed
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
    check_result(layer, name, W)
    if stats is not None and stats.held_rows:
        x, y = _held_out(stats, W, bias, device)
        static = tensors.get("input_amax") if is_fused_down(name) else None
        err, y_norm2 = output_error(x, y, tensors, form, static)
        if y_norm2 > 0 and math.isfinite(err):  # (rows that give a zero output measure nothing)
            info.update(heldout_rows=int(x.shape[0]), heldout_err=err, heldout_norm2=y_norm2,
                        heldout_act="static" if static is not None else ("per-token" if form.act_quant else "none"))
        if compare_plain and "heldout_err" in info:
            info["heldout_err_plain"] = _plain_heldout_err(weight, bias, x, y, info["rank"], form, name,
                                                           dict(damp=damp, gptq=gptq, device=device,
                                                                weight_scale=weight_scale, whiten=whiten))
        del x, y
    return layer


def _held_out(stats: LayerStats, W: torch.Tensor, bias, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the statistics' held-out rows x, the dense output on them in fp32) on device."""
    x = stats.held.to(device)
    y = x.float() @ W.T
    if bias is not None:
        y += bias.to(device).float()
    return x, y


def _plain_heldout_err(weight, bias, x, y, rank, form, name, kw) -> float:
    """Held-out output error (rows x, dense output y) of a plain compression (no statistics: SVD,
    round-to-nearest) of the same rank."""
    plain = compress_linear(weight, bias, None, rank, form, name=name, compare_plain=False, **kw)
    return output_error(x, y, plain.tensors, form, None)[0]


def _compress_matched(weight, bias, stats, policy: RankPolicy, form, name, compare_plain, kw) -> CompressedLayer:
    """RankPolicy.match: the layer at the smallest rank (steps of MATCH_STEP from policy.rank, up to max_rank)
    whose held-out output error is at most policy.match x the FP8 residual's at policy.rank. The error falls
    as the rank grows, so the search walks down from policy.rank while the target holds, or up until it does
    (at max_rank when it never does; info["match"] says so). Costs one compression per rank tried plus the
    FP8 reference: 3-5 per linear on all-MiniLM-L6-v2 (bench/real_layers_match_cpu.md)."""
    if stats is None or not stats.held_rows:
        raise ValueError(f"{name or 'layer'}: choosing its rank by the output error (match {policy.match:g}x FP8) "
                         "needs statistics with held-out rows: run LiteFFN Calibrate (again), or give a fixed rank")
    r0, cap = policy.rank, min(policy.max_rank, *weight.shape)
    fp8 = F.get("fp8")
    # (a reference rank larger than the layer: this first compression says so)
    ref = compress_linear(weight, bias, stats, r0, fp8, name=name, compare_plain=False, **kw)
    if "heldout_err" not in ref.info:  # held-out rows whose dense output is zero measure nothing: the fixed rank
        layer = compress_linear(weight, bias, stats, r0, form, name=name, compare_plain=compare_plain, **kw)
        layer.info["match"] = dict(target=policy.match, ref_rank=r0, met=None, tried=[r0])
        return layer
    goal = policy.match * ref.info["heldout_err"]
    tried = {r0: ref} if form == fp8 else {}

    def at(r):
        if r not in tried:
            tried[r] = compress_linear(weight, bias, stats, r, form, name=name, compare_plain=False, **kw)
        return tried[r].info["heldout_err"] <= goal

    r = r0
    if at(r0):
        while r - MATCH_STEP >= 0 and at(r - MATCH_STEP):
            r -= MATCH_STEP
    else:
        while r < cap:
            r = min(r + MATCH_STEP, cap)
            if at(r):
                break
    layer = tried[r]
    info = layer.info
    info["match"] = dict(target=policy.match, ref_rank=r0, ref_err=ref.info["heldout_err"], met=at(r),
                         ratio=info["heldout_err"] / max(ref.info["heldout_err"], 1e-30), tried=sorted(tried))
    if compare_plain:
        device = kw["device"] if kw["device"] is not None else weight.device
        x, y = _held_out(stats, source_weight(weight.to(device), kw["weight_scale"]), bias, device)
        info["heldout_err_plain"] = _plain_heldout_err(weight, bias, x, y, r, form, name, kw)
    return layer


def is_fused_down(name: str) -> bool:
    """An LTX-2 FFN's down linear: inside the fused FFN its input (the hidden activation) is quantized at the
    static scale of its calibrated range, not per token."""
    return ltx2.is_ffn_linear(name) and name.endswith("." + ltx2.DOWN)


def output_error(x: torch.Tensor, y: torch.Tensor, tensors: dict, form, static_amax: torch.Tensor | None = None
                 ) -> tuple[float, float]:
    """(||y' - y|| / ||y||, ||y||^2) with y' the compressed layer on rows x as the kernels compute it, in fp32:
    x quantized to FP8 per token, or at static_scale(static_amax) (saturating) when given; y the dense output."""
    t = {k: v.to(x.device) for k, v in tensors.items() if k != "input_amax"}
    scale = static_scale(static_amax.to(x.device)) if static_amax is not None else None
    y2 = compressed_linear_ref(x.float(), form, t, act_quant=True, act_scale=scale, dtype=torch.float32)
    n2 = float(y.square().sum())
    return float((y2 - y).norm() / max(n2, 1e-60) ** 0.5), n2


def check_damp(damp) -> None:
    if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and math.isfinite(damp) and damp > 0):
        raise ValueError(f"damping must be a number > 0 (a fraction of the mean diagonal of R added before "
                         f"whitening; default 0.01), got {damp!r}: 0 leaves R singular wherever an input channel "
                         "never varied")


def check_result(layer: CompressedLayer, name: str, W: torch.Tensor | None = None) -> None:
    """The layer as it will be written passes the loader's checks (validate.py): tensors, shapes,
    dtypes, finite values and error. A finite but huge weight overflows fp32 in the decomposition
    and gives NaN: refused here, naming the layer, instead of written."""
    amax = float(W.abs().max()) if W is not None else None
    fix = (f"its weight's largest |value| is {amax:.3g}, too large for the fp32 arithmetic of the decomposition: "
           "check this layer in the checkpoint" if amax is not None and amax > 1e15 else
           "check this layer's weights in the checkpoint") + "; nothing was written"
    where, layer_name = "LiteFFN compression", name or "?"
    check_header(where, layer_name, layer.info, header_of(layer.tensors), fix=fix, error=LayerError)
    check_values(where, layer_name, layer.info, layer.tensors, fix=fix, error=LayerError)
    if not math.isfinite(layer.info["rel_err"]):
        raise LayerError(f"{where}: layer {layer_name}: its measured error is {layer.info['rel_err']}; {fix}")
