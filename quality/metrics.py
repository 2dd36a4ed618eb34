"""Frame quality against a reference: PSNR and SSIM per frame, for ComfyUI IMAGE batches
([frames, H, W, C] floats in [0, 1]). Plain torch; no ComfyUI imports.

SSIM is Wang et al. (2004): 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data
range 1, computed per channel over valid windows and averaged (as scikit-image does with
gaussian_weights=True).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"the two image batches differ in shape ({tuple(a.shape)} vs {tuple(b.shape)}): "
                         "compare frames of the same size and count (same length, width and height)")
    if a.dim() != 4:
        raise ValueError(f"expected IMAGE batches [frames, height, width, channels], got {tuple(a.shape)}")


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check(a, b)
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1)


def psnr_from_mse(m) -> float:
    """inf for identical frames."""
    m = float(m)
    return math.inf if m == 0 else 10 * math.log10(1.0 / m)


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [psnr_from_mse(m) for m in mse(a, b)]


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> list[float]:
    _check(a, b)
    n, h, w, c = a.shape
    if min(h, w) < window:
        raise ValueError(f"frames of {h}x{w} are smaller than the SSIM window ({window})")
    x = a.double().permute(0, 3, 1, 2).reshape(n * c, 1, h, w)
    y = b.double().permute(0, 3, 1, 2).reshape(n * c, 1, h, w)
    g = _gaussian(window, sigma).to(x.device)
    blur = lambda t: Fn.conv2d(Fn.conv2d(t, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.reshape(n, c, -1).mean((1, 2)).tolist()


def compare(reference: torch.Tensor, test: torch.Tensor) -> dict:
    """Per-frame and overall PSNR (from the mean MSE) and SSIM (mean)."""
    m = mse(reference, test)
    s = ssim(reference, test)
    return {"psnr": [psnr_from_mse(v) for v in m], "ssim": s,
            "psnr_all": psnr_from_mse(m.mean()), "ssim_all": sum(s) / len(s)}


def fmt_db(v: float) -> str:
    return "inf (identical)" if math.isinf(v) else f"{v:.2f} dB"
