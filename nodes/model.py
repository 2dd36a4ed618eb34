"""The LTX-2 MODEL as ComfyUI hands it to a node (a ModelPatcher): checks, its FFN linears,
their source weights, and the patched clone that carries our modules.

Reads go through the patcher, never the live module tree alone: while another clone of the
same model is loaded, the tree holds that clone's object patches and LoRA-patched weights;
get_model_object and the shared `backup` give the originals.
"""
from __future__ import annotations

import logging
import uuid

import torch

from ..calibration import ltx2
from ..calibration.compressed_file import fingerprint
from ..kernels.modules import CompressedFFN

log = logging.getLogger("liteffn")
PREFIX = "diffusion_model."  # inside a ModelPatcher


def diffusion_model(model) -> torch.nn.Module:
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if dm is None or not hasattr(dm, "transformer_blocks") or not hasattr(dm, ltx2.MARKER.split(".")[0]):
        kind = type(getattr(model, "model", model)).__name__
        raise ValueError(
            f"LiteFFN works on LTX-2 models only (LTX-AV: LTX-2 19B, LTX-2.3 22B); this MODEL is {kind}. "
            "Connect the MODEL output of an LTX-2 checkpoint or diffusion-model loader."
        )
    return dm


def ffn_names(model, which: str = "all", blocks: str = "") -> list[str]:
    return ltx2.ffn_modules(len(diffusion_model(model).transformer_blocks), which, blocks)


def original_ffn(model, ffn: str) -> torch.nn.Module:
    """The model's own FeedForward at `ffn`, whatever clone is loaded now."""
    key = PREFIX + ffn
    m = model.get_model_object(key)
    if isinstance(m, (CompressedFFN, _FFNProxy)):
        raise ValueError(
            f"{ffn} is already compressed by LiteFFN in this MODEL. Connect the MODEL from before the "
            "LiteFFN Compress / Low-Rank FFN Loader node."
        )
    if key in model.object_patches or not isinstance(getattr(m, "net", None), torch.nn.Sequential):
        raise ValueError(
            f"{ffn} was replaced by another node ({type(m).__name__}); LiteFFN needs LTX-2's own FeedForward. "
            "Apply LiteFFN before that node."
        )
    return m


def linear_of(model, linear: str) -> torch.nn.Module:
    ffn = ltx2.ffn_of(linear)
    return original_ffn(model, ffn).get_submodule(linear[len(ffn) + 1:])


def source(model, linear: str):
    """(weight as stored, its FP8 scale or None, bias) of an FFN linear, originals (not LoRA-patched).
    A comfy-kitchen QuantizedTensor (FP8 checkpoints) comes back as its FP8 codes and scale."""
    mod = linear_of(model, linear)
    w = _original(model, linear + ".weight", mod.weight)
    b = _original(model, linear + ".bias", mod.bias) if getattr(mod, "bias", None) is not None else None
    scale = None
    if type(w).__name__ == "QuantizedTensor":
        qdata = getattr(w, "_qdata", None)
        s = getattr(getattr(w, "_params", None), "scale", None)
        if qdata is not None and qdata.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and s is not None:
            w, scale = qdata, s
        else:  # other layouts (NVFP4, MXFP8): compress from the dequantized weight
            w = w.dequantize()
    elif w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        scale = getattr(mod, "weight_scale", None)
        scale = getattr(mod, "scale_weight", None) if scale is None else scale
    if isinstance(w, torch.nn.Parameter):
        w = w.data
    return w, scale, b


def _original(model, key_rel: str, live):
    bk = model.backup.get(PREFIX + key_rel)
    return bk.weight if bk is not None else live


def model_fingerprint(model, linears) -> dict:
    """{linear: [out, in, digest]} as in the compressed file; linears missing from the model are left out."""
    out = {}
    for name in linears:
        try:
            w, _, _ = source(model, name)
        except (AttributeError, ValueError):
            continue
        out.update(fingerprint([(name, w)]))
    return out


def warn_about_lora(model, linears) -> list[str]:
    keys = [PREFIX + n + ".weight" for n in linears]
    hit = [k for k in keys if k in model.patches]
    if not hit:
        return []
    msg = (f"{len(hit)} FFN weights carry LoRA/weight patches (e.g. {hit[0]}); they are not in the compressed "
           "FFNs (runtime LoRA on compressed FFNs is not implemented yet), so the LoRA's FFN part is ignored")
    log.warning("LiteFFN: %s", msg)
    return [msg]


class _FFNProxy(torch.nn.Module):
    """What the object patch puts at `ff`: no tensors of its own, it calls the compressed FFN.

    The compressed tensors live in one container module that the patched MODEL carries as an
    additional model (as ControlNets are), so ComfyUI loads, offloads, counts and frees them
    as a model of their own. Tensors inside an object-patched subtree break dynamic VRAM:
    it restores its weight backups by name after the object patches are undone."""

    def __init__(self, target: CompressedFFN, original: torch.nn.Module):
        super().__init__()
        # neither registered: not part of the main model's tree, so neither is loaded with it
        self.__dict__["target"], self.__dict__["original"] = target, original

    def __getattr__(self, name):
        # Paths into the replaced FFN (`ff.net.0.proj.weight`) still resolve, to the original: dynamic
        # VRAM restores another clone's weight backups by name while this proxy is patched in.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["original"], name)

    def forward(self, x):
        return self.target(x)

    def extra_repr(self):
        return f"LiteFFN -> {self.target.up.extra_repr()}"


ADDITIONAL_KEY = "liteffn"


def patched(model, modules: dict[str, CompressedFFN]):
    """A clone of model whose FFNs run the compressed modules; model itself is untouched.
    Sizes are what ComfyUI plans VRAM with: the clone's drops by the dense FFNs it no longer
    loads, the compressed tensors are counted by their own patcher."""
    import comfy.model_patcher

    m = model.clone()
    container = torch.nn.ModuleDict({_key(f): mod for f, mod in modules.items()})
    saved = 0
    for ffn, mod in modules.items():
        key = PREFIX + ffn
        orig = original_ffn(model, ffn)
        for k in [k for k in m.object_patches if k.startswith(key + ".")]:
            log.warning("LiteFFN: dropping another node's patch %s: its FFN is now compressed", k)
            del m.object_patches[k]
        m.add_object_patch(key, _FFNProxy(mod, orig))
        saved += _nbytes(orig)
    m.set_additional_models(ADDITIONAL_KEY, [comfy.model_patcher.CoreModelPatcher(
        container, load_device=model.load_device, offload_device=model.offload_device)])
    m.size = max(model.model_size() - saved, 1)
    # ComfyUI swaps clones of one model without moving weights when their patches_uuid match, which
    # would leave the dense FFNs of the other branch wherever they were (found on the GPU: CPU
    # weights, CUDA input). A new uuid makes a switch reload, as a LoRA or a dtype change does.
    m.patches_uuid = uuid.uuid4()
    return m


def compressed_modules(model) -> dict[str, CompressedFFN]:
    """{ffn name: CompressedFFN} of a MODEL patched by LiteFFN ({} for any other)."""
    out = {}
    for k, v in model.object_patches.items():
        if isinstance(v, _FFNProxy):
            out[k[len(PREFIX):]] = v.target
    return out


def _key(ffn: str) -> str:
    return ffn.replace(".", "-")


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in module.state_dict().values())
