"""A source file whose content changed between a crash and the rerun: the old content's batches are discarded.

A run SIGKILLed mid-file leaves the file's first batches committed (append: in the target; the staged modes: in
staging) with no ``file`` row. If the file at that path is then replaced (a re-download, a corrected extraction),
the rerun reads it under its new sha256. Before (session 19's fresh-user review), the old content's batches stayed:
append kept them beside the new content's rows (+44,635 rows on the review's month), merge published them at the
finalisation (299,970 keys inserted from 299,000 records read) -- records of a file that is no longer there. Each
case here crashes a real CLI run (SIGKILL while a writer's third commit waits on a lock, so the file is
mid-way), swaps every file of the month for another month's at the same paths, reruns and checks the target
against the new month's oracle, and the ledger against the new content only.
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import psycopg2

import pytest

from loadkit.config import (DialectConfig, ColumnConfig, EnvConfig, JobConfig, LoadkitConfig, SinkConfig,
                            SourceConfig, TableConfig, TrackingConfig, to_config)
from loadkit.errors import Category, SourceDataError, classify
from loadkit.examples.cnpj.sample import generate_month
from loadkit.postgres import ledger
from loadkit.runner import run_job
from tests.helpers import autocommit_cursor, compose, query
from tests.test_modes import all_in, assert_table_matches, identity, only
from tests.test_e2e_monthly import last_wins
from tests.test_shutdown import cli, wait_for, waiting_on_lock

pytestmark = [pytest.mark.slow, pytest.mark.fault]


HOLD = 726_019  # the advisory lock key a commit waits for (see the trigger below)


@pytest.mark.parametrize("mode", ["append", "merge"])
def test_a_file_replaced_after_a_crash_loads_only_its_new_content(mode: str, tmp_path: Path, pg_dsn: str,
                                                                  schemas: tuple, job_overrides: Any,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    target, led = schemas
    old = generate_month(tmp_path / "old", 2024, 5, rows=4000, shards=1, seed=5)
    new = generate_month(tmp_path / "new", 2024, 5, rows=4000, shards=1, seed=6)
    root = tmp_path / "data"
    shutil.copytree(old.root, root)
    files = old.files["empresas"]
    assert files == new.files["empresas"]
    assert (old.root / files[0]).read_bytes() != (new.root / files[0]).read_bytes()

    with autocommit_cursor(pg_dsn) as cur:
        ledger.Ledger(led).ensure(cur)
        # From the third batch on, a commit waits for an advisory lock the test holds: the file stays mid-way
        # however fast the run is (a 0.3 s load ends before a lock taken after 2 commits could stop it).
        cur.execute(f"""CREATE FUNCTION "{led}".hold() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                        IF (SELECT count(*) FROM "{led}".batch) >= 2 THEN PERFORM pg_advisory_xact_lock({HOLD});
                        END IF; RETURN NEW; END $$""")
        cur.execute(f'CREATE TRIGGER hold BEFORE INSERT ON "{led}".batch FOR EACH ROW EXECUTE FUNCTION "{led}".hold()')
    holder = psycopg2.connect(pg_dsn)
    holder.autocommit = True
    holder.cursor().execute("SELECT pg_advisory_lock(%s)", (HOLD,))
    overrides = job_overrides(root, "env.executor=inprocess", "tracking.enabled=false", "batch.size=100",
                              *only("empresas"), *all_in(mode, ("empresas",)))
    proc = cli(overrides, tmp_path / "crashed.log")
    try:
        wait_for(lambda: waiting_on_lock(pg_dsn, led), 120, "a writer waiting on the lock")
        assert proc.poll() is None, "the run ended before the crash"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        holder.close()  # the dead run's writer, let go, finds its client gone and rolls back
    with autocommit_cursor(pg_dsn) as cur:
        cur.execute(f'DROP TRIGGER hold ON "{led}".batch')
    (crashed,), = query(pg_dsn, f'SELECT count(DISTINCT file_sha) FROM "{led}".batch')
    stale = query(pg_dsn, f'SELECT sum(rows_loaded), count(*), min(file_path) FROM "{led}".batch')
    assert crashed == 1 and stale[0][2] == files[0] and 0 < stale[0][0] < old.rows["empresas"], stale
    assert query(pg_dsn, f'SELECT count(*) FROM "{led}".file') == [(0,)]  # unfinished: no file row

    shutil.rmtree(root)
    shutil.copytree(new.root, root)  # the same paths, other content
    rerun = run_job(compose(overrides))
    assert rerun.status == "succeeded", rerun.error

    expected = new.expected["empresas"]
    assert_table_matches(pg_dsn, target, "empresas",
                         expected if mode == "append" else last_wins(expected, identity("empresas")))
    tm = rerun.metrics.tables["empresas"]
    assert (tm.rows_read, tm.rows_rejected) == (new.rows["empresas"], 0)
    # The ledger accounts for the new content only, and for every one of its records.
    (sha,), = query(pg_dsn, f'SELECT file_sha FROM "{led}".file')
    assert query(pg_dsn, f'SELECT file_sha, sum(rows_in) FROM "{led}".batch GROUP BY file_sha') == [
        (sha, new.rows["empresas"])]
    assert any("changed since" in r.getMessage() and files[0] in r.getMessage() for r in caplog.records)


def _items_config(root: Path, target: str, led: str, dsn: str, mlflow_uri: str, mode: str, force: bool = False) -> Any:
    cols = [ColumnConfig(name="id", type="integer", nullable=False), ColumnConfig(name="a", type="text")]
    return to_config(LoadkitConfig(
        year=2024, month=5, data_root=str(root), force=force,
        job=JobConfig(name="changed", schema=target, tables={
            "items": TableConfig(source=SourceConfig(paths=["2024-05/items.csv"], dialect=DialectConfig(header=False)),
                                 columns=cols, mode=mode, key=["id"] if mode == "merge" else [])}),
        sink=SinkConfig(dsn=dsn, ledger_schema=led), tracking=TrackingConfig(uri=mlflow_uri, enabled=False),
        env=EnvConfig(progress_bars=False, executor="inprocess")))


@pytest.mark.parametrize("mode", ["append", "merge"])
def test_a_published_file_that_changed_is_not_appended_twice(mode: str, tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                              mlflow_uri: str) -> None:
    """A file loaded (published) whose content then changed at the same path. append: the rerun stops (exit 3)
    naming the file and force=true, with the target as it was -- before, it appended the new content beside
    the old (every unchanged record twice); force=true then holds exactly the new content. merge upserts the
    new content by key (its semantics; replace and snapshot rebuild the period)."""
    target, led = schemas
    (tmp_path / "2024-05").mkdir()
    items = tmp_path / "2024-05" / "items.csv"
    items.write_bytes(b"".join(b"%d,a%d\n" % (i, i) for i in range(1, 101)))
    first = run_job(_items_config(tmp_path, target, led, pg_dsn, mlflow_uri, mode))
    assert first.status == "succeeded", first.error
    before = query(pg_dsn, f'SELECT id, a FROM "{target}".items ORDER BY id')
    assert len(before) == 100
    items.write_bytes(b"".join(b"%d,%s%d\n" % (i, b"b" if i % 10 == 0 else b"a", i) for i in range(1, 106)))
    wanted = [(i, f"{'b' if i % 10 == 0 else 'a'}{i}") for i in range(1, 106)]

    again = run_job(_items_config(tmp_path, target, led, pg_dsn, mlflow_uri, mode))
    if mode == "merge":
        assert again.status == "succeeded", again.error
        assert query(pg_dsn, f'SELECT id, a FROM "{target}".items ORDER BY id') == wanted
        return
    assert again.status == "failed" and isinstance(again.error, SourceDataError)
    assert classify(again.error) is Category.SOURCE_DATA
    assert "2024-05/items.csv" in str(again.error) and "force=true" in str(again.error)
    assert query(pg_dsn, f'SELECT id, a FROM "{target}".items ORDER BY id') == before
    forced = run_job(_items_config(tmp_path, target, led, pg_dsn, mlflow_uri, mode, force=True))
    assert forced.status == "succeeded", forced.error
    assert query(pg_dsn, f'SELECT id, a FROM "{target}".items ORDER BY id') == wanted
