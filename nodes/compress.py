"""LiteFFN Compress Model: compress the FFNs (and attention projections) of the MODEL in the graph;
patched clone + report."""
from __future__ import annotations

import contextlib
import logging
import os

from comfy_api.latest import io, ui

import comfy.model_management
import comfy.utils

from ..calibration import compressed_file, ltx2
from ..calibration.compress import check_changes_something, compress_linear, without_statistics
from ..calibration.lowrank import RankPolicy
from ..calibration.report import format_report
from ..calibration.safe_io import check_output
from ..calibration.stats import ActivationStats
from ..kernels.formats import FORMATS
from . import model as M
from .errors import user_errors
from .files import Stats, file_state, full_path, layers_input, output_path, selection_inputs

log = logging.getLogger("liteffn")
NO_FILE = "(none)"


class LiteFFNCompressModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from .files import STATS, files

        return io.Schema(
            node_id="LiteFFNCompressModel",
            display_name="LiteFFN Compress Model",
            category="LiteFFN",
            is_output_node=True,  # it saves a file: runs headless even with nothing connected
            description="Replaces the LTX-2 FFNs (with layers = ffn+attention also every attention projection) by a "
                        "calibrated low-rank branch (bf16) plus a quantized residual. "
                        "Returns a patched copy of the MODEL (the input MODEL stays as it was) and a per-layer report; "
                        "saves the compressed file for the Low-Rank FFN Loader when given a name.",
            inputs=[
                io.Model.Input("model"),
                Stats.Input("stats", optional=True,
                            tooltip="From LiteFFN Calibrate. Without statistics: plain SVD and round-to-nearest."),
                io.Combo.Input("stats_file", options=[NO_FILE] + files(STATS), default=NO_FILE,
                               tooltip="Or statistics saved by LiteFFN Calibrate in models/liteffn/."),
                io.Int.Input("rank", default=64, min=0, max=8192,
                             tooltip="Rank of the low-rank branch per linear (0: residual only); "
                                     "with energy > 0, the largest rank allowed."),
                io.Float.Input("energy", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="0: the fixed rank above. Else each linear's rank keeps this fraction "
                                       "of its (whitened) spectral energy, at most `rank`."),
                io.Combo.Input("residual", options=list(FORMATS), default="fp8",
                               tooltip="fp8: E4M3 per channel (fused kernels on Hopper/Ada); nvfp4/mxfp4: "
                                       "4-bit blocks, half of fp8's memory (W4A8 kernels on Hopper/Ada, "
                                       "0.85-1.09x fp8's speed on the H100); bf16: no quantization."),
                *selection_inputs(),
                io.String.Input("save_name", default="",
                                tooltip="Saved as models/liteffn/<save_name>.safetensors; empty: not saved."),
                layers_input(),
                # optional: API prompts written before this input existed still validate
                io.Float.Input("match_fp8", default=0.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="0: off. Else each linear's rank is the smallest, in steps of 16 from `rank` "
                                       "up to twice it, whose output error on held-out rows is at most this many "
                                       "times an fp8 residual's at `rank` (e.g. 1.8 with nvfp4: rank where 4 bits "
                                       "lose most). Needs statistics; compressing takes 3-5x as long."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="report")],
        )

    @classmethod
    def fingerprint_inputs(cls, stats_file=NO_FILE, **_):
        # a statistics file rewritten under the same name (Calibrate run again) is read again
        return file_state(stats_file) if stats_file and stats_file != NO_FILE else NO_FILE

    @classmethod
    @user_errors
    def execute(cls, model, rank, energy, residual, streams, blocks, save_name, stats_file=NO_FILE,
                stats=None, layers="ffn", match_fp8=0.0) -> io.NodeOutput:
        units = M.unit_names(model, streams, blocks, layers)
        names = ltx2.linears(units)
        if energy > 0 and match_fp8 > 0:
            raise ValueError("energy and match_fp8 both choose each linear's rank: set one of them to 0")
        policy = (RankPolicy(rank=None, energy=energy, max_rank=rank) if energy > 0 else
                  RankPolicy.matching(rank, match_fp8) if match_fp8 > 0 else
                  RankPolicy(rank=rank))
        if policy.match is not None and stats is None and stats_file == NO_FILE:
            raise ValueError("match_fp8 measures each linear's error on held-out rows of its statistics: connect "
                             "LiteFFN Calibrate's stats (or choose a stats_file), or set match_fp8 to 0")
        path = output_path(save_name) if save_name.strip() else None
        check_changes_something(policy, residual)  # before any work
        writer_args = _checked_output(model, names, path, stats_file, policy, residual)
        stats_of, notes = _stats_source(stats, stats_file, model, names, without_statistics(policy, residual))
        notes += M.lora_notes(model, names)
        device = comfy.model_management.get_torch_device()
        pbar = comfy.utils.ProgressBar(len(names))
        extra = {"policy": policy.describe(), "residual_format": residual, "selection": {"layers": layers, "streams": streams, "blocks": blocks}}
        done, dense = {}, 0
        writer = compressed_file.Writer(path, ltx2.FAMILY, extra, **writer_args) if path else contextlib.nullcontext()
        with writer as w:
            for i, name in enumerate(names):
                comfy.model_management.throw_exception_if_processing_interrupted()
                weight, scale, bias = M.source(model, name)
                layer = compress_linear(weight, bias, stats_of(name), policy, residual, device=device, name=name,
                                        weight_scale=scale)
                if w is not None:  # fingerprinted as ComfyUI holds it (a quantized weight by its codes)
                    w.add(name, layer, M.stored(model, name))
                done[name] = layer
                dense += weight.numel() * 2
                pbar.update_absolute(i + 1)
        no_held = sum(1 for c in done.values() if c.info.get("calibrated") and "heldout_err" not in c.info)
        if no_held:
            notes.append(f"{no_held} linears' statistics hold no held-out rows (made before LiteFFN kept them): their "
                         "error is the weights' alone; run LiteFFN Calibrate again to see the output error on rows "
                         "the statistics never saw")
        patched = M.patched(model, {u: M.build_unit(u, done) for u in units})
        header = f"LiteFFN {policy.describe()} {residual}" + (f" -> {os.path.basename(path)}" if path else "")
        report = format_report({n: c.info for n, c in done.items()}, dense, header, notes)
        log.info("LiteFFN Compress Model:\n%s", "\n".join(report.splitlines()[:4]))
        return io.NodeOutput(patched, report, ui=ui.PreviewText(report))


def _checked_output(model, names, path, stats_file, policy, residual) -> dict:
    """save_name's file checked by the core (calibration.safe_io) before any work: not the
    statistics file, not an existing file of another kind, room on its disk. -> Writer's arguments."""
    if path is None:
        return {}
    lins = [M.linear_of(model, n) for n in names]
    shapes = [(int(m.out_features), int(m.in_features)) for m in lins]
    args = {"inputs": (full_path(stats_file),) if stats_file != NO_FILE else (),
            "expected_bytes": compressed_file.estimate_bytes(shapes, policy.fixed_rank, residual,
                                                             any(getattr(m, "bias", None) is not None for m in lins)),
            "expected_layers": len(names), "option": "save_name"}
    check_output(path, args["inputs"], expect_format=compressed_file.FILE_FORMAT,
                 expected_bytes=args["expected_bytes"], option="save_name")
    return args


def _stats_source(stats, stats_file, model, names, none_note: str):
    """-> (name -> LayerStats or None, notes). A saved file is read one layer at a time. none_note: the note
    without statistics."""
    notes = []
    if stats is not None and stats_file != NO_FILE:
        raise ValueError("connect statistics or choose a stats_file, not both")
    if stats_file != NO_FILE:
        path = full_path(stats_file)
        meta = ActivationStats.load_meta(path)
        meta_names, fp = set(meta["layers"]), meta.get("fingerprint")
        have = lambda n: n in meta_names  # noqa: E731
        get = lambda n: ActivationStats.load(path, names=[n])[n]  # noqa: E731
    elif stats is not None:
        fp = stats.meta.get("fingerprint")
        have = lambda n: n in stats  # noqa: E731
        get = lambda n: stats[n]  # noqa: E731
    else:
        notes.append(f"no statistics: {none_note} (connect LiteFFN Calibrate for better quality)")
        return (lambda n: None), notes
    missing = [n for n in names if not have(n)]
    if len(missing) == len(names):
        raise ValueError("the statistics hold none of the selected linears: were they collected on this model, "
                         "with these layers, streams and blocks?")
    if missing:
        notes.append(f"{len(missing)} linears have no statistics (e.g. {missing[0]}): plain SVD for those")
    if fp and _differs(fp, M.model_fingerprint(model, {n: fp[n] for n in names if n in fp})):
        notes.append("the statistics were collected on a model with other weights (another checkpoint or "
                     "precision); used anyway")
    for n in notes:
        log.warning("LiteFFN: %s", n)
    return (lambda n: get(n) if have(n) else None), notes


def _differs(saved: dict, model_fp: dict) -> bool:
    try:
        compressed_file.compare_fingerprints(saved, model_fp, common_only=True)
        return False
    except compressed_file.MismatchError:
        return True
