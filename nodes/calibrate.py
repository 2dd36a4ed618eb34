"""LiteFFN Calibrate: sample with ComfyUI's own sampler while recording the input statistics of the
linears LiteFFN compresses."""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io, ui

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils

from ..calibration import ltx2
from ..calibration.compressed_file import compare_fingerprints
from ..calibration.stats import (ActivationStats, FileStats, StatsCollector, check_mergeable, check_stats_output,
                                 HOLDOUT_ROWS, merged_meta, plan_passes, save_stream, stats_file_bytes,
                                 stream_passes)
from . import model as M
from .errors import user_errors
from .files import FOLDER, Stats, layers_input, output_path, selection_inputs

log = logging.getLogger("liteffn")
WRAPPER_KEY = "liteffn_calibrate"


class LiteFFNCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteFFNCalibrate",
            display_name="LiteFFN Calibrate",
            category="LiteFFN",
            is_output_node=True,  # it saves a file: runs headless even with nothing connected
            description="Samples the LTX-2 model on your prompts with ComfyUI's sampler and records the input "
                        "statistics of every selected linear (R = E[x x^T], ranges) for LiteFFN Compress Model. "
                        "Saved runs with the same filename add up.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=8, min=1, max=10000),
                io.Float.Input("cfg", default=3.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple"),
                io.Int.Input("seeds", default=1, min=1, max=1000,
                             tooltip="Runs with seed, seed+1, ...: more activations for the same prompt."),
                *selection_inputs(),
                io.Float.Input("memory_budget_gb", default=8.0, min=0.1, max=1024.0, step=0.5,
                               tooltip="Most memory the statistics may hold at once. LTX-2 19B needs ~70 GiB "
                                       "for all FFNs and ~56 GiB more with the attention projections (held-out "
                                       "rows included); under a "
                                       "smaller budget the sampling runs once per group "
                                       "of layers that fits (same seeds, same activations). With a filename "
                                       "each group is saved as its pass ends, so host memory stays within it "
                                       "too; without one the output holds all groups."),
                io.Combo.Input("storage", options=["gpu", "cpu"], default="gpu",
                               tooltip="Where the statistics accumulate: cpu saves VRAM, costs a copy per step."),
                io.String.Input("filename", default="ltx2_stats",
                                tooltip=f"Saved as models/{FOLDER}/<filename>.safetensors; empty: not saved."),
                io.Boolean.Input("append", default=True,
                                 tooltip="Add to an existing file of that name (prompts accumulate over runs); "
                                         "off: replace it."),
                Stats.Input("stats", optional=True,
                            tooltip="Statistics of an earlier Calibrate node to add these to: chain one node per "
                                    "prompt and the last one holds them all."),
                layers_input(),
            ],
            outputs=[Stats.Output(display_name="stats"), io.String.Output(display_name="summary")],
        )

    @classmethod
    @user_errors
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, seeds,
                streams, blocks, memory_budget_gb, storage, filename, append, stats=None,
                layers="ffn") -> io.NodeOutput:
        dm = M.diffusion_model(model)
        names = ltx2.linears(M.unit_names(model, streams, blocks, layers))
        widths = {n: int(M.linear_of(model, n).in_features) for n in names}
        budget = int(memory_budget_gb * 2**30)
        groups = plan_passes(widths, budget, held_rows=HOLDOUT_ROWS)
        path = output_path(filename) if filename.strip() else None
        if path:  # before sampling: not a directory or another kind of file, room on its disk
            check_stats_output(path, widths, option="filename")
        fp = M.model_fingerprint(model, names)
        appending = bool(path and append and os.path.exists(path))
        if appending:
            saved = ActivationStats.load_meta(path)
            _check_same_model(saved, fp, path, "(statistics of another model); choose another filename, or turn "
                              "append off to replace the file")  # fail before sampling, not after
        earlier = stats
        meta = {"model_family": ltx2.FAMILY, "fingerprint": fp, "runs": 1}
        note = ""
        if earlier is not None:
            _check_same_model(earlier.meta, fp, "the stats input", "(The stats input holds statistics of another "
                              "model: connect this model's, or leave the input empty.)")
            if isinstance(earlier, FileStats):
                earlier.check_unchanged()  # its file replaced since: refused now, not after sampling
            check_mergeable(meta, widths, earlier)
            if appending and isinstance(earlier, FileStats) and earlier.is_file(path):
                earlier, note = None, f" (the stats input is {os.path.basename(path)} itself: counted once)"
        out_widths = {**widths, **{n: earlier.width_of(n) for n in earlier.names() if n not in widths}} \
            if earlier is not None else widths
        if path:  # room for everything written: this run with the stats input, then with the file
            total = {**{n: i["width"] for n, i in saved["layers"].items()}, **out_widths} if appending else out_widths
            check_stats_output(path, total, option="filename",
                               extra_bytes=stats_file_bytes(out_widths) if appending else 0)

        latent = latent_image["samples"]
        latent = comfy.sample.fix_empty_latent_channels(model, latent, latent_image.get("downscale_ratio_spacial"),
                                                        latent_image.get("downscale_ratio_temporal"))
        total_steps = len(groups) * seeds * steps
        pbar = comfy.utils.ProgressBar(total_steps)
        done = [0]
        dev = "cpu" if storage == "cpu" else None
        log.info("LiteFFN Calibrate: %d linears in %d pass(es) x %d seed(s) x %d steps, budget %.1f GB%s",
                 len(names), len(groups), seeds, steps, memory_budget_gb,
                 "; each pass saved when it ends" if path else "")

        def run_group(group):
            """One pass: sample every seed with this group's hooks on; -> its statistics."""
            col = StatsCollector.for_widths({n: widths[n] for n in group}, budget_bytes=budget, storage=dev,
                                            holdout_rows=HOLDOUT_ROWS)
            work = model.clone()
            work.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _hooks(col))
            for s in range(seeds):
                _sample(work, seed + s, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, latent,
                        lambda *_: _step(pbar, done))
            return col.stats.layers

        rows = {}
        if path:  # each pass goes to disk as it ends: host memory holds one group, not the whole run
            stats = save_stream(path, stream_passes(groups, run_group, earlier, release=True, rows=rows),
                                merged_meta(meta, earlier.meta) if earlier is not None else meta,
                                out_widths, append=appending, option="filename")
        else:  # nothing to stream to: the output holds them
            stats = ActivationStats(meta=meta)
            stats.layers.update(stream_passes(groups, run_group, rows=rows))
            if earlier is not None:  # into the fresh object: the earlier node's cached output stays as it was
                stats.merge_(earlier)
                rows[names[0]] = stats.rows_of(names[0])
        summary = (f"{len(names)} linears ({layers}) of {len(dm.transformer_blocks)} blocks, {seeds} seed(s) x {steps} steps, "
                   f"{len(groups)} pass(es); {rows[names[0]]} rows seen by {names[0]}{_held(stats, names[0])}"
                   + (f" (with {int(earlier.meta.get('runs', 1))} earlier run(s))" if earlier is not None else ""))
        if path:
            if appending:
                summary += f"; added to {os.path.basename(path)} ({stats.meta['runs']} runs){note}"
            else:
                summary += f"; saved {os.path.basename(path)}"
        return io.NodeOutput(stats, summary, ui=ui.PreviewText(summary))


def _held(stats, name: str) -> str:
    """What the summary says of the rows set aside for compression's error report (stats.py)."""
    held, seen = stats.held_of(name)  # a file's from its header, not its tensors
    return f", {seen} more held out ({held} kept to measure compression's output error)" if seen else ""


def _hooks(col: StatsCollector):
    """DIFFUSION_MODEL wrapper: hooks go on the modules that run in this call (object patches
    applied), and come off even when sampling is interrupted."""
    def wrapper(executor, *args, **kwargs):
        col.attach(executor.class_obj)
        try:
            return executor(*args, **kwargs)
        finally:
            col.detach()
    return wrapper


def _sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, latent, callback):
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                        noise_mask=latent_image.get("noise_mask"), callback=callback, disable_pbar=True, seed=seed)


def _step(pbar, done):
    comfy.model_management.throw_exception_if_processing_interrupted()
    done[0] += 1
    pbar.update_absolute(done[0])


def _check_same_model(meta: dict, fp: dict, where: str, fix: str) -> None:
    """Statistics made on another model (per-layer weight fingerprints) are refused before sampling."""
    # (with Calibrate's own advice: the default one is the Loader's; execute's user_errors shows a ValueError)
    compare_fingerprints(meta.get("fingerprint") or {}, fp, where, common_only=True, fix=fix)
