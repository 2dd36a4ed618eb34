"""The input pass at many tokens: act_quant_lowrank's one launch (each program takes `rows` rows through
all of K twice, the second pass from L2) against its two launches, device time, H200.

    python bench/act_quant_single.py [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401
from _common import ffn_case, logger, rel, us  # noqa: E402

from liteffn.kernels import fp8_ffn as K  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    say = logger(a.out, "act_quant_single.log")
    say(f"# {torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M')}, r=64, us (device time)")
    for dim, m in ((4096, 6144), (4096, 24576), (2048, 5600)):
        up, dn, hs, x, W1, W2 = ffn_case(dim, m)
        mb = (x.numel() * 2 + x.numel()) / 2**20
        q0, s0, u0 = K.act_quant_lowrank(x, up["B"], single=False)
        line = f"{dim} M={m} ({mb:.0f} MB read once + written): two launches {us(lambda: K.act_quant_lowrank(x, up['B'], single=False)):.1f}"
        for rows in (1, 2, 4, 8, 16):
            for w in (4, 8):
                try:
                    q, s, u = K.act_quant_lowrank(x, up["B"], single=True, rows=rows, warps=w)
                    ok = torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)
                    t = us(lambda: K.act_quant_lowrank(x, up["B"], single=True, rows=rows, warps=w))
                    line += f"; one launch {rows} rows {w} warps {t:.1f}{'' if ok else ' (codes differ)'} u {rel(u, u0):.0e}"
                except Exception as ex:  # noqa: BLE001
                    line += f"; {rows} rows {w} warps: {type(ex).__name__}"
        say(line)


if __name__ == "__main__":
    main()
