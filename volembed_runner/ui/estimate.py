"""The dry run printed: counts, a per-stage table, totals, the same job on other GPUs, assumptions and warnings."""

from __future__ import annotations

from collections.abc import Callable

from rich import box
from rich.console import Console
from rich.table import Table

from volembed_runner.estimate import Estimate


def fmt_count(value: float | None) -> str:
    """3 significant digits with a unit: 6.46M, 4.04B, 219k; small numbers in full."""
    if value is None:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= 1e4 and abs(value) >= size * 0.9995:
            scaled = value / size
            return f"{scaled:.3g}{unit}" if abs(scaled) < 999.5 else f"{scaled:,.0f}{unit}"
    return f"{value:,.0f}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def fmt_usd(value: float | None) -> str:
    if value is None:
        return "unknown"
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.4f}"


def fmt_range(pair: list[float] | None, fmt: Callable[[float | None], str], label: str = "95%") -> str:
    if not pair or fmt(pair[0]) == fmt(pair[1]):
        return ""
    return f" ({label} {fmt(pair[0])}–{fmt(pair[1])})"


def _table(title: str, columns: list[str], wrap: str = "") -> Table:
    out = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in columns:
        out.add_column(col, justify="left" if col in ("STAGE", "GPU", "EACH", "RATE", "") else "right",
                       no_wrap=col != wrap, overflow="fold")
    return out


def summary_line(est: Estimate) -> str:
    """The estimate in one line (wall time, cost, GPUs at once): the dry run's total, and what a paid run prints."""
    iv = est.interval
    local = est.backend == "local"
    line = fmt_duration(est.wall_seconds) + fmt_range(iv.get("wall_seconds"), fmt_duration, "range")
    line += ", $0 (local: no spend)" if local else f", {fmt_usd(est.cost_usd)}"
    if not local:
        line += fmt_range(iv.get("cost_usd"), fmt_usd, "range")
    if est.effective_gpus is not None:
        line += f"; {est.effective_gpus} × {est.gpu} at once"
    kind = (est.throughput or {}).get("kind")
    return line + (f" ({kind} rate)" if kind else "")


def render(est: Estimate, console: Console) -> None:
    """Print the estimate: counts, per-stage table, totals, the same job on other GPUs, assumptions, warnings."""
    iv = est.interval
    local = est.backend == "local"
    counts = Table(title=f"estimate: {est.name} ({est.backend})", title_justify="left", show_header=False, box=None)
    counts.add_column(style="bold", no_wrap=True)
    counts.add_column()
    counts.add_row("documents", fmt_count(est.documents))
    counts.add_row("tokens", fmt_count(est.tokens) + fmt_range(iv.get("tokens"), fmt_count))
    counts.add_row("chunks", fmt_count(est.chunks) + fmt_range(iv.get("chunks"), fmt_count))
    counts.add_row("chunk tokens", fmt_count(est.embedded_tokens) + fmt_range(iv.get("embedded_tokens"), fmt_count))
    s = est.sample
    if s["documents"]:
        how = "all of them: exact" if s["complete"] else "converged" if s["converged"] else f"cap {s['cap']:,}"
        counts.add_row("sample", f"{s['documents']:,} documents ({how})")
    else:
        counts.add_row("sample", "none (sizes only)")
    if est.throughput:
        t = est.throughput
        per = "per GPU" if not local else "local engine"
        counts.add_row("throughput", f"{t['tokens_per_second']:,.0f} tokens/s {per} ({t['kind']})")
    console.print(counts)

    stages = _table("stages", ["STAGE", "CONTAINERS", "EACH", "CPU-H", "GPU-H", "TIME", "COST ($)"], wrap="EACH")
    for st in est.stages:
        stages.add_row(st.name, str(st.containers) if st.containers else "-", st.resources,
                       "-" if st.cpu_hours is None else f"{st.cpu_hours:,.2f}",
                       "-" if not st.gpu_hours else f"{st.gpu_hours:,.2f}",
                       "-" if st.seconds is None else fmt_duration(st.seconds),
                       "-" if local else fmt_usd(st.cost_usd))
    stages.add_row("total", "", "", "", "-" if not est.gpu_hours else f"{est.gpu_hours:,.2f}",
                   fmt_duration(est.wall_seconds), "$0" if local else fmt_usd(est.cost_usd), style="bold")
    console.print(stages)
    console.print(f"total: {summary_line(est)}", markup=False)
    kind = (est.throughput or {}).get("kind")
    base = est.uncalibrated
    if base is not None:
        console.print(f"uncalibrated: {fmt_duration(base['wall_seconds'])}, "
                      f"{'$0' if local else fmt_usd(base['cost_usd'])} at the {base['kind']} rate "
                      f"({base['tokens_per_second']:,.0f} tokens/s), which the calibrated one replaces", markup=False)
    elif not local and kind is not None:
        console.print(f"not calibrated: the {kind} rate is not measured on this job; `volembed-run calibrate SPEC` "
                      "probes the GPU (priced before it starts)", markup=False)
    if est.quality:
        console.print(est.quality, markup=False)
    for reason in est.unknown:
        console.print(f"unknown: {reason}", markup=False)

    title = "the same job on Modal GPUs, by cost" if local else "the same job on other GPUs, by cost"
    alt = _table(title, ["GPU", "$/H", "TOKENS/S", "RATE", "GPU-H", "TIME", "COST ($)", ""])
    rows = list(est.alternatives)
    if not local:
        rate = est.throughput or {}
        rows.append({"gpu": est.gpu, "usd_per_hour": est.gpu_usd_per_hour, "chosen": True,
                     "tokens_per_second": rate.get("tokens_per_second"), "rate_kind": rate.get("kind"),
                     "gpu_hours": est.gpu_hours, "wall_seconds": est.wall_seconds, "cost_usd": est.cost_usd})
        rows.sort(key=lambda r: (r["cost_usd"] is None, r["cost_usd"] or 0.0))
    for r in rows:
        price, tps = r.get("usd_per_hour"), r.get("tokens_per_second")
        alt.add_row(r["gpu"], "unknown" if price is None else f"{price:,.2f}",
                    "unknown" if tps is None else f"{tps:,.0f}", str(r.get("rate_kind") or ""),
                    "-" if r.get("gpu_hours") is None else f"{r['gpu_hours']:,.2f}",
                    fmt_duration(r.get("wall_seconds")), fmt_usd(r.get("cost_usd")),
                    "✔ chosen" if r.get("chosen") else "")
    console.print(alt)
    console.print("assumptions:", markup=False)
    for line in est.assumptions:
        console.print(f"  - {line}", markup=False)
    for line in est.warnings:
        console.print(f"warning: {line}", markup=False)

