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
from typing import Any, List

import psycopg2

import pytest

from loadkit.config import (DialectConfig, ColumnConfig, EnvConfig, JobConfig, LoadkitConfig, SinkConfig,
                            SourceConfig, TableConfig, TrackingConfig, to_config)
from loadkit.errors import Category, OperatorError, SourceDataError, classify
from loadkit.examples.cnpj.sample import generate_month
from loadkit.postgres import ledger
from loadkit.runner import run_job
from tests.helpers import autocommit_cursor, compose, query
from tests.test_modes import all_in, assert_table_matches, identity, only
from tests.test_e2e_monthly import last_wins
from tests.test_shutdown import cli, wait_for, waiting_on_lock

pytestmark = [pytest.mark.slow, pytest.mark.fault]


HOLD = 726_019  # the advisory lock key a commit waits for (crash_mid_file's trigger)




def crash_mid_file(pg_dsn: str, led: str, overrides: List[str], log: Path) -> None:
    """A real CLI run SIGKILLed mid-file: from the third batch on, a commit waits for an advisory lock the test
    holds (a trigger on the ledger's batch table), so the file stays mid-way however fast the run is (a 0.3 s
    load ends before a lock taken after 2 commits could stop it); the kill comes while a writer waits."""
    with autocommit_cursor(pg_dsn) as cur:
        ledger.Ledger(led).ensure(cur)
        cur.execute(f"""CREATE FUNCTION "{led}".hold() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                        IF (SELECT count(*) FROM "{led}".batch) >= 2 THEN PERFORM pg_advisory_xact_lock({HOLD});
                        END IF; RETURN NEW; END $$""")
        cur.execute(f'CREATE TRIGGER hold BEFORE INSERT ON "{led}".batch FOR EACH ROW EXECUTE FUNCTION "{led}".hold()')
    holder = psycopg2.connect(pg_dsn)
    holder.autocommit = True
    holder.cursor().execute("SELECT pg_advisory_lock(%s)", (HOLD,))
    proc = cli(overrides, log)
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


def elsewhere(overrides: List[str], target: str, led: str) -> List[str]:
    """The same run's overrides into another target and ledger schema."""
    kept = [o for o in overrides if not o.startswith(("job.schema=", "sink.ledger_schema="))]
    return kept + [f"job.schema={target}", f"sink.ledger_schema={led}"]


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

    overrides = job_overrides(root, "env.executor=inprocess", "tracking.enabled=false", "batch.size=100",
                              *only("empresas"), *all_in(mode, ("empresas",)))
    crash_mid_file(pg_dsn, led, overrides, tmp_path / "crashed.log")
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


@pytest.mark.parametrize("mode", ["append", "merge", "replace"])
def test_a_file_removed_after_a_crash_leaves_nothing_behind(mode: str, tmp_path: Path, pg_dsn: str,
                                                            schemas: tuple, job_overrides: Any, fresh: Any,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The crashed run's file is removed from the month (or renamed and changed: the run no longer reads that
    content) before the rerun. Before (a fresh-user review, session 20), its committed batches stayed: merge
    (a delete_missing table, the monthly job's) and replace published them (13,216 keys from 8,000 records
    read), append kept them in the target. The rerun must equal a fresh load of the month as it is now."""
    target, led = schemas
    month = generate_month(tmp_path / "data", 2024, 5, rows=8000, shards=2, seed=5)
    files = month.files["empresas"]
    assert len(files) == 2
    overrides = job_overrides(month.root, "env.executor=inprocess", "tracking.enabled=false", "batch.size=100",
                              *only("empresas"), *all_in(mode, ("empresas",)))
    crash_mid_file(pg_dsn, led, overrides, tmp_path / "crashed.log")
    crashed = query(pg_dsn, f'SELECT min(file_path), count(DISTINCT file_sha) FROM "{led}".batch')
    assert crashed == [(files[0], 1)], crashed  # the first shard, mid-way

    (month.root / files[0]).unlink()
    rerun = run_job(compose(overrides))
    assert rerun.status == "succeeded", rerun.error
    other_target, other_led = fresh()
    whole = run_job(compose(elsewhere(overrides, other_target, other_led)))
    assert whole.status == "succeeded", whole.error

    columns = "cnpj_basico, razao_social, natureza_juridica, capital_social, porte"
    rows = f"SELECT {columns} FROM \"{{}}\".empresas ORDER BY {columns}"
    assert query(pg_dsn, rows.format(target)) == query(pg_dsn, rows.format(other_target))
    assert query(pg_dsn, f'SELECT file_path, sum(rows_in) FROM "{led}".batch GROUP BY 1') == [
        (files[1], whole.metrics.tables["empresas"].rows_read)]
    assert rerun.metrics.tables["empresas"].rows_read == whole.metrics.tables["empresas"].rows_read
    assert any("no longer reads that file" in r.getMessage() and files[0] in r.getMessage() for r in caplog.records)


def _items_config(root: Path, target: str, led: str, dsn: str, mlflow_uri: str, mode: str, force: bool = False) -> Any:
    """One table, items (id, a) from 2024-05/*.csv; mode "sync" is merge with delete_missing."""
    cols = [ColumnConfig(name="id", type="integer", nullable=False), ColumnConfig(name="a", type="text")]
    keyed = mode in ("merge", "sync", "replace")
    return to_config(LoadkitConfig(
        year=2024, month=5, data_root=str(root), force=force,
        job=JobConfig(name="changed", schema=target, tables={
            "items": TableConfig(source=SourceConfig(paths=["2024-05/*.csv"], dialect=DialectConfig(header=False)),
                                 columns=cols, mode="merge" if mode == "sync" else mode, key=["id"] if keyed else [],
                                 delete_missing=mode == "sync")}),
        sink=SinkConfig(dsn=dsn, ledger_schema=led), tracking=TrackingConfig(uri=mlflow_uri, enabled=False),
        env=EnvConfig(progress_bars=False, executor="inprocess")))


@pytest.mark.parametrize("mode", ["append", "merge", "sync", "replace"])
def test_a_published_file_that_changed_is_loaded_as_its_mode_says(mode: str, tmp_path: Path, pg_dsn: str,
                                                                   schemas: tuple, mlflow_uri: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A file loaded (published) whose content then changed at the same path: items.csv, ids 1-100, then ids 1-105
    without the multiples of 7 and every tenth one changed. The month's other file, a.csv (ids 95-100 and
    201-250; earlier in the file order, so items.csv won the shared keys), stays as it was.

    - append: the rerun stops (exit 3) naming the file and force=true, with the target as it was -- before, it
      appended the new content beside the old (every unchanged record twice); force=true then loads both files.
    - merge upserts the new content over the old: the dropped keys stay (merge keeps keys), and so does the old
      content's value of key 98, which a.csv also has (a.csv is not read again).
    - merge with delete_missing (each month a full snapshot) reads the month again and holds exactly its keys
      now, key 98 with a.csv's value. Before (a fresh-user review, session 20) the old content still counted as
      the month's and the sync kept its dropped keys; then (a second review) forgetting only the old content
      let the sync delete key 98, whose row the old content had written.
    - replace rebuilds the period from both files.
    In every mode a.csv stays published when it is not read again: before, the settlement marked it 'staged'
    beside the changed file, its batches then counted as lost from staging and it was read again under a
    "missing from staging" warning with no crash."""
    target, led = schemas
    (tmp_path / "2024-05").mkdir()
    items = tmp_path / "2024-05" / "items.csv"
    other = [(i, f"s{i}") for i in range(95, 101)] + [(i, f"m{i}") for i in range(201, 251)]
    (tmp_path / "2024-05" / "a.csv").write_bytes("".join(f"{i},{v}\n" for i, v in other).encode())
    items.write_bytes(b"".join(b"%d,a%d\n" % (i, i) for i in range(1, 101)))
    first = run_job(_items_config(tmp_path, target, led, pg_dsn, mlflow_uri, mode))
    assert first.status == "succeeded", first.error
    before = query(pg_dsn, f'SELECT id, a FROM "{target}".items ORDER BY id, a')
    assert len(before) == (156 if mode == "append" else 150)
    kept = [i for i in range(1, 106) if i % 7]
    new_items = [(i, f"{'b' if i % 10 == 0 else 'a'}{i}") for i in kept]
    items.write_bytes("".join(f"{i},{v}\n" for i, v in new_items).encode())
    month_now = dict(other)
    month_now.update(new_items)  # items.csv comes later: its rows win the shared keys

    caplog.clear()
    again = run_job(_items_config(tmp_path, target, led, pg_dsn, mlflow_uri, mode))
    now = query(pg_dsn, f'SELECT id, a FROM "{target}".items ORDER BY id, a')
    if mode != "append":
        assert again.status == "succeeded", again.error
        wanted = dict(month_now)
        if mode == "merge":  # the old content's keys stay as it left them where nothing rewrote them
            wanted.update({i: f"a{i}" for i in range(1, 101) if i % 7 == 0})
        assert now == sorted(wanted.items())
        assert not any("missing from staging" in r.getMessage() for r in caplog.records)
        read = again.metrics.tables["items"].rows_read
        assert read == (len(new_items) if mode == "merge" else len(new_items) + len(other))
        # plain merge keeps both contents of items.csv accounted for (the old one's dropped keys stay published)
        assert query(pg_dsn, f'SELECT path, status FROM "{led}".file ORDER BY path') == [
            ("2024-05/a.csv", "loaded")] + [("2024-05/items.csv", "loaded")] * (2 if mode == "merge" else 1)
        return
    assert again.status == "failed" and isinstance(again.error, SourceDataError)
    assert classify(again.error) is Category.SOURCE_DATA
    assert "2024-05/items.csv" in str(again.error) and "force=true" in str(again.error)
    assert now == before
    forced = run_job(_items_config(tmp_path, target, led, pg_dsn, mlflow_uri, mode, force=True))
    assert forced.status == "succeeded", forced.error
    assert query(pg_dsn, f'SELECT id, a FROM "{target}".items ORDER BY id, a') == sorted(other + new_items)


def test_another_jobs_unfinished_staged_file_stops_a_staged_publish(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                                    job_overrides: Any) -> None:
    """Job A crashes mid-file on a merge table; job B, loading the same table and period, would publish all of
    staging -- A's half-read file with its own (a second review, session 20: 10,000 records read, 21,791 keys
    inserted, and the rows stayed after A dropped the file). B stops instead (exit 5, operator: naming A's job
    and file, rerun A first or force=true) with the target untouched; A's rerun then completes the month, and
    B's run finds it published."""
    target, led = schemas
    month = generate_month(tmp_path / "data", 2024, 5, rows=4000, shards=1, seed=5)
    overrides = job_overrides(month.root, "env.executor=inprocess", "tracking.enabled=false", "batch.size=100",
                              *only("empresas"), *all_in("merge", ("empresas",)))
    crash_mid_file(pg_dsn, led, overrides, tmp_path / "crashed.log")
    target_before = query(pg_dsn, f'SELECT count(*) FROM "{target}".empresas')

    other = run_job(compose(overrides + ["job.name=other_job"]))
    assert other.status == "failed" and isinstance(other.error, OperatorError), other.error
    assert classify(other.error) is Category.OPERATOR
    message = str(other.error)
    assert "cnpj_monthly" in message and month.files["empresas"][0] in message and "force=true" in message
    assert query(pg_dsn, f'SELECT count(*) FROM "{target}".empresas') == target_before

    resumed = run_job(compose(overrides))
    assert resumed.status == "succeeded", resumed.error
    assert_table_matches(pg_dsn, target, "empresas", last_wins(month.expected["empresas"], identity("empresas")))
    again = run_job(compose(overrides + ["job.name=other_job"]))
    assert again.status == "succeeded" and again.metrics.tables["empresas"].status == "skipped", again.error
