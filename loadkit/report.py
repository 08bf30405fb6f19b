"""A static HTML report of one run, built from its staged MLflow artifacts: the dashboard people
open without Jupyter (MLflow UI -> run -> Artifacts -> report.html, or any browser).

Reads, from one folder: ``summary.txt`` (the printed summary), ``batches.parquet`` (one row per
batch result), ``memory.parquet`` (the memory monitor's samples), ``rejects_sample.parquet`` and
``alerts.json``; writes ``report.html`` there, with the plots embedded as PNG (no other files).
Missing inputs leave their section out.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, List, Optional

_REJECT_ROWS = 20


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(path: Path) -> Optional[Any]:
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pandas()


def _figures(folder: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: List[str] = []
    batches = _table(folder / "batches.parquet")
    if batches is not None and len(batches):
        done = batches[batches["status"] == "committed"].copy()
        if len(done):
            per_k = done["rows_in"].clip(lower=1) / 1000.0
            fig, ax = plt.subplots(figsize=(6, 3.5))
            stages = {"parse": done["parse_s"] / per_k, "write (COPY + commit)": done["write_s"] / per_k}
            ax.boxplot([v.dropna() for v in stages.values()])
            ax.set_xticks(range(1, len(stages) + 1), list(stages.keys()))
            ax.set_ylabel("seconds per 1,000 rows")
            ax.set_ylim(bottom=0)
            ax.set_title("stage latency per 1,000 rows (all batches)")
            fig.tight_layout()
            out.append(("Stage latency", _png(fig)))
            plt.close(fig)
            t0 = done["received_at"].min() - done["write_s"].max()
            done = done.sort_values("received_at")
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(done["received_at"] - t0, done["rows_in"].cumsum(), marker=".")
            ax.set_xlabel("seconds")
            ax.set_ylabel("rows read (cumulative)")
            ax.set_ylim(bottom=0)
            ax.set_title("rows over time")
            fig.tight_layout()
            out.append(("Progress", _png(fig)))
            plt.close(fig)
    memory = _table(folder / "memory.parquet")
    if memory is not None and len(memory):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(memory["at_s"], memory["rss_bytes"] / 2**20)
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("RSS of the process tree (MiB)")
        ax.set_ylim(bottom=0)
        ax.set_title("memory over time")
        fig.tight_layout()
        out.append(("Memory", _png(fig)))
        plt.close(fig)
    return [f"<h2>{html.escape(title)}</h2>{img}" for title, img in out]


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
    if rejects is not None:
        parts.append(f"<h2>Rejects sample (first {min(len(rejects), _REJECT_ROWS)} of {len(rejects)})</h2>")
        parts.append(rejects.head(_REJECT_ROWS).to_html(index=False, escape=True) if len(rejects) else "<p>none</p>")
    return "\n".join(parts)


def write_html(folder: Path) -> Path:
    """Write ``report.html`` into ``folder``; returns its path."""
    path = Path(folder) / "report.html"
    path.write_text(render(Path(folder)), encoding="utf-8")
    return path
