"""Past one process: torch.distributed plumbing, and calibration statistics reduced across ranks.

Processes. `launch(fn, devices, ...)` starts one process per device (torch.multiprocessing,
spawn), joins them into a process group and returns what fn returned on each rank; a worker's
error comes back as a WorkerError naming the rank, its device and the message. The rendezvous
is a file in a fresh temporary folder, not a TCP port: nothing else on the machine can take it
between choosing and binding. Under torchrun, `init_from_env()` joins the group torchrun set up.
On CPU devices a worker runs max(1, cores / processes) threads unless OMP_NUM_THREADS is set.
CPU results depend on the thread count (BLAS splits its sums differently), so compare CPU runs
at the same count; GPUs of one model run the same kernels in every process (bench/multi_gpu.py
compares the bytes).

Statistics. Each rank calibrates on its own prompts / seeds; `reduce_stats` sums them per layer
group, `reduce_and_save` then writes one file from rank 0 with ActivationStats.save. Only one
group's tensors are in flight at a time: plan_passes (stats.py) splits the layers so that a
group's flat buffer fits `budget_bytes` (default 2 GiB, one 16384-wide layer needs 1 GiB); that
buffer is the extra memory on a rank, on the GPU under NCCL, on the host under gloo.

Two methods, both summing fp32 as the file merge does:
- "ordered" (default): rank 0 receives each other rank's group in rank order and adds it with
  LayerStats.merge_, the function `liteffn merge-stats` uses. Bit-identical to saving one file
  per rank and running `liteffn merge-stats rank0 rank1 ... -o out` in rank order, for any
  number of ranks (tests/test_distributed.py compares the files byte for byte). Rank 0's link
  carries (ranks - 1) x the statistics.
- "all_reduce": torch.distributed.all_reduce (SUM for X^T X, MAX for absmax); every rank ends
  with the total. Bit-identical at 2 ranks (one fp32 addition per element, and it commutes;
  tested with gloo, NCCL in bench/multi_gpu.py); from 3 ranks the backend chooses the order of
  the additions, so it equals the merge within fp32 rounding (gloo: 1e-7 of the largest entry
  at 3 and 4 ranks), not bit for bit. Row counts and absmax are exact either way.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from .stats import ActivationStats, LayerStats, merge_held, plan_passes

DEFAULT_BUDGET = 2 << 30
METHODS = ("ordered", "all_reduce")


class WorkerError(ValueError):
    """A worker process failed; the message names its rank and device."""


class AgreedError(ValueError):
    """Raised on every rank by agree(): the message already names the rank it came from."""


# ------------------------------------------------------------------ processes
def parse_devices(spec: str | list[str]) -> list[str]:
    """"cuda:0,cuda:1" -> ["cuda:0", "cuda:1"], checked against this machine. cpu may repeat (tests)."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if not parts:
        raise ValueError("no devices given: list them like cuda:0,cuda:1")
    out = []
    for p in parts:
        try:
            d = torch.device(p)
        except RuntimeError:
            raise ValueError(f"{p!r} is not a device: list devices like cuda:0,cuda:1 (or cpu,cpu)") from None
        if d.type == "cuda":
            n = torch.cuda.device_count()
            if d.index is None:
                raise ValueError(f"{p!r}: give the GPU's index (cuda:0, cuda:1, ...)")
            if d.index >= n:
                raise ValueError(f"device {p} does not exist: this machine has {n} CUDA device(s)"
                                 + ("" if n else " (no CUDA: torch sees no GPU)"))
        elif d.type != "cpu":
            raise ValueError(f"device {p}: only cuda:N and cpu are supported")
        out.append(str(d))
    dup = sorted({d for d in out if d != "cpu" and out.count(d) > 1})
    if dup:
        raise ValueError(f"{dup[0]} is listed more than once: one process per GPU")
    return out


def backend_for(devices: list[str]) -> str:
    return "nccl" if all(d.startswith("cuda") for d in devices) else "gloo"


def rank_world(group=None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("no torch.distributed process group: start under torchrun or with launch()")
    return dist.get_rank(group), dist.get_world_size(group)


def init_from_env(backend: str | None = None, device: str | None = None,
                  timeout_s: float = 1800) -> tuple[int, int, str]:
    """Join the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...). Returns (rank,
    world, device): device if given ("cpu"), else cuda:LOCAL_RANK when there are GPUs, else cpu."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device != "cpu" else "gloo"), init_method="env://",
                                timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def launch(fn, devices: list[str], *args, backend: str | None = None, timeout_s: float = 1800) -> list:
    """Run fn(rank, world, device, *args) in one spawned process per device, inside a process
    group (backend: nccl when every device is a GPU, else gloo). Returns [fn's result per rank].
    fn and its arguments must be picklable (module-level functions)."""
    import torch.multiprocessing as mp

    devices = parse_devices(devices)
    world = len(devices)
    backend = backend or backend_for(devices)
    tmp = tempfile.mkdtemp(prefix="liteffn-dist-")
    try:
        try:
            mp.spawn(_entry, args=(fn, devices, backend, tmp, timeout_s, args), nprocs=world, join=True)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            first = getattr(e, "error_index", 0)
            for r in [first] + [r for r in range(world) if r != first]:
                p = os.path.join(tmp, f"error-{r}.json")
                if os.path.exists(p):
                    with open(p) as f:
                        err = json.load(f)
                    where = "" if err["agreed"] else f" (rank {r} of {world}, {devices[r]})"
                    raise WorkerError(err["message"] + where) from None
            raise WorkerError(f"a worker process died without a message: {str(e).splitlines()[0]}") from None
        return [torch.load(os.path.join(tmp, f"result-{r}.pt"), weights_only=False) for r in range(world)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _entry(rank, fn, devices, backend, tmp, timeout_s, args):
    device = devices[rank]
    world = len(devices)
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        elif "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // sum(d == "cpu" for d in devices)))
        dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
        try:
            result = fn(rank, world, device, *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, os.path.join(tmp, f"result-{rank}.pt"))
    except BaseException as e:
        expected = isinstance(e, (ValueError, FileNotFoundError, MemoryError, KeyError))
        msg = str(e) if expected else f"{type(e).__name__}: {e}"
        if not expected:  # a bug or a crash: its traceback matters, and only this process has it
            traceback.print_exc()
        with open(os.path.join(tmp, f"error-{rank}.json"), "w") as f:
            json.dump({"message": msg, "agreed": isinstance(e, AgreedError)}, f)
        raise  # a non-zero exit: spawn stops the other workers instead of leaving them in a collective


def agree(error: str | None, group=None) -> None:
    """Collective: every rank passes its error message (or None); if any is not None, every rank
    raises the lowest rank's as AgreedError, so no rank waits forever in a collective that a
    failed rank never reaches. Messages should name their rank."""
    _, world = rank_world(group)
    errors = [None] * world
    dist.all_gather_object(errors, error, group=group)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise AgreedError(first)


# ------------------------------------------------------------------ statistics
def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe(stats: ActivationStats) -> dict:
    return {"widths": {n: stats[n].width for n in stats.names()},
            "rows": {n: int(stats[n].rows) for n in stats.names()},
            "held": {n: stats[n].held_rows for n in stats.names()},
            "held_seen": {n: int(stats[n].held_seen) for n in stats.names()},
            "meta": json.loads(json.dumps(stats.meta))}  # as a file would hold it


def _check_same_layers(infos: list[dict]) -> None:
    ref = infos[0]["widths"]
    for r, info in enumerate(infos[1:], 1):
        w = info["widths"]
        if list(w) != list(ref):
            only0, only_r = [n for n in ref if n not in w], [n for n in w if n not in ref]
            what = (f"rank 0 has {only0[0]} and rank {r} does not" if only0 else
                    f"rank {r} has {only_r[0]} and rank 0 does not" if only_r else "the layers come in another order")
            raise AgreedError(f"statistics differ in their layers across ranks ({what}); every rank must calibrate "
                             "the same layers (same model, layers and blocks)")
        bad = [n for n in ref if w[n] != ref[n]]
        if bad:
            raise AgreedError(f"layer {bad[0]} is {ref[bad[0]]} wide on rank 0 and {w[bad[0]]} on rank {r}: "
                             "the ranks calibrated different models")
        fp0, fpr = infos[0]["meta"].get("fingerprint", {}), info["meta"].get("fingerprint", {})
        diff = [n for n in fp0 if n in fpr and fp0[n] != fpr[n]]
        if diff:
            raise AgreedError(f"rank {r} calibrated other weights than rank 0 (e.g. {diff[0]}): statistics of "
                             "different models cannot be added")


def plan_groups(widths: dict[str, int], budget_bytes: int = DEFAULT_BUDGET) -> list[list[str]]:
    """Layer groups whose flat buffer (X^T X and absmax of each) fits budget_bytes, in model order."""
    return plan_passes(widths, budget_bytes, chunk_rows=0)


@torch.no_grad()
def reduce_stats(stats: ActivationStats, budget_bytes: int = DEFAULT_BUDGET, method: str = "ordered",
                 group=None) -> ActivationStats | None:
    """Sum every rank's statistics (collective: call on every rank of group).

    ordered: rank 0's `stats` becomes the total (in place) and is returned; other ranks get None,
    their statistics untouched. all_reduce: every rank's `stats` becomes the total. Every rank must
    hold the same layers (names, widths, order); row counts may differ. See the module docstring
    for what is bit-identical to `liteffn merge-stats`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    rank, world = rank_world(group)
    infos = [None] * world
    dist.all_gather_object(infos, _describe(stats), group=group)
    _check_same_layers(infos)  # the same infos on every rank: all raise together
    widths = infos[0]["widths"]
    groups = plan_groups(widths, budget_bytes)
    dev = _comm_device(group)

    # metadata as ActivationStats.merge_ adds files' metadata, in rank order
    total = ActivationStats(meta=infos[0]["meta"])
    for info in infos[1:]:
        total.merge_(ActivationStats(meta=info["meta"]))

    peer = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    for names in groups:
        if method == "all_reduce":
            xtx = torch.cat([stats[n].xtx.to(dev, torch.float32).reshape(-1) for n in names])
            amax = torch.cat([stats[n].absmax.to(dev, torch.float32) for n in names])
            dist.all_reduce(xtx, dist.ReduceOp.SUM, group=group)
            dist.all_reduce(amax, dist.ReduceOp.MAX, group=group)
            i = j = 0
            for n in names:
                s, k = stats[n], widths[n]
                s.xtx.copy_(xtx[i:i + k * k].view(k, k))
                s.absmax.copy_(amax[j:j + k])
                s.rows = sum(info["rows"][n] for info in infos)
                i, j = i + k * k, j + k
            del xtx, amax
        elif rank == 0:
            buf = torch.empty(sum(k * k + k for k in (widths[n] for n in names)), device=dev)
            for r in range(1, world):
                dist.recv(buf, src=peer(r), group=group)
                i = 0
                for n in names:
                    k = widths[n]
                    other = LayerStats(buf[i:i + k * k].view(k, k), buf[i + k * k:i + k * k + k], infos[r]["rows"][n])
                    stats[n].merge_(other)  # what merge-stats does with rank r's file
                    i += k * k + k
            del buf
        else:
            buf = torch.cat([t for n in names for t in (stats[n].xtx.to(dev, torch.float32).reshape(-1),
                                                         stats[n].absmax.to(dev, torch.float32))])
            dist.send(buf, dst=peer(0), group=group)
            del buf
        _reduce_held(stats, names, infos, rank, world, dev, peer, group, keep=method == "all_reduce" or rank == 0)
    if method == "ordered" and rank != 0:
        return None
    stats.meta = total.meta
    return stats


def _reduce_held(stats, names, infos, rank, world, dev, peer, group, keep: bool) -> None:
    """Every rank's held-out rows of these layers, broadcast by each rank in turn as bytes, merged in rank
    order (stats.merge_held, as merge-stats merges the ranks' files); where keep, stats' layers take the result."""
    if not any(info["held"][n] for info in infos for n in names):
        return
    widths = infos[0]["widths"]
    merged = {n: (None, 0) for n in names}
    for r in range(world):
        size = sum(infos[r]["held"][n] * widths[n] * 2 for n in names)
        if size:
            if r == rank:
                buf = torch.cat([stats[n].held.to(dev).reshape(-1).view(torch.uint8) for n in names
                                 if infos[r]["held"][n]])
            else:
                buf = torch.empty(size, dtype=torch.uint8, device=dev)
            dist.broadcast(buf, src=peer(r), group=group)
        i = 0
        for n in names:
            h, k = infos[r]["held"][n], widths[n]
            rows = buf[i:i + h * k * 2].view(torch.bfloat16).view(h, k).cpu() if h else None
            i += h * k * 2
            merged[n] = merge_held(*merged[n], rows, infos[r]["held_seen"][n])
        buf = None
    if keep:
        for n in names:
            s = stats[n]
            s.held = None if merged[n][0] is None else merged[n][0].to(s.xtx.device)
            s.held_seen = merged[n][1]


def reduce_and_save(stats: ActivationStats, path: str, budget_bytes: int = DEFAULT_BUDGET, method: str = "ordered",
                    group=None) -> ActivationStats | None:
    """reduce_stats, then rank 0 writes path (ActivationStats.save: atomic). Collective; an error
    on rank 0 while saving is raised on every rank."""
    out = reduce_stats(stats, budget_bytes, method, group)
    rank, _ = rank_world(group)
    err = None
    if rank == 0:
        try:
            out.save(path)
        except (ValueError, OSError) as e:
            err = f"rank 0 could not write {path}: {e}"
    agree(err, group)
    return out
