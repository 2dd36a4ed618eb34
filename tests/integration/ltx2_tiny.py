"""A small LTX-2 (LTX-AV) checkpoint built from ComfyUI's own LTXAVModel class, saved the way
LTX-2 checkpoints are (ComfyUI key layout, `config` metadata), so ComfyUI's loaders detect and
wrap it exactly as the real model. Random weights: what matters here is the model's structure.
VARIANTS: the same for LTX-2.3 and LTX-2.5, where this ComfyUI can build them (unsupported says why not)."""
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

# LTX-2.3 (22B), tiny: the flags its checkpoints' `config` sets, which ComfyUI's LTXAVModel reads.
# Gated attention (a per-head `to_gate_logits` beside q, k, v, out) in the blocks and the text
# connectors, cross-attention AdaLN (9 modulation rows, prompt_adaln_single), the text projection
# moved into the text encoder (dual_linear: video 4096 + audio 2048 wide, so the connectors are as
# wide as the blocks' cross-attention and the model's caption projection is the identity), split
# float64 RoPE.
CONFIG_23 = dict(CONFIG, apply_gated_attention=True, connector_apply_gated_attention=True, cross_attention_adaln=True,
                 caption_proj_before_connector=True, caption_projection_first_linear=False,
                 connector_num_attention_heads=4, connector_attention_head_dim=16,  # = cross_attention_dim
                 audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=8,  # = audio's
                 rope_type="split", frequencies_precision="float64", use_middle_indices_grid=True,
                 causal_temporal_positioning=True, av_ca_timestep_scale_multiplier=1000.0)
# LTX-2.5 (22B): LTX-2.3 with bias-less video FFNs (`ff_bias`; the audio FFNs keep theirs, as the
# released tensors show) and the keyframes' absolute position embedding (ComfyUI detects it by its key).
CONFIG_25 = dict(CONFIG_23, ff_bias=False, use_keyframes_abs_pos_embedding=True)
# LTX-2.5 with no FFN bias in either stream (`audio_ff_bias` too, as its release notes describe it).
# (Their `use_prompt_adaln_single` = False is left out: ComfyUI 0.33 then has no prompt timestep for
# the cross-attention AdaLN and fails in its own apply_cross_attention_adaln.)
CONFIG_25_NO_BIAS = dict(CONFIG_25, audio_ff_bias=False)
VARIANTS = {"ltx2.3": CONFIG_23, "ltx2.5": CONFIG_25, "ltx2.5-no-ffn-bias": CONFIG_25_NO_BIAS}
# constructor flags a variant needs from ComfyUI (LTXAVModel / LTXBaseModel parameters): an older
# ComfyUI takes unknown ones into **kwargs and silently builds LTX-2's layout instead
FLAGS = ("apply_gated_attention", "cross_attention_adaln", "caption_proj_before_connector",  # LTX-2.3
         "caption_projection_first_linear", "ff_bias", "audio_ff_bias", "use_keyframes_abs_pos_embedding")  # 2.5


def unsupported(config) -> str | None:
    """Why this ComfyUI cannot build config's variant (a flag its LTX-2 classes do not take), else None."""
    import inspect

    import comfy.ldm.lightricks.model as lm
    from comfy.ldm.lightricks.av_model import LTXAVModel

    known = set(inspect.signature(LTXAVModel.__init__).parameters)
    base = getattr(lm, "LTXBaseModel", None)
    if base is not None:
        known |= set(inspect.signature(base.__init__).parameters)
    missing = [f for f in FLAGS if f in config and f not in known]
    if not missing:
        return None
    try:
        import comfyui_version

        version = comfyui_version.__version__
    except ImportError:
        version = "?"
    what = "LTX-2.5 (upstream 57ce8e1 'Add support for LTX 2.5')" if "ff_bias" in missing else "LTX-2.3"
    return f"ComfyUI {version} cannot build {what}: its LTX-AV model takes no {', '.join(missing)}"


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


# the FFN linears of the transformer blocks, both streams (`ff`, `audio_ff`)
FFN_WEIGHT = re.compile(r"model\.diffusion_model\.transformer_blocks\.\d+\.(ff|audio_ff)\.net\.(0\.proj|2)\.weight")


def save(path: str, config=CONFIG, seed=0, fp8_ffn=False, video_only=False, fp8_attention=False,
         int8_convrot=False) -> str:
    """fp8_ffn: FFN weights stored as FP8 E4M3 with per-tensor `weight_scale` and
    `_quantization_metadata`, the layout of ComfyUI's FP8 LTX-2 checkpoints (the keys matching
    ".ff.net.": the video FFNs `ff`; `audio_ff` stays bf16). fp8_attention: the same for the blocks'
    attention projections (ATTENTION_WEIGHT, both streams). int8_convrot: every block linear LiteFFN
    compresses (FFNs of both streams, attention projections) in the layout of LTX-2.5's official
    `...-comfy-int8-convrot` transformer (quantize_int8_convrot)."""
    from safetensors.torch import save_file

    sd = state_dict(config, seed, video_only)
    meta = {"config": json.dumps({"transformer": {k: v for k, v in config.items()
                                                  if not (video_only and k.startswith("audio"))}})}
    keys = [k for k in sd if (fp8_ffn and ".ff.net." in k and k.endswith(".weight"))
            or (fp8_attention and ATTENTION_WEIGHT.fullmatch(k))]
    if keys:
        meta["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": quantize_fp8(sd, keys)})
    if int8_convrot:
        quantize_int8_convrot(sd, [k for k in sd if FFN_WEIGHT.fullmatch(k) or ATTENTION_WEIGHT.fullmatch(k)])
    save_file(sd, path, metadata=meta)
    return path


def int8_convrot_unsupported() -> str | None:
    """Why this ComfyUI cannot load int8-ConvRot checkpoints (no `int8_tensorwise` layout), else None."""
    try:
        import comfy.quant_ops as q
    except ImportError as e:
        return f"ComfyUI's quantized layouts are not importable here ({e})"
    if "int8_tensorwise" in q.QUANT_ALGOS and getattr(q, "_CK_AVAILABLE", False):
        return None
    import comfyui_version

    return (f"ComfyUI {comfyui_version.__version__} reads no int8-ConvRot checkpoints: its comfy.quant_ops has no "
            f"int8_tensorwise layout (it has {', '.join(q.QUANT_ALGOS)})"
            + ("" if getattr(q, "_CK_AVAILABLE", True) else "; comfy-kitchen is not importable"))


def convrot_groupsize(width: int) -> int:
    """ConvRot's Hadamard group: a power of 4 dividing the input width (the kernels' rule). LTX-2.5's widths
    (2048, 4096, 8192, 16384) all take ComfyUI's default 256; the tiny model's 32-wide audio stream takes 16."""
    return next(g for g in (256, 64, 16, 4) if width % g == 0)


def quantize_int8_convrot(sd: dict, keys) -> None:
    """The weights `keys` of sd replaced, in place, by int8-ConvRot (ComfyUI's `int8_tensorwise` layout with
    ConvRot: Hadamard-rotated, per-row int8), quantized by comfy-kitchen and written by ComfyUI's own
    quantized Linear: `weight` (int8), `weight_scale` and the `comfy_quant` config tensor, as ComfyUI saves
    such a layer and as LTX-2.5's official checkpoint holds it."""
    import comfy.ops
    from comfy.quant_ops import QuantizedTensor

    for k in keys:
        w = sd.pop(k)
        prefix = k[: -len("weight")]
        lin = comfy.ops.mixed_precision_ops({}).Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight = torch.nn.Parameter(QuantizedTensor.from_float(
            w, "TensorWiseINT8Layout", per_channel=True, convrot=True, convrot_groupsize=convrot_groupsize(w.shape[1])),
            requires_grad=False)
        lin.quant_format = "int8_tensorwise"
        sd.update({key: t.detach().contiguous() for key, t in lin.state_dict(prefix=prefix).items()})


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


def conditioning(seed=0, tokens=7, unprocessed=False):
    """unprocessed: the text encoder's output before the model's text connectors, as LTX-2.3's
    dual_linear projection delivers it (video 64 + audio 32 wide); the connectors then run in the model."""
    g = torch.Generator().manual_seed(seed)
    extra = {"unprocessed_ltxav_embeds": True} if unprocessed else {}
    return ([[torch.randn(1, tokens, CONTEXT, generator=g), dict(extra)]],
            [[torch.zeros(1, tokens, CONTEXT), dict(extra)]])


def latent(frames=2, h=4, w=4, audio=9):
    """Empty LTX-AV latent: video [1,128,frames,h,w] + audio [1,8,audio,16], as LTXVConcatAVLatent makes it."""
    import comfy.nested_tensor

    return {"samples": comfy.nested_tensor.NestedTensor((torch.zeros(1, 128, frames, h, w),
                                                         torch.zeros(1, 8, audio, 16)))}
