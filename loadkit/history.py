"""Run history from the ledger and MLflow: list recent runs, show one, compare two.

    python -m loadkit.history [--dsn DSN] [--ledger-schema S] [--tracking-uri URI] list [--limit N] [--job J]
    python -m loadkit.history ... show RUN
    python -m loadkit.history ... compare A B

RUN is a loadkit run id or a unique prefix of one. The ledger is the truth for status and
row counts; MLflow (via the run's recorded mlflow_run_id) adds throughput, latency and memory.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from loadkit import home
from loadkit.postgres import db
from loadkit.postgres.ledger import Ledger
from loadkit.errors import EXIT_CODES, ConfigError, LoadkitError, sqlstate_of
from loadkit.metrics import format_table, rate
from loadkit.security import mask_text

# MLflow metrics worth comparing, in display order (others are listed after them).
_KEY_METRICS = ("wall_s", "stream_s", "finalise_s", "rows_per_s", "batches_per_s", "batches", "batch_write_s_p50",
                "batch_write_s_p95",
                "batch_write_s_max", "batch_parse_s_p50", "batch_parse_s_p95", "peak_rss_bytes", "peak_pss_bytes",
                "writer_busy_mean", "driver_wait_s", "backpressure_s", "retries", "alerts")


class History:
    def __init__(self, dsn: str, ledger_schema: str, tracking_uri: Optional[str]) -> None:
        self.dsn = dsn
        self.schema = ledger_schema
        self.tracking_uri = tracking_uri

    def runs(self, limit: int = 20, job: Optional[str] = None) -> List[Dict[str, Any]]:
        with db.transaction(self.dsn) as cur:
            return Ledger(self.schema).recent_runs(cur, limit, job)

    def run(self, ref: str) -> Dict[str, Any]:
        with db.transaction(self.dsn) as cur:
            found = Ledger(self.schema).runs_by_prefix(cur, ref)
        if len(found) != 1:
            raise ConfigError(f"{'no' if not found else 'more than one'} run matches {ref!r}", key="run")
        return found[0]

    def tables(self, run_id: str) -> List[Dict[str, Any]]:
        with db.transaction(self.dsn) as cur:
            return Ledger(self.schema).table_loads(cur, run_id)

    def metrics(self, run: Dict[str, Any]) -> Dict[str, float]:
        """The run's final MLflow metrics (``progress.*`` samples left out), empty if it was not tracked.

        A run recorded by a background flush has no MLflow id in the ledger: it is found by its
        ``loadkit_run_id`` tag."""
        from loadkit import tracking

        if run.get("mlflow_run_id"):
            found = tracking.get_run(self.tracking_uri, run["mlflow_run_id"])
        else:
            found = tracking.find_by_loadkit_run(self.tracking_uri, run["run_id"])
            if found is None:
                return {}
            run["mlflow_run_id"] = found.info.run_id
        return {k: v for k, v in found.data.metrics.items() if not k.startswith("progress.")}


def _seconds(run: Dict[str, Any]) -> Optional[float]:
    if run["started_at"] and run["finished_at"]:
        return (run["finished_at"] - run["started_at"]).total_seconds()
    return None


def _num(v: Any, name: str = "") -> str:
    """A metric as the run's summary prints it: rates (``*_per_s``) as whole numbers, other fractions to 3 places."""
    if v is None:
        return "-"
    if name.endswith("_per_s") and isinstance(v, (int, float)):
        return f"{v:,.0f}"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{int(v):,}"


def render_list(runs: Sequence[Dict[str, Any]]) -> str:
    lines = [("run", "job", "period", "status", "started", "seconds", "read", "loaded", "rejected")]
    for r in runs:
        lines.append((r["run_id"], r["job"], r["period"], r["status"], r["started_at"].strftime("%Y-%m-%d %H:%M:%S"),
                      _num(_seconds(r)), _num(r["rows_read"]), _num(r["rows_loaded"]), _num(r["rows_rejected"])))
    return format_table(lines) if runs else "no runs recorded"


def _discarded(run: Dict[str, Any]) -> str:
    """``, discarded N`` for a run that discarded records with failed files (metrics.discarded_note: then rows read =
    loaded + rejected + discarded), else "" (none, or a run an older ledger recorded without the column)."""
    return f", discarded {_num(run['rows_discarded'])}" if run.get("rows_discarded") else ""


def render_show(run: Dict[str, Any], tables: Sequence[Dict[str, Any]], metrics: Dict[str, float]) -> str:
    head = [f"run {run['run_id']}  {run['job']} {run['period']}  {run['status']}",
            f"started {run['started_at']}  finished {run['finished_at']}  seconds {_num(_seconds(run))}",
            f"rows read {_num(run['rows_read'])}, loaded {_num(run['rows_loaded'])}, "
            f"rejected {_num(run['rows_rejected'])}{_discarded(run)}  mlflow {run['mlflow_run_id'] or '-'}"]
    if run["error_text"]:
        first, _, rest = mask_text(run["error_text"]).partition("\n")
        head.append(f"error ({run['error_category']}): {first}")
        if rest.strip():
            head.append(rest.rstrip())
    discarded = any(t["rows_discarded"] for t in tables)  # the column only when a table discarded any
    lines = [("table", "mode", "status", "files", "skipped", "read", "loaded", "rejected")
             + (("discarded",) if discarded else ()) + ("seconds", "rows/s")]
    for t in tables:
        per_s = rate(t["rows_read"] or 0, t["seconds"] or 0.0)
        lines.append((t["table_name"], t["mode"], t["status"], _num(t["files"]), _num(t["files_skipped"]),
                      _num(t["rows_read"]), _num(t["rows_loaded"]), _num(t["rows_rejected"]))
                     + ((_num(t["rows_discarded"]),) if discarded else ())  # None (-): not recorded
                     + (f"{t['seconds'] or 0:.1f}", f"{per_s:,.0f}"))
    out = "\n".join(head) + "\n\n" + format_table(lines)
    if metrics:
        keys = [k for k in _KEY_METRICS if k in metrics]
        out += "\n\n" + format_table([("metric", "value")] + [(k, _num(metrics[k], k)) for k in keys])
    return out


def comparison(a: Dict[str, Any], b: Dict[str, Any], ma: Dict[str, float],
               mb: Dict[str, float]) -> List[Dict[str, Any]]:
    """Rows of (metric, a, b, delta, pct): ledger counts first, then the MLflow metrics both runs have."""
    values = {"rows_read": (a["rows_read"], b["rows_read"]), "rows_loaded": (a["rows_loaded"], b["rows_loaded"]),
              "rows_rejected": (a["rows_rejected"], b["rows_rejected"]),
              "rows_discarded": (a["rows_discarded"], b["rows_discarded"]),  # None (-): unfinished, or an older ledger
              "seconds": (_seconds(a), _seconds(b))}
    common = [k for k in _KEY_METRICS if k in ma and k in mb]
    common += sorted(k for k in set(ma) & set(mb) if k not in common and "." not in k)
    values.update({k: (ma[k], mb[k]) for k in common})
    rows = []
    for name, (va, vb) in values.items():
        delta = vb - va if va is not None and vb is not None else None
        pct = delta / va * 100 if delta is not None and va else None
        rows.append({"metric": name, "a": va, "b": vb, "delta": delta, "pct": pct})
    return rows


def render_compare(a: Dict[str, Any], b: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> str:
    lines = [("metric", "", "A", "B", "delta", "%")]
    for r in rows:
        pct = "-" if r["pct"] is None else f"{r['pct']:+.1f}%"
        delta = "-" if r["delta"] is None else ("+" if r["delta"] > 0 else "") + _num(r["delta"], r["metric"])
        lines.append((r["metric"], "", _num(r["a"], r["metric"]), _num(r["b"], r["metric"]), delta, pct))
    return f"A = {a['run_id']} ({a['status']})\nB = {b['run_id']} ({b['status']})\n\n" + format_table(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadkit.history", description=__doc__.splitlines()[0])
    p.add_argument("--dsn", default=os.environ.get("LOADKIT_DSN"), help="sink DSN (default LOADKIT_DSN)")
    p.add_argument("--embedded-dir", default=None,
                   help="embedded PostgreSQL when no DSN is given (default: pgdata in loadkit's home)")
    p.add_argument("--ledger-schema", default="loadkit")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="recent runs with status and counts")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--job")
    sub.add_parser("show", help="one run: tables and metrics").add_argument("run")
    cmp = sub.add_parser("compare", help="two runs side by side (delta and %%)")
    cmp.add_argument("a")
    cmp.add_argument("b")
    return p


def execute(args: argparse.Namespace) -> str:
    embedded = args.embedded_dir or str(home.pgdata())
    h = History(db.resolve_dsn(args.dsn, embedded), args.ledger_schema, args.tracking_uri)
    if args.command == "list":
        return render_list(h.runs(args.limit, args.job))
    if args.command == "show":
        run = h.run(args.run)
        return render_show(run, h.tables(run["run_id"]), h.metrics(run))
    a, b = h.run(args.a), h.run(args.b)
    return render_compare(a, b, comparison(a, b, h.metrics(a), h.metrics(b)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        sys.stdout.write(execute(args) + "\n")
    except Exception as exc:
        if sqlstate_of(exc) in ("42P01", "3F000"):  # undefined table / schema: nothing was ever recorded there
            exc = ConfigError(f"no ledger in schema {args.ledger_schema!r} (see --ledger-schema)", key="ledger_schema")
        if not isinstance(exc, LoadkitError):
            raise
        sys.stderr.write(f"loadkit.history: {exc.category.value} error: {exc}\n")
        return EXIT_CODES[exc.category]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
