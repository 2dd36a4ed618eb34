"""Checkpoint layers in ComfyUI's quantized layouts, for the offline command (`liteffn compress`).

ComfyUI marks a quantized layer with a small config: {"format": "int8_tensorwise", "convrot": true,
"convrot_groupsize": 256} in LTX-2.5's official `...-comfy-int8-convrot` transformer. It is in the
file's `_quantization_metadata` header ({"layers": {layer: config}}) or in a `<layer>.comfy_quant`
tensor (the JSON's bytes, as ComfyUI saves layers); the header's wins, as in ComfyUI's loader.

Scaled FP8 (float8_e4m3fn / float8_e5m2) LiteFFN reads itself (codes times weight_scale). Every other
layout is loaded by ComfyUI's own quantized Linear (comfy.ops.mixed_precision_ops) and dequantized by
comfy-kitchen, not by a copy of their code here: the format names, their parameters and the
arithmetic stay theirs, so a layout ComfyUI adds is read as ComfyUI reads it. ComfyUI is imported
only when such a layer is selected: as already importable, else from COMFYUI_PATH, else the ComfyUI
whose custom_nodes folder holds this pack.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import sys

import torch

from .validate import LayerError

FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")  # read by LiteFFN itself
_PROBE = (16, 1024)  # a weight shape that every layout's blocks and groups divide
_FIX = ("run `liteffn compress` with the Python that runs ComfyUI (comfy-kitchen installed), with this pack in "
        "ComfyUI's custom_nodes folder or COMFYUI_PATH set to the ComfyUI folder; or compress the model in ComfyUI "
        "with LiteFFN Compress Model")


def configs(f, keys, layers, ckpt: str) -> dict:
    """{layer: its ComfyUI quantization config} of the layers (full key prefixes) that have one."""
    raw = (f.metadata() or {}).get("_quantization_metadata")
    try:
        header = json.loads(raw)["layers"] if raw else {}
        if not isinstance(header, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise LayerError(f"{ckpt}: its `_quantization_metadata` header is not ComfyUI's ({{\"layers\": {{...}}}}); "
                         "the checkpoint is damaged: use an intact copy") from None
    keys = set(keys)
    out = {}
    for layer in layers:
        conf = header.get(layer)
        if conf is None and layer + ".comfy_quant" in keys:
            try:
                conf = json.loads(f.get_tensor(layer + ".comfy_quant").numpy().tobytes())
            except ValueError:
                conf = "(not JSON)"
        if conf is None:
            continue
        if not isinstance(conf, dict):
            raise LayerError(f"{ckpt}: layer {layer} has a quantization config {conf!r}, not a table with a format; "
                             "the checkpoint is damaged: use an intact copy")
        out[layer] = conf
    return out


def is_comfy_layout(conf: dict | None) -> bool:
    """A layer LiteFFN reads through ComfyUI (any quantized format but scaled FP8)."""
    return conf is not None and conf.get("format") not in FP8_FORMATS


def describe(conf: dict) -> str:
    fmt = conf.get("format")
    return f"{fmt!r}" + (" (int8-ConvRot, as LTX-2.5's official checkpoints)"
                         if fmt == "int8_tensorwise" and conf.get("convrot") else "")


def check(ckpt: str, name: str, conf: dict, stored_shape) -> tuple[int, int]:
    """The weight's [out, in] of a layer in one of ComfyUI's layouts, from its header; LayerError naming the
    layout when this process cannot read it (no ComfyUI / comfy-kitchen, a layout they do not know, a
    packed layout whose weight shape the file does not give)."""
    fmt = conf.get("format")
    if not fmt:
        raise LayerError(f"{ckpt}: layer {name} has a quantization config without a format ({conf}); ComfyUI "
                         "cannot load it either: the checkpoint is damaged or was written by a tool that left the "
                         "format out")
    try:
        ops, quant_ops, version = comfyui()
    except LookupError as e:
        raise LayerError(f"{ckpt}: layer {name} is stored in the quantized layout {describe(conf)}, which LiteFFN "
                         f"reads only with ComfyUI's own loader and comfy-kitchen, not available here ({e}): "
                         f"{_FIX}") from None
    if fmt not in quant_ops.QUANT_ALGOS:
        raise LayerError(f"{ckpt}: layer {name} is stored as {fmt!r}, a quantized layout ComfyUI {version} does not "
                         f"know (it reads {', '.join(quant_ops.QUANT_ALGOS)}), so LiteFFN cannot read it: use the "
                         "ComfyUI (and comfy-kitchen) that loads this checkpoint, or a bf16 or FP8 checkpoint")
    shape = _logical_shape(quant_ops.QUANT_ALGOS[fmt]["comfy_tensor_layout"], tuple(stored_shape))
    if shape is None:
        raise LayerError(f"{ckpt}: layer {name} is stored as {fmt!r}, which packs several values per stored element "
                         f"({list(stored_shape)} stored) without a rule for the weight's shape, so the offline command "
                         "cannot read it: compress the model in ComfyUI with LiteFFN Compress Model (ComfyUI knows "
                         "its shapes), or use a bf16, FP8 or int8 checkpoint")
    return shape


def load(f, keys, layer: str, conf: dict, stored_shape, device, ckpt: str, name: str):
    """The layer's weight as ComfyUI's quantized Linear loads it (a comfy-kitchen QuantizedTensor on device,
    dequantizing to fp32): its tensors from f (weight, scales, ...) and conf, through ComfyUI's own code."""
    ops, _, _ = comfyui()
    out, k = check(ckpt, name, conf, stored_shape)
    lin = ops.mixed_precision_ops({}, compute_dtype=torch.float32).Linear(k, out, bias=False, device=device)
    sd = {key[len(layer) + 1:]: f.get_tensor(key) for key in keys
          if key.startswith(layer + ".") and "." not in key[len(layer) + 1:] and key != layer + ".bias"}
    sd["comfy_quant"] = torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)
    try:
        lin.load_state_dict(sd, strict=False)
    except Exception as e:  # noqa: BLE001: ComfyUI's loader says what is missing; the user needs the layer and layout
        raise LayerError(f"{ckpt}: layer {name} ({describe(conf)}) could not be loaded by ComfyUI ({_first_line(e)}); "
                         "the checkpoint is damaged or incomplete: use the full checkpoint") from None
    w = lin.weight
    if type(w).__name__ != "QuantizedTensor" or tuple(w.shape) != (out, k):
        raise LayerError(f"{ckpt}: layer {name} ({describe(conf)}): ComfyUI's loader gave a "
                         f"{type(w).__name__} of shape {list(w.shape)}, not the {out}x{k} weight; the checkpoint is "
                         "damaged: use an intact copy")
    return w


def dequantize(w, ckpt: str, name: str, conf: dict) -> torch.Tensor:
    """comfy-kitchen's dequantize of a loaded layer (fp32)."""
    try:
        return w.dequantize().float()
    except Exception as e:  # noqa: BLE001: see load
        raise LayerError(f"{ckpt}: layer {name} ({describe(conf)}): comfy-kitchen could not dequantize it here "
                         f"({_first_line(e)}): update comfy-kitchen, or run on the device ComfyUI runs this model "
                         "on (--device)") from None


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0]}" if s else type(e).__name__


@functools.lru_cache(maxsize=None)
def _logical_shape_rule(layout: str):
    """How a layout stores a weight: 'same' (stored at the weight's shape), 'rule' (the layout converts), or
    None (it packs values and says nothing): a probe quantized by comfy-kitchen itself."""
    from comfy.quant_ops import QuantizedTensor, get_layout_class

    if hasattr(get_layout_class(layout), "get_logical_shape_from_storage"):
        return "rule"
    try:
        q = QuantizedTensor.from_float(torch.randn(_PROBE, generator=torch.Generator().manual_seed(0)), layout)
    except Exception:  # noqa: BLE001: a layout that cannot quantize here cannot say either
        return None
    return "same" if tuple(q._qdata.shape) == _PROBE else None


def _logical_shape(layout: str, stored: tuple) -> tuple[int, int] | None:
    rule = _logical_shape_rule(layout)
    if rule == "same":
        return stored
    if rule == "rule":
        from comfy.quant_ops import get_layout_class

        return tuple(int(d) for d in get_layout_class(layout).get_logical_shape_from_storage(stored))
    return None


# ------------------------------------------------------------------ ComfyUI, imported when needed
_LOADED = []


def comfyui():
    """(comfy.ops, comfy.quant_ops, version) of a ComfyUI with comfy-kitchen; LookupError saying why not."""
    if _LOADED:
        return _LOADED[0]
    try:
        import comfy_kitchen  # noqa: F401  (ComfyUI's quantized layouts are comfy-kitchen's)
    except ImportError:
        raise LookupError("comfy-kitchen is not installed in this Python") from None
    root = None
    if not _importable():
        root = _comfyui_root()
        sys.path.append(root)  # after everything else: ComfyUI's top-level modules shadow nothing
    try:
        with _quiet():
            from comfy.cli_args import args

            if "comfy.model_management" not in sys.modules and not torch.cuda.is_available():
                args.cpu = True  # ComfyUI's device choice fails on a machine without a GPU unless told (--cpu)
            import comfy.ops
            import comfy.quant_ops
    except Exception as e:  # noqa: BLE001: a ComfyUI that does not import: say which and why
        raise LookupError(f"ComfyUI{' at ' + root if root else ''} could not be imported: {_first_line(e)}") from None
    if not getattr(comfy.quant_ops, "_CK_AVAILABLE", True):
        raise LookupError("ComfyUI could not import comfy-kitchen")
    try:
        import comfyui_version

        version = comfyui_version.__version__
    except ImportError:
        version = "(version unknown)"
    _LOADED.append((comfy.ops, comfy.quant_ops, version))
    return _LOADED[0]


def _importable() -> bool:
    if "comfy.ops" in sys.modules:
        return True
    spec = importlib.util.find_spec("comfy")
    return spec is not None and any(os.path.isfile(os.path.join(p, "ops.py"))
                                    for p in spec.submodule_search_locations or ())


def _is_comfyui(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "comfy", "ops.py")) and os.path.isfile(os.path.join(root, "folder_paths.py"))


def _comfyui_root() -> str:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if not _is_comfyui(env):
            raise LookupError(f"COMFYUI_PATH={env} is not a ComfyUI folder (no comfy/ops.py)")
        return env
    pack = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for p in dict.fromkeys((pack, os.path.realpath(pack))):  # as installed (also a link in custom_nodes), or resolved
        nodes_dir = os.path.dirname(p)
        if os.path.basename(nodes_dir) == "custom_nodes" and _is_comfyui(os.path.dirname(nodes_dir)):
            return os.path.dirname(nodes_dir)
    raise LookupError("ComfyUI is not importable here: not on the Python path, COMFYUI_PATH not set, and this pack "
                      "is not in a ComfyUI custom_nodes folder")


@contextlib.contextmanager
def _quiet():
    """ComfyUI's import logs its devices and backends at INFO: not the command's output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)
