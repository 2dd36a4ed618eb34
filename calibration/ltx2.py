"""What the pack knows about LTX-2's layout: which linears are FFN linears and their names.

Names are relative to the diffusion model (`transformer_blocks.N.ff.net.0.proj`); checkpoint
files prefix them with `model.diffusion_model.`, a ComfyUI ModelPatcher with `diffusion_model.`.
"""
from __future__ import annotations

import re

FAMILY = "ltx2"
CKPT_PREFIX = "model.diffusion_model."
# video `ff` and audio `audio_ff` of every block; net.0.proj is dim -> 4 dim, net.2 back.
FFN_LINEAR = re.compile(r"^transformer_blocks\.(\d+)\.(ff|audio_ff)\.net\.(0\.proj|2)$")
UP, DOWN = "net.0.proj", "net.2"
# LTX-AV (LTX-2) is recognised by this key, as in ComfyUI's model_detection.
MARKER = "audio_adaln_single.linear.weight"


def is_ffn_linear(name: str) -> bool:
    return FFN_LINEAR.match(name) is not None


def ffn_of(linear: str) -> str:
    """`transformer_blocks.3.ff.net.2` -> `transformer_blocks.3.ff`."""
    m = FFN_LINEAR.match(linear)
    if not m:
        raise ValueError(f"{linear} is not an LTX-2 FFN linear")
    return f"transformer_blocks.{m.group(1)}.{m.group(2)}"


STREAMS = {"all": ("ff", "audio_ff"), "video": ("ff",), "audio": ("audio_ff",)}


def streams(which: str) -> tuple[str, ...]:
    if which not in STREAMS:
        raise ValueError(f"layer selection must be one of {', '.join(STREAMS)}, got {which!r}")
    return STREAMS[which]


def select(names, which: str = "all") -> list[str]:
    """FFN linears among names: which = all | video | audio (ff / audio_ff)."""
    keep = streams(which)
    return [n for n in names if (m := FFN_LINEAR.match(n)) and m.group(2) in keep]


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
    return [f"transformer_blocks.{i}.{s}" for i in parse_blocks(blocks, n_blocks) for s in streams(which)]
