"""Is a ledger claim still true? Verify the target before skipping a file the ledger says is loaded.

The ledger identifies a loaded file by table, period and content (sha256), and every row a
batch writes carries its deterministic batch id in ``_lk_batch``. Before a run skips files,
``verified_files`` checks that the target (``job.schema``.table) actually holds rows of the
batches the ledger claims -- so a dropped table, a changed ``job.schema`` or deleted rows are
noticed instead of silently reported as "skipped" over an empty table. On drift the run
reloads the period (default, with a warning naming the table) or stops (``job.on_drift=stop``).

For ``append`` targets the same content loaded under another period is skipped with a
warning, not loaded twice: exactly-once per target whatever the run parameters.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from loadkit.postgres.ledger import Ledger
from loadkit.postgres.modes import mode_for
from loadkit.errors import ConfigError
from loadkit.plan import BATCH_COL, TableSpec
from loadkit.security import qualified, quote_ident

log = logging.getLogger("loadkit.postgres.identity")


def _holds_any(cur: Any, table: TableSpec, ids_sql: str, args: tuple) -> bool:
    """True if the target holds at least one row of the batches ids_sql selects (stops at the first)."""
    cur.execute(f"SELECT EXISTS (SELECT 1 FROM {qualified(table.schema, table.name)} "
                f"WHERE {quote_ident(BATCH_COL)} IN ({ids_sql}))", args)
    return bool(cur.fetchone()[0])


def _held_rows(cur: Any, table: TableSpec, ids_sql: str, args: tuple) -> int:
    cur.execute(f"SELECT count(*) FROM {qualified(table.schema, table.name)} "
                f"WHERE {quote_ident(BATCH_COL)} IN ({ids_sql})", args)
    return int(cur.fetchone()[0])


def drift(cur: Any, table: TableSpec, ledger: Ledger, period: str, verify: str = "exists") -> Optional[str]:
    """Why the target does not hold what the ledger says about this period, or None if it does.

    verify="exists": one row of the claimed batches is enough (append, snapshot: this period's
    batches; merge, replace: this period's or any later one's, which legitimately overwrite it).
    verify="count": for append, the target must hold exactly the rows the ledger claims.
    The target must exist (the run creates missing tables before this check)."""
    if verify == "off":
        return None
    claimed = ledger.claimed_rows(cur, table.name, period)
    if claimed == 0:
        return None  # nothing to find: empty files, or every row rejected
    where = f"{table.schema}.{table.name}"
    mode = mode_for(table)
    if mode.overwritten_later:
        ok = _holds_any(cur, table, ledger.claimed_or_later_sql(), (table.name, table.name, period))
    elif verify == "count" and not mode.staged:
        held = _held_rows(cur, table, ledger.claimed_batches_sql(), (table.name, period))
        if held != claimed:
            return (f"target {where} holds {held:,} rows of period {period}'s batches, "
                    f"the ledger ({ledger.schema}) says {claimed:,}")
        return None
    else:
        ok = _holds_any(cur, table, ledger.claimed_batches_sql(), (table.name, period))
    if ok:
        return None
    return (f"target {where} holds none of the {claimed:,} rows the ledger ({ledger.schema}) says period {period} "
            "loaded (table dropped or emptied, or job.schema changed)")


def verified_files(cur: Any, table: TableSpec, ledger: Ledger, period: str, verify: str = "exists",
                   on_drift: str = "reload") -> Dict[str, str]:
    """file sha -> ledger status for this table and period, after checking the target holds the claim.

    On drift: ``on_drift="reload"`` logs a warning naming the table, removes this period's
    rows and ledger entries (the mode's ``reset``) and returns {} so every file loads again;
    ``on_drift="stop"`` raises ConfigError. For append targets, a file whose content is
    loaded under another period and whose rows the target holds is returned as "loaded"
    (skipped) with a warning. Runs inside the caller's transaction, after the mode's ``prepare``."""
    mode = mode_for(table)
    done = ledger.loaded_files(cur, table.name, period)
    if "loaded" in done.values():
        problem = drift(cur, table, ledger, period, verify)
        if problem is not None:
            if on_drift == "stop":
                raise ConfigError(f"{problem}: refusing to skip its files (force=true reloads them, "
                                  "job.on_drift=reload does it automatically)", key="job.on_drift")
            log.warning("%s: reloading %s.%s for period %s", problem, table.schema, table.name, period)
            mode.reset(cur, ledger, period)
            done = {}
    if not mode.staged and verify != "off":  # an append target holds each file's content once
        for f in table.files:
            if done.get(f.sha256) == "loaded":
                continue
            for other, rows in ledger.loaded_elsewhere(cur, table.name, period, f.sha256):
                held = rows == 0 or _holds_any(
                    cur, table, ledger.claimed_batches_sql() + " AND b.file_sha = %s",
                    (table.name, other, f.sha256))
                if held:
                    log.warning("file %s (sha256 %s) is already loaded into %s.%s under period %s: skipped, "
                                "not loaded twice (an append target holds each file once)", f.rel, f.sha256[:12],
                                table.schema, table.name, other)
                    done[f.sha256] = "loaded"
                    break
    return done
