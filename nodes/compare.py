"""LiteFFN Compare: how far the compressed model's frames are from the baseline's."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..quality import metrics as Q
from ..quality.plot import render
from .errors import user_errors


class LiteFFNCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteFFNCompare",
            display_name="LiteFFN Compare",
            category="LiteFFN",
            is_output_node=True,  # shows its report in the graph
            description="PSNR and SSIM of each frame of `test` against `reference` (e.g. decoded frames of the "
                        "baseline and of a compressed model, same prompt and seed), with a plot.",
            inputs=[
                io.Image.Input("reference"),
                io.Image.Input("test"),
                io.String.Input("label", default="", tooltip="Shown on the plot, e.g. 'r=64 fp8'."),
            ],
            outputs=[
                io.Float.Output(display_name="psnr"),
                io.Float.Output(display_name="ssim"),
                io.String.Output(display_name="report"),
                io.Image.Output(display_name="plot"),
            ],
        )

    @classmethod
    @user_errors
    def execute(cls, reference, test, label="") -> io.NodeOutput:
        r = Q.compare(reference, test)
        lines = [f"{label + ': ' if label else ''}PSNR {Q.fmt_db(r['psnr_all'])}, SSIM {r['ssim_all']:.4f} "
                 f"over {len(r['psnr'])} frames", "frame  PSNR         SSIM"]
        lines += [f"{i:>5}  {Q.fmt_db(p):<12} {s:.4f}" for i, (p, s) in enumerate(zip(r["psnr"], r["ssim"]))]
        report = "\n".join(lines)
        return io.NodeOutput(r["psnr_all"], r["ssim_all"], report, render(reference, test, r, label),
                             ui=ui.PreviewText(report))
