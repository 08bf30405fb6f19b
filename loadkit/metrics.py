"""Run metrics: per-batch results folded into per-table counters, run-level figures and the summary.

The driver feeds every writer result through ``RunMetrics.add``; everything logged to
MLflow (progress and final metrics, the per-batch and per-file tables) is derived here,
so the runner only decides *when* to log.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

import pyarrow as pa

from loadkit.records import BatchResult


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
    blank_lines: int = 0  # blank lines skipped (not records; a one-column table loads them as NULL rows)
    # Records this run loaded from a file that then failed (a source error, a reject threshold): its batches
    # were discarded, so they are not loaded after all. rows_read = rows_loaded + rows_rejected + rows_discarded.
    rows_discarded: int = 0
    bytes: int = 0
    retries: int = 0
    started: float = field(default_factory=time.time)
    last_batch_at: Optional[float] = None
    stream_s: float = 0.0  # from the pipeline's start to this table's last batch result
    finalise_s: float = 0.0  # dedup / upsert / swap / index builds after the stream
    finalised_at: Optional[float] = None  # wall-clock time its finalisation ended
    status: str = "pending"
    inserted: Optional[int] = None
    updated: Optional[int] = None
    unchanged: Optional[int] = None  # merge: keys whose row already held the staged values (not rewritten)
    duplicates: Optional[int] = None  # loaded rows collapsed onto another row with the same key
    deleted: Optional[int] = None  # rows a full-snapshot sync deleted or closed (None: no sync ran)
    # Seconds per finalisation step (upsert, swap, indexes, ...; see modes.step), in the order run;
    # their sum is at most finalise_s (the transaction's other statements are not steps).
    finalise_steps: Dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """The table's whole load time: streaming plus finalisation (what the ledger records)."""
        return self.stream_s + self.finalise_s

    @property
    def rows_per_s(self) -> float:
        """Rows read per second of the table's whole load, finalisation included."""
        return rate(self.rows_read, self.seconds)

    @property
    def batches_per_s(self) -> float:
        return self.batches / self.seconds if self.seconds > 0 else 0.0

    @property
    def reject_rate(self) -> float:
        return self.rows_rejected / self.rows_read if self.rows_read else 0.0


def quantiles(values: Iterable[float], prefix: str) -> Dict[str, float]:
    """p50/p95/max of a sample under ``prefix`` (empty dict for no sample)."""
    ordered = sorted(values)
    if not ordered:
        return {}
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return {f"{prefix}_p50": pick(0.5), f"{prefix}_p95": pick(0.95), f"{prefix}_max": ordered[-1]}


class RunMetrics:
    """Folds the writers' per-batch results; the driver's single source of progress numbers.

    ``last_progress`` is read by the watchdog thread, hence the lock around updates.
    """

    def __init__(self, tables: Dict[str, str]) -> None:
        self.tables = {name: TableMetrics(name, mode) for name, mode in tables.items()}
        self.batches: List[BatchResult] = []  # data results (committed or skipped), as received
        self.file_events: Dict[tuple, Dict[str, Any]] = {}
        self.started = time.time()
        self.last_progress = time.time()
        self.errors: Counter = Counter()
        self.deadlocks = 0  # writer commits retried after a deadlock/serialization failure (batch results)
        self.driver_wait_s = 0.0  # driver blocked waiting for the next result
        self.read_wait_s = 0.0  # read tasks blocked handing a chunk downstream (parse + backpressure)
        self.chunks_read = 0
        self.executor = ""  # ray | inprocess; empty when nothing was left to load
        self.batch_sizes: List[Tuple[float, int, str]] = []  # (time, rows, reason) of each size change
        self.stream_s = 0.0  # the pipeline, from start to its last result
        self.members: Dict[tuple, int] = {}  # (table, file sha) -> members to read, where known (zip)
        self.expected: Dict[tuple, int] = {}  # (table, file sha) -> uncompressed bytes this run should parse
        self.parsed: Dict[tuple, int] = {}  # (table, file sha) -> uncompressed bytes parsed so far
        self.finalise_s = 0.0  # after the stream: file accounting checks and every table's finalisation
        self._lock = threading.Lock()

    def add(self, result: BatchResult) -> BatchResult:
        """Fold one writer result in; returns it stamped with the time it was received."""
        result = replace(result, received_at=time.time())
        with self._lock:
            self._add_one(result)
        return result

    def _add_one(self, r: BatchResult) -> None:
        t = self.tables[r.table_name]
        key = (r.table_name, r.file_sha)
        ev = self.file_events.setdefault(key, {})
        ev["last_at"] = r.finished_at or r.received_at
        if r.kind == "error":
            ev["error"] = r.message
            self.errors["source_data"] += 1
            return
        if r.kind == "eof":
            ev.setdefault("members", {})[r.member] = r.chunks
            members = self.members.get(key)
            if members is not None and len(ev["members"]) >= members:
                ev["ended"] = True
            return
        self.last_progress = r.received_at
        t.last_batch_at = r.finished_at
        self.batches.append(r)
        self.deadlocks += r.deadlocks
        if r.status == "skipped":
            t.batches_skipped += 1
            return
        t.batches += 1
        t.rows_read += r.rows_in
        t.rows_loaded += r.rows_loaded
        t.rows_rejected += r.rows_rejected
        t.rows_coerced += r.rows_coerced
        t.blank_lines += r.blank_lines
        t.bytes += r.bytes
        self.parsed[key] = self.parsed.get(key, 0) + r.bytes
        retries = max(0, (r.attempts or 1) - 1)
        t.retries += retries
        if retries:
            self.errors["transient_infrastructure"] += retries  # each retry answered a transient failure
        t.stream_s = max(t.stream_s, (r.finished_at or time.time()) - t.started)

    def expect(self, files: Iterable[Tuple[Any, ...]]) -> None:
        """Plan the progress figure: (table, sha, path, format, size[, member glob]) of every file this
        run reads (the member glob, as the table's ``source.member``, picks the zip members counted)."""
        for table, sha, path, fmt, size, *member in files:
            self.expected[(table, sha)], members = uncompressed_size(path, fmt, size, *member[:1])
            if members is not None:
                self.members[(table, sha)] = members

    def done_fraction(self) -> Optional[float]:
        """Share of the planned source bytes parsed (0..1), None before anything was planned.

        A file counts in proportion to its uncompressed bytes parsed (zip/gzip sizes come from
        their headers), and whole once it ended or failed; a resumed file's skipped ranges
        count only when the file ends."""
        return self._done()[0]

    def _done(self) -> Tuple[Optional[float], bool]:
        """(done_fraction, whether a file still streaming has parsed more bytes than planned for it)."""
        if not self.expected:
            return None, False
        with self._lock:
            total = sum(self.expected.values())
            done, overrun = 0.0, False
            for key, size in self.expected.items():
                ev = self.file_events.get(key, {})
                if ev.get("error") or ev.get("ended"):
                    done += size
                else:
                    parsed = self.parsed.get(key, 0)
                    done += min(size, parsed)
                    overrun = overrun or parsed > size
        return (min(1.0, done / total) if total else 1.0), overrun

    def eta_s(self) -> Optional[float]:
        """Seconds left at the rate so far: None until 2% is done, and None while a file still streaming
        has parsed more bytes than were planned for it (its planned size was an underestimate -- a URL
        listed without a size counts 1 byte, a Parquet file its file size against the Arrow bytes
        parsed -- so the fraction done says nothing about the time left)."""
        f, overrun = self._done()
        if f is None or f < 0.02 or overrun:
            return None
        return (time.time() - self.started) * (1 - f) / f

    def touch(self) -> None:
        """Count as progress (the pipeline just started, so the stall clock starts now)."""
        with self._lock:
            self.last_progress = time.time()

    def seconds_since_progress(self) -> float:
        with self._lock:
            return time.time() - self.last_progress

    def size_changed(self, rows: int, reason: str) -> None:
        self.batch_sizes.append((time.time(), rows, reason))

    def file_error(self, table: str, sha: str) -> Optional[str]:
        return self.file_events.get((table, sha), {}).get("error")

    def totals(self) -> tuple:
        return (sum(t.rows_read for t in self.tables.values()), sum(t.rows_loaded for t in self.tables.values()),
                sum(t.rows_rejected for t in self.tables.values()))

    def discarded(self) -> int:
        """Records loaded by this run and discarded with their failed files (TableMetrics.rows_discarded)."""
        return sum(t.rows_discarded for t in self.tables.values())

    def _committed(self) -> List[BatchResult]:
        return [b for b in self.batches if b.status == "committed"]

    def latencies(self) -> Dict[str, float]:
        """Per-stage batch latency: parse (read task), write (writer), end to end at the driver."""
        done = self._committed()
        out = quantiles((b.write_s for b in done), "batch_write_s")
        out.update(quantiles((b.parse_s for b in done), "batch_parse_s"))
        out.update(quantiles((b.received_at - b.finished_at for b in done if b.finished_at),
                             "batch_delivery_s"))
        return out

    def pool_figures(self) -> Dict[str, float]:
        """Writer pool use: the writers' own utilisation figure and the busy fraction seen from here."""
        done = self._committed()
        out: Dict[str, float] = {}
        reported = [b.pool_utilisation for b in done]
        if reported:
            out.update(pool_utilisation_mean=sum(reported) / len(reported), pool_utilisation_max=max(reported))
        busy = self.writer_busy()
        if busy:
            out.update(writer_busy_mean=sum(busy.values()) / len(busy), writer_busy_max=max(busy.values()))
        rss = [b.rss_bytes for b in done if b.rss_bytes]
        out.update(quantiles(rss, "writer_rss_bytes"))
        return out

    def writer_busy(self) -> Dict[str, float]:
        """Per writer: time spent in COPY transactions over the time since the pipeline started."""
        span = max(1e-9, time.time() - self.started)
        busy: Dict[str, float] = {}
        for b in self._committed():
            busy[b.writer] = busy.get(b.writer, 0.0) + b.write_s
        return {w: min(1.0, s / span) for w, s in busy.items()}

    def file_table(self) -> pa.Table:
        """When each file finished (seconds since the run started) and its error, if any."""
        rows = [{"table_name": t, "file_sha": sha, "completed_s": ev.get("last_at", self.started) - self.started,
                 "members": len(ev.get("members", {})), "error": ev.get("error")}
                for (t, sha), ev in self.file_events.items()]
        return pa.Table.from_pylist(rows) if rows else pa.table({})

    def progress(self, memory: Tuple[float, int, float]) -> Dict[str, float]:
        """The figures logged every few seconds while the run streams."""
        _, rss, fraction = memory
        read, loaded, rejected = self.totals()
        elapsed = max(1e-9, time.time() - self.started)
        done = len(self._committed())
        done_fraction = self.done_fraction()
        out = {"rows_read": read, "rows_loaded": loaded, "rows_rejected": rejected, "rows_per_s": read / elapsed,
               "batches_per_s": done / elapsed, "rss_bytes": rss, "memory_fraction": fraction,
               "driver_wait_s": self.driver_wait_s, "read_wait_s": self.read_wait_s,
               "queue_depth": max(0, self.chunks_read - len(self.batches))}
        if done_fraction is not None:
            out["done_fraction"] = done_fraction
            eta = self.eta_s()
            if eta is not None:
                out["eta_s"] = eta
        if self.batch_sizes:
            out["batch_size"] = self.batch_sizes[-1][1]
        busy = self.writer_busy()
        if busy:
            out["writer_busy_max"] = max(busy.values())
        return out

    def final(self, wall_s: float, peak_rss: int, alerts: int, peak_pss: int) -> Dict[str, float]:
        """Every end-of-run metric: totals, rates, latencies, memory, pool, waits, retries, errors by class."""
        read, loaded, rejected = self.totals()
        # the tables' counts, not the results held here: an interrupted run's are its ledger's (sink)
        batches = sum(t.batches for t in self.tables.values())
        out: Dict[str, float] = {
            "rows_read": read, "rows_loaded": loaded, "rows_rejected": rejected, "rows_discarded": self.discarded(),
            "wall_s": wall_s,
            "rows_per_s": rate(read, wall_s),
            "batches_per_s": batches / wall_s if wall_s else 0.0,
            "batches": batches, "peak_rss_bytes": peak_rss, "peak_pss_bytes": peak_pss,
            "alerts": alerts,
            "retries": sum(t.retries for t in self.tables.values()),
            "driver_wait_s": self.driver_wait_s, "read_wait_s": self.read_wait_s,
            "backpressure_s": max(0.0, self.read_wait_s - sum(b.parse_s for b in self._committed())),
            "batch_size_changes": len(self.batch_sizes),
            "stream_s": self.stream_s, "finalise_s": self.finalise_s,
            "blank_lines": sum(t.blank_lines for t in self.tables.values()),
        }
        out.update(self.latencies())
        out.update(self.pool_figures())
        out.update({f"errors.{k}": v for k, v in self.errors.items()})
        completed = [ev["last_at"] - self.started for ev in self.file_events.values() if "last_at" in ev]
        out.update(quantiles(completed, "file_completed_s"))
        for t in self.tables.values():
            out.update({f"{t.name}.rows_read": t.rows_read, f"{t.name}.rows_loaded": t.rows_loaded,
                        f"{t.name}.rows_rejected": t.rows_rejected, f"{t.name}.rows_discarded": t.rows_discarded,
                        f"{t.name}.rows_per_s": t.rows_per_s,
                        f"{t.name}.batches_per_s": t.batches_per_s, f"{t.name}.retries": t.retries,
                        f"{t.name}.seconds": t.seconds, f"{t.name}.stream_s": t.stream_s,
                        f"{t.name}.finalise_s": t.finalise_s, f"{t.name}.blank_lines": t.blank_lines})
            out.update({f"{t.name}.finalise.{step}_s": v for step, v in t.finalise_steps.items()})
            out.update({f"{t.name}.{k}": v for k, v in (("inserted", t.inserted), ("updated", t.updated),
                                                         ("unchanged", t.unchanged),
                                                         ("duplicates", t.duplicates), ("deleted", t.deleted))
                        if v is not None})
        return out

    def batch_table(self) -> pa.Table:
        return BatchResult.to_table(self.batches) if self.batches else pa.table({})

    def size_table(self) -> pa.Table:
        rows = [{"at_s": at - self.started, "rows": rows, "reason": why} for at, rows, why in self.batch_sizes]
        return pa.Table.from_pylist(rows) if rows else pa.table({})


def uncompressed_size(path: str, fmt: str, size: int, member: Optional[str] = None) -> Tuple[int, Optional[int]]:
    """(bytes a file decompresses to, its member count) from its headers; (size, None) when unknown.

    zip: the central directory's sizes of the members the reader reads (``files.data_members``:
    ``__MACOSX``/AppleDouble entries and directories left out, ``member`` glob applied); gzip: the
    trailer's ISIZE (modulo 4 GiB, so only trusted when not smaller than the compressed size); csv:
    the file size; parquet: the file size (its batches are counted whole when the file ends)."""
    import zipfile

    from loadkit.source.files import data_members, open_source  # a local path or an fsspec URL (ranged reads)

    try:
        if fmt == "zip":
            with open_source(path) as raw, zipfile.ZipFile(raw) as zf:
                infos = data_members(zf, member)
                return max(1, sum(i.file_size for i in infos)), len(infos)
        if fmt == "gzip":
            with open_source(path) as fh:
                fh.seek(-4, 2)
                isize = int.from_bytes(fh.read(4), "little")
            return (max(isize, size)), 1
    except (OSError, zipfile.BadZipFile, ValueError):
        pass
    return max(1, size), (1 if fmt == "csv" else None)


def progress_text(done: Optional[float], eta_s: Optional[float], bar: bool = False) -> str:
    """``42% of bytes, ETA 1m10s`` (with a 20-cell bar in front on a terminal); empty when unknown."""
    if done is None:
        return ""
    text = f"{done:.0%} of bytes, ETA {format_eta(eta_s)}"
    if bar:
        cells = int(done * 20 + 0.5)
        text = f"[{'#' * cells}{'.' * (20 - cells)}] {text}"
    return text


def progress_line(figures: Dict[str, float]) -> str:
    """The in-place terminal line: ``[####....] 42% of bytes, ETA 1m10s | 1,234 rows, 5,678 rows/s``
    (without the bar and percent when the share of bytes is unknown)."""
    done = figures.get("done_fraction")
    head = progress_text(done, figures.get("eta_s"), bar=True) + " | " if done is not None else ""
    return f"{head}{figures['rows_read']:,.0f} rows, {figures['rows_per_s']:,.0f} rows/s"


class ProgressBar:
    """The run's progress drawn in place on an interactive terminal: one line redrawn with ``\\r``.

    While a line is drawn, any ``loadkit`` log record first clears it (a filter on the logger's
    handlers), so log lines never end up glued to the bar; the next ``draw`` puts the bar back.
    ``close`` ends the line with a newline and removes the filters. Off a terminal the runner does
    not use this class and logs ``progress:`` lines instead."""

    def __init__(self, stream: Optional[TextIO] = None, logger: str = "loadkit") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.drawn = False
        self.drawn_at = 0.0  # time.time() of the last draw
        self._handlers = list(logging.getLogger(logger).handlers)
        for h in self._handlers:
            h.addFilter(self._clear)

    def _clear(self, record: logging.LogRecord) -> bool:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.drawn = False
        return True

    def draw(self, text: str) -> None:
        """Replace the current line by ``text`` (cut to 150 characters)."""
        self.stream.write("\r" + text[:150] + "\x1b[K")
        self.stream.flush()
        self.drawn, self.drawn_at = True, time.time()

    def close(self) -> None:
        """Keep the last drawn line and move below it; the log handlers are left as they were."""
        for h in self._handlers:
            h.removeFilter(self._clear)
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def format_eta(seconds: Optional[float]) -> str:
    """``1h02m``, ``4m05s``, ``12s``, or ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = int(seconds + 0.5)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def memory_table(samples: Sequence[Tuple[float, int, float]], started: float) -> pa.Table:
    """The memory monitor's samples as a table (seconds since start, tree RSS, host fraction)."""
    return pa.table({"at_s": [t - started for t, _, _ in samples], "rss_bytes": [r for _, r, _ in samples],
                     "memory_fraction": [f for _, _, f in samples]})


def rate(rows: float, seconds: float) -> float:
    """Rows per second, 0 for no time. The one formula behind every printed and logged rows/s."""
    return rows / seconds if seconds > 0 else 0.0


def summary_table(metrics: RunMetrics, run_id: str, wall_s: float, label: str = "") -> str:
    """The human summary printed at the end of a run.

    Per table, ``seconds`` is streaming plus finalisation (``stream s`` + ``final s``) and
    ``rows/s`` is rows read over that whole time; the TOTAL row uses the run's wall time, the
    same figures MLflow records as ``wall_s`` and ``rows_per_s`` (and ``history show`` prints).
    ``inserted``/``updated``/``unchanged``/``duplicates``/``deleted`` come from finalisation (``-``: not
    applicable); for merge, loaded = inserted + updated + unchanged + duplicates (``unchanged``: keys whose
    row already held exactly the staged values, ``_lk_batch`` included, so it was not rewritten).
    Blank lines skipped (never records: ``rows read = loaded + rejected``) are a footnote, printed
    only when some table skipped any (see ``skipped_lines_note``); so are records discarded with failed
    files (``discarded_note``: then rows read = loaded + rejected + discarded).
    ``label`` (e.g. a sweep point's overrides) heads the table."""
    head = ("table", "mode", "files", "skipped", "rows read", "loaded", "rejected", "inserted", "updated",
            "unchanged", "duplicates", "deleted", "stream s", "final s", "seconds", "rows/s", "status")
    lines = [head]
    n = lambda v: "-" if v is None else f"{v:,}"  # noqa: E731
    total = lambda name: n(sum(getattr(t, name) or 0 for t in metrics.tables.values()))  # noqa: E731
    for t in metrics.tables.values():
        lines.append((t.name, t.mode, str(t.files), str(t.files_skipped), f"{t.rows_read:,}", f"{t.rows_loaded:,}",
                      f"{t.rows_rejected:,}", n(t.inserted), n(t.updated), n(t.unchanged), n(t.duplicates),
                      n(t.deleted),
                      f"{t.stream_s:.1f}", f"{t.finalise_s:.1f}", f"{t.seconds:.1f}", f"{t.rows_per_s:,.0f}",
                      t.status))
    read, loaded, rejected = metrics.totals()
    lines.append(("TOTAL", "", str(sum(t.files for t in metrics.tables.values())),
                  str(sum(t.files_skipped for t in metrics.tables.values())), f"{read:,}", f"{loaded:,}",
                  f"{rejected:,}", total("inserted"), total("updated"), total("unchanged"), total("duplicates"),
                  total("deleted"),
                  f"{metrics.stream_s:.1f}", f"{metrics.finalise_s:.1f}", f"{wall_s:.1f}",
                  f"{rate(read, wall_s):,.0f}", ""))
    notes = [n for n in (skipped_lines_note(metrics), discarded_note(metrics)) if n]
    return ((f"{label}\n" if label else "") + format_table(lines) + "".join(f"\n{n}" for n in notes)
            + f"\nrun id: {run_id}")


def discarded_note(metrics: RunMetrics) -> str:
    """The summary's footnote on records discarded with failed files, or "" when none were.

    ``discarded: 1,462 records (items 1,462) loaded from files that then failed and were discarded whole;
    rows read = loaded + rejected + discarded``. ``loaded`` counts only what the run left in the load."""
    per = [(t.name, t.rows_discarded) for t in metrics.tables.values() if t.rows_discarded]
    if not per:
        return ""
    tables = ", ".join(f"{name} {n:,}" for name, n in per)
    return (f"discarded: {sum(n for _, n in per):,} records ({tables}) loaded from files that then failed and were "
            "discarded whole; rows read = loaded + rejected + discarded")


def skipped_lines_note(metrics: RunMetrics) -> str:
    """The summary's footnote on blank lines skipped, or "" when no table skipped any.

    ``skipped lines: 2 blank (people 2); lines = records + blank lines skipped, records = loaded + rejected``.
    A blank line is a NULL row in a one-column table (a record, counted in ``rows read``) and is
    skipped in any other table (counted here, never in ``rows read``)."""
    per = [(t.name, t.blank_lines) for t in metrics.tables.values() if t.blank_lines]
    if not per:
        return ""
    total = sum(n for _, n in per)
    tables = ", ".join(f"{name} {n:,}" for name, n in per)
    return (f"skipped lines: {total:,} blank ({tables}); "
            "lines = records + blank lines skipped, records = loaded + rejected")


def format_table(lines: Sequence[Sequence[str]]) -> str:
    """Left-align the first two columns, right-align the rest (numbers), with a rule under the head."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines[1:]])
