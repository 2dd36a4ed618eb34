"""Low-Rank FFN Loader: put a compressed file from models/liteffn/ onto an LTX-2 MODEL."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..calibration import compressed_file, ltx2
from ..calibration.report import dense_bytes, format_report
from . import model as M
from .errors import user_errors
from .files import COMPRESSED, file_state, files, full_path

log = logging.getLogger("liteffn")


class LowRankFFNLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowRankFFNLoader",
            display_name="Low-Rank FFN Loader",
            category="LiteFFN",
            description="Loads a file made by LiteFFN Compress Model (or `liteffn compress`) onto the LTX-2 MODEL "
                        "it was made from. The file is checked against the model's weights first.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("compressed_file", options=files(COMPRESSED),
                               tooltip="From models/liteffn/ (compressed files; statistics files are not listed)."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="report")],
        )

    @classmethod
    def fingerprint_inputs(cls, compressed_file=None, **_):
        return file_state(compressed_file)  # a file rewritten under the same name is loaded again

    @classmethod
    @user_errors
    def execute(cls, model, compressed_file) -> io.NodeOutput:
        return io.NodeOutput(*load_onto(model, full_path(compressed_file)))


def load_onto(model, path: str):
    M.diffusion_model(model)
    meta = compressed_file.read_meta(path)
    model_fp = M.model_fingerprint(model, meta["fingerprint"])
    layers, meta = compressed_file.load(path, model_fp, family=ltx2.FAMILY)
    units: dict[str, dict] = {}
    for name, layer in layers.items():
        units.setdefault(ltx2.unit_of(name), {})[name] = layer
    broken = [u for u, got in units.items() if len(got) != len(ltx2.linears_of(u))]
    if broken:
        raise ValueError(f"{path} holds only one linear of {broken[0]} (and {len(broken) - 1} more FFNs); "
                         "LiteFFN replaces whole FFNs: compress both linears")
    patched = M.patched(model, {u: M.build_unit(u, got) for u, got in units.items()})
    dense = dense_bytes(meta["layers"])
    notes = M.lora_notes(model, list(layers))
    report = format_report(meta["layers"], dense, f"loaded {path.rsplit('/', 1)[-1]} ({meta.get('policy', '?')})", notes)
    return patched, report
