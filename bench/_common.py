"""Small timing helpers shared by the benches (w4a8.py, w4a8_ncu.py, ffn_kernels.py): device time
of CUDA-graph replays, weights rotating over copies that exceed the L2 cache."""
from __future__ import annotations

import math

import torch

ROT_BYTES = 200 * 2**20  # weights of one timed set of calls: several times the 50 MB L2
CHECK_ROWS = 2048


def us(fn) -> float:
    from triton.testing import do_bench_cudagraph  # imported late: importing triton early fixes its mode

    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3


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
