import sys, os, traceback, torch
sys.path.insert(0, "bench"); import _package
from liteffn.kernels import fp8_ffn as K, fp8_ws as W
from liteffn.calibration.synthetic import random_fp8_layer, random_activations
print("gluon available", W.available(), "supports", W.supports(torch.device("cuda")), "enabled", W.enabled(torch.device("cuda"), 1000))
for (k, n, m, r) in [(4096, 16384, 1000, 64), (4096, 16384, 1000, 0), (4096, 16384, 300, 256), (16384, 4096, 3000, 0)]:
    t = random_fp8_layer(n, k, r, seed=1, device="cuda"); x = random_activations(m, k, 2, "cuda")
    xq, sx, u = K.act_quant_lowrank(x, t.get("B"))
    out, ptrs, sizes, flags = K.G.gemm_operands(xq, sx, n, u, t.get("A"), t["bias"], False, None, None, None, None, torch.bfloat16)
    try:
        W.launch(xq, t["q"], out, sx, t["q_scale"], ptrs, sizes[:5], flags, 512); torch.cuda.synchronize(); print(k, n, m, r, "ok")
    except Exception:
        print(k, n, m, r, "FAILED"); traceback.print_exc(limit=3)
