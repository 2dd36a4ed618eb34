"""A small LTX-2 (LTX-AV) checkpoint built from ComfyUI's own LTXAVModel class, saved the way
LTX-2 checkpoints are (ComfyUI key layout, `config` metadata), so ComfyUI's loaders detect and
wrap it exactly as the real model. Random weights: what matters here is the model's structure."""
from __future__ import annotations

import json
import re

import torch

# video 4 heads x 16 = 64 wide (FFN 64<->256), audio 4 x 8 = 32 wide (FFN 32<->128), 2 blocks; text
# embeddings connectors 4 x 12 = caption_channels wide (ComfyUI's default, 30 x 128, is 2 x 354M parameters)
CONFIG = dict(num_layers=2, attention_head_dim=16, num_attention_heads=4, cross_attention_dim=64,
              audio_attention_head_dim=8, audio_num_attention_heads=4, audio_cross_attention_dim=32,
              caption_channels=48, in_channels=128, audio_in_channels=128,
              connector_num_attention_heads=4, connector_attention_head_dim=12, connector_num_layers=2)
CONTEXT = 96  # processed text context width (video 64 + audio 32), as LTX-2's text encoder delivers


def state_dict(config=CONFIG, seed=0, video_only=False) -> dict:
    import comfy.ops
    from comfy.ldm.lightricks.av_model import LTXAVModel
    from comfy.ldm.lightricks.model import LTXVModel

    cls = LTXVModel if video_only else LTXAVModel
    cfg = {k: v for k, v in config.items() if not (video_only and k.startswith("audio"))}
    m = cls(**cfg, operations=comfy.ops.disable_weight_init, dtype=torch.float32)
    return {"model.diffusion_model." + k: v for k, v in random_like(m.state_dict(), seed).items()}


def random_like(sd: dict, seed: int, dtype=torch.bfloat16) -> dict:
    """Random weights with ~unit-variance activations: N(0, 1/fan_in) for matrices and kernels,
    N(0, 0.02^2) for vectors; normalisation statistics (std 1, mean 0) left sensible."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if "std-of-means" in k:
            t = torch.ones(v.shape)
        elif "mean-of-means" in k:
            t = torch.zeros(v.shape)
        else:
            t = torch.randn(v.shape, generator=g) * (1.0 / v[0].numel() ** 0.5 if v.dim() > 1 else 0.02)
        out[k] = t.to(dtype)
    return out


# the attention projections of the transformer blocks (attn1, attn2, audio_attn1/2, audio_to_video_attn,
# video_to_audio_attn): to_q, to_k, to_v, to_out.0; not those of the text embeddings connectors
ATTENTION_WEIGHT = re.compile(r"model\.diffusion_model\.transformer_blocks\.\d+\.\w+\.(to_q|to_k|to_v|to_out\.0)\.weight")


def save(path: str, config=CONFIG, seed=0, fp8_ffn=False, video_only=False, fp8_attention=False) -> str:
    """fp8_ffn: FFN weights stored as FP8 E4M3 with per-tensor `weight_scale` and
    `_quantization_metadata`, the layout of ComfyUI's FP8 LTX-2 checkpoints (the keys matching
    ".ff.net.": the video FFNs `ff`; `audio_ff` stays bf16). fp8_attention: the same for the blocks'
    attention projections (ATTENTION_WEIGHT, both streams)."""
    from safetensors.torch import save_file

    sd = state_dict(config, seed, video_only)
    meta = {"config": json.dumps({"transformer": {k: v for k, v in config.items()
                                                  if not (video_only and k.startswith("audio"))}})}
    keys = [k for k in sd if (fp8_ffn and ".ff.net." in k and k.endswith(".weight"))
            or (fp8_attention and ATTENTION_WEIGHT.fullmatch(k))]
    if keys:
        meta["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": quantize_fp8(sd, keys)})
    save_file(sd, path, metadata=meta)
    return path


def quantize_fp8(sd: dict, keys) -> dict:
    """The weights `keys` of sd replaced, in place, by FP8 E4M3 codes with a per-tensor `weight_scale`
    (amax / 448) beside them. -> the `layers` of `_quantization_metadata` that mark them so."""
    layers = {}
    for k in keys:
        w = sd[k].float()
        s = w.abs().amax() / 448
        sd[k] = (w / s).to(torch.float8_e4m3fn)
        sd[k[: -len("weight")] + "weight_scale"] = s.reshape(())
        layers[k[: -len(".weight")]] = {"format": "float8_e4m3fn"}
    return layers


def conditioning(seed=0, tokens=7):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, CONTEXT, generator=g), {}]], [[torch.zeros(1, tokens, CONTEXT), {}]]


def latent(frames=2, h=4, w=4, audio=9):
    """Empty LTX-AV latent: video [1,128,frames,h,w] + audio [1,8,audio,16], as LTXVConcatAVLatent makes it."""
    import comfy.nested_tensor

    return {"samples": comfy.nested_tensor.NestedTensor((torch.zeros(1, 128, frames, h, w),
                                                         torch.zeros(1, 8, audio, 16)))}
