"""The LTX-2 MODEL as ComfyUI hands it to a node (a ModelPatcher): checks, the linears LiteFFN
compresses (grouped in units: whole FFNs, single attention projections; calibration/ltx2.py),
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
from ..kernels.modules import CompressedFFN, CompressedLinear, module_from_layers, share_inputs

log = logging.getLogger("liteffn")
PREFIX = "diffusion_model."  # inside a ModelPatcher


def diffusion_model(model) -> torch.nn.Module:
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if dm is None or not hasattr(dm, "transformer_blocks") or not hasattr(dm, ltx2.MARKER.split(".")[0]):
        kind = type(getattr(model, "model", model)).__name__
        raise ValueError(
            f"LiteFFN works on LTX-2 models only (LTX-AV: LTX-2 19B, LTX-2.3 22B, LTX-2.5); this MODEL is {kind}. "
            "Connect the MODEL output of an LTX-2 checkpoint or diffusion-model loader."
        )
    return dm


def unit_names(model, which: str = "all", blocks: str = "", layers: str = "ffn") -> list[str]:
    """The units (FFNs, attention projections) of a selection; see calibration/ltx2.py."""
    return ltx2.units(len(diffusion_model(model).transformer_blocks), which, blocks, layers)


def original_unit(model, unit: str) -> torch.nn.Module:
    """The model's own module at `unit` (an FFN or a Linear), whatever clone is loaded now."""
    key = PREFIX + unit
    m = model.get_model_object(key)
    what = "FFN" if ltx2.is_ffn_unit(unit) else "linear"
    if isinstance(m, (CompressedFFN, CompressedLinear, _Proxy)):
        raise ValueError(
            f"{unit} is already compressed by LiteFFN in this MODEL. Connect the MODEL from before the "
            "LiteFFN Compress / Low-Rank FFN Loader node."
        )
    own = (isinstance(getattr(m, "net", None), torch.nn.Sequential) if ltx2.is_ffn_unit(unit)
           else isinstance(m, torch.nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "weight")))
    if key in model.object_patches or not own:
        raise ValueError(
            f"{unit} was replaced by another node ({type(m).__name__}); LiteFFN needs LTX-2's own {what}. "
            "Apply LiteFFN before that node."
        )
    return m


def linear_of(model, linear: str) -> torch.nn.Module:
    unit = ltx2.unit_of(linear)
    return original_linear(original_unit(model, unit), unit, linear)


def source(model, linear: str):
    """(weight as stored, its FP8 scale or None, bias) of a block linear, originals (not LoRA-patched).
    A comfy-kitchen QuantizedTensor in FP8 with one scale per tensor or row (scaled FP8 checkpoints) comes
    back as its FP8 codes and scale; in any other layout (int8-ConvRot as LTX-2.5 ships, NVFP4, MXFP8, ...)
    dequantized by ComfyUI's own code. A weight in a layout LiteFFN cannot read raises a ValueError naming it."""
    mod = linear_of(model, linear)
    w = stored(model, linear, mod)
    b = _original(model, linear + ".bias", mod.bias) if getattr(mod, "bias", None) is not None else None
    scale = None
    if type(w).__name__ == "QuantizedTensor":
        qdata = getattr(w, "_qdata", None)
        s = getattr(getattr(w, "_params", None), "scale", None)
        if (str(getattr(w, "_layout_cls", "")).startswith("TensorCoreFP8") and qdata is not None
                and qdata.dtype in FP8 and s is not None and s.numel() in (1, qdata.shape[0])):
            w, scale = qdata, s
        else:  # block scales (MXFP8), int8, FP4: ComfyUI's dequantize, to the model's compute dtype
            w = _dequantized(w, mod, linear)
    elif w.dtype in FP8:
        scale = getattr(mod, "weight_scale", None)
        scale = getattr(mod, "scale_weight", None) if scale is None else scale
    elif not w.is_floating_point():  # e.g. a GGUF loader's packed tensor, or int8 codes without their layout
        kind = getattr(w, "tensor_type", None)  # ComfyUI-GGUF's quantization type (Q4_K, Q8_0, ...)
        what = (f"{w.dtype} weights without a quantized layout" if type(w) in (torch.Tensor, torch.nn.Parameter)
                else f"a {type(w).__name__} weight ({getattr(kind, 'name', kind) or w.dtype})")
        raise UnreadableWeight(f"{linear} holds {what}, which LiteFFN cannot read: {_READS}")
    if isinstance(w, torch.nn.Parameter):
        w = w.data
    return w, scale, b


FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_READS = ("it compresses bf16, fp16 and fp32 weights and the quantized layouts ComfyUI loads (scaled FP8; int8 and "
          "int8-ConvRot, as LTX-2.5 ships; NVFP4; MXFP8). Load the model from such a checkpoint.")


class UnreadableWeight(ValueError):
    """A weight in a layout LiteFFN cannot read (the message names it)."""


def _dequantized(w, mod, linear: str) -> torch.Tensor:
    """ComfyUI's own dequantize of a QuantizedTensor; a failure names the layout."""
    fmt = getattr(mod, "quant_format", None)
    layout = str(getattr(w, "_layout_cls", type(w).__name__))
    try:
        return w.dequantize()
    except Exception as e:  # noqa: BLE001: whatever the layout's code raises, the user sees which layout it is
        why = type(e).__name__ + (": " + str(e).strip().splitlines()[0] if str(e).strip() else "")
        raise UnreadableWeight(f"{linear} is stored in the {fmt + ' / ' if fmt else ''}{layout} layout, which "
                               f"ComfyUI could not dequantize here ({why}). Update ComfyUI and comfy-kitchen, or load "
                               "the model from a bf16, fp16, fp32 or scaled FP8 checkpoint.") from e


def stored(model, linear: str, mod=None) -> torch.Tensor:
    """The weight of a block linear as ComfyUI holds it (a QuantizedTensor stays one), not LoRA-patched:
    what fingerprints are taken of (calibration/fingerprint.py), without dequantizing anything."""
    mod = linear_of(model, linear) if mod is None else mod
    return _original(model, linear + ".weight", mod.weight)


def _original(model, key_rel: str, live):
    bk = model.backup.get(PREFIX + key_rel)
    return bk.weight if bk is not None else live


def model_fingerprint(model, linears) -> dict:
    """{linear: [out, in, digest]} as in the compressed file; linears missing from the model are left out.
    linears: names, or a file's fingerprint (then each digest is taken in the version the file holds)."""
    like = linears if isinstance(linears, dict) else None
    out = {}
    for name in linears:
        try:
            w = stored(model, name)
        except (AttributeError, ValueError):
            continue
        out.update(fingerprint([(name, w)], like=like))
    return out


class LoRAError(ValueError):
    pass


def unit_finder(units):
    """key -> the unit among units (names relative to the diffusion model) that a patcher key
    (`diffusion_model.transformer_blocks.0.attn1.to_q.weight`) names or lies under, else None.
    Looked up by the key's leading names, so a model's patches are sorted in one pass, not one
    pass per unit (1248 units with ffn+attention)."""
    units = set(units)
    depths = sorted({u.count(".") + 1 for u in units})

    def find(key: str) -> str | None:
        if not key.startswith(PREFIX):
            return None
        parts = key[len(PREFIX):].split(".")
        for depth in depths:
            if depth > len(parts):
                break
            u = ".".join(parts[:depth])
            if u in units:
                return u
        return None
    return find


def lora_terms(model, units) -> dict[str, dict[str, tuple | None]]:
    """{unit: {linear: (up, down) or None}} for the linears of units: the LoRA patches that
    ComfyUI's LoRA loaders put on their weights, as one low-rank delta per linear (strength and
    alpha/rank folded into `up`).

    A compressed linear has no dense weight for ComfyUI to patch, so a LoRA's low-rank delta is added
    to the compressed low-rank branch instead (CompressedLinear.set_lora): the same function as the
    patched dense weight, whatever the order of the loaders. Patches that are not a low-rank delta
    (full weight diffs, LoHa/LoKr/OFT, DoRA, bias diffs, a scaled base weight) raise LoRAError."""
    out = {u: {n: None for n in ltx2.linears_of(u)} for u in units}
    find = unit_finder(out)
    for key, entries in model.patches.items():
        unit = find(key)
        if unit is None:
            continue
        linear = key[len(PREFIX):].removesuffix(".weight")
        if not key.endswith(".weight") or linear not in out[unit]:
            raise LoRAError(_unsupported(key, "a patch of a tensor other than the weight"))
        ups, downs = [], []
        for strength, v, strength_model, offset, function in entries:
            w = getattr(v, "weights", None)
            if getattr(v, "name", None) != "lora" or not isinstance(w, tuple) or len(w) < 3:
                raise LoRAError(_unsupported(key, f"a {getattr(v, 'name', None) or _patch_kind(v)} patch"))
            if any(x is not None for x in w[3:6]):
                raise LoRAError(_unsupported(key, "a LoRA with DoRA scale, mid weight or reshape"))
            if offset is not None or function is not None or strength_model != 1.0:
                raise LoRAError(_unsupported(key, "a patch with offset, function or model strength != 1"))
            if strength == 0:
                continue
            up, down, alpha = w[0].float().flatten(1), w[1].float().flatten(1), w[2]
            ups.append(up * (strength * (float(alpha) / down.shape[0] if alpha is not None else 1.0)))
            downs.append(down)
        if ups:
            out[unit][linear] = (torch.cat(ups, 1), torch.cat(downs, 0))
    return out


def _patch_kind(v) -> str:
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
        return f"'{v[0]}'"
    return "full weight diff" if isinstance(v, tuple) and len(v) == 1 else type(v).__name__


def _unsupported(key: str, what: str) -> str:
    return (f"{key} carries {what}, which a compressed linear cannot apply: LiteFFN adds plain LoRAs (up/down "
            "factors) to the compressed linears' low-rank branch. Merge this patch into the model first (its "
            "loader, then ComfyUI's Save Checkpoint) and compress that model, or load it without that part.")


def lora_notes(model, linears) -> list[str]:
    """Check that the LoRA patches on these linears can run on compressed ones (raises LoRAError
    if not) and say so in the report."""
    units = sorted({ltx2.unit_of(n) for n in linears})
    terms = lora_terms(model, units)
    hit = [u for u in units if any(terms[u].values())]
    if not hit:
        return []
    msg = (f"a LoRA patches {len(hit)} of the compressed units (e.g. {hit[0]}): it runs on the compressed "
           "linears, added to their low-rank branch at sampling time (strength changes need no re-compression)")
    log.info("LiteFFN: %s", msg)
    return [msg]


def compressed_linear(target: torch.nn.Module, unit: str, linear: str) -> CompressedLinear:
    """The CompressedLinear of `linear` inside the module that replaced `unit`."""
    return target if unit == linear else (target.up if linear.endswith("." + ltx2.UP) else target.down)


def original_linear(original: torch.nn.Module, unit: str, linear: str) -> torch.nn.Module:
    return original if unit == linear else original.get_submodule(linear[len(unit) + 1:])


class _Proxy(torch.nn.Module):
    """What the object patch puts at a unit (`ff`, `attn1.to_q`): no tensors of its own, it calls the
    compressed module.

    The compressed tensors live in one container module that the patched MODEL carries as an
    additional model (as ControlNets are), so ComfyUI loads, offloads, counts and frees them
    as a model of their own. Tensors inside an object-patched subtree break dynamic VRAM:
    it restores its weight backups by name after the object patches are undone."""

    def __init__(self, target: CompressedFFN | CompressedLinear, original: torch.nn.Module):
        super().__init__()
        # neither registered: not part of the main model's tree, so neither is loaded with it
        self.__dict__["target"], self.__dict__["original"] = target, original

    def __getattr__(self, name):
        # Paths into the replaced unit (`ff.net.0.proj.weight`, `to_q.weight`) still resolve, to the original: dynamic
        # VRAM restores another clone's weight backups by name while this proxy is patched in. Only its parameters,
        # buffers and submodules: ComfyUI's state of its own Linears (`comfy_cast_weights`) read through the proxy of
        # a projection made ComfyUI load, count and patch the proxy as one of them (KeyError on `weight`).
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__["original"]
            for kind in ("_parameters", "_buffers", "_modules"):
                if name in original.__dict__[kind]:
                    return original.__dict__[kind][name]
            raise

    def __setattr__(self, name, value):
        # Another pack's object patch of `ff.forward` applied after ours (KJNodes' chunked FFN) lands here;
        # it would call the dense FFN that is no longer loaded. The compressed modules need no chunking.
        if name == "forward":  # _before_sampling names the patch in a warning
            return
        original = self.__dict__.get("original")
        if original is not None and (name in original._parameters or name in original._buffers):
            setattr(original, name, value)  # a weight set by name (`to_q.weight`, backups restored) is the original's
            return
        super().__setattr__(name, value)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        # ComfyUI maps and accepts LoRA keys by the live state_dict (model_lora_keys_unet, add_patches),
        # which holds this proxy while the compressed MODEL is loaded: the unit's keys must stay there.
        return self.__dict__["original"].state_dict(*args, destination=destination, prefix=prefix,
                                                    keep_vars=keep_vars)

    def forward(self, x):
        return self.target(x)

    def extra_repr(self):
        return f"LiteFFN -> {getattr(self.target, 'up', self.target).extra_repr()}"


ADDITIONAL_KEY = "liteffn"


def patched(model, modules: dict[str, CompressedFFN | CompressedLinear]):
    """A clone of model whose units (FFNs, attention projections) run the compressed modules; model
    itself is untouched. Sizes are what ComfyUI plans VRAM with: the clone's drops by the dense
    weights it no longer loads, the compressed tensors are counted by their own patcher."""
    import comfy.model_patcher
    from comfy.patcher_extension import CallbacksMP

    m = model.clone()
    container = torch.nn.ModuleDict({_key(u): mod for u, mod in modules.items()})
    # q, k and v of a self-attention (k and v of a cross-attention) run from one input pass
    share_inputs(modules, ltx2.shared_inputs(list(modules)))
    saved = 0
    find = unit_finder(modules)
    for k in list(m.object_patches):  # other nodes' patches inside a unit about to be replaced
        unit = find(k)
        if unit is not None and k != PREFIX + unit:
            log.warning("LiteFFN: dropping another node's patch %s: %s is now compressed", k, unit)
            del m.object_patches[k]
    for unit, mod in modules.items():
        key = PREFIX + unit
        orig = original_unit(model, unit)
        m.add_object_patch(key, _Proxy(mod, orig))
        saved += _nbytes(orig)
    if not m.get_callbacks(CallbacksMP.ON_PRE_RUN, ADDITIONAL_KEY):  # once, also on a MODEL patched by LiteFFN before
        m.add_callback_with_key(CallbacksMP.ON_PRE_RUN, ADDITIONAL_KEY, _before_sampling)
        m.add_callback_with_key(CallbacksMP.ON_CLEANUP, ADDITIONAL_KEY, _after_sampling)
    # beside the containers of earlier LiteFFN nodes on this MODEL (FFNs loaded, then attention compressed)
    m.set_additional_models(ADDITIONAL_KEY, m.get_additional_models_with_key(ADDITIONAL_KEY) + [
        comfy.model_patcher.CoreModelPatcher(container, load_device=model.load_device,
                                             offload_device=model.offload_device)])
    m.size = max(model.model_size() - saved, 1)
    # ComfyUI swaps clones of one model without moving weights when their patches_uuid match, which
    # would leave the dense weights of the other branch wherever they were (found on the GPU: CPU
    # weights, CUDA input). A new uuid makes a switch reload, as a LoRA or a dtype change does.
    m.patches_uuid = uuid.uuid4()
    return m


def _proxies(model):
    return [(k[len(PREFIX):], v) for k, v in model.object_patches.items() if isinstance(v, _Proxy)]


def _before_sampling(model) -> None:
    """ON_PRE_RUN of the MODEL being sampled (after loading): its LoRA patches go into the compressed
    linears, which clones share, so they are set for this run and cleared after it."""
    proxies = _proxies(model)
    ours = {u for u, _ in proxies}
    terms = lora_terms(model, ours)
    for unit, proxy in proxies:
        for name in ltx2.linears_of(unit):
            compressed_linear(proxy.target, unit, name).set_lora(*(terms[unit][name] or (None,)))
            if "forward" in vars(original_linear(proxy.original, unit, name)):  # e.g. Load LoRA (Bypass)
                raise LoRAError(f"another node replaced the forward of {name} (a bypass LoRA or similar), a "
                                "linear that LiteFFN compressed, so it would be ignored. Use ComfyUI's Load LoRA "
                                "for LoRAs (LiteFFN adds them to the compressed linears), or apply that node to the "
                                "uncompressed MODEL.")
    find = unit_finder(ours)

    def inside(k):  # strictly below one of our units
        u = find(k)
        return u is not None and k != PREFIX + u

    for k in model.object_patches:
        if inside(k):
            _warn_once(f"another node's patch {k} is ignored: that unit is compressed by LiteFFN")
    hooked = [k for hp in model.hook_patches.values() for k in hp if inside(k)]
    if hooked:
        raise LoRAError(f"a hook LoRA (Create Hook LoRA / Set Model Hooks) patches {hooked[0]}, a layer that LiteFFN "
                        "compressed; hooks cannot reach compressed layers. Use a LoRA loader node instead.")


def _after_sampling(model) -> None:
    for unit, proxy in _proxies(model):
        for name in ltx2.linears_of(unit):
            compressed_linear(proxy.target, unit, name).set_lora(None)


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning("LiteFFN: %s", msg)


def compressed_modules(model) -> dict[str, CompressedFFN | CompressedLinear]:
    """{unit: CompressedFFN or CompressedLinear} of a MODEL patched by LiteFFN ({} for any other)."""
    return {u: p.target for u, p in _proxies(model)}


def build_unit(unit: str, layers: dict) -> CompressedFFN | CompressedLinear:
    """The module for a unit from its CompressedLayers {linear: layer} (calibration/compress.py)."""
    return module_from_layers([layers[n] for n in ltx2.linears_of(unit)])


def _key(unit: str) -> str:
    return unit.replace(".", "-")


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in module.state_dict().values())
