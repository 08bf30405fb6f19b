"""Run metrics: per-batch results folded into per-table counters and the summary table."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import pyarrow as pa


@dataclass
class TableMetrics:
    name: str
    mode: str
    files: int = 0
    files_skipped: int = 0
    batches: int = 0
    batches_skipped: int = 0
    rows_read: int = 0
    rows_loaded: int = 0
    rows_rejected: int = 0
    rows_coerced: int = 0
    bytes: int = 0
    retries: int = 0
    started: float = field(default_factory=time.time)
    last_batch_at: Optional[float] = None
    seconds: float = 0.0
    status: str = "pending"
    inserted: Optional[int] = None
    updated: Optional[int] = None

    @property
    def rows_per_s(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0

    @property
    def reject_rate(self) -> float:
        return self.rows_rejected / self.rows_read if self.rows_read else 0.0


class RunMetrics:
    """Folds the writers' per-batch results; the driver's single source of progress numbers."""

    def __init__(self, tables: Dict[str, str]) -> None:
        self.tables = {name: TableMetrics(name, mode) for name, mode in tables.items()}
        self.batches: List[Dict[str, Any]] = []
        self.file_events: Dict[tuple, Dict[str, Any]] = {}
        self.started = time.time()
        self.last_progress = time.time()

    def add(self, results: pa.Table) -> List[Dict[str, Any]]:
        rows = results.to_pylist()
        for r in rows:
            self._add_one(r)
        return rows

    def _add_one(self, r: Dict[str, Any]) -> None:
        t = self.tables[r["table_name"]]
        key = (r["table_name"], r["file_sha"])
        if r["kind"] == "error":
            self.file_events.setdefault(key, {})["error"] = r["message"]
            return
        if r["kind"] == "eof":
            ev = self.file_events.setdefault(key, {})
            ev.setdefault("members", {})[r["member"]] = int(r["message"] or 0)
            return
        self.last_progress = time.time()
        t.last_batch_at = r["finished_at"]
        self.batches.append({k: v for k, v in r.items()})
        if r["status"] == "skipped":
            t.batches_skipped += 1
            return
        t.batches += 1
        t.rows_read += r["rows_in"] or 0
        t.rows_loaded += r["rows_loaded"] or 0
        t.rows_rejected += r["rows_rejected"] or 0
        t.rows_coerced += r["rows_coerced"] or 0
        t.bytes += r["bytes"] or 0
        t.retries += max(0, (r["attempts"] or 1) - 1)
        t.seconds = max(t.seconds, (r["finished_at"] or time.time()) - t.started)

    def file_error(self, table: str, sha: str) -> Optional[str]:
        return self.file_events.get((table, sha), {}).get("error")

    def totals(self) -> tuple:
        return (sum(t.rows_read for t in self.tables.values()), sum(t.rows_loaded for t in self.tables.values()),
                sum(t.rows_rejected for t in self.tables.values()))

    def latencies(self) -> Dict[str, float]:
        values = sorted(b["write_s"] for b in self.batches if b.get("status") == "committed")
        if not values:
            return {}
        pick = lambda q: values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]  # noqa: E731
        return {"batch_write_p50_s": pick(0.5), "batch_write_p95_s": pick(0.95), "batch_write_max_s": values[-1]}

    def batch_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.batches) if self.batches else pa.table({})


def summary_table(metrics: RunMetrics, run_id: str, wall_s: float) -> str:
    """The human summary printed at the end of a run."""
    head = ("table", "mode", "files", "skipped", "rows read", "loaded", "rejected", "seconds", "rows/s", "status")
    lines = [head]
    for t in metrics.tables.values():
        lines.append((t.name, t.mode, str(t.files), str(t.files_skipped), f"{t.rows_read:,}", f"{t.rows_loaded:,}",
                      f"{t.rows_rejected:,}", f"{t.seconds:.1f}", f"{t.rows_per_s:,.0f}", t.status))
    read, loaded, rejected = metrics.totals()
    lines.append(("TOTAL", "", str(sum(t.files for t in metrics.tables.values())),
                  str(sum(t.files_skipped for t in metrics.tables.values())), f"{read:,}", f"{loaded:,}",
                  f"{rejected:,}", f"{wall_s:.1f}", f"{read / wall_s if wall_s else 0:,.0f}", ""))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    out = [fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines[1:]]
    return "\n".join(out + [f"run id: {run_id}"])
