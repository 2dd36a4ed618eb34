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
    lines = [header] if header else []
    lines += [
        f"{len(infos)} linears, residual {next(iter(infos.values()))['format']}, rank {min(ranks)}-{max(ranks)} "
        f"(mean {sum(ranks) / len(ranks):.0f}), {calibrated} calibrated",
        f"size {comp / 2**20:.1f} MiB vs {dense_bytes / 2**20:.1f} MiB bf16 ({comp / max(dense_bytes, 1):.2f}x)",
        f"relative error (weights on calibration inputs): mean {100 * sum(errs) / len(errs):.2f}%, "
        f"max {100 * max(errs):.2f}%",
        *([larger_than_dense(comp, dense_bytes)] if comp >= dense_bytes > 0 else []),
        *notes,
        "",
        f"{'layer':<40} {'rank':>5} {'energy':>7} {'error':>7} {'MiB':>8}  stats",
    ]
    for name, i in infos.items():
        lines.append(f"{name:<40} {i['rank']:>5} {100 * i.get('energy', 0.0):>6.1f}% {100 * i['rel_err']:>6.2f}% "
                     f"{i['bytes'] / 2**20:>8.2f}  {'yes' if i.get('calibrated') else 'no'}")
    return "\n".join(lines)


def dense_bytes(infos: dict) -> int:
    """bf16 bytes of the dense weights that compressed layers (their infos) replace."""
    return sum(2 * i["in_features"] * i["out_features"] for i in infos.values())


def larger_than_dense(comp_bytes: int, dense_bytes: int) -> str:
    return (f"WARNING: the compressed linears take {comp_bytes / max(dense_bytes, 1):.2f}x the memory of their dense "
            "bf16 weights: no memory is saved (a lower rank or energy, or a 4-bit residual, makes them smaller)")
