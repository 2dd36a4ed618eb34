"""Command line: `liteffn demo | compress | merge-stats` (also `python -m liteffn.calibration.cli`).

`compress --devices cuda:0,cuda:1` spreads the layers over one process per device; under
torchrun (`torchrun --nproc-per-node N -m liteffn.calibration.cli compress ...`) each rank
takes cuda:LOCAL_RANK. Either way one file, the same bytes as one device.

Every failure ends with one line on stderr and exit code 2 (`--debug` adds the traceback);
Ctrl-C ends with one line and exit code 130, and leaves no partial output.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from . import ltx2

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130
DEFAULT_RANK, DEFAULT_MAX_RANK = 64, 512
FP4_BLOCK = 32  # the demo's widths: FP4 residuals quantize blocks of 16 (NVFP4) / 32 (MXFP4) inputs
COMMANDS = "demo | compress | merge-stats"


# ------------------------------------------------------------------ argument types (argparse says the message)
def _number(kind, lo=None, lo_open=False, hi=None, what=""):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{s!r}: must be a finite number")
        if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{s}: must be {what}")
        return v
    return parse


_rank = _number(int, 0, what=">= 0 (0 = no low-rank branch)")
_max_rank = _number(int, 1, what=">= 1")
_energy = _number(float, 0.0, True, 1.0, what="in (0, 1], e.g. 0.5")
_match = _number(float, 0.0, True, what="> 0, e.g. 1.8")
_damp = _number(float, 0.0, True, what="> 0 (a fraction of R's mean diagonal added to R, e.g. 0.01)")
_blocks = _number(int, 1, what=">= 1")
_workers = _number(int, 1, what=">= 1")


def _width(s: str) -> int:
    v = _number(int, 1, what="a positive multiple of 32")(s)
    if v % FP4_BLOCK:
        raise argparse.ArgumentTypeError(f"{s}: must be a multiple of {FP4_BLOCK} (FP4 residuals quantize "
                                         f"blocks of 16/32 inputs)")
    return v


class _Parser(argparse.ArgumentParser):
    """A usage error is one line too, pointing at -h (argparse prints the whole usage first)."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (`{self.prog} -h` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    from ..kernels.formats import FORMATS

    formats = list(FORMATS)
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on failure, print the Python traceback as well as the one-line message")
    ap = _Parser(prog="liteffn", parents=[debug],
                 description="LiteFFN offline: compress an LTX-2 checkpoint's FFNs, add statistics files, or "
                             "run the built-in demo. A failure is one line and exit code 2, Ctrl-C exit code 130.",
                 epilog="`liteffn COMMAND -h` describes a command's options.")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", title="commands", parser_class=_Parser)

    d = sub.add_parser("demo", parents=[debug], help="calibrate and compress a small synthetic LTX-2-shaped stack "
                       "(no GPU, no files): prints error and bytes per format and rank, and per kind of linear",
                       description="Calibrate a small synthetic LTX-2-shaped stack (FFNs and self-attention "
                       "projections) with forward hooks, compress it at each rank and residual format with and "
                       "without the statistics, and print the FFN output error on held-out activations and the "
                       "bytes, then the error of each kind of linear (ffn, attention). Takes under a minute on a "
                       "2-core CPU; each step is printed as it finishes.")
    d.add_argument("--blocks", type=_blocks, default=2, help="transformer blocks of the stack (default 2)")
    d.add_argument("--video-dim", type=_width, default=256,
                   help="video stream width: attn1 projections dim->dim, ff hidden 4x (a multiple of 32; default 256)")
    d.add_argument("--audio-dim", type=_width, default=128,
                   help="audio stream width: audio_attn1 projections dim->dim, audio_ff hidden 4x (a multiple of "
                   "32; default 128)")
    d.add_argument("--ranks", type=_rank, nargs="+", default=[0, 16, 64], metavar="RANK",
                   help="ranks of the low-rank branch to try, each <= --audio-dim (default 0 16 64)")
    d.add_argument("--formats", nargs="+", default=["fp8", "nvfp4", "mxfp4"], choices=formats, metavar="FORMAT",
                   help=f"residual formats to try, of {', '.join(formats)} (default fp8 nvfp4 mxfp4)")
    d.add_argument("--workers", type=_workers, default=None,
                   help="processes that compress (default: one per CPU, at most 8; 1: all in this process)")

    c = sub.add_parser("compress", parents=[debug], help="compress an LTX-2 checkpoint's FFNs into a LiteFFN file",
                       description="Compress the FFN linears of an LTX-2 checkpoint, one layer at a time, into "
                       "one LiteFFN .safetensors (loaded in ComfyUI by the Low-Rank FFN Loader node).")
    c.add_argument("checkpoint", help="LTX-2 .safetensors (ComfyUI key layout; bf16/fp16/fp32/FP8)")
    c.add_argument("-o", "--out", required=True, help="output .safetensors (written to a temp file, then renamed)")
    c.add_argument("--stats", help="statistics file written by ComfyUI's LiteFFN Calibrate node (in "
                                   "models/liteffn/); without it: plain SVD and round-to-nearest, which is worse")
    c.add_argument("--rank", type=_rank, help=f"fixed rank per layer (default {DEFAULT_RANK}; 0 = no low-rank "
                                              "branch); not with --energy")
    c.add_argument("--energy", type=_energy, help="instead of a fixed rank: per layer, the smallest rank keeping "
                                                  "this fraction of the spectral energy, in (0, 1], at most --max-rank")
    c.add_argument("--max-rank", type=_max_rank, help=f"cap of the rank --energy chooses (default {DEFAULT_MAX_RANK}), "
                                                      "or --match-fp8 (default twice --rank)")
    c.add_argument("--match-fp8", type=_match, metavar="RATIO",
                   help="per layer, the smallest rank (steps of 16 from --rank, at most --max-rank) whose output "
                        "error on the statistics' held-out rows is at most RATIO x an FP8 residual's at --rank, "
                        "e.g. 1.8 with --format nvfp4: rank where 4 bits lose most, less where they lose least; "
                        "needs --stats; 3-5 compressions per layer")
    c.add_argument("--format", default="fp8", choices=formats,
                   help="residual format: fp8 (E4M3, per-row scales), nvfp4 / mxfp4 (4-bit blocks), bf16 "
                        "(unquantized) (default fp8)")
    c.add_argument("--layers", default="ffn", choices=[*ltx2.LAYERS, *ltx2.STREAMS],
                   help="which linears of each block: ffn (the FFNs), ffn+attention (also every q, k, v and out "
                        "projection) or attention (default ffn); all / video / audio: the FFNs of those streams, "
                        "as before --streams existed")
    c.add_argument("--streams", default="all", choices=list(ltx2.STREAMS),
                   help="which streams: all, video or audio (default all)")
    where = c.add_mutually_exclusive_group()
    where.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    where.add_argument("--devices", help="spread the layers over these devices, one process each, e.g. "
                                         "cuda:0,cuda:1 (the same file as one device writes)")
    c.add_argument("--damp", type=_damp, default=0.01,
                   help="damping of the statistics' covariance R, as a fraction of its mean diagonal "
                        "(default 0.01; larger: more stable, less calibrated)")
    c.add_argument("--no-gptq", action="store_true", help="round the residual to nearest even with statistics")

    m = sub.add_parser("merge-stats", parents=[debug], help="add statistics files of the same model into one",
                       description="Add statistics files of the same model (e.g. Calibrate runs on other "
                       "prompts, sessions or GPUs) into one file for compress --stats.")
    m.add_argument("inputs", nargs="+", metavar="STATS", help="statistics files (.safetensors from LiteFFN Calibrate)")
    m.add_argument("-o", "--out", required=True, help="output statistics file")
    ap.commands = {"demo": d, "compress": c, "merge-stats": m}  # _check reports through the command's parser
    return ap


def _check(ap, a) -> None:
    """Conflicts and bounds argparse cannot see alone; the command's parser exits 2 with the message."""
    err = ap.commands[a.cmd].error if a.cmd in ap.commands else ap.error
    if a.cmd == "compress":
        if a.energy is not None and a.rank is not None:
            err("give --rank (a fixed rank) or --energy (a rank per layer, capped by --max-rank), "
                     "not both")
        if a.match_fp8 is not None and a.energy is not None:
            err("--match-fp8 searches a rank per layer from --rank; not with --energy")
        if a.match_fp8 is not None and not a.stats:
            err("--match-fp8 measures each layer's error on held-out rows: give --stats (from LiteFFN Calibrate)")
        if a.energy is None and a.match_fp8 is None and a.max_rank is not None:
            err("--max-rank caps the rank --energy or --match-fp8 chooses; with a fixed rank use --rank alone")
        if a.layers in ltx2.STREAMS and a.streams != "all":
            err(f"--layers {a.layers} is the older way to pick the FFNs of a stream; give --layers ffn "
                f"--streams {a.streams} (or ffn+attention)")
        # the older `--layers video` is the video stream's FFNs
        a.which, a.kinds = (a.layers, "ffn") if a.layers in ltx2.STREAMS else (a.streams, a.layers)
    elif a.cmd == "demo":
        cap = min(a.video_dim, a.audio_dim)
        if max(a.ranks) > cap:
            err(f"rank {max(a.ranks)} is larger than the smallest layer allows (--audio-dim {cap}); "
                     f"use ranks <= {cap}")


def _policy(a):
    from .lowrank import RankPolicy

    if a.energy is not None:
        return RankPolicy(rank=None, energy=a.energy, max_rank=a.max_rank or DEFAULT_MAX_RANK)
    rank = DEFAULT_RANK if a.rank is None else a.rank
    if a.match_fp8 is not None:
        return RankPolicy.matching(rank, a.match_fp8, a.max_rank)
    return RankPolicy(rank=rank)


# ------------------------------------------------------------------ checks before the work, messages after it
def _before(a) -> None:
    """What can be known wrong before minutes of work: inputs, the output's folder, the device. Also says
    what a run without statistics does."""
    if a.cmd == "compress":
        _check_input(a.checkpoint, "checkpoint")
        if a.stats:
            _check_input(a.stats, "--stats")
        _check_output_dir(a.out)
        if a.device:
            _check_device(a.device)
        from .compress import check_changes_something, without_statistics

        check_changes_something(_policy(a), a.format)
        if not a.stats and os.environ.get("RANK", "0") == "0":
            print(f"liteffn: no --stats: every layer gets {without_statistics(_policy(a), a.format)} (statistics "
                  "come from ComfyUI's LiteFFN Calibrate node; with them the error is lower)", file=sys.stderr)
    elif a.cmd == "merge-stats":
        for p in a.inputs:
            _check_input(p, "statistics file")
        _check_output_dir(a.out)


def _check_input(path: str, what: str) -> None:
    """The file exists, is a file, and its safetensors header reads (a truncated file fails here)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder, not a .safetensors file")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except OSError:
        raise
    except Exception as e:  # SafetensorError: not safetensors, truncated, corrupt header
        raise ValueError(f"{what} {path} is not a readable .safetensors file (truncated or corrupt?): "
                         f"{' '.join(str(e).split())}") from e


def _check_output_dir(out: str) -> None:
    """The output's folder exists and takes a new file (a probe, so read-only mounts and root on /sys count)."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {out}: the folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".liteffn-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write {out}: {e.strerror or e} (the folder {folder} takes no new file); "
                         "write elsewhere with -o") from e


def _check_device(spec: str) -> None:
    import torch

    try:
        d = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a device: use cuda, cuda:N or cpu") from None
    if d.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise ValueError(f"--device {spec}: no CUDA here ({why}); use --device cpu (slower) or a machine with a GPU")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")


_OS_HINTS = {28: "free some space or write elsewhere with -o", 30: "write elsewhere with -o",
             13: "check the permissions, or write elsewhere with -o"}


def _message(e: BaseException, a, debug: bool) -> str:
    """One line for any failure: the message of a user error (bad value, bad file, no space), the type
    and a pointer to --debug for anything unexpected."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors
        SafetensorError = ()
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
        if not e.filename and a.cmd == "compress":
            text += f" (compressing {a.checkpoint} into {a.out})"
        elif not e.filename and a.cmd == "merge-stats":
            text += f" (writing {a.out})"
        if e.errno in _OS_HINTS:
            text += f"; {_OS_HINTS[e.errno]}"
    elif isinstance(e, (ValueError, OSError)):
        text = str(e) or type(e).__name__
    elif isinstance(e, SafetensorError):
        text = f"a .safetensors file could not be read: {e}"
    elif isinstance(e, MemoryError):
        text = "out of memory" + (f" ({e})" if str(e) else "")
    elif type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
        text = f"out of GPU memory: {str(e).splitlines()[0]}; free the GPU or use --device cpu"
    else:
        text = f"{type(e).__name__}: {e}" + ("" if debug else " (unexpected; run with --debug for the traceback)")
    return " ".join(text.split())


def main(argv=None) -> int:
    """-> exit code: 0 done, 2 an error (one line on stderr; --debug: the traceback), 130 Ctrl-C."""
    ap = build_parser()
    try:
        a = ap.parse_args(argv)
        _check(ap, a)
    except SystemExit as e:  # -h (0), or a usage error argparse has printed (2)
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    if a.cmd is None:
        ap.print_help(sys.stderr)
        print(f"\nliteffn: error: give a command: {COMMANDS}", file=sys.stderr)
        return EXIT_ERROR
    debug = getattr(a, "debug", False)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        _before(a)
        if a.cmd == "demo":
            from .demo import run

            run(a.blocks, a.video_dim, a.audio_dim, tuple(a.ranks), tuple(a.formats), workers=a.workers)
        elif a.cmd == "compress":
            if a.device and a.devices:
                raise ValueError("give --device or --devices, not both")
            from .compressed_file import check_checkpoint_output

            check_checkpoint_output(a.out, a.checkpoint, a.stats, a.which, _policy(a).fixed_rank,
                                    a.format, layers=a.kinds)  # before any work: not an input, room on the disk
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                return _compress_torchrun(a)
            from .checkpoint import compress_checkpoint

            timings = {}
            infos = compress_checkpoint(a.checkpoint, a.out, a.stats, _policy(a), a.format, a.which, a.device,
                                        a.damp, not a.no_gptq, devices=a.devices, timings=timings, layers=a.kinds)
            _summary(a.out, infos, timings)
        else:
            from .stats import ActivationStats, check_stats_output, merge_files

            check_stats_output(a.out, {n: i["width"] for p in a.inputs for n, i in  # before any work
                                       ActivationStats.load_meta(p)["layers"].items()}, a.inputs, "-o")
            total = merge_files(a.inputs, a.out, option="-o")  # layer by layer; other models' files refused
            print(f"wrote {a.out}: {len(total['layers'])} layers")
    except KeyboardInterrupt:
        print("\nliteffn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001: every failure is one line; --debug shows where
        if debug:
            import traceback

            traceback.print_exc()
        print(f"liteffn: error: {_message(e, a, debug)}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _summary(out: str, infos: dict, timings: dict) -> None:
    from .report import dense_bytes, heldout_line, larger_than_dense, match_line

    errs = [i["rel_err"] for i in infos.values()]
    calibrated = sum(bool(i.get("calibrated")) for i in infos.values())
    kind = ("R-weighted: expected on the calibration inputs" if calibrated == len(infos) else
            "Frobenius, of the weights: no statistics" if not calibrated else
            f"{calibrated} layers R-weighted, {len(infos) - calibrated} without statistics Frobenius")
    comp = sum(i["bytes"] for i in infos.values())
    dense = dense_bytes(infos)
    print(f"wrote {out}: {len(infos)} layers, mean relative error {100 * sum(errs) / max(len(errs), 1):.2f}% "
          f"({kind}), {comp / 2**30:.2f} GiB")
    held = heldout_line(infos)
    if held:
        print(held)
    if any("match" in i for i in infos.values()):
        ranks = [i["rank"] for i in infos.values()]
        print(f"{match_line(infos)}; rank {min(ranks)}-{max(ranks)}, mean {sum(ranks) / len(ranks):.1f}")
    if comp >= dense > 0:
        print(f"liteffn: {larger_than_dense(comp, dense)}", file=sys.stderr)
    ranks = timings.get("ranks", [])
    if len(ranks) > 1:
        print("layers per process: " + ", ".join(f"{r['device']} {r['layers']} ({r['busy_s']:.1f} s)" for r in ranks))


def _compress_torchrun(a) -> int:
    """One rank of `torchrun ... compress`: a gloo group for coordination, cuda:LOCAL_RANK (or --device cpu)."""
    import torch.distributed as dist

    from .checkpoint import WAIT_S, compress_rank
    from .distributed import AgreedError, init_from_env

    if a.devices:
        raise ValueError("--devices starts its own processes; under torchrun leave it out (each rank takes "
                         "cuda:LOCAL_RANK)")
    if a.device not in (None, "cpu"):
        raise ValueError("under torchrun each rank takes cuda:LOCAL_RANK; --device may only be cpu")
    rank, world, device = init_from_env("gloo", device=a.device, timeout_s=WAIT_S)
    try:
        res = compress_rank(rank, world, device, a.checkpoint, a.out, a.stats, _policy(a), a.format, a.which,
                            a.damp, not a.no_gptq, layers=a.kinds)
    except AgreedError:  # raised on every rank: rank 0 says it
        if rank:
            return 2
        raise
    finally:
        dist.destroy_process_group()
    if rank == 0:
        _summary(a.out, res["infos"], res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
