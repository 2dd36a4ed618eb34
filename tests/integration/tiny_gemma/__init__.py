"""Test-only ComfyUI custom node package: ComfyUI builds "Gemma 3 12B" at a tiny width.

Why: LTX-2's text encoder is Gemma 3 12B, and ComfyUI hard-codes its size: the
`Gemma3_12B_Config` dataclass in comfy/text_encoders/llama.py (hidden 3840, vocab 262208,
a SigLIP vision tower of 400M parameters), and LTXAVTEModel in comfy/text_encoders/lt.py,
whose text projection is `Linear(3840 * 49, 3840)` (49 = Gemma's 48 layers + embeddings,
stacked). No file can make ComfyUI build a smaller one, so a random-weight LTX-2 model set
for tests (tests/integration/ltx2_models.py) needs this shim in the process that loads it.

What it changes, and nothing else (at import, idempotent):
  1. `comfy.text_encoders.llama.Gemma3_12B_Config` -> a dataclass subclass of it with tiny
     widths (hidden 32, 2 heads of 16, MLP 64, vocab 320, a 1-layer 16-wide vision tower).
     `Gemma3_12B.__init__` looks the name up at call time. The layer count stays 48, so the
     file is still what ComfyUI's own detection calls Gemma 3 12B
     (`model.layers.47.self_attn.q_norm.weight`: comfy.sd.detect_te_model, and
     LTXAVTEModel.load_sd, which routes the Gemma file by that key), and the projection still
     reads all 49 hidden states.
  2. Only where ComfyUI hard-codes the projection (0.22; 0.33 sizes it from the Gemma config
     and the file, `video_projection_dim` & co., so the tiny config is enough there):
     `comfy.text_encoders.lt.LTXAVTEModel.__init__` -> the original, told to build no
     projection, followed by the same projection class ComfyUI would build
     (`operations.Linear` for "single_linear", LTX-2; `DualLinearProjection` for
     "dual_linear", LTX-2.3) at widths 32 * 49 -> PROJECTION_OUT (resp. VIDEO/AUDIO_CONTEXT)
     instead of 3840 * 49 -> 3840 (resp. 4096, 2048).

Everything else is ComfyUI's own and unchanged: the loader nodes (CheckpointLoaderSimple,
LTXAVTextEncoderLoader, LTXVAudioVAELoader), comfy.sd.load_clip with CLIPType.LTXV and its
detection (llama_detect, lt.sd_detect), the SentencePiece Gemma tokenizer read from the
file's `spiece_model` tensor (padding to 1024 tokens, left), Gemma's forward (all 48 layers,
sliding-window pattern, RoPE, norms), the stacking/normalisation of the 49 hidden states, the
projection's forward, and the LTX-2 transformer's own embeddings connectors, which take the
projected text (PROJECTION_OUT wide = the tiny transformer's `caption_channels`) from there.

The widths below must match the checkpoint that ltx2_models.py writes; it reads them from here.
Loaded by ComfyUI as a custom node (symlink this folder into custom_nodes/), or imported by a
test after ComfyUI is importable. It never un-patches: a process that imports it builds every
Gemma 3 12B tiny, which only matters to a process that loads the real one.
"""
from __future__ import annotations

import dataclasses
import inspect

import comfy.text_encoders.llama as _llama
import comfy.text_encoders.lt as _lt

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

HIDDEN = 32          # Gemma 3 12B: 3840
LAYERS = 48          # as Gemma 3 12B (kept: ComfyUI detects the model by layer 47)
VOCAB = 320          # Gemma 3: 262208; the tiny SentencePiece model must fit (ids 0..VOCAB-1)
PROJECTION_OUT = 48  # single_linear (LTX-2) output = the transformer's caption_channels (3840)
VIDEO_CONTEXT, AUDIO_CONTEXT = 64, 32  # dual_linear (LTX-2.3) outputs (4096, 2048)

TINY_VISION = dict(_llama.GEMMA3_VISION_CONFIG, hidden_size=16, intermediate_size=32,
                   num_attention_heads=2, num_hidden_layers=1)  # image size/patching as Gemma 3


@dataclasses.dataclass
class TinyGemma3_12B_Config(_llama.Gemma3_12B_Config):
    vocab_size: int = VOCAB
    hidden_size: int = HIDDEN
    intermediate_size: int = 64
    num_hidden_layers: int = LAYERS
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim = 16
    vision_config = TINY_VISION


def _tiny_ltxav_te_init(self, *args, **kwargs):
    a = _SIGNATURE.bind(self, *args, **kwargs)
    a.apply_defaults()
    kind = a.arguments["text_projection_type"]
    a.arguments["text_projection_type"] = "none (tiny_gemma builds it)"
    _original_init(*a.args, **a.kwargs)
    self.text_projection_type = kind
    dtype, device = a.arguments["dtype"], a.arguments["device"]
    ops = self.gemma3_12b.operations
    width = HIDDEN * (LAYERS + 1)
    if kind == "single_linear":
        self.text_embedding_projection = ops.Linear(width, PROJECTION_OUT, bias=False, dtype=dtype, device=device)
    elif kind == "dual_linear":
        self.text_embedding_projection = _lt.DualLinearProjection(width, VIDEO_CONTEXT, AUDIO_CONTEXT, dtype=dtype,
                                                                  device=device, operations=ops)


if getattr(_lt.LTXAVTEModel.__init__, "_tiny_gemma", False):
    _original_init = _lt.LTXAVTEModel.__init__._original
else:
    _original_init = _lt.LTXAVTEModel.__init__
    _llama.Gemma3_12B_Config = TinyGemma3_12B_Config
    # A ComfyUI that sizes the projection itself (from the config and the file) needs only the tiny config.
    if "video_projection_dim" not in inspect.signature(_original_init).parameters:
        _tiny_ltxav_te_init._tiny_gemma = True
        _tiny_ltxav_te_init._original = _original_init
        _lt.LTXAVTEModel.__init__ = _tiny_ltxav_te_init
_SIGNATURE = inspect.signature(_original_init)
