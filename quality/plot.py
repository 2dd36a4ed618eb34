"""The comparison as one picture: the worst frame of the reference and of the test side by side,
above the per-frame PSNR curve (SSIM in the caption). Drawn with Pillow (ComfyUI ships it)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .metrics import fmt_db

CURVE_H = 200
PAD = 8


def render(reference: torch.Tensor, test: torch.Tensor, result: dict, label: str = "") -> torch.Tensor:
    """-> IMAGE [1, H, W, 3] in [0, 1]."""
    from PIL import Image, ImageDraw

    psnr = result["psnr"]
    worst = min(range(len(psnr)), key=lambda i: psnr[i])
    pair = torch.cat([reference[worst], test[worst]], dim=1).clamp(0, 1)
    if pair.shape[-1] == 1:
        pair = pair.expand(-1, -1, 3)
    top = (pair[..., :3].cpu().numpy() * 255).round().astype(np.uint8)
    w = max(top.shape[1], 320)
    canvas = Image.new("RGB", (w, top.shape[0] + CURVE_H + 3 * PAD), "white")
    canvas.paste(Image.fromarray(top), (0, 0))
    d = ImageDraw.Draw(canvas)
    y0 = top.shape[0] + PAD
    d.text((PAD, y0), f"{label + ': ' if label else ''}PSNR {fmt_db(result['psnr_all'])}, "
                      f"SSIM {result['ssim_all']:.4f}", fill="black")
    d.text((PAD, y0 + 12), f"worst frame {worst} above (reference | test); PSNR per frame:", fill="gray")
    _curve(d, psnr, PAD, y0 + 3 * PAD + 12, w - 2 * PAD, CURVE_H - 4 * PAD - 6)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]


def _curve(d, psnr, x, y, w, h):
    finite = [p for p in psnr if not math.isinf(p)]
    hi = max(finite, default=60.0) + 1
    lo = min(finite, default=0.0) - 1
    d.rectangle([x, y, x + w, y + h], outline="gray")
    d.text((x + 2, y + 2), f"{hi:.1f} dB", fill="gray")
    d.text((x + 2, y + h - 12), f"{lo:.1f} dB", fill="gray")
    n = len(psnr)
    pts = []
    for i, p in enumerate(psnr):
        px = x + (w * (i + 0.5) / n)
        py = y if math.isinf(p) else y + h * (hi - p) / (hi - lo)  # identical frames sit on the top edge
        pts.append((px, py))
    if len(pts) > 1:
        d.line(pts, fill=(200, 40, 40), width=2)
    for px, py in pts:
        d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=(200, 40, 40))
