"""Synthetic LTX-2-like layers and activations for the demo, the tests and the benchmarks.

Real transformer FFN inputs are far from isotropic: channel scales spread over orders of
magnitude with a few outlier channels, and channels are correlated. Pretrained weights have
a decaying spectrum on top of a noise floor. Both matter: whitening only helps where the
activations are anisotropic, and the residual's size depends on the spectrum. The
structure (channel scales, mixing) comes from `structure_seed`; samples from `sample_seed`,
so calibration and held-out sets share a distribution but no rows.
"""
from __future__ import annotations

import torch


def synthetic_weight(n: int, k: int, seed: int = 0, decay: float = 0.5, floor: float = 1.0) -> torch.Tensor:
    """A decaying spectrum (s_i ~ i^-decay) plus a noise floor of comparable energy: the
    low-rank part of a trained FFN is real but holds only part of the weight."""
    g = torch.Generator().manual_seed(seed)
    r = min(n, k)
    U, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(k, r, generator=g))
    s = (1.0 + torch.arange(r, dtype=torch.float32)) ** -decay
    W = (U * s) @ V.T
    W = W / W.norm() + floor * torch.randn(n, k, generator=g) / (n * k) ** 0.5
    return W * (n**0.5) * 0.5  # rows of order-one norm, like a trained linear's


class SyntheticActivations:
    """Correlated channels (covariance spectrum ~ i^-alpha in a random basis), log-normal
    channel scales, a mean offset and 1% outlier channels."""

    def __init__(self, k: int, structure_seed: int = 0, alpha: float = 1.0, outliers: float = 0.01,
                 outlier_scale: float = 20.0, spread: float = 0.5):
        g = torch.Generator().manual_seed(10_000 + structure_seed)
        self.k = k
        lam = (1.0 + torch.arange(k, dtype=torch.float32)) ** -alpha
        Q, _ = torch.linalg.qr(torch.randn(k, k, generator=g))
        self.mix = (Q * lam.sqrt()).T * (0.3 * k**0.5)
        self.scale = torch.exp(spread * torch.randn(k, generator=g))
        idx = torch.randperm(k, generator=g)[: max(1, int(outliers * k))]
        self.scale[idx] *= outlier_scale
        self.mean = 0.3 * torch.randn(k, generator=g)

    def sample(self, rows: int, sample_seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(20_000 + sample_seed)
        z = torch.randn(rows, self.k, generator=g)
        return (z @ self.mix + 0.3 * torch.randn(rows, self.k, generator=g) + self.mean) * self.scale


class SyntheticFFN(torch.nn.Module):
    """LTX-2 FeedForward layout (net.0.proj -> GELU tanh -> net.2) with structured weights."""

    def __init__(self, dim: int, mult: int = 4, seed: int = 0):
        super().__init__()
        inner = dim * mult
        up = torch.nn.Linear(dim, inner)
        down = torch.nn.Linear(inner, dim)
        with torch.no_grad():
            up.weight.copy_(synthetic_weight(inner, dim, seed) * 2.0)
            down.weight.copy_(synthetic_weight(dim, inner, seed + 1))
            up.bias.copy_(0.1 * torch.randn(inner, generator=torch.Generator().manual_seed(seed)))
            down.bias.zero_()
        proj = torch.nn.Module()
        proj.proj = up
        proj.forward = lambda x: torch.nn.functional.gelu(up(x), approximate="tanh")
        self.net = torch.nn.Sequential(proj, torch.nn.Dropout(0.0), down)

    def forward(self, x):
        return self.net(x)


class SyntheticLTX2(torch.nn.Module):
    """A few blocks with video `ff` and audio `audio_ff`, named as in LTX-2."""

    def __init__(self, blocks: int = 2, video_dim: int = 256, audio_dim: int = 128, seed: int = 0):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList()
        for i in range(blocks):
            b = torch.nn.Module()
            b.ff = SyntheticFFN(video_dim, seed=seed + 10 * i)
            b.audio_ff = SyntheticFFN(audio_dim, seed=seed + 10 * i + 5)
            self.transformer_blocks.append(b)
        self.video_acts = SyntheticActivations(video_dim, seed)
        self.audio_acts = SyntheticActivations(audio_dim, seed + 1)

    def forward(self, video: torch.Tensor, audio: torch.Tensor):
        """Each block's FFNs see the stream (with a residual add), as in the transformer."""
        for b in self.transformer_blocks:
            video = video + b.ff(video)
            audio = audio + b.audio_ff(audio)
        return video, audio


def random_activations(m: int, k: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """bf16 [m, k] rows of very different magnitudes (per-token scales matter), for the same
    kernel tests and benchmarks."""
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(m, k, generator=g, device=device) * torch.rand(m, 1, generator=g, device=device) * 4).bfloat16()


def random_fp8_layer(n: int, k: int, rank: int, seed: int = 0, device="cpu") -> dict:
    """Stored tensors of a compressed linear (fp8 residual, per-row scales, bf16 factors) drawn
    at random with LTX-2-like magnitudes, without running compression: for kernel tests and
    benchmarks at full size, where only shapes and value ranges matter."""
    g = torch.Generator(device=device).manual_seed(seed)
    W = torch.randn(n, k, generator=g, device=device) / k**0.5
    s = W.abs().amax(1) / 448
    t = {"q": (W / s[:, None]).to(torch.float8_e4m3fn), "q_scale": s.float().contiguous(),
         "bias": (torch.randn(n, generator=g, device=device) / 8).bfloat16()}
    if rank:
        t["A"] = (torch.randn(n, rank, generator=g, device=device) / rank**0.5 / 4).bfloat16()
        t["B"] = (torch.randn(rank, k, generator=g, device=device) / k**0.5).bfloat16()
    return t


def random_fp4_layer(fmt: str, n: int, k: int, rank: int, seed: int = 0, device="cpu") -> dict:
    """As random_fp8_layer, with the residual stored as MXFP4 or NVFP4 (round to nearest)."""
    from ..kernels import formats as F

    t = random_fp8_layer(n, k, rank, seed, device)
    W = t.pop("q").float() * t.pop("q_scale")[:, None]
    f = F.get(fmt)
    blk = f.block
    amax = W.abs().view(n, k // blk, blk).amax(-1)
    ts = f.tensor_scale_for(amax.max())  # NVFP4's; None for MXFP4
    scale = f.block_scale(amax, ts)
    grid = f.round((W.view(n, k // blk, blk) / scale[:, :, None]).view(n, k))
    return {**t, **f.encode(grid, scale, ts)}
