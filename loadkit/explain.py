"""``loadkit plan``: the resolved plan as text -- files (sizes, sha256), target DDL, mode, and what the
ledger says is already loaded. Writes nothing: the DDL is what ``modes.prepare`` would execute,
captured inside a transaction that is always rolled back (PostgreSQL DDL is transactional), with
a short lock timeout so a running load is never blocked for long. Without a reachable database
the DDL shown is that of a fresh target and the ledger state is "unknown".
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from loadkit.postgres import db
from loadkit.postgres import identity
from loadkit.postgres.ledger import Ledger
from loadkit.postgres import modes
from loadkit.errors import LoadkitError
from loadkit.plan import LoadPlan, SinkPlan, TableSpec
from loadkit.security import mask_dsn

_DDL = ("CREATE", "ALTER", "DROP", "TRUNCATE")
_IF_NOT_EXISTS = re.compile(
    r'^\s*CREATE\s+(?:UNLOGGED\s+)?(SCHEMA|TABLE)\s+IF\s+NOT\s+EXISTS\s+("[^"]+"(?:\."[^"]+")?)',
                            re.IGNORECASE)


class _Recorder:
    """A cursor that records the DDL it is given; with ``cur=None`` it pretends nothing exists."""

    def __init__(self, cur: Any = None) -> None:
        self._cur = cur
        self.statements: List[str] = []

    def execute(self, sql: str, args: Any = None) -> None:
        if sql.lstrip().upper().startswith(_DDL) and not self._no_op(sql):
            self.statements.append(" ".join(sql.split()))
        if self._cur is not None:
            self._cur.execute(sql, args)

    def _no_op(self, sql: str) -> bool:
        """A CREATE ... IF NOT EXISTS of a schema or table that exists: nothing would change."""
        m = _IF_NOT_EXISTS.match(sql)
        if m is None or self._cur is None:
            return False
        kind, name = m.group(1).upper(), m.group(2)
        if kind == "SCHEMA":
            self._cur.execute("SELECT to_regnamespace(%s) IS NOT NULL", (name,))
        else:
            self._cur.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
        return bool(self._cur.fetchone()[0])

    def fetchall(self) -> List[Any]:
        return self._cur.fetchall() if self._cur is not None else []

    def fetchone(self) -> Any:
        return self._cur.fetchone() if self._cur is not None else None


def _dsn(sink: SinkPlan) -> Optional[str]:
    """The sink's DSN, or None when only an embedded server that was never started would do."""
    if sink.dsn or os.environ.get("LOADKIT_DSN"):
        return sink.dsn or os.environ["LOADKIT_DSN"]
    if (Path(sink.embedded_dir).expanduser() / "PG_VERSION").is_file():
        return db.resolve_dsn(None, sink.embedded_dir)
    return None


def inspect(plan: LoadPlan) -> Tuple[str, Dict[str, Dict[str, Any]]]:
    """(database note, table -> {"ddl": [...], "ledger": {sha: status}, "drift": str|None, "error": str|None})."""
    out: Dict[str, Dict[str, Any]] = {t.name: {"ddl": [], "ledger": None, "drift": None, "error": None}
                                      for t in plan.tables}
    dsn = _dsn(plan.sink)
    if dsn is None:
        for t in plan.tables:
            rec = _Recorder()
            modes.prepare(rec, t, plan.migrate)
            out[t.name]["ddl"] = rec.statements
        return "no database yet (embedded server never started): DDL of fresh targets, nothing loaded", out
    try:
        conn = db.connect(dsn, plan.sink.connect_timeout)
    except LoadkitError as exc:
        for t in plan.tables:
            rec = _Recorder()
            modes.prepare(rec, t, plan.migrate)
            out[t.name]["ddl"] = rec.statements
        return f"database unreachable ({exc}): DDL of fresh targets, ledger unknown", out
    try:
        for t in plan.tables:
            with conn.cursor() as cur:
                cur.execute("SET LOCAL lock_timeout = '2s'")
                led = Ledger(plan.ledger_schema)
                led.ensure(cur)
                rec = _Recorder(cur)
                try:
                    modes.prepare(rec, t, plan.migrate)
                    out[t.name]["ledger"] = led.loaded_files(cur, t.name, plan.period)
                    out[t.name]["drift"] = identity.drift(cur, t, led, plan.period, plan.verify)
                except LoadkitError as exc:
                    out[t.name]["error"] = str(exc)
                except Exception as exc:  # e.g. lock_timeout behind a running load: say so, keep going
                    out[t.name]["error"] = f"{type(exc).__name__}: {str(exc).strip()}"
                out[t.name]["ddl"] = rec.statements
            conn.rollback()  # nothing of the above is kept
    finally:
        conn.rollback()
        conn.close()
    return f"database {mask_dsn(dsn)} (ledger schema {plan.ledger_schema})", out


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _table_text(t: TableSpec, info: Dict[str, Any]) -> List[str]:
    status = info["ledger"]
    lines = [f"table {t.schema}.{t.name}  mode={t.mode}  format={t.format}"
             + (f"  key={list(t.key)}" if t.key else "")]
    for f in t.files:
        state = "unknown" if status is None else status.get(f.sha256, "new")
        lines.append(f"  file {f.rel}  {_size(f.size)}  sha256 {f.sha256[:16]}  ledger: {state}")
    if status is not None:
        todo = sum(1 for f in t.files if status.get(f.sha256) != "loaded")
        lines.append(f"  would load {todo} of {len(t.files)} file(s)" + ("" if todo else " (force=true reloads)"))
    if info["drift"]:
        lines.append(f"  DRIFT: {info['drift']}")
    if info["error"]:
        lines.append(f"  REFUSED: {info['error']}")
    ddl = info["ddl"] or ["(target exists and matches the declaration: no DDL)"]
    lines += [f"  ddl: {s}" for s in ddl]
    return lines


def describe(plan: LoadPlan) -> str:
    """The plan as text: one block per table, then the knobs. Writes nothing."""
    note, info = inspect(plan)
    params = ", ".join(f"{k}={v}" for k, v in plan.params) or "none"
    lines = [f"job {plan.job}  period {plan.period}  params: {params}  force={plan.force}",
             f"data root {plan.data_root}", note, ""]
    for t in plan.tables:
        lines += _table_text(t, info[t.name]) + [""]
    lines.append(f"batch {plan.batch.policy} size={plan.batch.size:,}  writers={plan.writers} x "
                 f"{plan.connections_per_writer} connection(s)  retry attempts={plan.retry.attempts}")
    return "\n".join(lines)
