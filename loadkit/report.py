"""A static HTML report of one run, built from its staged MLflow artifacts: the dashboard people
open without Jupyter (MLflow UI -> run -> Artifacts -> report.html, or any browser).

Reads, from one folder: ``summary.txt`` (the printed summary), ``batches.parquet`` (one row per
batch result), ``memory.parquet`` (the memory monitor's samples), ``rejects_sample.parquet`` and
``alerts.json``; writes ``report.html`` there, with the charts inline as SVG (no other files,
no plotting library: it costs milliseconds at the end of every run). Missing inputs leave their
section out.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

_REJECT_ROWS = 20
_W, _H, _PAD = 560, 240, 48


def _table(path: Path) -> Optional[Any]:
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _nice(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.3g}"


def svg_chart(series: Sequence[Tuple[str, Sequence[Any], Sequence[float]]], x_label: str, y_label: str,
              bars: bool = False) -> str:
    """A small inline SVG line chart (or bar chart with ``bars``), y axis from 0. ``series``: (name, xs, ys).

    Hand-drawn on purpose: a report is written at the end of every tracked run, where matplotlib
    cost ~1-3 s of import and rendering; the notebook keeps matplotlib for exploration."""
    ys_all = [y for _, _, ys in series for y in ys] or [0.0]
    if bars:
        x0, x1 = 0.0, float(max(1, len(series[0][1]) if series else 1))
    else:
        xs_all = [float(x) for _, xs, _ in series for x in xs] or [0.0]
        x0, x1 = min(xs_all), max(xs_all)
    y1 = max(ys_all) * 1.1 or 1.0

    def sx(x: float) -> float:
        return _PAD + (x - x0) / ((x1 - x0) or 1.0) * (_W - 2 * _PAD)

    def sy(y: float) -> float:
        return _H - _PAD + 10 - y / y1 * (_H - _PAD - 20)

    colours = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" font-family="sans-serif" '
           'font-size="11">',
           f'<line x1="{_PAD}" y1="{sy(0):.1f}" x2="{_W - _PAD}" y2="{sy(0):.1f}" stroke="black"/>',
           f'<line x1="{_PAD}" y1="{sy(0):.1f}" x2="{_PAD}" y2="{sy(y1):.1f}" stroke="black"/>',
           f'<text x="{_PAD - 4}" y="{sy(0):.1f}" text-anchor="end">0</text>',
           f'<text x="{_PAD - 4}" y="{sy(y1 / 1.1) + 4:.1f}" text-anchor="end">{_nice(y1 / 1.1)}</text>',
           f'<text x="{_W / 2}" y="{_H - 6}" text-anchor="middle">{html.escape(x_label)}</text>',
           f'<text x="12" y="{_H / 2}" transform="rotate(-90 12 {_H / 2})" text-anchor="middle">'
           f'{html.escape(y_label)}</text>']
    if not bars:
        out.append(f'<text x="{_PAD}" y="{sy(0) + 14:.1f}">{_nice(x0)}</text>')
        out.append(f'<text x="{_W - _PAD}" y="{sy(0) + 14:.1f}" text-anchor="end">{_nice(x1)}</text>')
    for i, (name, xs, ys) in enumerate(series):
        colour = colours[i % len(colours)]
        if bars:
            width = (_W - 2 * _PAD) / max(1.0, x1) * 0.7
            for j, (label, y) in enumerate(zip(xs, ys)):
                left, top = sx(j + 0.15), sy(y)
                text = html.escape(str(label))
                out.append(f'<rect x="{left:.1f}" y="{top:.1f}" width="{width:.1f}" height="{sy(0) - top:.1f}" '
                           f'fill="{colour}"><title>{text}: {_nice(y)}</title></rect>')
                out.append(f'<text x="{left + width / 2:.1f}" y="{sy(0) + 14:.1f}" text-anchor="middle">{text}</text>')
                out.append(f'<text x="{left + width / 2:.1f}" y="{top - 3:.1f}" text-anchor="middle">{_nice(y)}</text>')
        else:
            points = " ".join(f"{sx(float(x)):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
            out.append(f'<text x="{_W - _PAD}" y="{20 + 14 * i}" text-anchor="end" fill="{colour}">'
                       f'{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _pick(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] if ordered else 0.0


def _figures(folder: Path) -> List[str]:
    out: List[Tuple[str, str]] = []
    batches = _table(folder / "batches.parquet")
    if batches is not None and batches.num_rows:
        done = [b for b in batches.to_pylist() if b.get("status") == "committed" and (b.get("rows_in") or 0) > 0]
        if done:
            per_k = {stage: [(b.get(f"{stage}_s") or 0.0) / (b["rows_in"] / 1000) for b in done]
                     for stage in ("parse", "write")}
            labels = [f"{stage} p50" for stage in per_k] + [f"{stage} p95" for stage in per_k]
            values = [_pick(v, 0.5) for v in per_k.values()] + [_pick(v, 0.95) for v in per_k.values()]
            out.append(("Stage latency per 1,000 rows (write = COPY + ledger + commit)",
                        svg_chart([("", labels, values)], "stage", "seconds per 1,000 rows", bars=True)))
            done.sort(key=lambda b: b["received_at"])
            t0 = min(b["received_at"] - (b.get("write_s") or 0.0) - (b.get("parse_s") or 0.0) for b in done)
            total, xs, ys = 0, [0.0], [0.0]
            for b in done:
                total += b["rows_in"]
                xs.append(b["received_at"] - t0)
                ys.append(float(total))
            out.append(("Rows over time", svg_chart([("rows read", xs, ys)], "seconds", "rows read (cumulative)")))
    memory = _table(folder / "memory.parquet")
    if memory is not None and memory.num_rows:
        at, rss = memory.column("at_s").to_pylist(), memory.column("rss_bytes").to_pylist()
        out.append(("Memory over time", svg_chart([("RSS", at, [r / 2**20 for r in rss])], "seconds since start",
                                                  "RSS of the process tree (MiB)")))
    return [f"<h2>{html.escape(title)}</h2>{chart}" for title, chart in out]


def _html_table(rows: List[Dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r.values())
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(folder: Path) -> str:
    """The report's HTML for the artifacts in ``folder`` (see the module doc for the inputs)."""
    parts = ["<!doctype html><meta charset='utf-8'><title>loadkit run report</title>",
             ("<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}pre,table{font-size:90%}"
              "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}table{border-collapse:collapse}</style>"),
             "<h1>loadkit run report</h1>"]
    summary = folder / "summary.txt"
    if summary.is_file():
        parts.append(f"<h2>Summary</h2><pre>{html.escape(summary.read_text(encoding='utf-8'))}</pre>")
    parts += _figures(folder)
    alerts = folder / "alerts.json"
    if alerts.is_file():
        fired = json.loads(alerts.read_text(encoding="utf-8"))
        parts.append(f"<h2>Alerts ({len(fired)})</h2><pre>{html.escape(json.dumps(fired, indent=1))}</pre>")
    rejects = _table(folder / "rejects_sample.parquet")
    parts.append("<h2>Rejects sample</h2>")
    if rejects is not None and rejects.num_rows:
        parts.append(f"<p>first {min(rejects.num_rows, _REJECT_ROWS)} of {rejects.num_rows} sampled</p>")
        parts.append(_html_table(rejects.slice(0, _REJECT_ROWS).to_pylist()))
    else:
        parts.append("<p>no rejected rows</p>")
    return "\n".join(parts)


def write_html(folder: Path) -> Path:
    """Write ``report.html`` into ``folder``; returns its path."""
    path = Path(folder) / "report.html"
    path.write_text(render(Path(folder)), encoding="utf-8")
    return path
