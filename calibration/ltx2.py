"""What the pack knows about LTX-2's layout: which linears of the transformer blocks it compresses,
and how they group into the modules it replaces ("units").

Names are relative to the diffusion model (`transformer_blocks.N.ff.net.0.proj`); checkpoint
files prefix them with `model.diffusion_model.`, a ComfyUI ModelPatcher with `diffusion_model.`.

A unit is what one patch replaces: an FFN (`transformer_blocks.N.ff`, both of its linears, run
fused) or a single attention projection (`transformer_blocks.N.attn1.to_q`, the unit is the
linear). Every block has six attentions (video and audio self-attention, their cross-attention
to the text, audio->video and video->audio) with q, k, v and out projections. The per-head gate
of LTX-2.3's gated attention (`to_gate_logits`, dim -> heads) is left dense: 32 outputs.
"""
from __future__ import annotations

import re

FAMILY = "ltx2"
CKPT_PREFIX = "model.diffusion_model."
# video `ff` and audio `audio_ff` of every block; net.0.proj is dim -> 4 dim, net.2 back.
FFN_LINEAR = re.compile(r"^transformer_blocks\.(\d+)\.(ff|audio_ff)\.net\.(0\.proj|2)$")
UP, DOWN = "net.0.proj", "net.2"
# each attention and the stream it writes to (audio_to_video: queries from video, keys from audio)
ATTENTIONS = {"attn1": "video", "attn2": "video", "audio_to_video_attn": "video",
              "audio_attn1": "audio", "audio_attn2": "audio", "video_to_audio_attn": "audio"}
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
ATTN_LINEAR = re.compile(r"^transformer_blocks\.(\d+)\.(" + "|".join(ATTENTIONS) + r")\.(to_q|to_k|to_v|to_out\.0)$")
FFN_STREAM = {"ff": "video", "audio_ff": "audio"}
# LTX-AV (LTX-2) is recognised by this key, as in ComfyUI's model_detection.
MARKER = "audio_adaln_single.linear.weight"

# `layers`: which kinds of block linears are compressed. ffn: today's default; ffn+attention:
# every projection too (all block linears but the per-head gates).
LAYERS = {"ffn": ("ffn",), "ffn+attention": ("ffn", "attention"), "attention": ("attention",)}
STREAMS = {"all": ("video", "audio"), "video": ("video",), "audio": ("audio",)}


def is_ffn_linear(name: str) -> bool:
    return FFN_LINEAR.match(name) is not None


def kind_of(linear: str) -> str | None:
    """'ffn', 'attention', or None for a linear the pack does not compress."""
    return "ffn" if FFN_LINEAR.match(linear) else "attention" if ATTN_LINEAR.match(linear) else None


def stream_of(linear: str) -> str | None:
    if m := FFN_LINEAR.match(linear):
        return FFN_STREAM[m.group(2)]
    if m := ATTN_LINEAR.match(linear):
        return ATTENTIONS[m.group(2)]
    return None


def ffn_of(linear: str) -> str:
    """`transformer_blocks.3.ff.net.2` -> `transformer_blocks.3.ff`."""
    m = FFN_LINEAR.match(linear)
    if not m:
        raise ValueError(f"{linear} is not an LTX-2 FFN linear")
    return f"transformer_blocks.{m.group(1)}.{m.group(2)}"


def unit_of(linear: str) -> str:
    """The module a patch replaces for this linear: its FFN, or the attention projection itself."""
    if FFN_LINEAR.match(linear):
        return ffn_of(linear)
    if ATTN_LINEAR.match(linear):
        return linear
    raise ValueError(f"{linear} is not a linear LiteFFN compresses (LTX-2 block FFNs and attention projections)")


def ffn_hidden(up_out):
    """The FFN's down-linear input from its up linear's output: GELU (tanh), as ComfyUI's GELU_approx."""
    import torch  # here: the command line reads this module before it needs torch

    return torch.nn.functional.gelu(up_out, approximate="tanh")


def is_ffn_unit(unit: str) -> bool:
    return unit.rsplit(".", 1)[-1] in FFN_STREAM


def linears_of(unit: str) -> list[str]:
    """The linears a unit holds, in the order they run."""
    return [f"{unit}.{UP}", f"{unit}.{DOWN}"] if is_ffn_unit(unit) else [unit]


def streams(which: str) -> tuple[str, ...]:
    if which not in STREAMS:
        raise ValueError(f"stream selection must be one of {', '.join(STREAMS)}, got {which!r}")
    return STREAMS[which]


def kinds(layers: str) -> tuple[str, ...]:
    if layers not in LAYERS:
        raise ValueError(f"layers must be one of {', '.join(LAYERS)}, got {layers!r}")
    return LAYERS[layers]


def select(names, which: str = "all", layers: str = "ffn") -> list[str]:
    """The linears among names that a selection compresses: streams which = all | video | audio,
    kinds layers = ffn | ffn+attention | attention."""
    keep, want = streams(which), kinds(layers)
    return [n for n in names if kind_of(n) in want and stream_of(n) in keep]


def parse_blocks(spec: str, n_blocks: int) -> list[int]:
    """Block selection as users type it: "" or "all" -> every block; "0-11, 20" -> 0..11 and 20."""
    spec = (spec or "").strip().lower()
    if spec in ("", "all"):
        return list(range(n_blocks))
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"block selection {spec!r}: use numbers and ranges like '0-11, 20'") from None
        if not 0 <= a <= b < n_blocks:
            raise ValueError(f"block selection {part!r} is outside this model's blocks 0-{n_blocks - 1}")
        out.extend(i for i in range(a, b + 1) if i not in out)
    return sorted(out)


def ffn_modules(n_blocks: int, which: str = "all", blocks: str = "") -> list[str]:
    """FFN module names (`transformer_blocks.N.ff` / `.audio_ff`) of the selected streams and blocks."""
    return units(n_blocks, which, blocks, "ffn")


def units(n_blocks: int, which: str = "all", blocks: str = "", layers: str = "ffn") -> list[str]:
    """The units of a selection, block by block in the order a block runs them (attentions, FFNs)."""
    keep, want = streams(which), kinds(layers)
    out = []
    for i in parse_blocks(blocks, n_blocks):
        if "attention" in want:
            out += [f"transformer_blocks.{i}.{a}.{p}" for a, st in ATTENTIONS.items() if st in keep
                    for p in PROJECTIONS]
        if "ffn" in want:
            out += [f"transformer_blocks.{i}.{s}" for s, st in FFN_STREAM.items() if st in keep]
    return out


# ComfyUI's LTX attention calls to_q(x), then to_k and to_v on its context, which is x itself in the blocks'
# self-attentions (called without one): so there q, k and v read one tensor, elsewhere k and v do.
SELF_ATTENTIONS = ("attn1", "audio_attn1")


def shared_inputs(units_) -> list[list[str]]:
    """Groups of the attention projections among units_ that read the same tensor, each in the order the
    attention calls them: q, k, v of a self-attention, k and v of a cross-attention. A projection missing
    from units_ leaves its group smaller; groups of one are left out. Only speed depends on this: at run
    time a group fuses a call only when its members really get the same tensor (kernels/modules.py)."""
    have, out = set(units_), []
    for u in units_:
        m = ATTN_LINEAR.match(u)
        if not m or m.group(3) == "to_out.0":
            continue
        base = u.rsplit(".", 1)[0]
        names = ("to_q", "to_k", "to_v") if m.group(2) in SELF_ATTENTIONS else ("to_k", "to_v")
        g = [f"{base}.{p}" for p in names if f"{base}.{p}" in have]
        if len(g) > 1 and g[0] == u:  # once per group, at its first member
            out.append(g)
    return out


def linears(units_) -> list[str]:
    return [n for u in units_ for n in linears_of(u)]
