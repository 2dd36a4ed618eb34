"""Attention projections that read one input, at LTX-2 shapes: each CompressedLinear with its own input
pass against the linked ones (kernels/modules.SharedInput: one input pass, a GEMM each), and bf16.

    python bench/shared_input.py [--out bench/shared_input_h200.md] [--json bench/results/shared_input_h200.json]
    python bench/shared_input.py --dry-run      # tiny shapes on the CPU (interpreter): checks the script

Cases (K -> N per member x members, M tokens): the video self-attention's q, k, v (4096 -> 4096 x 3) at
6144 and 24576 tokens; the video->audio cross-attention's k, v (4096 -> 2048 x 2, video tokens) at 6144;
attn2's k, v on the 1024 text tokens (4096 -> 4096 x 2); the audio self-attention's q, k, v (2048 -> 2048
x 3) at 126 tokens. FP8 residuals, rank 64, weights rotating over copies that exceed the L2 cache. Times
in microseconds for all members of one call: device (CUDA-graph replays, no host cost) and python (as
ComfyUI calls them, back to back, host cost included; the linked and unlinked modules interleaved in
rounds, since the host's speed drifts between minutes). With $OUT set, outputs are also written there.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as Fn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CASES = [("video q/k/v", 4096, 4096, 3, (6144, 24576)), ("video->audio k/v", 4096, 2048, 2, (6144,)),
         ("text k/v", 4096, 4096, 2, (1024,)), ("audio q/k/v", 2048, 2048, 3, (126,))]
DRY = [("q/k/v", 128, 64, 3, (24,)), ("k/v", 128, 64, 2, (16,))]
RANK = 64


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "shared_input_h200.md"))
    ap.add_argument("--json", default=os.path.join(HERE, "results", "shared_input_h200.json"))
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("LITEFFN_AUTOTUNE", "0")
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        a.out = a.out if "--out" in (argv or sys.argv) else os.path.join("/tmp", "shared_input_dryrun.md")
        a.json = a.json if "--json" in (argv or sys.argv) else os.path.join("/tmp", "shared_input_dryrun.json")
    import _package  # noqa: F401
    import triton
    from _common import Rot, rel
    from ffn_kernels import Timer
    from liteffn.calibration.synthetic import random_activations, random_fp8_layer
    from liteffn.kernels import dispatch
    from liteffn.kernels import modules as M

    gpu = torch.cuda.is_available() and not a.dry_run
    dev = "cuda" if gpu else "cpu"
    dispatch.set_mode("triton")
    timer = Timer(argparse.Namespace(rep=20, target_ms=15.0, repeats=5, max_calls=200), gpu)
    head = dict(device=torch.cuda.get_device_name() if gpu else "CPU (dry run: times mean nothing)",
                date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), torch=torch.__version__,
                triton=triton.__version__, rank=RANK, command="python " + " ".join(sys.argv))
    rows = []
    outs = [a.out, a.json] + ([os.path.join(os.environ["OUT"], os.path.basename(p)) for p in (a.out, a.json)]
                              if os.environ.get("OUT") else [])

    def write():
        lines = [f"# Linked input passes (SharedInput) at LTX-2 shapes: {head['device']}, {head['date']}", "",
                 f"torch {head['torch']}, triton {head['triton']}; FP8 residuals, rank {RANK}. Command: "
                 f"`{head['command']}`.", "", __doc__.split("\n\n")[2].strip(), "",
                 "| case | M | mode | bf16 | each alone | linked | linked vs alone | linked vs bf16 | linked vs alone, "
                 "output rel. diff |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            for mode in ("device", "python"):
                t = r[mode]
                lines.append(f"| {r['case']} ({r['k']}->{r['n']} x {r['members']}) | {r['M']} | {mode} | "
                             f"{t['bf16']:.1f} | {t['alone']:.1f} | {t['linked']:.1f} | "
                             f"{t['alone'] / t['linked']:.2f}x | {t['bf16'] / t['linked']:.2f}x | "
                             f"{r['diff']:.1e} |")
        text = "\n".join(lines) + "\n"
        for p in outs:
            os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
            with open(p + ".tmp", "w") as f:
                f.write(text if p.endswith(".md") else json.dumps(dict(header=head, rows=rows), indent=1))
            os.replace(p + ".tmp", p)
        print(lines[-1], flush=True)

    for case, k, n, g, ms in (DRY if a.dry_run else CASES):
        copies = 2 if a.dry_run else max(2, -(-200 * 2**20 // (g * n * k)))
        layers = [[random_fp8_layer(n, k, RANK, seed=100 * c + i, device=dev) for i in range(g)] for c in range(copies)]
        dense = Rot([[((t["q"].float() * t["q_scale"][:, None] + t["A"].float() @ t["B"].float()).bfloat16(),
                       t["bias"]) for t in ls] for ls in layers])
        alone = Rot([[M.CompressedLinear("fp8", k, n, dict(t)) for t in ls] for ls in layers])
        linked = Rot([[M.CompressedLinear("fp8", k, n, dict(t)) for t in ls] for ls in layers])
        for ms_ in linked.items:
            M.SharedInput(ms_)
        for m in ms:
            x = random_activations(m, k, seed=m, device=dev)[None]
            ya = [mod(x) for mod in alone.items[0]]
            yl = [mod(x) for mod in linked.items[0]]
            diff = max(rel(p, q) for p, q in zip(yl, ya))
            fb = lambda: [Fn.linear(x, w, b) for w, b in dense()]  # noqa: E731
            fa = lambda: [mod(x) for mod in alone()]  # noqa: E731
            fl = lambda: [mod(x) for mod in linked()]  # noqa: E731
            r = dict(case=case, k=k, n=n, members=g, M=m, diff=diff,
                     device=dict(bf16=timer.device(fb), alone=timer.device(fa), linked=timer.device(fl)))
            ta, tl = timer.paired(fa, fl)
            r["python"] = dict(bf16=timer.python(fb), alone=ta, linked=tl)
            rows.append(r)
            write()
        del layers, dense, alone, linked
        if gpu:
            torch.cuda.empty_cache()
    print(f"dispatch counts: {dict(dispatch.counts)}")


if __name__ == "__main__":
    main()
