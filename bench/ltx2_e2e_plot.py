"""The README's picture of bench/ltx2_e2e.py's runs: step time split into FFN and the rest, and peak
allocated VRAM, dense against LiteFFN, as bars (Pillow, which ComfyUI ships).

    python bench/ltx2_e2e_plot.py [--out docs/ltx2_e2e_h100.png]  # reads bench/ltx2_e2e_*h100.json
"""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
W, ROW, LABEL, PAD = 900, 22, 190, 10
COLORS = {"ffn": (214, 96, 77), "rest": (120, 144, 180), "peak": (90, 160, 110)}


def bars():
    """[(section title, [(label, ffn ms or None, step ms, peak GiB or None)])] from the committed runs."""
    runs = {f: json.load(open(os.path.join(HERE, f"ltx2_e2e_{f}h100.json"))) for f in ("", "mxfp4_", "compile_")}
    fp8, mx, comp = runs[""], runs["mxfp4_"], runs["compile_"]
    out = []
    for i, row in enumerate(fp8["rows"]):
        n = row["video_tokens"]
        items = [("dense bf16", row["base"]["ffn_ms"], row["base"]["step_ms"], row["base"]["peak_gib"]),
                 ("LiteFFN FP8 r=64", row["comp"]["ffn_ms"], row["comp"]["step_ms"], row["comp"]["peak_gib"])]
        m = next(r for r in mx["rows"] if r["video_tokens"] == n)
        items.append(("LiteFFN MXFP4 r=64", m["comp"]["ffn_ms"], m["comp"]["step_ms"], m["comp"]["peak_gib"]))
        if n == comp["rows"][0]["video_tokens"]:
            c = comp["compiled"]
            items += [("dense, compiled", None, c["dense"]["step_ms"], None),
                      ("LiteFFN FP8, compiled", None, c["LiteFFN"]["step_ms"], None)]
        out.append((f"{n} video + {row['audio_tokens']} audio tokens: step ms (FFN part red) | peak allocated GiB", items))
    return out, fp8["meta"]


def draw(path):
    from PIL import Image, ImageDraw

    sections, meta = bars()
    h = PAD * 3 + ROW + sum(ROW * (len(items) + 1) + PAD for _, items in sections)
    img = Image.new("RGB", (W, h), "white")
    d = ImageDraw.Draw(img)
    d.text((PAD, PAD), f"LTX-2 19B, one transformer step, {meta['device']}, {meta['date']} (random weights)", fill="black")
    y = PAD * 2 + ROW
    time_w, peak_x = 430, LABEL + 430 + 90
    for title, items in sections:
        d.text((PAD, y), title, fill="black")
        y += ROW
        top = max(s for _, _, s, _ in items)
        for label, ffn, step, peak in items:
            d.text((PAD, y + 4), label, fill="black")
            x1 = LABEL + time_w * step / top
            d.rectangle([LABEL, y + 2, x1, y + ROW - 4], fill=COLORS["rest"])
            if ffn is not None:
                d.rectangle([LABEL, y + 2, LABEL + time_w * ffn / top, y + ROW - 4], fill=COLORS["ffn"])
            d.text((x1 + 4, y + 4), f"{step:.0f}", fill="black")
            if peak is not None:
                d.rectangle([peak_x, y + 2, peak_x + 4 * peak, y + ROW - 4], fill=COLORS["peak"])
                d.text((peak_x + 4 * peak + 4, y + 4), f"{peak:.1f}", fill="black")
            y += ROW
        y += PAD
    img.save(path)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "ltx2_e2e_h100.png"))
    print(draw(ap.parse_args().out))
