"""A readable per-layer report of a compression: what the Compress node shows and the CLI prints."""
from __future__ import annotations


def format_report(infos: dict, dense_bytes: int, header: str = "", notes=()) -> str:
    """infos: {linear name: CompressedLayer.info}; dense_bytes: bf16 bytes of the same linears."""
    if not infos:
        return "no layers compressed"
    comp = sum(i["bytes"] for i in infos.values())
    errs = [i["rel_err"] for i in infos.values()]
    ranks = [i["rank"] for i in infos.values()]
    calibrated = sum(bool(i.get("calibrated")) for i in infos.values())
    held = heldout_line(infos)
    lines = [header] if header else []
    lines += [
        f"{len(infos)} linears, residual {next(iter(infos.values()))['format']}, rank {min(ranks)}-{max(ranks)} "
        f"(mean {sum(ranks) / len(ranks):.0f}), {calibrated} calibrated",
        f"size {comp / 2**20:.1f} MiB vs {dense_bytes / 2**20:.1f} MiB bf16 ({comp / max(dense_bytes, 1):.2f}x)",
        f"relative error (weights on calibration inputs): mean {100 * sum(errs) / len(errs):.2f}%, "
        f"max {100 * max(errs):.2f}%",
        *([held] if held else []),
        *([match_line(infos)] if any("match" in i for i in infos.values()) else []),
        *([larger_than_dense(comp, dense_bytes)] if comp >= dense_bytes > 0 else []),
        *notes,
        "",
        f"{'layer':<40} {'rank':>5} {'energy':>7} {'error':>7} {'held-out':>9} {'plain':>7} {'MiB':>8}  stats",
    ]
    for name, i in infos.items():
        ho = i.get("heldout_err")
        pl = i.get("heldout_err_plain")
        lines.append(f"{name:<40} {i['rank']:>5} {100 * i.get('energy', 0.0):>6.1f}% {100 * i['rel_err']:>6.2f}% "
                     f"{_pct(ho):>9} {_pct(pl):>7} {i['bytes'] / 2**20:>8.2f}  {'yes' if i.get('calibrated') else 'no'}")
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def heldout_totals(infos: dict) -> dict | None:
    """Output error on the held-out rows over the layers that have it: pooled (sqrt of the summed squared
    errors over the summed squared outputs), mean and max, for the result and, where measured, for a plain
    compression of the same rank; None when no layer has held-out rows (statistics without them, or none)."""
    got = {n: i for n, i in infos.items() if isinstance(i.get("heldout_err"), (int, float))}
    if not got:
        return None

    def pooled(key):
        num = sum(i[key] ** 2 * i.get("heldout_norm2", 1.0) for i in got.values())
        return (num / max(sum(i.get("heldout_norm2", 1.0) for i in got.values()), 1e-60)) ** 0.5

    out = {"layers": len(got), "rows": min(int(i.get("heldout_rows", 0)) for i in got.values()),
           "total": pooled("heldout_err"), "mean": sum(i["heldout_err"] for i in got.values()) / len(got),
           "max": max(i["heldout_err"] for i in got.values())}
    if all(isinstance(i.get("heldout_err_plain"), (int, float)) for i in got.values()):
        out["plain_total"] = pooled("heldout_err_plain")
        out["plain_mean"] = sum(i["heldout_err_plain"] for i in got.values()) / len(got)
    return out


def heldout_line(infos: dict) -> str:
    """The report's line on the error users get (held-out rows, activations quantized as the kernels do)."""
    t = heldout_totals(infos)
    if t is None:
        return ""
    line = (f"output error on held-out rows (activations quantized as the kernels do; {t['layers']} linears, "
            f">= {t['rows']} rows each): total {100 * t['total']:.2f}%, mean {100 * t['mean']:.2f}%, "
            f"max {100 * t['max']:.2f}%")
    if "plain_total" in t:
        line += (f"; without statistics (plain SVD and round-to-nearest, same rank) {100 * t['plain_total']:.2f}% "
                 f"(x{t['total'] / max(t['plain_total'], 1e-30):.2f})")
    return line


def match_line(infos: dict) -> str:
    """The report's line on ranks chosen per layer to match the FP8 residual's error (RankPolicy.match)."""
    m = [i["match"] for i in infos.values() if "match" in i]
    met = [x for x in m if x.get("met")]
    ratios = [x["ratio"] for x in m if "ratio" in x]
    line = (f"rank per layer to stay within {m[0]['target']:g}x the FP8 residual's held-out error at rank "
            f"{m[0]['ref_rank']}: {len(met)} of {len(m)} linears within it")
    if ratios:
        line += f" (ratio mean {sum(ratios) / len(ratios):.2f}, max {max(ratios):.2f})"
    if len(met) < len(m):
        line += "; the others stopped at the largest rank allowed"
    return line


def dense_bytes(infos: dict) -> int:
    """bf16 bytes of the dense weights that compressed layers (their infos) replace."""
    return sum(2 * i["in_features"] * i["out_features"] for i in infos.values())


def larger_than_dense(comp_bytes: int, dense_bytes: int) -> str:
    return (f"WARNING: the compressed linears take {comp_bytes / max(dense_bytes, 1):.2f}x the memory of their dense "
            "bf16 weights: no memory is saved (a lower rank or energy, or a 4-bit residual, makes them smaller)")
