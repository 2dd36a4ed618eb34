"""Activation statistics of linear inputs: streaming X^T X, row count, per-channel absmax.

Precision: per-batch products are computed in fp32 and summed into an fp32 accumulator.
Measured (tests/test_stats.py::test_fp32_accumulation_is_accurate): after 400 batches the
fp32 sum differs from an fp64 sum by ~1e-6 relative, three orders below the damping
(1e-2 of the mean diagonal) that whitening adds anyway, at half the memory of fp64.

Memory: one K-wide layer holds K*K*4 bytes (16384 wide: 1 GiB). The collector takes an
explicit budget and refuses to hold more; `plan_passes` splits the layers into groups that
fit, and the caller runs the same calibration once per group (same prompts, seeds and
settings, so every group sees the same activations). Groups can also be kept on the host
(`storage="cpu"`): per batch the product is still computed where the activation lives,
then added into host memory, trading a device-to-host copy per layer and batch for
device memory. Inputs are processed in row chunks so the fp32 copy of a batch is bounded
too (`chunk_rows`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

STATS_FORMAT = "liteffn.stats"
STATS_VERSION = 1


@dataclass
class LayerStats:
    xtx: torch.Tensor  # [K, K] fp32, sum of x x^T over rows
    absmax: torch.Tensor  # [K] fp32, max |x| per input channel
    rows: int = 0

    @classmethod
    def empty(cls, k: int, device="cpu") -> "LayerStats":
        return cls(torch.zeros(k, k, device=device), torch.zeros(k, device=device), 0)

    @property
    def width(self) -> int:
        return self.xtx.shape[0]

    def covariance(self) -> torch.Tensor:
        """R = E[x x^T] (fp32)."""
        if self.rows <= 0:
            raise ValueError("statistics hold no rows: calibration saw no activations for this layer")
        return self.xtx / self.rows

    def check_finite(self, name: str = "") -> None:
        if not (torch.isfinite(self.xtx).all() and torch.isfinite(self.absmax).all()):
            raise ValueError(
                f"statistics of layer {name or '?'} contain NaN or Inf; the model produced "
                "non-finite activations during calibration. Re-run calibration (check the model "
                "and its dtype) rather than compressing with these statistics."
            )

    def merge_(self, other: "LayerStats") -> "LayerStats":
        if other.xtx.shape != self.xtx.shape:
            raise ValueError(f"cannot merge statistics of width {other.width} into width {self.width}")
        self.xtx += other.xtx.to(self.xtx.device)
        self.absmax = torch.maximum(self.absmax, other.absmax.to(self.absmax.device))
        self.rows += other.rows
        return self


def layer_bytes(width: int) -> int:
    return width * width * 4 + width * 4


def plan_passes(widths: dict[str, int], budget_bytes: int, chunk_rows: int = 4096) -> list[list[str]]:
    """Split layers into groups whose accumulators plus one row chunk fit budget_bytes.

    Greedy first-fit in the given order (model order keeps hooks of a group close)."""
    groups: list[list[str]] = []
    used: list[int] = []
    for name, k in widths.items():
        need = layer_bytes(k)
        if need + chunk_rows * k * 4 > budget_bytes:
            raise ValueError(
                f"layer {name} ({k} wide) needs {need / 2**20:.0f} MiB for its statistics plus "
                f"{chunk_rows * k * 4 / 2**20:.0f} MiB scratch, more than the whole budget "
                f"({budget_bytes / 2**20:.0f} MiB); raise the budget or lower chunk_rows"
            )
        for i, g in enumerate(groups):
            scratch = chunk_rows * max([widths[n] for n in g] + [k]) * 4
            if used[i] + need + scratch <= budget_bytes:
                g.append(name)
                used[i] += need
                break
        else:
            groups.append([name])
            used.append(need)
    return groups


class ActivationStats:
    """Statistics of many layers, keyed by the linear's name in the model."""

    def __init__(self, layers: dict[str, LayerStats] | None = None, meta: dict | None = None):
        self.layers: dict[str, LayerStats] = dict(layers or {})
        self.meta: dict = dict(meta or {})

    def __contains__(self, name):
        return name in self.layers

    def __getitem__(self, name) -> LayerStats:
        return self.layers[name]

    def names(self):
        return list(self.layers)

    def nbytes(self) -> int:
        return sum(s.xtx.numel() * 4 + s.absmax.numel() * 4 for s in self.layers.values())

    def merge_(self, other: "ActivationStats") -> "ActivationStats":
        """Add other's statistics in place; layers only in other are copied over."""
        for name, s in other.layers.items():
            if name in self.layers:
                self.layers[name].merge_(s)
            else:
                self.layers[name] = LayerStats(s.xtx.clone(), s.absmax.clone(), s.rows)
        self.meta["runs"] = int(self.meta.get("runs", 1)) + int(other.meta.get("runs", 1))
        if "fingerprint" in other.meta:  # source weights of every layer held
            self.meta["fingerprint"] = {**other.meta["fingerprint"], **self.meta.get("fingerprint", {})}
        return self

    # ------------------------------------------------------------ file
    def save(self, path: str, inputs=(), option: str = "output") -> None:
        """safetensors + JSON metadata, streamed through safe_io (write_stats). inputs: files
        this output must not be (e.g. merge-stats' inputs)."""
        write_stats(path, self.layers.items(), self.meta, inputs=inputs, option=option,
                    widths={n: s.width for n, s in self.layers.items()})

    @staticmethod
    def load_names(path: str) -> list[str]:
        return list(ActivationStats.load_meta(path)["layers"])

    @staticmethod
    def load_meta(path: str) -> dict:
        return read_meta(path, STATS_FORMAT, STATS_VERSION)

    @classmethod
    def load(cls, path: str, device="cpu", names=None) -> "ActivationStats":
        """names: load only these layers (a 19B model's statistics are tens of GB)."""
        meta, f = open_checked(path, STATS_FORMAT, STATS_VERSION)
        with f:
            layers = {}
            for name, info in meta.pop("layers").items():
                if names is not None and name not in names:
                    continue
                try:
                    xtx, amax = f.get_tensor(f"{name}.xtx"), f.get_tensor(f"{name}.absmax")
                except Exception as e:  # safetensors raises its own error types
                    raise ValueError(f"statistics file {path} is missing tensors of layer {name}: {e}") from e
                s = LayerStats(xtx.to(device), amax.to(device), int(info["rows"]))
                s.check_finite(name)
                layers[name] = s
        meta.pop("format"), meta.pop("version")
        return cls(layers, meta)


def stats_file_bytes(widths: dict[str, int]) -> int:
    """Size of a statistics file holding layers of these widths (header room included)."""
    return sum(layer_bytes(k) for k in widths.values()) + _stats_header_room(len(widths))


def _stats_header_room(layers: int) -> int:
    return 16384 + 1024 * layers  # ~330 bytes per layer measured with LTX-2's names


def check_stats_output(path: str, widths: dict[str, int] | None = None, inputs=(), option: str = "output") -> str:
    """A statistics output checked before any work (safe_io.check_output): not an input, not a
    directory or device, not an existing file of another kind, room for its size."""
    from .safe_io import check_output

    return check_output(path, inputs, expect_format=STATS_FORMAT, option=option,
                        expected_bytes=None if widths is None else stats_file_bytes(widths))


def write_stats(path: str, layers, meta: dict, *, inputs=(), widths: dict[str, int] | None = None,
                option: str = "output") -> None:
    """Write a statistics file from (name, LayerStats) pairs, one layer in memory at a time
    (layers may be a generator), through safe_io: the output is checked first (with widths:
    its size against the free space), written into a temp beside it and renamed into place
    whole; an error or a signal leaves the old file as it was and no temp."""
    from .st_writer import StreamingSafetensorsWriter

    room = _stats_header_room(len(widths) if widths is not None else 256) + len(json.dumps(meta))
    w = StreamingSafetensorsWriter(path, inputs, expect_format=STATS_FORMAT, header_room=room, option=option,
                                   expected_bytes=None if widths is None else stats_file_bytes(widths))
    try:
        infos = {}
        for name, s in layers:
            s.check_finite(name)
            w.add(f"{name}.xtx", s.xtx.detach().float().contiguous())
            w.add(f"{name}.absmax", s.absmax.detach().float().contiguous())
            infos[name] = {"rows": int(s.rows), "width": s.width}
        full = {"format": STATS_FORMAT, "version": STATS_VERSION, "layers": infos, **meta}
        w.close({"liteffn": json.dumps(full)})
    finally:
        w.abort()


def open_checked(path: str, fmt: str, version: int):
    """Open a safetensors file of ours; returns (metadata dict, open handle). Clear errors
    for a missing, corrupt or foreign file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        f = safe_open(path, framework="pt")
        raw = (f.metadata() or {}).get("liteffn")
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a LiteFFN {fmt} file (no 'liteffn' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != fmt:
        raise ValueError(f"{path} holds {meta.get('format')!r}, expected {fmt!r}")
    if int(meta.get("version", -1)) > version:
        raise ValueError(
            f"{path} is format version {meta['version']}, newer than this LiteFFN reads ({version}); update the pack"
        )
    return meta, f


def read_meta(path: str, fmt: str, version: int) -> dict:
    """The checked metadata of a file of ours, without reading its tensors."""
    meta, f = open_checked(path, fmt, version)
    with f:
        return meta


class StatsCollector:
    """Forward pre-hooks that feed each named linear's input into ActivationStats.

    Usage:
        with StatsCollector(model, names, budget_bytes=8 << 30) as col:
            run the model ...
        stats = col.stats
    `names` must fit the budget (see plan_passes); layers outside `names` are not hooked.
    Without a model (`StatsCollector.for_widths`), hooks go on whatever module tree is given to
    `attach` each time: a host such as ComfyUI may swap the modules in and out between calls.
    """

    def __init__(self, model: torch.nn.Module | None, names, budget_bytes: int | None = None,
                 storage: str | torch.device | None = None, chunk_rows: int = 4096, widths: dict | None = None):
        self.model = model
        if model is not None:
            mods = dict(model.named_modules())
            missing = [n for n in names if n not in mods]
            if missing:
                raise KeyError(f"no module named {missing[:3]} in the model")
            widths = {n: _in_features(mods[n], n) for n in names}
        self.widths = dict(widths)
        self.chunk_rows = chunk_rows
        need = sum(layer_bytes(k) for k in self.widths.values()) + chunk_rows * max(self.widths.values(), default=0) * 4
        if budget_bytes is not None and need > budget_bytes:
            raise MemoryError(
                f"statistics of {len(self.widths)} layers need {need / 2**20:.0f} MiB, over the budget of "
                f"{budget_bytes / 2**20:.0f} MiB; split them with plan_passes() and calibrate once per group"
            )
        self.required_bytes = need
        self.storage = storage
        self.stats = ActivationStats()
        self._handles = []

    @classmethod
    def for_widths(cls, widths: dict[str, int], **kw) -> "StatsCollector":
        return cls(None, list(widths), widths=widths, **kw)

    def attach(self, root: torch.nn.Module) -> None:
        """Hook the collected layers as found under root now."""
        for n in self.widths:
            self._handles.append(root.get_submodule(n).register_forward_pre_hook(self._hook(n)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        if self.model is not None:
            self.attach(self.model)
        return self

    def __exit__(self, *exc):
        self.detach()

    def _hook(self, name):
        def hook(_module, args):
            self.update(name, args[0])
        return hook

    @torch.no_grad()
    def update(self, name: str, x: torch.Tensor) -> None:
        k = self.widths[name]
        x = x.detach().reshape(-1, k)
        s = self.stats.layers.get(name)
        if s is None:
            dev = self.storage if self.storage is not None else x.device
            s = self.stats.layers[name] = LayerStats.empty(k, dev)
        for i in range(0, x.shape[0], self.chunk_rows):
            xc = x[i : i + self.chunk_rows].float()
            if not torch.isfinite(xc).all():
                raise ValueError(f"non-finite activation entering {name}; statistics not updated")
            s.xtx += (xc.T @ xc).to(s.xtx.device)
            s.absmax = torch.maximum(s.absmax, xc.abs().amax(0).to(s.absmax.device))
        s.rows += x.shape[0]


def _in_features(m: torch.nn.Module, name: str) -> int:
    if hasattr(m, "in_features"):
        return int(m.in_features)
    w = getattr(m, "weight", None)
    if w is None or w.dim() != 2:
        raise TypeError(f"{name} is not a linear layer (no 2-D weight)")
    return int(w.shape[1])
