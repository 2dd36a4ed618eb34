"""Offline compression of an LTX-2 checkpoint file, one layer at a time.

Reads ComfyUI's key layout (`model.diffusion_model.transformer_blocks.N.ff.net.0.proj.weight`,
or the same without the prefix for diffusion-model-only files) through safetensors' lazy
reader, so only one FFN weight is in memory at a time, and streams the compressed layers
into the output file. Over several devices (compress_rank), the layers are divided by cost
and one process writes the same file. Weights in ComfyUI's quantized layouts: scaled FP8 is read
here; int8-ConvRot (LTX-2.5's official checkpoints) and ComfyUI's other layouts through ComfyUI's
own loader and comfy-kitchen (comfy_layouts).
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext

import torch

from . import comfy_layouts, compressed_file, ltx2
from .compress import check_damp, compress_linear
from .fingerprint import MismatchError
from .lowrank import RankPolicy
from .stats import ActivationStats, check_stats_meta
from .validate import SOURCE_DTYPES, LayerError

log = logging.getLogger("liteffn")



def _inputs(ckpt: str, stats_path: str | None) -> tuple:
    """The files the output must never be (the Writer refuses them as output, also through links)."""
    return (ckpt,) + ((stats_path,) if stats_path else ())


def _prefix(keys) -> str:
    return ltx2.CKPT_PREFIX if any(k.startswith(ltx2.CKPT_PREFIX) for k in keys) else ""


def block_linears(keys, which: str = "all", layers: str = "ffn") -> tuple[str, list[str]]:
    """(key prefix, the selected block linears) of a checkpoint (ltx2.select's streams and layers)."""
    keys = list(keys)
    p = _prefix(keys)
    names = [k[len(p):-len(".weight")] for k in keys if k.startswith(p) and k.endswith(".weight")]
    return p, ltx2.select(names, which, layers)



def _open(f, ckpt: str, which: str, stats_path: str | None, warn: bool = True, policy: RankPolicy | None = None,
          layers: str = "ffn"):
    """(keys, prefix, selected FFN linear names, their ComfyUI quantization configs, statistics' layer infos,
    statistics' fingerprint). Everything that can be known before a layer is compressed is checked
    here (check_inputs), so a bad input fails before any work and leaves no file."""
    keys = list(f.keys())
    p, names = block_linears(keys, which, layers)
    if p + ltx2.MARKER not in keys or not names:
        raise ValueError(
            f"{ckpt} is not an LTX-2 checkpoint (no {p + ltx2.MARKER!r} or none of the selected layers, e.g. FFNs "
            f"named like 'transformer_blocks.0.ff.net.0.proj'); LiteFFN compresses LTX-2 only"
        )
    quant = comfy_layouts.configs(f, keys, [p + n for n in names], ckpt)
    shapes = check_inputs(f, keys, p, names, quant, ckpt, policy)
    stats_infos, stats_fp = {}, {}
    if stats_path:
        stats_infos, stats_fp = _check_stats(stats_path, shapes, ckpt, warn)
        missing = [n for n in names if n not in stats_infos]
        if missing and warn:
            log.warning("LiteFFN: %d layers have no statistics (e.g. %s): plain SVD for those",
                        len(missing), missing[0])
    return keys, p, names, quant, stats_infos, stats_fp


def check_inputs(f, keys, p: str, names: list[str], quant: dict, ckpt: str, policy: RankPolicy | None) -> dict:
    """Header-only checks of the selected block linears of an open checkpoint -> {name: (out, in)}:
    both linears of every FFN, 2-D weights of a dtype LiteFFN reads (FP8 with its scale) or in a layout of
    ComfyUI's it reads through ComfyUI (quant: comfy_layouts.configs), the two linears' shapes fitting each
    other, biases [out], a fixed rank within every layer."""
    shapes = {}
    for name in names:
        key = f"{p}{name}.weight"
        sl = f.get_slice(key)
        dt, shape = sl.get_dtype(), tuple(sl.get_shape())
        conf = quant.get(p + name)
        if comfy_layouts.is_comfy_layout(conf):  # int8-ConvRot (LTX-2.5), NVFP4, ...: ComfyUI's loader reads it
            shape = comfy_layouts.check(ckpt, name, conf, shape)
        elif dt not in SOURCE_DTYPES:
            raise LayerError(f"{ckpt}: layer {name} has {dt} weights without a quantization config saying their "
                             "layout; LiteFFN compresses bf16, fp16, fp32 or FP8 (with its weight_scale) weights and "
                             "ComfyUI's quantized layouts (int8-ConvRot and others, marked as ComfyUI saves them): use "
                             "such a checkpoint (bare int8 and other quantized weights are not read)")
        elif dt.startswith("F8") and _scale_key(keys, p + name) is None:
            raise LayerError(f"{ckpt}: layer {name} is FP8 without a weight_scale tensor; the checkpoint is "
                             "incomplete: use the full checkpoint")
        if len(shape) != 2 or min(shape) < 1:
            raise LayerError(f"{ckpt}: layer {name} has a weight of shape {list(shape)}, not a 2-D linear weight")
        if f"{p}{name}.bias" in keys:
            b = f.get_slice(f"{p}{name}.bias")
            if tuple(b.get_shape()) != shape[:1] or b.get_dtype() not in SOURCE_DTYPES[:3]:
                raise LayerError(f"{ckpt}: layer {name} has a {b.get_dtype()} bias of shape {list(b.get_shape())}, "
                                 f"expected bf16/fp16/fp32 [{shape[0]}]")
        shapes[name] = shape
    for name in filter(ltx2.is_ffn_linear, names):  # LiteFFN replaces whole FFNs: both linears or neither
        ffn = ltx2.ffn_of(name)
        up, down = f"{ffn}.{ltx2.UP}", f"{ffn}.{ltx2.DOWN}"
        other = down if name == up else up
        if other not in shapes:
            raise LayerError(f"{ckpt} holds {name} but not {other}: LiteFFN replaces whole FFNs, and a file with "
                             "one linear of an FFN cannot be loaded; use a complete checkpoint")
        if name == up and shapes[up][0] != shapes[down][1]:
            raise LayerError(f"{ckpt}: {up} gives {shapes[up][0]} features but {down} takes {shapes[down][1]}: "
                             "the two linears of this FFN do not fit each other; the checkpoint is damaged")
    if policy is not None and policy.rank is not None:
        for name, (n, k) in shapes.items():
            if policy.rank > min(n, k):
                policy.choose(torch.ones(min(n, k)), name, min(n, k))  # raises its clear error
    return shapes


def _check_stats(stats_path: str, shapes: dict, ckpt: str, warn: bool):
    """The statistics file's layers and fingerprint, checked against the checkpoint's headers:
    family, widths. The weights' fingerprints are compared as each layer is read (_compress_one)."""
    meta = ActivationStats.load_meta(stats_path)
    infos = check_stats_meta(meta, stats_path)
    fam = meta.get("model_family")
    if fam is not None and fam != ltx2.FAMILY:
        raise MismatchError(f"statistics file {stats_path} was made on a {fam!r} model, not LTX-2: these "
                            f"statistics were made for another model; calibrate {ckpt} or compress without --stats")
    wrong = [n for n in shapes if n in infos and infos[n]["width"] != shapes[n][1]]
    if wrong:
        n = wrong[0]
        raise MismatchError(f"statistics file {stats_path} does not match {ckpt}: layer {n} takes {shapes[n][1]} "
                            f"inputs, the statistics are {infos[n]['width']} wide ({len(wrong)} layers differ): these "
                            "statistics were made for another model; calibrate this checkpoint or compress without "
                            "--stats")
    fp = meta.get("fingerprint") or {}
    if not fp and warn:
        log.warning("LiteFFN: %s holds no fingerprint of its model: it cannot be checked against %s", stats_path, ckpt)
    return infos, fp


def _check_stats_weight(stats_path: str, stats_fp: dict, ckpt: str, name: str, weight) -> None:
    """The statistics' fingerprint of layer name against the checkpoint's weight (MismatchError)."""
    if name not in stats_fp:
        return
    mine = compressed_file.fingerprint([(name, weight)], like=stats_fp)
    compressed_file.compare_fingerprints(
        {name: stats_fp[name]}, mine, f"statistics file {stats_path}",
        fix=f"These statistics were made for another model: calibrate {ckpt} itself, or compress without --stats.")


def _compress_one(f, keys, p, name, quant, stats_path, stats_infos, stats_fp, policy, fmt, damp, gptq, device,
                  ckpt=""):
    """(CompressedLayer, source weight as stored: what its fingerprint is taken of) of one linear of the open
    checkpoint f. A layer in one of ComfyUI's quantized layouts other than scaled FP8 is loaded by ComfyUI's
    quantized Linear and compressed from comfy-kitchen's dequantized weight (fp32)."""
    conf = quant.get(p + name)
    if comfy_layouts.is_comfy_layout(conf):
        stored = comfy_layouts.load(f, keys, p + name, conf, f.get_slice(f"{p}{name}.weight").get_shape(), device,
                                    ckpt, name)
        weight, scale = comfy_layouts.dequantize(stored, ckpt, name, conf), None
    else:
        stored = weight = f.get_tensor(f"{p}{name}.weight")
        scale = _scale(f, keys, p + name)
    bias = f.get_tensor(f"{p}{name}.bias") if f"{p}{name}.bias" in keys else None
    stats = None
    if name in stats_infos:
        _check_stats_weight(stats_path, stats_fp, ckpt, name, stored)
        stats = ActivationStats.load(stats_path, names=[name])[name]
    return compress_linear(weight, bias, stats, policy, fmt, damp, gptq, device, name, scale), stored


def _extra(policy: RankPolicy, fmt: str, ckpt: str) -> dict:
    return {"policy": policy.describe(), "residual_format": fmt, "source": ckpt.rsplit("/", 1)[-1]}


def compress_checkpoint(ckpt: str, out: str, stats_path: str | None = None, policy: RankPolicy | int = 64,
                        fmt: str = "fp8", which: str = "all", device: str | None = None, damp: float = 0.01,
                        gptq: bool = True, progress: bool = True, devices: list[str] | str | None = None,
                        timings: dict | None = None, layers: str = "ffn") -> dict:
    """Compress every selected linear of ckpt (streams which, kinds layers: ltx2.select) into out;
    returns {name: info}.

    devices (e.g. ["cuda:0", "cuda:1"]): one process per device, the layers divided by cost
    (compress_rank); the file has the same bytes as a run on one of them. timings, if given, is
    filled with each rank's layers and busy seconds."""
    from safetensors import safe_open
    from tqdm import tqdm

    policy = RankPolicy(rank=policy) if isinstance(policy, int) else policy
    check_damp(damp)
    if devices is not None:
        from .distributed import launch, parse_devices

        if device is not None:
            raise ValueError("give either device or devices, not both")
        devices = parse_devices(devices)
        if len(devices) > 1:
            res = launch(compress_rank, devices, ckpt, out, stats_path, policy, fmt, which, damp, gptq, progress, layers,
                         backend="gloo", timeout_s=WAIT_S)[0]
            if timings is not None:
                timings.update(ranks=res["ranks"], write_s=res["write_s"])
            return res["infos"]
        device = devices[0]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    on_gpu = torch.cuda.device(torch.device(device)) if torch.device(device).type == "cuda" else nullcontext()
    with on_gpu, safe_open(ckpt, framework="pt") as f:  # on_gpu: Triton launches on cuda:N, not the current GPU
        keys, p, names, quant, stats_infos, stats_fp = _open(f, ckpt, which, stats_path, policy=policy, layers=layers)
        infos = {}
        with compressed_file.Writer(out, ltx2.FAMILY, _extra(policy, fmt, ckpt), inputs=_inputs(ckpt, stats_path),
                                    expected_layers=len(names)) as w:
            for name in tqdm(names, desc="LiteFFN compress", unit="layer", disable=not progress):
                layer, weight = _compress_one(f, keys, p, name, quant, stats_path, stats_infos, stats_fp, policy, fmt,
                                              damp, gptq, device, ckpt)
                w.add(name, layer, weight)
                infos[name] = layer.info
                del weight, layer
    if timings is not None:
        timings.update(ranks=[{"device": str(device), "layers": len(names), "busy_s": time.perf_counter() - t0}],
                       write_s=0.0)
    return infos


# ------------------------------------------------------------------ over several processes
WAIT_S = 6 * 3600  # how long a rank that has finished its share waits for the others (gloo timeout)


def layer_cost(n: int, k: int) -> int:
    """Relative compression time of an n x k (out x in) linear: n k + k^2 / 4. Fitted to
    bench/compress_time_h100.md (video up 0.51 s, down 1.14 s, audio up 0.14 s, down 0.24 s on an
    H100; the GEMMs grow with n k, whitening and the GPTQ Hessian with k^2): with one scale for
    all four, each predicted within 11%."""
    return n * k + k * k // 4


def assign_by_cost(costs: dict[str, int], world: int) -> dict[str, int]:
    """{layer: rank}: largest first, each to the least loaded rank (LPT); ties go to the earlier
    layer and the lower rank, so every process computes the same assignment."""
    load = [0] * world
    owner = {}
    for name in sorted(costs, key=lambda n: -costs[n]):  # sorted() is stable: ties keep checkpoint order
        r = min(range(world), key=lambda j: (load[j], j))
        owner[name] = r
        load[r] += costs[name]
    return {n: owner[n] for n in costs}


def _part(parts: str, i: int) -> str:
    return os.path.join(parts, f"{i:06d}.pt")


def compress_rank(rank: int, world: int, device: str, ckpt: str, out: str, stats_path: str | None = None,
                  policy: RankPolicy | int = 64, fmt: str = "fp8", which: str = "all", damp: float = 0.01,
                  gptq: bool = True, progress: bool = True, layers: str = "ffn") -> dict:
    """One rank's share of a compression spread over processes (collective: every rank of the
    default process group calls it; launch() or torchrun starts them, gloo suffices).

    Each rank compresses the layers assign_by_cost gives it, in checkpoint order, and leaves each
    in a part file (torch.save, renamed into place when whole) in a folder beside out, so all
    ranks must see the same file system (one machine). Rank 0 alone writes out: it adds the parts
    in checkpoint order with the same Writer calls as the one-process path, as they arrive while it
    compresses its own share, the rest once all ranks are done. So out has the same bytes as a
    one-device run whenever the devices compute each layer bit for bit alike (GPUs of one model;
    on CPU, the same thread count). Returns, on rank 0, {"infos", "ranks": [{device, layers, cost,
    busy_s}], "write_s"}; {} elsewhere. An error on any rank is raised on every rank, naming the
    rank it happened on; out is then left as it was and the parts are removed."""
    import shutil
    import tempfile

    import torch.distributed as dist
    from safetensors import safe_open
    from tqdm import tqdm

    from .compress import CompressedLayer
    from .distributed import AgreedError, agree

    policy = RankPolicy(rank=policy) if isinstance(policy, int) else policy
    box = [None, None]
    if rank == 0:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            box[0] = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)),
                                      prefix=f".{os.path.basename(out)}.parts-")
        except OSError as e:
            box[1] = f"cannot write beside {out}: {e}"
    dist.broadcast_object_list(box, src=0)
    parts, err = box
    if err:
        raise AgreedError(err)
    f = writer = None
    mine, cost, busy, write_s, infos, nxt = [], 0, 0.0, 0.0, {}, 0
    try:
        try:
            if not os.path.isfile(ckpt):
                raise FileNotFoundError(f"no such file: {ckpt}")
            f = safe_open(ckpt, framework="pt")
            check_damp(damp)
            keys, p, names, quant, stats_infos, stats_fp = _open(f, ckpt, which, stats_path, warn=rank == 0,
                                                                 policy=policy, layers=layers)
            costs = {n: layer_cost(*f.get_slice(f"{p}{n}.weight").get_shape()) for n in names}
            owner = assign_by_cost(costs, world)
            mine = [n for n in names if owner[n] == rank]
            cost = sum(costs[n] for n in mine)
            if rank == 0:
                writer = compressed_file.Writer(out, ltx2.FAMILY, _extra(policy, fmt, ckpt),
                                                inputs=_inputs(ckpt, stats_path), expected_layers=len(names))
        except Exception as e:  # the same file on every rank: they fail alike
            err = _message(e, rank, device)
        agree(err)
        index = {n: i for i, n in enumerate(names)}
        bar = tqdm(total=len(names), desc=f"LiteFFN compress ({world} processes)", unit="layer",
                   disable=not (progress and rank == 0))

        def drain(wait: bool):
            """Rank 0: add every finished layer that is next in checkpoint order."""
            nonlocal nxt, write_s
            t = time.perf_counter()
            while nxt < len(names) and (wait or os.path.exists(_part(parts, nxt))):
                part = torch.load(_part(parts, nxt), weights_only=True)
                name = names[nxt]
                writer.add(name, CompressedLayer(part["tensors"], part["info"]), fingerprint_entry=part["fp"])
                infos[name] = part["info"]
                os.remove(_part(parts, nxt))
                nxt += 1
                bar.update(1)
            write_s += time.perf_counter() - t

        err = None
        try:
            for name in mine:
                t = time.perf_counter()
                layer, weight = _compress_one(f, keys, p, name, quant, stats_path, stats_infos, stats_fp, policy, fmt,
                                              damp, gptq, device, ckpt)
                part = {"tensors": layer.tensors, "info": layer.info,
                        "fp": compressed_file.fingerprint([(name, weight)])[name]}
                tmp = _part(parts, index[name]) + ".tmp"
                torch.save(part, tmp)
                os.replace(tmp, _part(parts, index[name]))
                del layer, weight, part
                busy += time.perf_counter() - t
                if rank == 0:
                    drain(wait=False)
        except Exception as e:
            err = _message(e, rank, device)
        agree(err)  # every rank has finished its share
        err = None
        if rank == 0:
            try:
                drain(wait=True)
                t = time.perf_counter()
                writer.close()
                writer = None
                write_s += time.perf_counter() - t
            except Exception as e:
                err = _message(e, rank, device)
        bar.close()
        agree(err)
        ranks = [None] * world
        dist.all_gather_object(ranks, {"device": device, "layers": len(mine), "cost": cost, "busy_s": busy})
    finally:
        if writer is not None:
            writer.abort()
        if rank == 0:
            shutil.rmtree(parts, ignore_errors=True)
    return {"infos": infos, "ranks": ranks, "write_s": write_s} if rank == 0 else {}


def _message(e: Exception, rank: int, device: str) -> str:
    """A worker's error as one line naming its rank; unexpected errors keep their traceback in the log."""
    if not isinstance(e, (ValueError, FileNotFoundError, MemoryError, KeyError, TypeError)):
        log.error("LiteFFN: rank %d (%s) failed", rank, device, exc_info=e)
        return f"{type(e).__name__}: {e} (rank {rank}, {device})"
    return f"{e} (rank {rank}, {device})"


def _scale_key(keys, base: str):
    for suffix in (".weight_scale", ".scale_weight"):  # ComfyUI's current and older FP8 names
        if base + suffix in keys:
            return base + suffix
    return None


def _scale(f, keys, base: str):
    key = _scale_key(keys, base)
    return f.get_tensor(key) if key is not None else None
