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

Held-out rows. A collector made with `holdout_rows > 0` (LiteFFN Calibrate: HOLDOUT_ROWS) sets aside
every `holdout_every`-th input row of a layer (counted over the whole calibration) from X^T X, absmax
and the row count, and keeps a uniform sample of at most `holdout_rows` of them (reservoir sampling,
seeded by the layer's name: the same run gives the same rows) in bf16 as `LayerStats.held`. Compression
measures on them the output error that users get (activations quantized as the kernels do), rows that
the statistics it was fitted to never saw. Files carry them as `<layer>.held` (BF16 [rows, width]);
files without them (older ones) load with none. Merges keep a sample of both sides' rows in
proportion to the rows each side set aside.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import ltx2
from .fingerprint import MismatchError, check_fingerprint, compare_files
from .validate import FileError, all_finite

STATS_FORMAT = "liteffn.stats"
STATS_VERSION = 1
RECALIBRATE = "calibrate again (LiteFFN Calibrate) to make a new statistics file"
HOLDOUT_ROWS = 2048  # held-out rows kept per layer by LiteFFN Calibrate (at width 16384: 64 MiB, 6% of X^T X)
HOLDOUT_EVERY = 32  # every 32nd input row is set aside (3% of the rows leave X^T X)


@dataclass
class LayerStats:
    xtx: torch.Tensor  # [K, K] fp32, sum of x x^T over rows
    absmax: torch.Tensor  # [K] fp32, max |x| per input channel
    rows: int = 0
    held: torch.Tensor | None = None  # [S, K] bf16: a sample of the rows set aside (not in xtx, absmax, rows)
    held_seen: int = 0  # rows set aside in all, of which `held` is a uniform sample

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
        if not (all_finite(self.xtx) and all_finite(self.absmax)  # in pieces: no layer-sized scratch
                and (self.held is None or all_finite(self.held))):
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
        self.held, self.held_seen = merge_held(self.held, self.held_seen, other.held, other.held_seen)
        return self

    @property
    def held_rows(self) -> int:
        return 0 if self.held is None else int(self.held.shape[0])


def merge_held(a: torch.Tensor | None, a_seen: int, b: torch.Tensor | None, b_seen: int,
               cap: int | None = None) -> tuple[torch.Tensor | None, int]:
    """Two samples of held-out rows as one: both whole while they fit `cap` (default: HOLDOUT_ROWS or the
    larger sample), else rows of each in proportion to the rows each side set aside, drawn by a generator
    seeded from the counts (the same inputs give the same rows, in any process). Commutative to the byte:
    the sides are taken in an order of their own (counts, then a checksum), as X^T X's sums commute, so an
    append and a merge in the other order write the same file. -> (rows, seen)."""
    seen = int(a_seen) + int(b_seen)
    na, nb = (0 if t is None else int(t.shape[0]) for t in (a, b))
    if nb == 0:
        return a, seen
    if na == 0:
        return b.clone(), seen
    b = b.to(a.device)
    if _order_key(b, b_seen) < _order_key(a, a_seen):  # the sides in a fixed order: a + b gives b + a's bytes
        a, a_seen, b, b_seen, na, nb = b, b_seen, a, a_seen, nb, na
    cap = max(HOLDOUT_ROWS, na, nb) if cap is None else cap
    if na + nb <= cap:
        return torch.cat([a, b]), seen
    ka = min(na, max(cap - nb, round(cap * a_seen / max(seen, 1))))
    kb = cap - ka
    g = torch.Generator().manual_seed(int(a_seen) * 1_000_003 + int(b_seen))
    ia = torch.randperm(na, generator=g)[:ka].sort().values.to(a.device)
    ib = torch.randperm(nb, generator=g)[:kb].sort().values.to(a.device)
    return torch.cat([a[ia], b[ib]]), seen


def _order_key(t: torch.Tensor, seen: int) -> tuple:
    return int(seen), int(t.shape[0]), int(t.reshape(-1).view(torch.int16).sum(dtype=torch.int64))


def layer_bytes(width: int, held_rows: int = 0) -> int:
    """Memory (and file bytes) of one layer's statistics: X^T X, absmax and up to held_rows bf16 rows."""
    return width * width * 4 + width * 4 + held_rows * width * 2


def plan_passes(widths: dict[str, int], budget_bytes: int, chunk_rows: int = 4096, held_rows: int = 0
                ) -> list[list[str]]:
    """Split layers into groups whose accumulators (and held_rows held-out rows each) plus one row chunk
    fit budget_bytes.

    Greedy first-fit in the given order (model order keeps hooks of a group close)."""
    groups: list[list[str]] = []
    used: list[int] = []
    for name, k in widths.items():
        need = layer_bytes(k, held_rows)
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

    def width_of(self, name: str) -> int:
        return self.layers[name].width

    def rows_of(self, name: str) -> int:
        return int(self.layers[name].rows)

    def held_of(self, name: str) -> tuple[int, int]:
        """(held-out rows kept, rows set aside) of a layer."""
        s = self.layers[name]
        return s.held_rows, int(s.held_seen)

    def nbytes(self) -> int:
        return sum(s.xtx.numel() * 4 + s.absmax.numel() * 4 + s.held_rows * s.width * 2 for s in self.layers.values())

    def merge_(self, other: "ActivationStats", names: tuple[str, str] = ("these statistics", "the others")
               ) -> "ActivationStats":
        """Add other's statistics in place; layers only in other are copied over. Statistics of
        another model (family, per-layer fingerprints, widths) are refused (MismatchError) before
        anything is added. names: how messages call self and other. other may be file-backed
        (FileStats): it is read one layer at a time."""
        check_mergeable(self.meta, {n: self.width_of(n) for n in self.names()}, other, names)
        for name in other.names():
            s = other[name]
            if name in self.layers:
                self.layers[name].merge_(s)
            else:
                self.layers[name] = LayerStats(s.xtx.clone(), s.absmax.clone(), s.rows,
                                               None if s.held is None else s.held.clone(), s.held_seen)
            del s
        self.meta = merged_meta(self.meta, other.meta)
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
            infos = check_stats_meta(meta, path)
            layers = {}
            for name, info in infos.items():
                if names is not None and name not in names:
                    continue
                layers[name] = read_layer(f, path, name, info, device)
        meta.pop("layers"), meta.pop("format"), meta.pop("version")
        return cls(layers, meta)


def merged_meta(mine: dict, other: dict) -> dict:
    """Metadata of statistics plus other's (ActivationStats.merge_): mine's keys, runs added,
    fingerprints of both (mine's entries first)."""
    meta = dict(mine)
    meta["runs"] = int(mine.get("runs", 1)) + int(other.get("runs", 1))
    if "fingerprint" in other:  # source weights of every layer held
        meta["fingerprint"] = {**other["fingerprint"], **mine.get("fingerprint", {})}
    return meta


def check_mergeable(meta: dict, widths: dict[str, int], other: "ActivationStats",
                    names: tuple[str, str] = ("these statistics", "the others")) -> None:
    """MismatchError when other (in memory or file-backed: nothing read but its metadata) holds
    statistics of another model than meta / widths (family, per-layer fingerprints, widths)."""
    check_same_model(meta, other.meta, *names)
    for name in other.names():
        if name in widths and widths[name] != other.width_of(name):
            raise MismatchError(f"{names[0]} and {names[1]} hold layer {name} at widths {widths[name]} "
                                f"and {other.width_of(name)}: statistics of different models cannot be added")


class _FileLayers(Mapping):
    """FileStats.layers: a read-only mapping whose values are read from the file when asked for."""

    def __init__(self, owner: "FileStats"):
        self._owner = owner

    def __getitem__(self, name) -> LayerStats:
        return self._owner[name]

    def __iter__(self):
        return iter(self._owner.infos)

    def __len__(self):
        return len(self._owner.infos)

    def __contains__(self, name):
        return name in self._owner.infos


class FileStats(ActivationStats):
    """Statistics that stay in their file (LiteFFN Calibrate's output once saved): names, widths,
    rows and metadata are known from the header; `stats[name]` reads that one layer (checked as
    ActivationStats.load checks it), so a consumer that goes layer by layer (Compress Model,
    merge_, a chained Calibrate) never holds the whole file. Read-only (merge_ refused).

    The file must stay the one that was opened: if it is replaced afterwards (another run wrote
    that filename), reading refuses with a clear FileError rather than returning other data."""

    def __init__(self, path: str):
        self._identity = _file_identity(path)  # first: a file replaced while its header is read is refused later
        meta, f = open_checked(path, STATS_FORMAT, STATS_VERSION)
        with f:
            infos = check_stats_meta(meta, path)
        self.path = os.path.abspath(path)
        self.infos: dict[str, dict] = {n: layer_info_of(i) for n, i in infos.items()}
        self.meta = {k: v for k, v in meta.items() if k not in ("format", "version", "layers")}
        self.layers = _FileLayers(self)

    def __contains__(self, name):
        return name in self.infos

    def __getitem__(self, name) -> LayerStats:
        if name not in self.infos:
            raise KeyError(name)
        self.check_unchanged()
        _, f = open_checked(self.path, STATS_FORMAT, STATS_VERSION)
        with f:
            return read_layer(f, self.path, name, self.infos[name])

    def names(self):
        return list(self.infos)

    def width_of(self, name: str) -> int:
        return self.infos[name]["width"]

    def rows_of(self, name: str) -> int:
        return self.infos[name]["rows"]

    def held_of(self, name: str) -> tuple[int, int]:
        return self.infos[name].get("held", 0), self.infos[name].get("held_seen", 0)

    def nbytes(self) -> int:
        return 0  # nothing held in memory

    def is_file(self, path: str) -> bool:
        """Whether path is this object's file, as it was when opened."""
        try:
            return os.path.samefile(path, self.path) and _file_identity(self.path) == self._identity
        except OSError:
            return False

    def check_unchanged(self) -> None:
        try:
            now = _file_identity(self.path)
        except OSError:
            now = None
        if now != self._identity:
            raise FileError(f"statistics file {self.path} was {'removed' if now is None else 'replaced'} after "
                            "these statistics were saved into it (another run wrote that file since); to use the "
                            "file as it is now choose it in LiteFFN Compress Model's stats_file, or run the LiteFFN "
                            "Calibrate node that made these statistics again")

    def merge_(self, other, names=("these statistics", "the others")):
        raise TypeError("statistics kept in their file are read-only; merge them into ActivationStats()")

    def __repr__(self):
        return f"FileStats({self.path!r}, {len(self.infos)} layers)"


def _file_identity(path: str) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def stream_passes(groups, run_group, earlier: "ActivationStats | None" = None, release: bool = False,
                  rows: dict | None = None):
    """Calibration once per group of layers, yielding each group's statistics on the host as soon
    as its pass ends: (name, LayerStats) pairs, in the order the collector met them.

    run_group(group) -> {name: LayerStats} runs the calibration for that group (e.g. the
    collector's stats.layers; its entries are taken out of it). earlier: statistics added into
    each layer (in memory or a FileStats, read one layer at a time); its layers this run lacks
    follow at the end, as read. release: after the consumer asks for the next layer, the one it
    had is emptied (xtx, absmax = None), so a consumer that writes and forgets (write_stats)
    keeps one group alive at most, never the whole run; off when the consumer keeps them. rows:
    filled with {name: rows} of what was yielded. A layer that never ran raises RuntimeError,
    non-finite statistics ValueError (LayerStats.check_finite), before its group is yielded."""
    seen = set()
    for group in groups:
        got = run_group(group)
        missing = [n for n in group if n not in got or got[n].rows == 0]
        if missing:
            raise RuntimeError(f"LiteFFN Calibrate: {len(missing)} linears never ran (e.g. {missing[0]}); "
                               "is this latent empty, or does another node skip them?")
        for n in group:
            got[n].check_finite(n)
        for n in [n for n in got if n in group]:
            st = got.pop(n)
            s = LayerStats(st.xtx.cpu(), st.absmax.cpu(), st.rows,  # off the GPU (no copy when on the host)
                           None if st.held is None else st.held.cpu(), st.held_seen)
            del st
            if earlier is not None and n in earlier:
                s.merge_(earlier[n])
            seen.add(n)
            if rows is not None:
                rows[n] = int(s.rows)
            yield n, s
            if release:
                s.xtx = s.absmax = s.held = None
            del s
        del got
    if earlier is not None:
        for n in earlier.names():
            if n in seen:
                continue
            s = earlier[n]
            if rows is not None:
                rows[n] = int(s.rows)
            yield n, s
            del s


def sibling_temp(path: str) -> str:
    """A name for a scratch file beside path that safe_io.clean_stale recognises as LiteFFN's (and
    removes once this process is gone)."""
    from .safe_io import temp_path

    d, base = os.path.split(os.path.abspath(path))
    return temp_path(d, base[:120] + ".run")


def check_stats_meta(meta: dict, path: str) -> dict:
    """{layer: {"rows", "width"}} of a statistics file's metadata, checked (FileError otherwise);
    its fingerprint, if any, well formed."""
    layers = meta.get("layers")
    if not isinstance(layers, dict):
        raise FileError(f"statistics file {path}: metadata 'layers' is missing or not a table; {RECALIBRATE}")
    for name, info in layers.items():
        ok = isinstance(info, dict) and all(isinstance(info.get(k), int) and not isinstance(info.get(k), bool)
                                            for k in ("rows", "width"))
        if not ok or info["rows"] < 0 or info["width"] < 1:
            raise FileError(f"statistics file {path}: metadata of layer {name} is {info!r}, not rows >= 0 and "
                            f"width >= 1; {RECALIBRATE}")
        held = [info.get(k, 0) for k in ("held", "held_seen")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in held) or held[0] > held[1]:
            raise FileError(f"statistics file {path}: metadata of layer {name} is {info!r}, not held <= held_seen, "
                            f"both >= 0; {RECALIBRATE}")
    fp = check_fingerprint(meta.get("fingerprint"), f"statistics file {path}", RECALIBRATE, required=False)
    for name, info in layers.items():
        if name in fp and fp[name][1] != info["width"]:
            raise FileError(f"statistics file {path}: layer {name} is {info['width']} wide but its fingerprint "
                            f"says {fp[name][1]}; {RECALIBRATE}")
    return layers


def check_layer_header(f, path: str, name: str, info: dict) -> None:
    """The layer's tensors in an open statistics file: present, F32, [w, w] and [w]."""
    w = info["width"]
    held = int(info.get("held", 0))
    for k, shape in (("xtx", (w, w)), ("absmax", (w,))) + ((("held", (held, w)),) if held else ()):
        try:
            sl = f.get_slice(f"{name}.{k}")
        except Exception:  # safetensors raises its own error types
            raise FileError(f"statistics file {path} has no tensor {name}.{k} (layer {name}); {RECALIBRATE}") from None
        dt = "BF16" if k == "held" else "F32"
        if tuple(sl.get_shape()) != shape or sl.get_dtype() != dt:
            raise FileError(f"statistics file {path}: layer {name}, tensor {k} is {sl.get_dtype()} "
                            f"{list(sl.get_shape())}, expected {dt} {list(shape)} ({w} wide); {RECALIBRATE}")


def read_layer(f, path: str, name: str, info: dict, device="cpu") -> LayerStats:
    """One layer of an open statistics file, its shapes, dtype and values checked."""
    check_layer_header(f, path, name, info)
    held = f.get_tensor(f"{name}.held").to(device) if info.get("held", 0) else None
    s = LayerStats(f.get_tensor(f"{name}.xtx").to(device), f.get_tensor(f"{name}.absmax").to(device),
                   int(info["rows"]), held, int(info.get("held_seen", 0)))
    _check_layer_finite(s, path, name)
    return s


def layer_info(s: LayerStats) -> dict:
    """A layer's entry in a statistics file's metadata."""
    return layer_info_of({"rows": s.rows, "width": s.width, "held": s.held_rows, "held_seen": s.held_seen})


def layer_info_of(info: dict) -> dict:
    """A layer's entry as files carry it (from a checked file's metadata, or layer_info's): held-out counts
    only where rows were set aside, so files without them stay as they were."""
    out = {"rows": int(info["rows"]), "width": int(info["width"])}
    if info.get("held_seen"):
        out.update(held=int(info.get("held", 0)), held_seen=int(info["held_seen"]))
    return out


def _check_layer_finite(s: LayerStats, path: str, name: str) -> None:
    if not (all_finite(s.xtx) and all_finite(s.absmax) and (s.held is None or all_finite(s.held))):
        raise _non_finite(path, name)


def _non_finite(path: str, name: str) -> FileError:
    return FileError(f"statistics file {path}: layer {name} contains NaN or Inf; the model produced non-finite "
                     f"activations during calibration, or the file is damaged: {RECALIBRATE}")


def check_same_model(a: dict, b: dict, name_a: str, name_b: str, what: str = "added") -> None:
    """Metadata of two sets of statistics: MismatchError if they come from different models."""
    compare_files(a, b, name_a, name_b, what)


# ------------------------------------------------------------------ streaming merge
def merge_files(inputs: list[str], out: str, option: str = "output") -> dict:
    """Sum statistics files into out, one layer at a time: memory holds about one layer (its sum
    and a 4 MiB read buffer), never the files. Files of different models (family, per-layer
    fingerprints, widths) and damaged files (every layer's header) are refused before anything is
    written; out is written through safe_io (write_stats: never one of the inputs, appears whole or
    not at all). -> out's metadata (with "layers"). option: how the user names out, for messages."""
    return _stream_merge(list(inputs), out, None, inputs=inputs, option=option)


def append_to_file(stats: "ActivationStats", path: str, option: str = "filename") -> "ActivationStats":
    """Add stats to the statistics file at path (or write it if there is none), streaming the
    file layer by layer: the append of statistics held in memory (Calibrate streams its passes
    through save_stream instead, which gives the same file). stats' own layers become the totals, in place; the
    file's other layers are copied through without being held. Returns stats (meta: runs and
    fingerprint of the total). An error leaves the file as it was (stats may hold part of the sum)."""
    if not os.path.exists(path):
        stats.save(path, option=option)
        return stats
    _stream_merge([path], path, stats, inputs=(), option=option)  # path is read while its successor is written
    return stats


def _stream_merge(paths: list[str], out: str, into: "ActivationStats | None", inputs=(), option="output") -> dict:
    metas = []  # (name for messages, meta, {layer: info}) of every input, then of `into`
    spans = []  # {tensor: (start, end)} byte ranges of every input
    for p in paths:  # headers only: every layer's tensors checked before anything is read or written
        meta, f = open_checked(p, STATS_FORMAT, STATS_VERSION)
        with f:
            infos = check_stats_meta(meta, p)
            for name, info in infos.items():
                check_layer_header(f, p, name, info)
        metas.append((p, meta, infos))
        spans.append(_data_spans(p))
    if into is not None:
        for n, s in into.layers.items():
            s.check_finite(n)
        metas.append(("the statistics being added", into.meta, {n: layer_info(s) for n, s in into.layers.items()}))
    for i, (pa, ma, ia) in enumerate(metas):  # every pair
        for pb, mb, ib in metas[i + 1:]:
            check_same_model(ma, mb, pa, pb, "merged")
            for n in ia:
                if n in ib and ia[n]["width"] != ib[n]["width"]:
                    raise MismatchError(f"{pa} and {pb} hold layer {n} at widths {ia[n]['width']} and "
                                        f"{ib[n]['width']}: statistics of different models cannot be merged")
    meta = {k: v for k, v in metas[0][1].items() if k not in ("format", "version", "layers")}
    meta["runs"] = sum(int(m.get("runs", 1)) for _, m, _ in metas)
    fp = {}
    for _, m, _ in metas:
        fp = {**(m.get("fingerprint") or {}), **fp}
    if fp:
        meta["fingerprint"] = fp
    order = list(dict.fromkeys(n for _, _, infos in metas for n in infos))
    width = {n: infos[n]["width"] for _, _, infos in reversed(metas) for n in infos}

    def total(name: str, files) -> LayerStats:
        """The layer summed over the inputs (and `into`, in place)."""
        acc = into.layers.get(name) if into is not None else None
        for (p, _, infos), span, fh in zip(metas, spans, files):
            if name not in infos:
                continue
            w = infos[name]["width"]
            absmax = torch.empty(w)
            _read_f32(fh, span[f"{name}.absmax"], absmax, p, name)
            held = _read_held(p, name, infos[name])
            seen = int(infos[name].get("held_seen", 0))
            if acc is None:  # the first input's copy becomes the sum
                acc = LayerStats(torch.empty(w, w), absmax, int(infos[name]["rows"]), held, seen)
                _read_f32(fh, span[f"{name}.xtx"], acc.xtx, p, name)
            else:
                _read_f32(fh, span[f"{name}.xtx"], acc.xtx, p, name, add=True)
                acc.absmax = torch.maximum(acc.absmax, absmax.to(acc.absmax.device))
                acc.rows += int(infos[name]["rows"])
                acc.held, acc.held_seen = merge_held(acc.held, acc.held_seen, held, seen)
        if not (all_finite(acc.xtx) and all_finite(acc.absmax)):
            raise FileError(f"layer {name}: the sum of its statistics overflows fp32 (Inf); merge fewer files")
        return acc

    def layers():
        files = [open(p, "rb", buffering=0) for p in paths]  # plain reads: nothing mapped
        try:
            for name in order:
                acc = total(name, files)
                out = LayerStats(acc.xtx, acc.absmax, acc.rows, acc.held, acc.held_seen)  # a wrapper: `into`'s
                del acc  # own layer stays whole
                yield name, out
                out.xtx = out.absmax = out.held = None  # written: the consumer's loop variable must not keep it alive
                # while the next layer is summed
        finally:
            for fh in files:
                fh.close()

    written = {}

    def counted():
        for name, s in layers():
            written[name] = layer_info(s)
            yield name, s

    write_stats(out, counted(), meta, inputs=inputs, widths=width, option=option)
    if into is not None:
        into.meta = meta
    return {**meta, "layers": written}


_CHUNK = 1 << 20  # values per read when adding (4 MiB)


def _read_held(path: str, name: str, info: dict) -> torch.Tensor | None:
    """A layer's held-out rows from a statistics file whose headers were checked (None if it has none)."""
    if not info.get("held", 0):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        t = f.get_tensor(f"{name}.held")
    if not all_finite(t):
        raise _non_finite(path, name)
    return t


def _data_spans(path: str) -> dict:
    """{tensor: (first byte, end)} in a safetensors file whose header safe_open has accepted."""
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def _read_f32(fh, span: tuple, dst: torch.Tensor, path: str, name: str, add: bool = False) -> None:
    """Read the fp32 tensor at span of the open file into dst (add: into dst += it), in chunks;
    NaN / Inf in it are refused (FileError). safetensors is little-endian, as torch's hosts are."""
    flat = dst.view(-1)
    if span[1] - span[0] != flat.numel() * 4:
        raise FileError(f"statistics file {path}: layer {name} has a tensor of {span[1] - span[0]} bytes, expected "
                        f"{flat.numel() * 4}; the file is damaged: {RECALIBRATE}")
    buf = torch.empty(min(_CHUNK, flat.numel())) if add else None
    fh.seek(span[0])
    for i in range(0, flat.numel(), _CHUNK):
        part = flat[i:i + _CHUNK]
        into = buf[:part.numel()] if add else part
        view = memoryview(into.numpy()).cast("B")
        got = 0
        while got < len(view):
            k = fh.readinto(view[got:])
            if not k:
                raise FileError(f"statistics file {path} ends inside layer {name}: the file is truncated: "
                                f"{RECALIBRATE}")
            got += k
        if not bool(torch.isfinite(into).all()):
            raise _non_finite(path, name)
        if add:
            part += into.to(part.device)


def stats_file_bytes(widths: dict[str, int]) -> int:
    """Size of a statistics file holding layers of these widths (header room included)."""
    return sum(layer_bytes(k, HOLDOUT_ROWS) for k in widths.values()) + _stats_header_room(len(widths))


def _stats_header_room(layers: int) -> int:
    return 16384 + 1024 * layers  # ~330 bytes per layer measured with LTX-2's names


def check_stats_output(path: str, widths: dict[str, int] | None = None, inputs=(), option: str = "output",
                       extra_bytes: int = 0) -> str:
    """A statistics output checked before any work (safe_io.check_output): not an input, not a
    directory or device, not an existing file of another kind, room for its size (plus
    extra_bytes of scratch written beside it first, e.g. save_stream's run file)."""
    from .safe_io import check_output

    return check_output(path, inputs, expect_format=STATS_FORMAT, option=option,
                        expected_bytes=None if widths is None else stats_file_bytes(widths) + int(extra_bytes))


def save_stream(path: str, layers, meta: dict, widths: dict[str, int], append: bool = False,
                option: str = "output") -> "FileStats":
    """Write (name, LayerStats) pairs (a generator: stream_passes) to the statistics file at path,
    one layer in memory at a time, and return the result kept in its file (FileStats).

    append and a file at path: the pairs go into a scratch statistics file beside path first
    (their widths up front, as write_stats takes them), which is then summed with the file into
    path layer by layer (_stream_merge, the same sums and order as append_to_file) and removed
    whatever happens. Either way path appears whole or not at all: an error (or a layer the
    generator refuses) leaves it as it was and no temp. Disk: the scratch file plus the new file
    (check_stats_output(..., extra_bytes=) checks that before the work)."""
    if not (append and os.path.exists(path)):
        write_stats(path, layers, meta, widths=widths, option=option)
        return FileStats(path)
    run = sibling_temp(path)
    lock = None
    try:
        write_stats(run, layers, meta, widths=widths, option=option)
        lock = _hold_lock(run)  # another process's clean_stale leaves it alone while it is merged
        _stream_merge([path, run], path, None, inputs=(), option=option)  # path is read while its successor
        # is written; x + y == y + x in fp32, so the totals are bit-identical to append_to_file's
    finally:
        if lock is not None:
            os.close(lock)
        try:
            os.unlink(run)
        except FileNotFoundError:
            pass
    return FileStats(path)


def _hold_lock(path: str) -> int:
    """An open descriptor of path holding an exclusive flock on it where there are flocks (as SafeOutput
    holds on its temps)."""
    from .safe_io import lock_exclusive

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    lock_exclusive(fd)
    return fd


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
            if s.held_rows:
                w.add(f"{name}.held", s.held.detach().to(torch.bfloat16).contiguous())
            infos[name] = layer_info(s)
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
        raise FileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    try:
        return _checked_meta(raw, path, fmt, version), f
    except BaseException:
        f.__exit__(None, None, None)
        raise


def _checked_meta(raw, path: str, fmt: str, version: int) -> dict:
    if raw is None:
        raise FileError(f"{path} is a safetensors file but not a LiteFFN {fmt} file (no 'liteffn' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise FileError(f"{path}: its LiteFFN metadata is not valid JSON ({e}): the file is damaged") from None
    if not isinstance(meta, dict):
        raise FileError(f"{path}: its LiteFFN metadata is not a table: the file is damaged")
    if meta.get("format") != fmt:
        raise FileError(f"{path} holds {meta.get('format')!r}, expected {fmt!r}")
    v = meta.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise FileError(f"{path}: its format version is {v!r}, not a number: the file is damaged")
    if v > version:
        raise FileError(f"{path} is format version {v}, newer than this LiteFFN reads ({version}); update the pack")
    return meta


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
                 storage: str | torch.device | None = None, chunk_rows: int = 4096, widths: dict | None = None,
                 holdout_rows: int = 0, holdout_every: int = HOLDOUT_EVERY):
        self.model = model
        if model is not None:
            mods = dict(model.named_modules())
            missing = [n for n in names if n not in mods]
            if missing:
                raise KeyError(f"no module named {missing[:3]} in the model")
            widths = {n: _in_features(mods[n], n) for n in names}
        self.widths = dict(widths)
        self.chunk_rows = chunk_rows
        if holdout_rows < 0 or holdout_every < 2:
            raise ValueError(f"holdout_rows must be >= 0 and holdout_every >= 2, got {holdout_rows}, {holdout_every}")
        self.holdout_rows, self.holdout_every = int(holdout_rows), int(holdout_every)
        self._gens: dict[str, torch.Generator] = {}
        need = (sum(layer_bytes(k, self.holdout_rows) for k in self.widths.values())
                + chunk_rows * max(self.widths.values(), default=0) * 4)
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
            if ltx2.is_ffn_linear(n) and n.endswith("." + ltx2.DOWN):
                self._hook_fused_down(root, n)

    def _hook_fused_down(self, root: torch.nn.Module, name: str) -> None:
        """An FFN's down linear may run without its module being called: ComfyUI (0.33) folds the GELU
        into the int8 activation quantizer of an int8 (int8-ConvRot: LTX-2.5's official checkpoints)
        down linear and calls the kernel directly (comfy.ops.linear_input_act). Its input is then taken
        from the up linear's output: held when the up linear returns, dropped when the down linear's own
        hook runs, counted (through the FFN's GELU) when the next up call or the FFN's return finds it
        still held. So each row is counted once, whichever way the FFN ran."""
        ffn = ltx2.ffn_of(name)
        try:
            up, unit = root.get_submodule(f"{ffn}.{ltx2.UP}"), root.get_submodule(ffn)
        except AttributeError:  # not LTX-2's FFN module tree (a model of other modules): its own hook only
            return
        held = [None]

        def flush():
            if held[0] is not None:
                h, held[0] = held[0], None
                self.update(name, ltx2.ffn_hidden(h))

        def up_done(_module, _args, out):
            flush()  # an earlier chunk's output that no down-linear call consumed
            held[0] = out

        def down_called(_module, _args):
            held[0] = None

        self._handles += [up.register_forward_hook(up_done), unit.register_forward_hook(lambda *_: flush()),
                          root.get_submodule(name).register_forward_pre_hook(down_called)]

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
        every = self.holdout_every if self.holdout_rows else 0
        start = s.rows + s.held_seen  # rows this layer was given before (held-out ones included)
        fit = x.shape[0]
        for i in range(0, x.shape[0], self.chunk_rows):
            xc = x[i : i + self.chunk_rows].float()
            if not torch.isfinite(xc).all():
                raise ValueError(f"non-finite activation entering {name}; statistics not updated")
            if every:
                first = (every - 1 - (start + i)) % every  # the chunk's first row set aside
                if first < xc.shape[0]:
                    if xc.data_ptr() == x.data_ptr() + i * x.stride(0) * x.element_size():
                        xc = xc.clone()  # .float() of an fp32 input is the model's own tensor: never zeroed
                    rows = xc[first::every]  # a view: zeroed below once copied out
                    self._hold(name, s, rows.to(torch.bfloat16))
                    fit -= rows.shape[0]
                    rows.zero_()  # a zero row adds nothing to X^T X or absmax
            s.xtx += (xc.T @ xc).to(s.xtx.device)
            s.absmax = torch.maximum(s.absmax, xc.abs().amax(0).to(s.absmax.device))
        s.rows += fit

    def _hold(self, name: str, s: LayerStats, rows: torch.Tensor) -> None:
        """Reservoir sampling (Algorithm R) of the rows set aside: s.held stays a uniform sample of all
        s.held_seen of them, at most holdout_rows; the draws come from a generator seeded by the name."""
        cap, n = self.holdout_rows, rows.shape[0]
        dev = s.xtx.device
        have = s.held_rows
        take = min(cap - have, n)
        if take > 0:
            new = rows[:take].to(dev)
            s.held = new.clone() if s.held is None else torch.cat([s.held, new])
        if take < n:
            g = self._gens.get(name)
            if g is None:
                g = self._gens[name] = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            j = torch.arange(s.held_seen + take, s.held_seen + n, dtype=torch.float64) + 1  # candidates' 1-based ranks
            slot = (torch.rand(n - take, generator=g, dtype=torch.float64) * j).long()
            last = {}  # slot -> the last candidate drawn into it (later draws replace earlier ones)
            for c, sl in enumerate(slot.tolist()):
                if sl < cap:
                    last[sl] = take + c
            if last:
                slots = torch.tensor(list(last), device=dev)
                src = torch.tensor(list(last.values()), device=rows.device)
                s.held[slots] = rows[src].to(dev)
        s.held_seen += n


def _in_features(m: torch.nn.Module, name: str) -> int:
    if hasattr(m, "in_features"):
        return int(m.in_features)
    w = getattr(m, "weight", None)
    if w is None or w.dim() != 2:
        raise TypeError(f"{name} is not a linear layer (no 2-D weight)")
    return int(w.shape[1])
