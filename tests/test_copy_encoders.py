"""The two binary COPY encoders (postgres/copy.py: pgpq + psycopg 3, ADBC) give identical tables, and the
writer keeps its one-transaction exactly-once contract, timeouts, application_name, cancellation and
error classification on the psycopg 3 path too. Real PostgreSQL throughout."""
from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import threading
import uuid
from typing import Any, Dict, Iterator, List

import psycopg2
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadkit.errors import (BatchRangeConflict, Category, ConfigError, LoadkitError, OperatorError, TransientDBError,
                            classify)
from loadkit.plan import BATCH_COL, RetryPolicy
from loadkit.postgres import ledger
from loadkit.postgres.copy import ENCODERS, encoder
from loadkit.postgres.db import application_name, cancel_backends, session_dsn, with_application_name
from loadkit.postgres.writer import BatchWriter, TableTarget, WriterSettings
from loadkit.records import BatchResult, ParsedBatch
from loadkit.transform import REJECT_SCHEMA
from tests.conftest import compose

# Every loadkit column type (config.py's type grammar) plus timestamptz and bytea, as the Arrow type
# transform.py gives it. (name, PostgreSQL type, Arrow type)
COLUMNS = [
    ("t", "text", pa.string()),
    ("v", "varchar(12)", pa.string()),
    ("c", "char(5)", pa.string()),
    ("i2", "smallint", pa.int16()),
    ("i4", "integer", pa.int32()),
    ("i8", "bigint", pa.int64()),
    ("n", "numeric(18,4)", pa.decimal128(18, 4)),
    ("n0", "numeric(38,0)", pa.decimal128(38, 0)),
    ("n2", "numeric(12,2)", pa.decimal128(12, 2)),
    ("d", "date", pa.date32()),
    ("ts", "timestamp", pa.timestamp("us")),
    ("tz", "timestamptz", pa.timestamp("us", tz="UTC")),
    ("b", "boolean", pa.bool_()),
    ("f", "double precision", pa.float64()),
    ("f4", "real", pa.float32()),
    ("by", "bytea", pa.binary()),
]
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


def _decimal(precision: int, scale: int) -> st.SearchStrategy:
    """Any numeric(precision, scale) value, built from its digits (exact: no 28-digit context rounding)."""
    digits = 10**precision - 1
    return st.integers(-digits, digits).map(lambda i: decimal.Decimal(f"{i}E-{scale}"))


_VALUES: Dict[str, st.SearchStrategy] = {
    "t": _TEXT,
    "v": st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
    "c": st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=5),
    "i2": st.integers(-(2**15), 2**15 - 1),
    "i4": st.integers(-(2**31), 2**31 - 1),
    "i8": st.integers(-(2**63), 2**63 - 1),
    "n": _decimal(18, 4),
    "n0": _decimal(38, 0),
    "n2": _decimal(12, 2),
    "d": st.dates(),
    "ts": st.datetimes(),
    "tz": st.datetimes(timezones=st.just(dt.timezone.utc)),
    "b": st.booleans(),
    "f": st.floats(allow_nan=True, allow_infinity=True),
    "f4": st.floats(width=32, allow_nan=True, allow_infinity=True),
    "by": st.binary(max_size=20),
}
_ROW = st.fixed_dictionaries({name: st.one_of(st.none(), _VALUES[name]) for name, _, _ in COLUMNS})


def _arrow(rows: List[Dict[str, Any]], chunks: int) -> pa.Table:
    cols = {"id": pa.array(range(len(rows)), pa.int64())}
    cols.update({name: pa.array([r[name] for r in rows], typ) for name, _, typ in COLUMNS})
    table = pa.table(cols)
    if chunks > 1 and table.num_rows > 1:  # several record batches, as a concatenated parse result has
        step = max(1, table.num_rows // chunks)
        table = pa.concat_tables([table.slice(i, step) for i in range(0, table.num_rows, step)])
    return table


@pytest.fixture(scope="module")
def typed_tables(pg_dsn: str) -> Iterator[str]:
    schema = f"enc_{uuid.uuid4().hex[:8]}"
    ddl = ", ".join(["id bigint"] + [f"{name} {pg}" for name, pg, _ in COLUMNS])
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE SCHEMA "{schema}"')
        for name in ENCODERS:
            cur.execute(f'CREATE TABLE "{schema}".{name} ({ddl})')
    yield schema
    with conn.cursor() as cur:
        cur.execute(f'DROP SCHEMA "{schema}" CASCADE')
    conn.close()


@pytest.fixture(scope="module")
def encoder_conns(pg_dsn: str) -> Iterator[Dict[str, Any]]:
    conns = {name: encoder(name).connect(pg_dsn) for name in ENCODERS}
    yield conns
    for conn in conns.values():
        conn.close()


def _rows_as_text(dsn: str, schema: str, table: str) -> List[str]:
    """Each row as PostgreSQL's own text of the row (exact for numerics, floats, timestamps, bytea)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f'SELECT r::text FROM "{schema}".{table} r ORDER BY id')
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_ROW, max_size=30), chunks=st.integers(1, 3))
def test_both_encoders_write_identical_rows_for_every_type(pg_dsn: str, typed_tables: str,
                                                           encoder_conns: Dict[str, Any],
                                                           rows: List[Dict[str, Any]], chunks: int) -> None:
    data = _arrow(rows, chunks)
    for name in ENCODERS:
        conn = encoder_conns[name]
        with conn.cursor() as cur:
            cur.execute(f'TRUNCATE "{typed_tables}".{name}')
        encoder(name).copy_arrow(conn, typed_tables, name, data)
        conn.commit()
    got = {name: _rows_as_text(pg_dsn, typed_tables, name) for name in ENCODERS}
    assert len(got["pgpq"]) == len(rows)
    assert got["pgpq"] == got["adbc"]


def test_encoder_values_read_back_as_written(pg_dsn: str, typed_tables: str, encoder_conns: Dict[str, Any]) -> None:
    """Against a reference (the Python values), not only each other: numerics keep their scale, char pads."""
    row = {"t": "só", "v": "abc", "c": "ab", "i2": -32768, "i4": 7, "i8": 2**63 - 1,
           "n": decimal.Decimal("-12345678901234.5678"), "n0": decimal.Decimal(10**37), "n2": decimal.Decimal("0.10"),
           "d": dt.date(1, 1, 1), "ts": dt.datetime(2024, 5, 31, 23, 59, 59, 999999),
           "tz": dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc), "b": False, "f": 0.1, "f4": 1.5, "by": b"\x00\xff"}
    for name in ENCODERS:
        conn = encoder_conns[name]
        with conn.cursor() as cur:
            cur.execute(f'TRUNCATE "{typed_tables}".{name}')
        encoder(name).copy_arrow(conn, typed_tables, name, _arrow([row], 1))
        conn.commit()
        pg = psycopg2.connect(pg_dsn)
        with pg.cursor() as cur:
            cur.execute(f'SELECT {", ".join(n for n, _, _ in COLUMNS)} FROM "{typed_tables}".{name}')
            (got,) = cur.fetchall()
        pg.close()
        read = dict(zip([n for n, _, _ in COLUMNS], got), by=bytes(got[-1]))
        assert read == dict(row, c="ab   ")  # char(5) pads
        assert str(got[6]) == "-12345678901234.5678" and str(got[8]) == "0.10"


def test_unknown_encoder_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        encoder("copy-by-hand")
    assert err.value.context["key"] == "sink.copy_encoder"
    with pytest.raises(ConfigError) as err:
        compose(["+job=monthly", "year=2024", "month=5", "sink.copy_encoder=copy-by-hand"])
    assert err.value.context["key"] == "sink.copy_encoder"


def test_the_plan_carries_the_encoder_to_the_writers() -> None:
    from loadkit.plan import build_plan
    from loadkit.postgres.sink import writer_settings

    for name in ENCODERS:
        plan = build_plan(compose(["+job=monthly", "year=2024", "month=5", f"sink.copy_encoder={name}"]))
        assert writer_settings(plan, "postgresql://x@127.0.0.1/db").copy_encoder == name
    assert build_plan(compose(["+job=monthly", "year=2024", "month=5"])).sink.copy_encoder == "pgpq"


# ---------------------------------------------------------------- the writer on each encoder


def _writer_setup(dsn: str, schemas: tuple) -> None:
    target, led = schemas
    conn = psycopg2.connect(dsn)
    with conn:
        with conn.cursor() as cur:
            ledger.Ledger(led).ensure(cur)
            cur.execute(f'CREATE SCHEMA IF NOT EXISTS "{target}"')
            cur.execute(f'CREATE TABLE IF NOT EXISTS "{target}".items (code char(4), qty integer, '
                        f'price numeric(10,2), seen date, {BATCH_COL} bigint)')
    conn.close()


def _settings(dsn: str, schemas: tuple, copy_encoder: str, run_id: str = "encrun") -> WriterSettings:
    target, led = schemas
    return WriterSettings(dsn=dsn, ledger_schema=led, run_id=run_id, period="2024-05",
                          tables={"items": TableTarget(target, "items", keep_row_ordinal=False)}, connections=1,
                          pre_ping=True, retry=RetryPolicy(2, 0.01, 0.02, 2.0, 0.0, 5, 1.0),
                          copy_encoder=copy_encoder)


def _record(batch_id: int, rows_in: int = 3, loaded: int = 2, rejected: int = 1) -> ParsedBatch:
    rows = pa.table({"code": ["A1", "B22", None], "qty": pa.array([1, None, 3], pa.int32()),
                     "price": pa.array([decimal.Decimal("1.50"), None, decimal.Decimal("-0.01")], pa.decimal128(10, 2)),
                     "seen": pa.array([dt.date(2024, 5, 1), None, dt.date(1999, 12, 31)], pa.date32()),
                     "_lk_row": pa.array([0, 1, 2], pa.int32())}).slice(0, loaded)
    rejects = pa.Table.from_pylist([{"line_number": 7, "column_name": "qty", "reason": "not an integer",
                                     "raw": "X;y;z"}] * rejected, schema=REJECT_SCHEMA)
    return ParsedBatch(kind="data", table_name="items", file_sha="f" * 64, member="", batch_id=batch_id,
                       rows_in=rows_in, rows_loaded=loaded, rows_rejected=rejected, rows_coerced=0, bytes=10,
                       parse_s=0.0, blank_lines=0, rows=rows, rejects=rejects, file_path="/data/items.csv",
                       file_ordinal=0, start=0, end=10, first_line=1)


def _write(writer: BatchWriter, batch: ParsedBatch) -> BatchResult:
    return writer.write(batch)


def _count(dsn: str, sql: str) -> int:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return int(cur.fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("copy_encoder", ENCODERS)
def test_writer_commits_rows_rejects_and_ledger_row_once(pg_dsn: str, schemas: tuple, copy_encoder: str) -> None:
    _writer_setup(pg_dsn, schemas)
    target, led = schemas
    writer = BatchWriter(_settings(pg_dsn, schemas, copy_encoder))
    other = BatchWriter(_settings(pg_dsn, schemas, copy_encoder, run_id="a later run"))
    try:
        assert _write(writer, _record(101)).status == "committed"
        assert _write(other, _record(101)).status == "skipped"  # the ledger has it: never twice
        # Its own run's batch is reported committed, never written again: the commit whose reply was lost
        # (or a dead Ray loader's last one) is this run's, so its counts must be too (the driver drops a
        # result it already has).
        assert _write(writer, _record(101)).status == "committed"
    finally:
        writer.close()
        other.close()
    conn = psycopg2.connect(pg_dsn)
    with conn.cursor() as cur:
        cur.execute(f'SELECT code, qty, price::text, seen::text, {BATCH_COL} FROM "{target}".items ORDER BY code')
        assert cur.fetchall() == [("A1  ", 1, "1.50", "2024-05-01", 101), ("B22 ", None, None, None, 101)]
        cur.execute(f'SELECT batch_id, rows_in, rows_loaded, rows_rejected, attempts FROM "{led}".batch')
        assert cur.fetchall() == [(101, 3, 2, 1, 1)]
        cur.execute(f'SELECT batch_id, line_number, column_name, reason, raw, file_path FROM "{led}".reject')
        assert cur.fetchall() == [(101, 7, "qty", "not an integer", "X;y;z", "/data/items.csv")]
    conn.close()


@pytest.mark.parametrize("copy_encoder", ENCODERS)
def test_a_batch_id_committed_with_another_extent_is_neither_skipped_nor_reported(pg_dsn: str, schemas: tuple,
                                                                                  copy_encoder: str) -> None:
    """A batch id is (table, period, file, member, start): a chunk starting where a committed batch starts but
    ending elsewhere shares its id without being that batch. It happens when a commit lands after the reader
    planned its ranges, at another batch size: a killed run's orphaned loader committing the batch in hand
    after the next run planned (adaptive sizing: the next run starts at ``batch.size``), or a dead Ray
    loader's COMMIT in flight becoming visible after its retry read the ledger. Before: the writer skipped
    the chunk (another run's) or reported it committed (its own run's, with the chunk's counts), so rows
    [10, 20) were never written and the next chunk, starting at 20, went on as if they had been; with a
    shorter chunk the rows past its end were written twice. Now the write stops, classified transient and
    not retried in the run: the rerun plans from the ledger's ranges and reads exactly the rest."""
    _writer_setup(pg_dsn, schemas)
    target, led = schemas
    orphan = BatchWriter(_settings(pg_dsn, schemas, copy_encoder, run_id="killed run"))
    nxt = BatchWriter(_settings(pg_dsn, schemas, copy_encoder, run_id="next run"))
    try:
        assert orphan.write(_record(101)).status == "committed"  # rows [0, 10)
        for writer in (nxt, orphan):
            for end in (20, 5):
                longer = dataclasses.replace(_record(101), end=end)
                with pytest.raises(BatchRangeConflict) as err:
                    writer.write(longer)
                assert classify(err.value) is Category.TRANSIENT
                assert err.value.context["committed"] == "[0, 10)" and err.value.context["batch"] == f"[0, {end})"
        assert nxt.write(_record(101)).status == "skipped"  # the same extent: the committed batch itself
        assert orphan.write(_record(101)).status == "committed"
    finally:
        orphan.close()
        nxt.close()
    assert _count(pg_dsn, f'SELECT count(*) FROM "{target}".items') == 2
    assert _count(pg_dsn, f'SELECT count(*) FROM "{led}".batch') == 1


@pytest.mark.parametrize("copy_encoder", ENCODERS)
def test_a_failing_ledger_row_rolls_back_the_batch_rows(pg_dsn: str, schemas: tuple, copy_encoder: str) -> None:
    """Rows, rejects and ledger row are one transaction on one connection: the ledger row's CHECK
    (rows_in = loaded + rejected) failing leaves no row of the batch behind."""
    _writer_setup(pg_dsn, schemas)
    target, led = schemas
    writer = BatchWriter(_settings(pg_dsn, schemas, copy_encoder))
    try:
        with pytest.raises(LoadkitError) as err:
            _write(writer, _record(202, rows_in=9))
        assert err.value.context.get("sqlstate") == "23514" and err.value.category is Category.SOURCE_DATA
    finally:
        writer.close()
    assert _count(pg_dsn, f'SELECT count(*) FROM "{target}".items') == 0
    assert _count(pg_dsn, f'SELECT count(*) FROM "{led}".reject') == 0
    assert _count(pg_dsn, f'SELECT count(*) FROM "{led}".batch') == 0


@pytest.mark.parametrize("copy_encoder", ENCODERS)
def test_writer_sessions_carry_application_name_and_timeouts(pg_dsn: str, schemas: tuple, copy_encoder: str) -> None:
    _writer_setup(pg_dsn, schemas)
    dsn = session_dsn(pg_dsn, connect_timeout=5, statement_timeout_ms=4321, lock_timeout_ms=1234)
    run_id = f"enc{uuid.uuid4().hex[:6]}"
    writer = BatchWriter(_settings(dsn, schemas, copy_encoder, run_id=run_id))
    try:
        with writer._pool.connection() as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), "
                            "current_setting('application_name')")
                got = tuple(cur.fetchall()[0])
            conn.rollback()
    finally:
        writer.close()
    assert got == ("4321ms", "1234ms", application_name(run_id, "writer"))


def test_cancel_backends_interrupts_a_pgpq_copy_waiting_on_a_lock(pg_dsn: str, schemas: tuple) -> None:
    """The run's shutdown cancels a psycopg 3 COPY by application_name; the error classifies as interrupted."""
    _writer_setup(pg_dsn, schemas)
    target, _ = schemas
    run_id = f"enc{uuid.uuid4().hex[:6]}"
    enc = encoder("pgpq")
    holder = psycopg2.connect(pg_dsn)
    conn = enc.connect(with_application_name(pg_dsn, application_name(run_id, "writer")))
    errors: List[BaseException] = []

    def copy() -> None:
        try:
            enc.copy_arrow(conn, target, "items", pa.table({"qty": pa.array([1], pa.int32())}))
        except BaseException as exc:  # the cancelled COPY's error, checked below
            errors.append(exc)

    try:
        with holder.cursor() as cur:
            cur.execute(f'LOCK TABLE "{target}".items IN ACCESS EXCLUSIVE MODE')
        worker = threading.Thread(target=copy)
        worker.start()
        cancelled = 0
        for _ in range(200):  # until the COPY is waiting on the lock (bounded)
            cancelled = cancel_backends(pg_dsn, run_id)
            if cancelled:
                break
            worker.join(0.05)
        worker.join(30)
        assert cancelled == 1 and not worker.is_alive()
        assert len(errors) == 1 and classify(errors[0]) is Category.INTERRUPTED
    finally:
        holder.rollback()
        holder.close()
        conn.close()


def test_psycopg3_errors_classify_like_the_other_drivers(pg_dsn: str) -> None:
    conn = encoder("pgpq").connect(session_dsn(pg_dsn, statement_timeout_ms=50))
    try:
        with pytest.raises(Exception) as timeout:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(5)")
        assert classify(timeout.value) is Category.TRANSIENT  # 57014 by statement_timeout: retried
        conn.rollback()
        with pytest.raises(Exception) as dup:
            with conn.cursor() as cur:
                cur.execute("SELECT 1/0")
        assert classify(dup.value) is Category.SOURCE_DATA  # 22012
        conn.rollback()
    finally:
        conn.close()


def test_psycopg3_connect_failures_are_classified_and_masked(pg_dsn: str) -> None:
    secret = "pc-" + uuid.uuid4().hex
    with pytest.raises(TransientDBError) as down:
        encoder("pgpq").connect(f"postgresql://root:{secret}@127.0.0.1:1/test?connect_timeout=3")
    with pytest.raises(OperatorError) as refused:
        encoder("pgpq").connect(pg_dsn.rsplit("/", 1)[0] + f"/no_such_db_{uuid.uuid4().hex[:6]}")
    for err in (down.value, refused.value):
        assert secret not in str(err) and secret not in repr(err.context)


def test_psycopg2_and_psycopg3_coexist_in_one_process(pg_dsn: str) -> None:
    import psycopg

    old = psycopg2.connect(pg_dsn)
    new = psycopg.connect(pg_dsn)
    try:
        with old.cursor() as a, new.cursor() as b:
            a.execute("SELECT pg_backend_pid()")
            b.execute("SELECT pg_backend_pid()")
            assert a.fetchone()[0] != b.fetchone()[0]
    finally:
        old.close()
        new.close()


def test_writer_trims_freed_memory_once_the_process_grew_not_after_every_batch(
        pg_dsn: str, schemas: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer hands freed heap back (release_memory) when the process's RSS has grown by TRIM_GROWTH_BYTES
    since the last trim, not after every batch (that faulted each batch's pages in again); the result's
    rss_bytes is the RSS after any trim."""
    from loadkit.postgres import writer as writer_mod

    trims: List[int] = []
    real = writer_mod.release_memory
    monkeypatch.setattr(writer_mod, "release_memory", lambda: (trims.append(1), real())[1])  # spy: still trims
    _writer_setup(pg_dsn, schemas)
    writer = BatchWriter(_settings(pg_dsn, schemas, "pgpq"))
    try:
        assert _write(writer, _record(301)).status == "committed" and trims == []  # no growth since the start
        grown = bytearray(b"\x01") * (writer_mod.TRIM_GROWTH_BYTES + 32 * 2**20)  # touched: resident
        result = _write(writer, _record(302))
        assert result.status == "committed" and trims == [1]
        assert result.rss_bytes == writer._trimmed_rss > 0
        assert _write(writer, _record(303)).status == "committed" and trims == [1]  # no growth since that trim
        del grown
    finally:
        writer.close()
    assert _count(pg_dsn, f'SELECT count(*) FROM "{schemas[1]}".batch') == 3
