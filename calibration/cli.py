"""Command line: `liteffn demo | compress | merge-stats` (also `python -m liteffn.calibration.cli`).

`compress --devices cuda:0,cuda:1` spreads the layers over one process per device; under
torchrun (`torchrun --nproc-per-node N -m liteffn.calibration.cli compress ...`) each rank
takes cuda:LOCAL_RANK. Either way one file, the same bytes as one device.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _policy(a):
    from .lowrank import RankPolicy

    if a.energy is not None:
        return RankPolicy(rank=None, energy=a.energy, max_rank=a.max_rank)
    return RankPolicy(rank=a.rank)


def main(argv=None) -> int:
    from ..kernels.formats import FORMATS

    ap = argparse.ArgumentParser(prog="liteffn", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="calibrate + compress a small synthetic LTX-2-shaped stack, print errors and bytes")
    d.add_argument("--blocks", type=int, default=2)
    d.add_argument("--video-dim", type=int, default=256)
    d.add_argument("--audio-dim", type=int, default=128)
    d.add_argument("--ranks", type=int, nargs="+", default=[0, 16, 64])
    d.add_argument("--formats", nargs="+", default=["fp8", "nvfp4", "mxfp4"])

    c = sub.add_parser("compress", help="compress an LTX-2 checkpoint's FFNs into a LiteFFN file")
    c.add_argument("checkpoint", help="LTX-2 .safetensors (ComfyUI key layout; bf16/fp16/fp32/FP8)")
    c.add_argument("-o", "--out", required=True, help="output .safetensors")
    c.add_argument("--stats", help="statistics file from LiteFFN Calibrate (without: plain SVD)")
    c.add_argument("--rank", type=int, default=64, help="fixed rank per layer (default 64; 0 = no low-rank branch)")
    c.add_argument("--energy", type=float, help="choose each layer's rank to keep this fraction of spectral energy")
    c.add_argument("--max-rank", type=int, default=512, help="cap for --energy")
    c.add_argument("--format", default="fp8", choices=list(FORMATS))
    c.add_argument("--layers", default="all", choices=["all", "video", "audio"])
    c.add_argument("--device", help="cuda / cpu (default: cuda if available)")
    c.add_argument("--devices", help="spread the layers over these devices, one process each, e.g. cuda:0,cuda:1 "
                                     "(the same file as one device writes)")
    c.add_argument("--damp", type=float, default=0.01)
    c.add_argument("--no-gptq", action="store_true", help="round the residual to nearest even with statistics")

    m = sub.add_parser("merge-stats", help="add statistics files of the same model")
    m.add_argument("inputs", nargs="+")
    m.add_argument("-o", "--out", required=True)

    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if a.cmd == "demo":
            from .demo import run

            run(a.blocks, a.video_dim, a.audio_dim, tuple(a.ranks), tuple(a.formats))
        elif a.cmd == "compress":
            if a.device and a.devices:
                raise ValueError("give --device or --devices, not both")
            from .compressed_file import check_checkpoint_output

            check_checkpoint_output(a.out, a.checkpoint, a.stats, a.layers, 0 if a.energy is not None else a.rank,
                                    a.format)  # before any work: not an input, room on the disk
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                return _compress_torchrun(a)
            from .checkpoint import compress_checkpoint

            timings = {}
            infos = compress_checkpoint(a.checkpoint, a.out, a.stats, _policy(a), a.format, a.layers, a.device,
                                        a.damp, not a.no_gptq, devices=a.devices, timings=timings)
            _summary(a.out, infos, timings)
        else:
            from .stats import ActivationStats, check_stats_output

            check_stats_output(a.out, {n: i["width"] for p in a.inputs for n, i in  # before any work
                                       ActivationStats.load_meta(p)["layers"].items()}, a.inputs, "-o")
            total = ActivationStats.load(a.inputs[0])
            for p in a.inputs[1:]:
                total.merge_(ActivationStats.load(p))
            total.save(a.out, inputs=a.inputs, option="-o")
            print(f"wrote {a.out}: {len(total.names())} layers")
    except (ValueError, FileNotFoundError, MemoryError, KeyError) as e:
        print(f"liteffn: error: {e}", file=sys.stderr)
        return 2
    return 0


def _summary(out: str, infos: dict, timings: dict) -> None:
    errs = [i["rel_err"] for i in infos.values()]
    print(f"wrote {out}: {len(infos)} layers, mean relative error {100 * sum(errs) / len(errs):.2f}%, "
          f"{sum(i['bytes'] for i in infos.values()) / 2**30:.2f} GiB")
    ranks = timings.get("ranks", [])
    if len(ranks) > 1:
        print("layers per process: " + ", ".join(f"{r['device']} {r['layers']} ({r['busy_s']:.1f} s)" for r in ranks))


def _compress_torchrun(a) -> int:
    """One rank of `torchrun ... compress`: a gloo group for coordination, cuda:LOCAL_RANK (or --device cpu)."""
    import torch.distributed as dist

    from .checkpoint import WAIT_S, compress_rank
    from .distributed import AgreedError, init_from_env

    if a.devices:
        raise ValueError("--devices starts its own processes; under torchrun leave it out (each rank takes "
                         "cuda:LOCAL_RANK)")
    if a.device not in (None, "cpu"):
        raise ValueError("under torchrun each rank takes cuda:LOCAL_RANK; --device may only be cpu")
    rank, world, device = init_from_env("gloo", device=a.device, timeout_s=WAIT_S)
    try:
        res = compress_rank(rank, world, device, a.checkpoint, a.out, a.stats, _policy(a), a.format, a.layers,
                            a.damp, not a.no_gptq)
    except AgreedError:  # raised on every rank: rank 0 says it
        if rank:
            return 2
        raise
    finally:
        dist.destroy_process_group()
    if rank == 0:
        _summary(a.out, res["infos"], res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
