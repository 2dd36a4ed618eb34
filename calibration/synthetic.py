"""Synthetic LTX-2-like layers and activations for the demo, the tests and the benchmarks.

Real transformer FFN inputs are far from isotropic: channel scales spread over orders of
magnitude with a few outlier channels, and channels are correlated. Pretrained weights have
a decaying spectrum on top of a noise floor. Both matter: whitening only helps where the
activations are anisotropic, and the residual's size depends on the spectrum. The
structure (channel scales, mixing) comes from `structure_seed`; samples from `sample_seed`,
so calibration and held-out sets share a distribution but no rows.
"""
from __future__ import annotations

import hashlib

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


class SyntheticAttention(torch.nn.Module):
    """LTX-2 attention layout (to_q, to_k, to_v, to_out.0: dim -> dim, with biases) with structured
    weights like SyntheticFFN's. Self-attention over the stream's tokens in heads of 32 channels:
    q and k RMS-normalised over all channels (LTX-2's q_norm / k_norm), softmax(sharpness q k^T /
    sqrt(head dim)) v, then to_out.0. sharpness stands in for the norms' learned gains: at 1 each
    query spreads over most of 1024 tokens, at 3 over ~150 (largest weight ~8%). So to_q/k/v see
    the stream itself (outlier channels and all) and to_out.0 the attention output, as in the
    transformer."""

    def __init__(self, dim: int, seed: int = 0, head_dim: int = 32, sharpness: float = 3.0):
        super().__init__()
        self.heads = max(1, dim // head_dim)
        self.sharpness = sharpness
        if dim % self.heads:
            raise ValueError(f"attention width {dim} does not split into {self.heads} heads")
        g = torch.Generator().manual_seed(seed)
        lins = {}
        for j, name in enumerate(("to_q", "to_k", "to_v", "out")):
            lin = torch.nn.Linear(dim, dim)
            with torch.no_grad():
                lin.weight.copy_(synthetic_weight(dim, dim, seed + j))
                lin.bias.copy_(0.02 * torch.randn(dim, generator=g))
            lins[name] = lin
        self.to_q, self.to_k, self.to_v = lins["to_q"], lins["to_k"], lins["to_v"]
        self.to_out = torch.nn.Sequential(lins["out"], torch.nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, dim] or [batch, tokens, dim]; the projections see it as given."""
        Fn = torch.nn.functional
        t, c = x.shape[-2:]
        # heads as [batch, heads, tokens, head dim]: 4-D takes SDPA's fast CPU kernel (3-D the slow one)
        heads = lambda z: z.reshape(-1, t, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q = heads(Fn.rms_norm(self.to_q(x), (c,)))
        k = heads(Fn.rms_norm(self.to_k(x), (c,)))
        o = Fn.scaled_dot_product_attention(q, k, heads(self.to_v(x)), scale=self.sharpness * (self.heads / c) ** 0.5)
        return self.to_out(o.transpose(1, 2).reshape(x.shape))


class SyntheticLTX2(torch.nn.Module):
    """A few blocks with video `ff` and audio `audio_ff`, named as in LTX-2. With attention=True
    each block also has a self-attention per stream, `attn1` (video) and `audio_attn1` (audio),
    run before the FFNs as in the transformer (LTX-2's other four attentions, text and
    cross-modal, are left out: the demo measures the projection kind, not every attention)."""

    def __init__(self, blocks: int = 2, video_dim: int = 256, audio_dim: int = 128, seed: int = 0,
                 attention: bool = False):
        super().__init__()
        self.attention = attention
        self.transformer_blocks = torch.nn.ModuleList()
        for i in range(blocks):
            b = torch.nn.Module()
            if attention:  # registered first: a block's modules in the order they run
                b.attn1 = SyntheticAttention(video_dim, seed=seed + 10 * i + 100_000)
                b.audio_attn1 = SyntheticAttention(audio_dim, seed=seed + 10 * i + 100_005)
            b.ff = SyntheticFFN(video_dim, seed=seed + 10 * i)
            b.audio_ff = SyntheticFFN(audio_dim, seed=seed + 10 * i + 5)
            self.transformer_blocks.append(b)
        self.video_acts = SyntheticActivations(video_dim, seed)
        self.audio_acts = SyntheticActivations(audio_dim, seed + 1)

    def checkpoint(self) -> dict:
        """Its weights as an LTX-2 checkpoint file holds them: ComfyUI's prefix, plus the tensor by which
        the loaders recognise an LTX-2 (audio-video) checkpoint."""
        from . import ltx2

        sd = {ltx2.CKPT_PREFIX + k: v.detach().clone() for k, v in self.state_dict().items()}
        sd[ltx2.CKPT_PREFIX + ltx2.MARKER] = torch.zeros(4, 4)
        return sd

    def forward(self, video: torch.Tensor, audio: torch.Tensor):
        """Each block's attentions, then its FFNs, see the stream (each with a residual add), as in the
        transformer. Streams are [tokens, dim] or [batch, tokens, dim]."""
        for b in self.transformer_blocks:
            if self.attention:
                video = video + b.attn1(video)
                audio = audio + b.audio_attn1(audio)
            video = video + b.ff(video)
            audio = audio + b.audio_ff(audio)
        return video, audio


def generator(purpose: str, seed: int = 0, device="cpu") -> torch.Generator:
    """A torch.Generator for (purpose, seed). The seed is hashed with the purpose, so streams of
    different purposes are unrelated at any seeds: activations and weights drawn with the same
    seed number are independent (a plain manual_seed(seed) for both made x's rows equal W's)."""
    h = hashlib.blake2b(f"liteffn.synthetic/{purpose}/{int(seed)}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(h, "little") >> 1)


def random_activations(m: int, k: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """bf16 [m, k] rows of very different magnitudes (per-token scales matter), for the same
    kernel tests and benchmarks: kernel_inputs("independent", ...)."""
    return kernel_inputs("independent", m, k, seed=seed, device=device)


# Inputs for kernel accuracy tests and benchmarks. Hopper's FP8 MMA accumulates in truncated
# precision, so its error depends on how the products x_i w_j line up: independent data
# cancels, same-sign sums (x rows along W rows) are its worst case.
INPUT_KINDS = (
    "independent",      # gaussian rows, per-token magnitudes (random_activations)
    "gelu",             # GELU(tanh) of gaussian pre-activations: positive mean, as the down-projection sees
    "coherent",         # rows of the dense weight W, cycled: same-sign sums, the worst case (needs weight)
    "partly_coherent",  # 0.3 x a W row (unit RMS) plus unit noise: cosine ~0.3 with that row (needs weight)
    "mean",             # one mean vector shared by all tokens plus as much noise: outputs share a component
    "outliers",         # gaussian with a few channels 50-100x larger, as DiT activations have
)
_NEEDS_WEIGHT = ("coherent", "partly_coherent")


def dense_weight(t: dict) -> torch.Tensor:
    """The fp32 [N, K] weight of an FP8 layer dict (random_fp8_layer): codes times row scales."""
    return t["q"].float() * t["q_scale"].float()[:, None]


def _weight_rows(weight: torch.Tensor, m: int, k: int, g: torch.Generator, device) -> torch.Tensor:
    """m rows of weight, cycled from a seeded offset, scaled to unit RMS."""
    n = weight.shape[0]
    off = int(torch.randint(n, (1,), generator=g, device=device))
    rows = weight[(off + torch.arange(m, device=weight.device)) % n].to(device=device, dtype=torch.float32)
    return rows * (k**0.5 / rows.norm(dim=1, keepdim=True).clamp_min(1e-30))


def kernel_inputs(kind: str, m: int, k: int, weight: torch.Tensor | None = None, seed: int = 0,
                  device="cpu") -> torch.Tensor:
    """bf16 [m, k] activations of one of INPUT_KINDS for kernel tests and benchmarks. Every kind
    scales its rows (gelu: its pre-activations) by a per-token magnitude in [0, 4), as per-token
    FP8 scales matter. `weight` [N, k], the layer's dense weight (dense_weight(t)), is needed by
    the coherent kinds. Each (kind, seed) has its own stream, unrelated to the layers' streams."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"unknown input kind {kind!r}; choose one of {', '.join(INPUT_KINDS)}")
    if kind in _NEEDS_WEIGHT and (weight is None or weight.dim() != 2 or weight.shape[1] != k):
        got = None if weight is None else tuple(weight.shape)
        raise ValueError(f"input kind {kind!r} needs the layer's dense weight [N, {k}], got {got}")
    g = generator(f"inputs/{kind}", seed, device)
    z = torch.randn(m, k, generator=g, device=device)
    mag = torch.rand(m, 1, generator=g, device=device) * 4
    if kind == "gelu":
        return torch.nn.functional.gelu(z * mag, approximate="tanh").bfloat16()
    if kind == "coherent":
        x = _weight_rows(weight, m, k, g, device)
    elif kind == "partly_coherent":
        x = 0.3 * _weight_rows(weight, m, k, g, device) + z
    elif kind == "mean":
        x = torch.randn(1, k, generator=g, device=device) + z
    elif kind == "outliers":
        idx = torch.randperm(k, generator=g, device=device)[: max(2, k // 512)]
        ch = torch.ones(k, device=device)
        ch[idx] = 50 + 50 * torch.rand(len(idx), generator=g, device=device)
        x = z * ch
    else:
        x = z
    return (x * mag).bfloat16()


def random_fp8_layer(n: int, k: int, rank: int, seed: int = 0, device="cpu") -> dict:
    """Stored tensors of a compressed linear (fp8 residual, per-row scales, bf16 factors) drawn
    at random with LTX-2-like magnitudes, without running compression: for kernel tests and
    benchmarks at full size, where only shapes and value ranges matter. Its stream is unrelated
    to the activations' at any seed (see generator)."""
    g = generator("fp8_layer", seed, device)
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
    W = dense_weight(t)
    del t["q"], t["q_scale"]
    f = F.get(fmt)
    blk = f.block
    amax = W.abs().view(n, k // blk, blk).amax(-1)
    ts = f.tensor_scale_for(amax.max())  # NVFP4's; None for MXFP4
    scale = f.block_scale(amax, ts)
    grid = f.round((W.view(n, k // blk, blk) / scale[:, :, None]).view(n, k))
    return {**t, **f.encode(grid, scale, ts)}
