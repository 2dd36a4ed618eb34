"""Command line: `liteffn demo | compress | merge-stats` (also `python -m liteffn.calibration.cli`)."""
from __future__ import annotations

import argparse
import logging
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
            from .checkpoint import compress_checkpoint

            infos = compress_checkpoint(a.checkpoint, a.out, a.stats, _policy(a), a.format, a.layers, a.device,
                                        a.damp, not a.no_gptq)
            errs = [i["rel_err"] for i in infos.values()]
            print(f"wrote {a.out}: {len(infos)} layers, mean relative error {100 * sum(errs) / len(errs):.2f}%, "
                  f"{sum(i['bytes'] for i in infos.values()) / 2**30:.2f} GiB")
        else:
            from .stats import ActivationStats

            total = ActivationStats.load(a.inputs[0])
            for p in a.inputs[1:]:
                total.merge_(ActivationStats.load(p))
            total.save(a.out)
            print(f"wrote {a.out}: {len(total.names())} layers")
    except (ValueError, FileNotFoundError, MemoryError, KeyError) as e:
        print(f"liteffn: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
