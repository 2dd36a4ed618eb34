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
    """{linear: [out, in, digest]} as in the compressed file; linears missing from the model are left out.
    linears: names, or a file's fingerprint (then each digest is taken in the version the file holds)."""
    like = linears if isinstance(linears, dict) else None
    out = {}
    for name in linears:
        try:
            w, _, _ = source(model, name)
        except (AttributeError, ValueError):
            continue
        out.update(fingerprint([(name, w)], like=like))
    return out


class LoRAError(ValueError):
    pass


def lora_terms(model, ffn: str) -> dict[str, tuple | None]:
    """{UP/DOWN: (up, down) or None}: the LoRA patches that ComfyUI's LoRA loaders put on this FFN's
    weights, as one low-rank delta per linear (strength and alpha/rank folded into `up`).

    A compressed FFN has no dense weight for ComfyUI to patch, so a LoRA's low-rank delta is added
    to the compressed low-rank branch instead (CompressedLinear.set_lora): the same function as the
    patched dense weight, whatever the order of the loaders. Patches that are not a low-rank delta
    (full weight diffs, LoHa/LoKr/OFT, DoRA, bias diffs, a scaled base weight) raise LoRAError."""
    prefix = PREFIX + ffn + "."
    out = {ltx2.UP: None, ltx2.DOWN: None}
    for key, entries in model.patches.items():
        if not key.startswith(prefix):
            continue
        sub = key[len(prefix):].removesuffix(".weight")
        if sub not in out or not key.endswith(".weight"):
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
            out[sub] = (torch.cat(ups, 1), torch.cat(downs, 0))
    return out


def _patch_kind(v) -> str:
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
        return f"'{v[0]}'"
    return "full weight diff" if isinstance(v, tuple) and len(v) == 1 else type(v).__name__


def _unsupported(key: str, what: str) -> str:
    return (f"{key} carries {what}, which a compressed FFN cannot apply: LiteFFN adds plain LoRAs (up/down "
            "factors) to the compressed FFNs' low-rank branch. Merge this patch into the model first (its "
            "loader, then ComfyUI's Save Checkpoint) and compress that model, or load it without its FFN part.")


def lora_notes(model, linears) -> list[str]:
    """Check that the LoRA patches on these FFN linears can run on compressed FFNs (raises LoRAError
    if not) and say so in the report."""
    ffns = sorted({ltx2.ffn_of(n) for n in linears})
    hit = [f for f in ffns if any(lora_terms(model, f).values())]
    if not hit:
        return []
    msg = (f"a LoRA patches {len(hit)} of the FFNs (e.g. {hit[0]}): it runs on the compressed FFNs, added "
           "to their low-rank branch at sampling time (strength changes need no re-compression)")
    log.info("LiteFFN: %s", msg)
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

    def __setattr__(self, name, value):
        # Another pack's object patch of `ff.forward` applied after ours (KJNodes' chunked FFN) lands here;
        # it would call the dense FFN that is no longer loaded. The compressed FFN needs no chunking.
        if name == "forward":  # _before_sampling names the patch in a warning
            return
        super().__setattr__(name, value)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        # ComfyUI maps and accepts LoRA keys by the live state_dict (model_lora_keys_unet, add_patches),
        # which holds this proxy while the compressed MODEL is loaded: the FFN's keys must stay there.
        return self.__dict__["original"].state_dict(*args, destination=destination, prefix=prefix,
                                                    keep_vars=keep_vars)

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
    from comfy.patcher_extension import CallbacksMP

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
    m.add_callback_with_key(CallbacksMP.ON_PRE_RUN, ADDITIONAL_KEY, _before_sampling)
    m.add_callback_with_key(CallbacksMP.ON_CLEANUP, ADDITIONAL_KEY, _after_sampling)
    m.set_additional_models(ADDITIONAL_KEY, [comfy.model_patcher.CoreModelPatcher(
        container, load_device=model.load_device, offload_device=model.offload_device)])
    m.size = max(model.model_size() - saved, 1)
    # ComfyUI swaps clones of one model without moving weights when their patches_uuid match, which
    # would leave the dense FFNs of the other branch wherever they were (found on the GPU: CPU
    # weights, CUDA input). A new uuid makes a switch reload, as a LoRA or a dtype change does.
    m.patches_uuid = uuid.uuid4()
    return m


def _proxies(model):
    return [(k[len(PREFIX):], v) for k, v in model.object_patches.items() if isinstance(v, _FFNProxy)]


def _before_sampling(model) -> None:
    """ON_PRE_RUN of the MODEL being sampled (after loading): its LoRA patches go into the compressed
    FFNs, which clones share, so they are set for this run and cleared after it."""
    proxies = _proxies(model)
    for ffn, proxy in proxies:
        terms = lora_terms(model, ffn)
        for sub, linear in ((ltx2.UP, proxy.target.up), (ltx2.DOWN, proxy.target.down)):
            linear.set_lora(*(terms[sub] or (None,)))
            if "forward" in vars(proxy.original.get_submodule(sub)):  # e.g. Load LoRA (Bypass)'s injection
                raise LoRAError(f"another node replaced the forward of {ffn}.{sub} (a bypass LoRA or similar), an "
                                "FFN linear that LiteFFN compressed, so it would be ignored. Use ComfyUI's Load LoRA "
                                "for LoRAs (LiteFFN adds them to the compressed FFNs), or apply that node to the "
                                "uncompressed MODEL.")
    ours = {PREFIX + f for f, _ in proxies}
    for k in model.object_patches:
        if k not in ours and any(k.startswith(o + ".") for o in ours):
            _warn_once(f"another node's patch {k} is ignored: that FFN is compressed by LiteFFN")
    hooked = [k for hp in model.hook_patches.values() for k in hp if any(k.startswith(o + ".") for o in ours)]
    if hooked:
        raise LoRAError(f"a hook LoRA (Create Hook LoRA / Set Model Hooks) patches {hooked[0]}, an FFN that LiteFFN "
                        "compressed; hooks cannot reach compressed FFNs. Use a LoRA loader node instead.")


def _after_sampling(model) -> None:
    for _, proxy in _proxies(model):
        proxy.target.up.set_lora(None)
        proxy.target.down.set_lora(None)


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning("LiteFFN: %s", msg)


def compressed_modules(model) -> dict[str, CompressedFFN]:
    """{ffn name: CompressedFFN} of a MODEL patched by LiteFFN ({} for any other)."""
    return {ffn: proxy.target for ffn, proxy in _proxies(model)}


def _key(ffn: str) -> str:
    return ffn.replace(".", "-")


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in module.state_dict().values())
