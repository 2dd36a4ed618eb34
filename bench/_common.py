"""Small timing helpers and cases shared by the benches (w4a8.py, w4a8_ncu.py, ffn_kernels.py): device time
of CUDA-graph replays, weights rotating over copies that exceed the L2 cache."""
from __future__ import annotations

import math

import torch

ROT_BYTES = 200 * 2**20  # weights of one timed set of calls: several times the 50 MB L2
CHECK_ROWS = 2048


def logger(out_dir: str, name: str):
    """say(line): print it and append it to out_dir/name as it goes (device runs can be cut off)."""
    import os

    log = open(os.path.join(out_dir, name), "a")

    def say(s: str) -> None:
        print(s, flush=True)
        log.write(s + "\n")
        log.flush()
    return say


def emit(lines: list, path: str | None) -> None:
    """A bench's markdown: written to path (if given) and printed."""
    text = "\n".join(lines) + "\n"
    if path:
        with open(path, "w") as f:
            f.write(text)
    print(text)


def us(fn) -> float:
    from triton.testing import do_bench_cudagraph  # imported late: importing triton early fixes its mode

    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3


def bf16_ffn(x, W1, b1, W2, b2):
    """The dense bf16 FFN (Linear -> GELU(tanh) -> Linear) the benchmarks time as the baseline."""
    import torch.nn.functional as Fn

    return Fn.linear(Fn.gelu(Fn.linear(x, W1, b1), approximate="tanh"), W2, b2)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class Rot:
    """Cycles through copies of some weights, one per call (also inside a captured graph)."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def copies_for(n, k) -> int:
    return max(1, math.ceil(ROT_BYTES / (n * k * 2)))


def act(m, k, seed=0):
    from liteffn.calibration.synthetic import random_activations  # after the caller registered liteffn

    return random_activations(m, k, seed, "cuda")


def ffn_case(dim: int, m: int):
    """A compressed FFN dim -> 4 dim -> dim at r=64 (FP8 residuals), a static hidden scale, an input of m
    tokens and bf16 weights of the same shapes for the dense baseline, on the GPU."""
    from liteffn.calibration.synthetic import random_fp8_layer

    hid = 4 * dim
    up = random_fp8_layer(hid, dim, 64, seed=1, device="cuda")
    dn = random_fp8_layer(dim, hid, 64, seed=2, device="cuda")
    hs = torch.tensor([2.0**-6], device="cuda")
    x = (torch.randn(m, dim, device="cuda") * 2).bfloat16()
    W1 = (torch.randn(hid, dim, device="cuda") / dim**0.5).bfloat16()
    W2 = (torch.randn(dim, hid, device="cuda") / hid**0.5).bfloat16()
    return up, dn, hs, x, W1, W2
