"""Where LiteFFN files live in ComfyUI (models/liteffn/, registered with folder_paths) and the
custom type that carries statistics between nodes."""
from __future__ import annotations

import os
import re

from comfy_api.latest import io

import folder_paths

from ..calibration.compressed_file import FILE_FORMAT as COMPRESSED  # the kinds safe_io.file_kind reads
from ..calibration.safe_io import file_kind
from ..calibration.stats import STATS_FORMAT as STATS

FOLDER = "liteffn"
Stats = io.Custom("LITEFFN_STATS")


def register() -> None:
    """models/liteffn/, after any path the user configured (extra_model_paths.yaml) for it."""
    configured = FOLDER in folder_paths.folder_names_and_paths
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=not configured)
    folder_paths.folder_names_and_paths[FOLDER][1].add(".safetensors")


_KINDS: dict = {}  # file_state -> kind: each header read once


def files(kind: str | None = None) -> list[str]:
    """The .safetensors files in models/liteffn/; with kind (COMPRESSED or STATS) without the files of the other
    LiteFFN kind, so the Loader does not list statistics nor Compress' stats_file compressed files (a file whose
    kind is not LiteFFN's stays listed: choosing it gives the node's message)."""
    names = [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(".safetensors")]
    if kind is None:
        return names
    other = STATS if kind == COMPRESSED else COMPRESSED
    return [f for f in names if _kind(f) != other]


def _kind(name: str) -> str | None:
    key = file_state(name)
    if key.startswith(_UNAVAILABLE):  # gone since the folder was listed
        return None
    if key not in _KINDS:
        if len(_KINDS) > 4096:
            _KINDS.clear()
        _KINDS[key] = file_kind(key.rsplit("|", 2)[0])  # (the path: it may hold "|" itself)
    return _KINDS[key]


def full_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise(FOLDER, name)


def file_state(name: str | None) -> str:
    """What tells a file in models/liteffn/ from the one read before: ComfyUI runs a node again when its
    fingerprint_inputs changes, so a file rewritten under the same name is read again, not taken from
    ComfyUI's cache (path, size and modification time: no read of the file)."""
    try:
        path = full_path(name)
        st = os.stat(path)
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"
    except Exception:  # noqa: BLE001  (no such file, or none chosen: the node's execute says what is wrong)
        return f"{_UNAVAILABLE}{name}"


_UNAVAILABLE = "unavailable|"


def output_path(name: str) -> str:
    """models/liteffn/<name>.safetensors for a name a user typed (subfolders allowed, no escaping)."""
    name = name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name or not re.fullmatch(r"[\w\-. /]+", name) or ".." in name.split("/") or name.startswith("/"):
        raise ValueError(f"file name {name!r}: use letters, digits, '-', '_', '.', and '/' for subfolders")
    return os.path.join(folder_paths.get_folder_paths(FOLDER)[0], name + ".safetensors")



def selection_inputs() -> list:
    """Which blocks and streams a node works on: the same two inputs on Calibrate and Compress
    (`layers`, the kinds of linears, comes last: workflows saved before it keep their values)."""
    from ..calibration.ltx2 import STREAMS

    return [io.Combo.Input("streams", options=list(STREAMS), default="all",
                           tooltip="video: the video stream's layers (ff, attn1, attn2, audio_to_video_attn); "
                                   "audio: the audio stream's (audio_ff, audio_attn1, audio_attn2, "
                                   "video_to_audio_attn)."),
            io.String.Input("blocks", default="all", tooltip="'all' or blocks like '0-11, 20'.")]


def layers_input():
    from ..calibration.ltx2 import LAYERS

    return io.Combo.Input("layers", options=list(LAYERS), default="ffn", optional=True,
                          tooltip="Which linears of each block: ffn (the FFNs; the output closest to the model's), "
                                  "ffn+attention (also every q, k, v and out projection: the fastest choice, about an "
                                  "FP8 checkpoint's VRAM, a larger error; calibrating it needs more memory), attention.")
