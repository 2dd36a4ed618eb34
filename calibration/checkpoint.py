"""Offline compression of an LTX-2 checkpoint file, one layer at a time.

Reads ComfyUI's key layout (`model.diffusion_model.transformer_blocks.N.ff.net.0.proj.weight`,
or the same without the prefix for diffusion-model-only files) through safetensors' lazy
reader, so only one FFN weight is in memory at a time, and streams the compressed layers
into the output file.
"""
from __future__ import annotations

import json
import logging

import torch

from . import compressed_file, ltx2
from .compress import compress_linear
from .lowrank import RankPolicy
from .stats import ActivationStats

log = logging.getLogger("liteffn")


def _prefix(keys) -> str:
    return ltx2.CKPT_PREFIX if any(k.startswith(ltx2.CKPT_PREFIX) for k in keys) else ""


def ffn_linears(keys, which: str = "all") -> tuple[str, list[str]]:
    keys = list(keys)
    p = _prefix(keys)
    names = [k[len(p):-len(".weight")] for k in keys if k.startswith(p) and k.endswith(".weight")]
    return p, ltx2.select(names, which)


def compress_checkpoint(ckpt: str, out: str, stats_path: str | None = None, policy: RankPolicy | int = 64,
                        fmt: str = "fp8", which: str = "all", device: str | None = None, damp: float = 0.01,
                        gptq: bool = True, progress: bool = True) -> dict:
    """Compress every selected FFN linear of ckpt into out; returns {name: info}."""
    from safetensors import safe_open
    from tqdm import tqdm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy = RankPolicy(rank=policy) if isinstance(policy, int) else policy
    with safe_open(ckpt, framework="pt") as f:
        keys = list(f.keys())
        p, names = ffn_linears(keys, which)
        if p + ltx2.MARKER not in keys or not names:
            raise ValueError(
                f"{ckpt} is not an LTX-2 checkpoint (no {p + ltx2.MARKER!r} or no FFN layers "
                f"named like 'transformer_blocks.0.ff.net.0.proj'); LiteFFN compresses LTX-2 only"
            )
        quant = json.loads((f.metadata() or {}).get("_quantization_metadata", "{}")).get("layers", {})
        stats_names = set()
        if stats_path:
            stats_names = set(ActivationStats.load_names(stats_path))
            missing = [n for n in names if n not in stats_names]
            if missing:
                log.warning("LiteFFN: %d layers have no statistics (e.g. %s): plain SVD for those",
                            len(missing), missing[0])
        infos = {}
        extra = {"policy": policy.describe(), "residual_format": fmt, "source": ckpt.rsplit("/", 1)[-1]}
        with compressed_file.Writer(out, ltx2.FAMILY, extra) as w:
            for name in tqdm(names, desc="LiteFFN compress", unit="layer", disable=not progress):
                qfmt = quant.get(p + name, {}).get("format")
                if qfmt is not None and not qfmt.startswith("float8"):
                    raise ValueError(f"{name} is stored as {qfmt}; LiteFFN reads bf16/fp16/fp32/FP8 sources")
                weight = f.get_tensor(f"{p}{name}.weight")
                scale = _scale(f, keys, p + name)
                bias = f.get_tensor(f"{p}{name}.bias") if f"{p}{name}.bias" in keys else None
                stats = ActivationStats.load(stats_path, names=[name])[name] if name in stats_names else None
                layer = compress_linear(weight, bias, stats, policy, fmt, damp, gptq, device, name, scale)
                w.add(name, layer, weight)
                infos[name] = layer.info
                del weight, stats, layer
    return infos


def _scale(f, keys, base: str):
    for suffix in (".weight_scale", ".scale_weight"):  # ComfyUI's current and older FP8 names
        if base + suffix in keys:
            return f.get_tensor(base + suffix)
    return None
