"""`volembed-run report` as one self-contained HTML page (charts inline as data: URIs) and a PNG of the token
histogram, from `report.RunReport`.

Charts are drawn with matplotlib's object API (`Figure` → PNG, the Agg renderer): no pyplot, no display, no global
state, so it runs headless anywhere. The token histogram is a bar per bucket of stats.json, as fineweb-modal's
notebooks plotted chunk token counts (`plt.bar`, labelled axes and title).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from volembed_runner import store
from volembed_runner.report import RunReport
from volembed_runner.ui.estimate import fmt_count, fmt_duration, fmt_usd

BAR = "#3b6ea5"
ESTIMATE = "#b0b7c3"


def _figure(width: float = 9.0, height: float = 3.6) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig, fig.subplots()


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def ordered_buckets(hist: dict[str, int]) -> list[tuple[str, int]]:
    """Buckets in numeric order ("1", "2-3", …, "1024+"; stats.json stores them sorted as text), without the empty
    ones past the last that holds anything."""
    items = sorted(((str(k), int(v)) for k, v in hist.items()),
                   key=lambda kv: int(kv[0].split("-")[0].rstrip("+") or 0))
    while items and items[-1][1] == 0:
        items.pop()
    return items


def histogram_png(hist: dict[str, int], *, title: str, xlabel: str, ylabel: str = "chunks") -> bytes:
    """A bar per bucket (labels as stats.json writes them: "1", "2-3", "256"), counts above the bars."""
    fig, ax = _figure()
    buckets = ordered_buckets(hist)
    labels, counts = [k for k, _ in buckets], [v for _, v in buckets]
    bars = ax.bar(range(len(labels)), counts, color=BAR)
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 8 else 0, ha="right"
                  if len(labels) > 8 else "center")
    ax.bar_label(bars, labels=[f"{c:,}" if c else "" for c in counts], fontsize=8, padding=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def stage_seconds_png(report: RunReport) -> bytes | None:
    """Measured seconds of each stage this pass beside the estimate's, when either is known."""
    rows = [s for s in report.stages if s.seconds is not None or s.estimated_seconds is not None]
    if not rows:
        return None
    fig, ax = _figure(height=2.8)
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [s.estimated_seconds or 0 for s in rows], height=0.38, color=ESTIMATE,
            label="estimated")
    ax.barh([i - 0.2 for i in y], [s.seconds or 0 for s in rows], height=0.38, color=BAR, label="measured")
    ax.set_yticks(list(y), [s.name for s in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _e(value: Any) -> str:
    return html.escape("–" if value is None or value == "" else str(value))


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _card(label: str, value: str, hint: str = "", warn: bool = False) -> str:
    cls = "card warn" if warn else "card"
    hint_html = f'<div class="hint">{_e(hint)}</div>' if hint else ""
    return (f'<div class="{cls}"><div class="value">{_e(value)}</div><div class="label">{_e(label)}</div>'
            f"{hint_html}</div>")


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}% of {whole:,}" if whole else "–"


def _rate(value: float | None, unit: str) -> str:
    return f"{value:,.0f} {unit}/s" if value else "–"


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2430; margin: 0;
       background: #f4f6f9; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; border-bottom: 1px solid #d5dae3; padding-bottom: 4px; }
.meta { color: #566173; font-size: 13.5px; }
.meta code { font-size: 12.5px; }
.status { display: inline-block; padding: 1px 10px; border-radius: 10px; font-size: 13px; font-weight: 600;
          vertical-align: middle; margin-left: 8px; background: #d9f2df; color: #17632b; }
.status.failed, .status.handover, .status.running { background: #fbe3e1; color: #8a1f17; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(128px, 1fr)); gap: 10px; }
.card { background: #fff; border: 1px solid #dfe3ea; border-radius: 8px; padding: 10px 12px; }
.card .value { font-size: 21px; font-weight: 650; }
.card .label { color: #566173; font-size: 13px; }
.card .hint { color: #7a8495; font-size: 12px; margin-top: 2px; }
.card.warn { border-color: #e6a19a; background: #fff6f5; }
figure { background: #fff; border: 1px solid #dfe3ea; border-radius: 8px; margin: 10px 0; padding: 8px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: #566173; font-size: 13px; padding: 4px 6px 0; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid #dfe3ea; font-size: 14px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #eceff4; vertical-align: top; }
th { background: #eef1f6; font-weight: 600; }
td:not(:first-child), th:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
table.text td, table.text th { text-align: left; }
.note { color: #566173; font-size: 13.5px; }
.ok { color: #17632b; }
details { margin-top: 10px; }
pre { background: #fff; border: 1px solid #dfe3ea; border-radius: 6px; padding: 10px; overflow-x: auto;
      font-size: 12.5px; }
"""


def render_html(report: RunReport, token_png: bytes | None = None) -> str:
    """The whole page as a string (self-contained: no link, script or file outside it)."""
    m, t, st = report.manifest, report.totals, report.stats
    chunks, documents = int(t.get("chunks", 0)), int(t.get("documents", 0))
    spec = m.get("spec") or {}
    emb, chunking, ds = spec.get("embedding") or {}, spec.get("chunking") or {}, spec.get("dataset") or {}
    failed = len(report.failures)
    truncated = int(t.get("truncated", 0))
    git = m.get("git") or {}
    commit = (git.get("commit") or "")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{_e(report.name)}: volembed-runner report</title><style>{CSS}</style></head><body><main>",
        f'<h1>{_e(report.name)}<span class="status {_e(report.status)}">{_e(report.status)}</span></h1>',
        '<div class="meta">',
        f"{_e(report.backend)} backend · volume <code>{_e(m.get('volume'))}</code> · spec "
        f"<code>{_e(m.get('spec_path'))}</code> (hash <code>{_e(m.get('spec_hash'))}</code>)"
        + (f" · git <code>{_e(commit)}</code>" if commit else "") + "<br>",
        f"pass {_e(m.get('passes'))} · started {_e(m.get('started_at'))} · finished {_e(m.get('finished_at'))}"
        f" · report made {_e(store.utc_stamp())}",
        "</div>",
    ]
    parts += [f'<p class="note">{_e(n)}</p>' for n in report.notes]

    parts.append("<h2>Counts</h2><div class=cards>")
    dims = t.get("dims") or []
    parts += [
        _card("documents", f"{documents:,}", f"{int(t.get('empty_documents', 0)):,} empty"),
        _card("chunks", f"{chunks:,}", f"{t.get('tokens', 0) / chunks:,.1f} tokens each on average" if chunks else ""),
        _card("tokens", fmt_count(t.get("tokens")), "in chunks"),
        _card("vectors", f"{int(t.get('vectors', 0)):,}", f"{'/'.join(str(d) for d in dims)} dimensions"
              if dims else ""),
        _card("tiny chunks", f"{report.tiny_chunks:,}", f"under {report.tiny_below} tokens",
              warn=report.tiny_chunks > 0),
        _card("truncated", f"{truncated:,}", "chunks the engine cut", warn=truncated > 0),
        _card("failed shards", f"{failed:,}", "this pass", warn=failed > 0),
    ]
    parts.append("</div>")

    parts.append("<h2>Chunks</h2>")
    tokens_hist = st.get("tokens_per_chunk") or {}
    if tokens_hist and token_png is not None:
        parts.append(f"<figure>{_img(token_png, 'tokens per chunk')}<figcaption>tokens per chunk, in buckets "
                     f"(chunk size {_e(st.get('chunk_size'))}, overlap {_e(st.get('overlap'))}; tokens of the "
                     f"model's tokenizer, without special tokens or prefix)</figcaption></figure>")
    per_doc = st.get("chunks_per_document") or {}
    if per_doc:
        png = histogram_png(per_doc, title="chunks per document", xlabel="chunks in a document",
                            ylabel="documents")
        parts.append(f"<figure>{_img(png, 'chunks per document')}<figcaption>chunks per document (0: empty "
                     "documents, which make no chunk)</figcaption></figure>")
    if not tokens_hist and not per_doc:
        parts.append('<p class="note">no chunk statistics yet</p>')

    parts.append("<h2>Tiny chunks, truncations and failures</h2>")
    parts.append(_table(["check", "count", "share"], [
        (f"chunks under {report.tiny_below} tokens", f"{report.tiny_chunks:,}", _pct(report.tiny_chunks, chunks)),
        ("empty documents (no chunk)", f"{int(t.get('empty_documents', 0)):,}",
         _pct(int(t.get("empty_documents", 0)), documents)),
        ("chunks truncated by the engine", f"{truncated:,}", _pct(truncated, chunks)),
        ("failed shards (this pass)", f"{failed:,}", ""),
    ]))
    if report.failures:
        parts.append("<p></p>" + _table(["stage", "shard", "cause"],
                                         [(f.stage, f.shard, f.cause) for f in report.failures], cls="text"))
    else:
        parts.append('<p class="note ok">No shard failed in the last pass.</p>')

    parts.append("<h2>Stages</h2>")
    parts.append(_table(
        ["stage", "shards done", "failed", "time", "estimated", "throughput", "passes"],
        [(s.name, f"{s.done:,} / {s.total:,}", f"{s.failed:,}", _duration(s.seconds), _duration(s.estimated_seconds),
          _throughput(s), f"{s.passes:,}") for s in report.stages]))
    seconds_png = stage_seconds_png(report)
    if seconds_png is not None:
        parts.append(f"<figure>{_img(seconds_png, 'stage time')}<figcaption>time in each stage, measured and "
                     "estimated</figcaption></figure>")
    parts.append('<p class="note">Time and throughput are summed over every pass that worked on these outputs '
                 "(a rerun that finds its shards done adds nothing); failures are the last pass's.</p>")

    parts.append("<h2>Estimated and measured</h2>")
    parts.append(_estimate_section(report))

    parts.append("<h2>Run</h2>")
    fps = m.get("fingerprints") or {}
    source = ds.get("hf") or ", ".join(str(f) for f in ds.get("files") or [])
    parts.append(_table(["setting", "value"], [
        ("dataset", source + (f" [{ds.get('config')}/{ds.get('split')}]" if ds.get("hf") else "")),
        ("limit", ds.get("limit")),
        ("model", f"{emb.get('model')}" + (f" @ {emb['revision']}" if emb.get("revision") else "")),
        ("chunking", f"{chunking.get('size')} tokens, overlap {chunking.get('overlap')}"),
        ("fingerprints", "  ".join(f"{k} {v}" for k, v in fps.items())),
        ("outputs", (m.get("outputs") or {}).get("embeddings")),
    ], cls="text"))
    parts.append("<details><summary>spec (resolved)</summary><pre>"
                 f"{html.escape(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))}</pre></details>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.1f} s" if seconds < 60 else fmt_duration(seconds)


def _throughput(stage: Any) -> str:
    if stage.name == "embed":
        return _rate(stage.tokens_per_second, "tokens") + (f" · {_rate(stage.rows_per_second, 'vectors')}"
                                                           if stage.rows_per_second else "")
    if stage.name == "chunk":
        return _rate(stage.rows_per_second, "documents") + (f" · {_rate(stage.tokens_per_second, 'tokens')}"
                                                            if stage.tokens_per_second else "")
    return f"{stage.shards_worked:,} shard(s)" if stage.shards_worked else "–"


def _estimate_section(report: RunReport) -> str:
    est = report.estimate
    measured = report.measured_seconds
    local = report.backend == "local"
    if est is None:
        return (f'<p class="note">No estimate: {_e(report.estimate_error or "it could not be made")}. Measured: '
                f"{_e(_duration(measured))} in the stages.</p>")
    measured_cost = "$0 (local: no spend)" if local else \
        "not measured here: Modal bills per container-second (see the app's usage in Modal's dashboard)"
    rows = [
        ("wall time", fmt_duration(est.get("wall_seconds")), _duration(measured)
         + (f" (over {report.passes} passes)" if report.passes > 1 else "")),
        ("cost", "$0 (local: no spend)" if local else fmt_usd(est.get("cost_usd")), measured_cost),
        ("chunks", fmt_count(est.get("chunks")), f"{int(report.totals.get('chunks', 0)):,}"),
        ("tokens in chunks", fmt_count(est.get("embedded_tokens")), fmt_count(report.totals.get("tokens"))),
    ]
    assumptions = "".join(f"<li>{_e(a)}</li>" for a in est.get("assumptions") or [])
    return (_table(["figure", "estimated", "measured"], rows)
            + f'<p class="note">The estimate is {_e(report.estimate_source)}.</p>'
            + (f"<details><summary>the estimate's assumptions</summary><ul>{assumptions}</ul></details>"
               if assumptions else ""))


def write_report(report: RunReport, html_path: Path) -> tuple[Path, Path | None]:
    """Write the page and, beside it, the token histogram as `<stem>-tokens.png`; both atomically."""
    html_path = Path(html_path)
    hist = report.stats.get("tokens_per_chunk") or {}
    png_path: Path | None = None
    token_png = None
    if hist:
        token_png = histogram_png(hist, title=f"{report.name}: tokens per chunk", xlabel="tokens in a chunk")
        png_path = html_path.with_name(f"{html_path.stem}-tokens.png")
        store.write_bytes_atomic(png_path, token_png, mode=store.USER_FILE_MODE)
    store.write_bytes_atomic(html_path, render_html(report, token_png).encode("utf-8"), mode=store.USER_FILE_MODE)
    return html_path, png_path
