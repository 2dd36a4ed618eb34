"""Device check of kernels/fp8_ws.py (the warp-specialized Gluon GEMM) against the Triton scaled GEMM
of fp8_ffn, with every epilogue the FFN uses, and the times of its variants (2 or 3 math warpgroups).

    python bench/ws_check.py [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401
from _common import bf16_ffn, ffn_case, logger  # noqa: E402

from triton.testing import do_bench_cudagraph  # noqa: E402

from liteffn.calibration.synthetic import random_fp8_layer  # noqa: E402
from liteffn.kernels import fp8_ffn as K  # noqa: E402
from liteffn.kernels import fp8_ws as W  # noqa: E402
from liteffn.kernels import fused  # noqa: E402

from liteffn.kernels.gemm import gemm_operands as _gemm_operands  # noqa: E402


def us(fn):
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=25, return_mode="median") * 1e3


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def ws_gemm(xq, sx, q, qs, promote_k=128, **kw):
    out, ptrs, sizes, flags = _gemm_operands(xq, sx, q.shape[0], kw.get("u"), kw.get("A"), kw.get("bias"),
                                             kw.get("gelu", False), kw.get("h_scale"), kw.get("next_B"),
                                             kw.get("u_next"), None, kw.get("out_dtype", torch.bfloat16))
    W.launch(xq, q, out, sx, qs, ptrs, sizes[:5], {k: v for k, v in flags.items() if k != "INTERP"}, promote_k)
    return out


def _knobs():
    return W.MATH_WGS, W.HEAVY_MIN_K


def _set(v):
    W.MATH_WGS, W.HEAVY_MIN_K = v


DEFAULTS = _knobs()
# (math warpgroups per CTA, and for the epilogues with GELU or the next linear's low rank). Earlier runs
# compared prefetch, 1 or 2 tiles per item and "1 MMA in flight" (bench/ws_check_h200.log), and an
# epilogue warpgroup (bench/ws_check_epi_h200.log).
VARIANTS = [(2, 0), (3, 1 << 30), (3, 0)]
VNAME = {(2, 0): "2 math WGs", (3, 1 << 30): "3 math WGs (2 for GELU/next-rank epilogues)",
         (3, 0): "3 math WGs (GELU/next-rank epilogues: 1 tile per item)"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the FFN variants")
    ap.add_argument("--cases", nargs="*", help="only GEMM cases whose name starts with one of these (e.g. up r0)")
    ap.add_argument("--rows", nargs="*", type=int, default=[6144, 1000], help="GEMM rows (M) to check")
    ap.add_argument("--shapes", nargs="*", default=["4096x16384", "16384x4096", "2048x8192", "8192x2048"],
                    help="GEMM shapes KxN")
    ap.add_argument("--ffn", nargs="*", type=lambda v: tuple(int(x) for x in v.split("x")),
                    default=[(4096, 6144), (4096, 24576), (4096, 43400), (2048, 5600)], help="FFNs as DIMxM")
    a = ap.parse_args()
    say = logger(a.out, "ws_check.log")
    say(f"# {torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M')}")
    # the Triton kernel's many-row default tiles, promoting every 128 (tri) and every 512 (tri4)
    tri = dict(K.DEFAULT_CONFIGS[1], PROMOTE=1)
    tri4 = dict(tri, PROMOTE=4)
    for (k, n) in [tuple(int(v) for v in sh.split("x")) for sh in a.shapes]:
        for m in a.rows:
            g = torch.Generator(device="cuda").manual_seed(k + m)
            x = (torch.randn(m, k, generator=g, device="cuda") * (torch.rand(m, 1, generator=g, device="cuda") * 3 + .1)
                 ).bfloat16()
            t = random_fp8_layer(n, k, 64, seed=n + 1, device="cuda")
            xq, sx, u = K.act_quant_lowrank(x, t["B"])
            nb = random_fp8_layer(512, n, 64, seed=3, device="cuda")["B"]  # a next layer's B [64, n]
            hs = torch.tensor([2.0**-4], device="cuda")
            cases = {
                "r0": dict(),
                "r64+bias": dict(u=u, A=t["A"], bias=t["bias"]),
                "r80 (LoRA-like, masked chunks)": dict(u=torch.cat([u, u[:, :16]], 1).contiguous(),
                                                       A=torch.cat([t["A"], t["A"][:, :16]], 1).contiguous(),
                                                       bias=t["bias"]),
                "up: r64 bias gelu fp8-out next64": dict(u=u, A=t["A"], bias=t["bias"], gelu=True, h_scale=hs,
                                                         next_B=nb),
                "down: static sx, fp32 u": dict(u=u, A=t["A"], bias=t["bias"], static=True),
            }
            for name, kw in cases.items():
                if a.cases and not any(name.startswith(c) for c in a.cases):
                    continue
                try:
                    kw = dict(kw)
                    sxx = hs if kw.pop("static", False) else sx
                    if "next_B" in kw:
                        kw_t, kw_w = dict(kw, u_next=torch.zeros(m, 64, device="cuda")), dict(kw, u_next=torch.zeros(m, 64, device="cuda"))
                    else:
                        kw_t, kw_w = kw, kw
                    ref = K.scaled_gemm(xq, sxx, t["q"], t["q_scale"], config=tri, **kw_t)
                    out = ws_gemm(xq, sxx, t["q"], t["q_scale"], **kw_w)
                    torch.cuda.synchronize()
                    if "h_scale" in kw:
                        e = rel(out.float() * hs, ref.float() * hs)
                        codes = float((out.view(torch.uint8) == ref.view(torch.uint8)).float().mean())
                        e2 = rel(kw_w["u_next"], kw_t["u_next"])
                        msg = f"out rel {e:.1e} (codes equal {codes:.3f}), u_next rel {e2:.1e}"
                    else:
                        msg = f"out rel {rel(out, ref):.1e}, NaN {bool(out.float().isnan().any())}"
                    line = f"{k}->{n} M={m} {name:34s} {msg}"
                    if m >= 5000 and name != "r80 (LoRA-like, masked chunks)":
                        kwt = dict(kw_t)

                        def run(promote_k=512, kwt=kwt):
                            if "u_next" in kwt:
                                kwt["u_next"].zero_()
                            return ws_gemm(xq, sxx, t["q"], t["q_scale"], promote_k=promote_k, **kwt)
                        if "u_next" in kwt:
                            kwt["u_next"] = torch.zeros(m, 64, device="cuda")
                        t_t = us(lambda: K.scaled_gemm(xq, sxx, t["q"], t["q_scale"], config=tri4, **kwt))
                        line += f" | triton (every 512) {t_t:.1f} us; gluon ws every 512:"
                        base = None
                        for v in VARIANTS:
                            _set(v)
                            o = run().clone()
                            u_v = kwt["u_next"].clone() if "u_next" in kwt else None
                            tv = us(run)
                            if base is None:
                                base, u_base = o, u_v
                            same = bool((o.view(torch.uint8) == base.view(torch.uint8)).all())
                            du = f", u_next {rel(u_v, u_base):.0e}" if u_v is not None else ""
                            line += f" [{VNAME[v]}] {tv:.1f}{'' if same else ' (out differs)'}{du}"
                        _set(DEFAULTS)
                        line += f" | cuBLAS promoted {us(lambda: torch._scaled_mm(xq, t['q'].T, sx[:, None], t['q_scale'][None, :], out_dtype=torch.bfloat16, use_fast_accum=False)):.1f}"
                    say(line)
                except Exception as ex:  # noqa: BLE001
                    import traceback
                    say(f"{k}->{n} M={m} {name}: FAILED {type(ex).__name__}: {str(ex)[:300]}")
                    say(traceback.format_exc()[-1500:])
            del x, xq, u, t
            torch.cuda.empty_cache()
    # whole FFN with both GEMMs on the Gluon kernel vs bf16
    for dim, m in a.ffn:
        up, dn, hs, x, W1, W2 = ffn_case(dim, m)

        def ffn_ws():
            xq, sx, u = K.act_quant_lowrank(x, up["B"])
            u2 = torch.zeros(m, 64, device="cuda")
            hq = ws_gemm(xq, sx, up["q"], up["q_scale"], u=u, A=up["A"], bias=up["bias"], gelu=True, h_scale=hs,
                         next_B=dn["B"], u_next=u2)
            return ws_gemm(hq, hs, dn["q"], dn["q_scale"], u=u2, A=dn["A"], bias=dn["bias"])
        try:
            from liteffn.kernels.reference import compressed_ffn_ref
            ref = fused.ffn(x, up, dn, hs, config=tri)
            got = ffn_ws()
            err = rel(got, ref) if ref is not None else float("nan")
            xs = x[:2048]
            r32 = compressed_ffn_ref(xs, "fp8", up, "fp8", dn, hs, dtype=torch.float32)
            say(f"FFN {dim} M={m}: vs fp32 reference: triton {rel(ref[:2048], r32):.2e}, gluon ws {rel(got[:2048], r32):.2e}")
            t_bf = us(lambda: bf16_ffn(x, W1, up["bias"], W2, dn["bias"]))
            line = f"FFN {dim} M={m}: bf16 {t_bf:.1f} us; fused.ffn (dispatch as shipped):"
            times = {v: [] for v in VARIANTS}
            for _ in range(a.rounds):  # variants interleaved: the GPU's clock drifts over a run
                for v in VARIANTS:
                    _set(v)
                    times[v].append(us(lambda: fused.ffn(x, up, dn, hs)))
            for v in VARIANTS:
                tv = sorted(times[v])[len(times[v]) // 2]
                line += f" [{VNAME[v]}] {tv:.1f} ({t_bf / tv:.2f}x; {'/'.join(f'{t:.0f}' for t in times[v])})"
            _set(DEFAULTS)
            say(line + f"; rel diff ws (every 128) vs triton {err:.1e}")
        except Exception as ex:  # noqa: BLE001
            import traceback
            say(f"FFN {dim} M={m}: FAILED {type(ex).__name__}: {str(ex)[:300]}")
            say(traceback.format_exc()[-1500:])


if __name__ == "__main__":
    main()
