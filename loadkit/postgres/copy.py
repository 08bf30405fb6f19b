"""Binary COPY of Arrow tables into PostgreSQL: one small interface, two encoders (``sink.copy_encoder``).

- ``pgpq`` (default): pgpq (Rust) encodes the Arrow batches into PostgreSQL's binary COPY format and
  psycopg 3 streams the bytes with ``COPY ... FROM STDIN (FORMAT BINARY)``. Its client-side CPU per
  row is 3.6-4.1x lower than ADBC's (a 30-column and a 7-column table; the server's share is the same;
  issue 16, ``benchmarks/encoder_bench.py``).
- ``adbc``: adbc_driver_postgresql's ``adbc_ingest`` (libpq, its own encoder). Kept as the fallback.

Both write the same binary format, the target's column types decide how the server reads it, so
both give identical tables (tests/test_copy_encoders.py checks every loadkit column type).

The writer runs its whole batch (ledger check, rows, rejects, ledger row) on ONE connection of the
chosen encoder, in one transaction: exactly-once depends on the ledger row committing with the rows,
so an encoder's ``copy_arrow`` never commits; the caller does.

Server-side transcoding (``dialect.server_transcode``, transform.server_encoding): a batch whose text
columns hold the source's latin-1 bytes (Arrow ``binary``, the schema's metadata names the encoding)
is COPYed by pgpq with ``SET LOCAL client_encoding`` to that encoding for that one statement and set
back right after it, so the ledger rows, rejects and queries of the same transaction stay in the
connection's own encoding; a failed COPY aborts the transaction, whose rollback restores it too.
ADBC, and a server whose encoding is not UTF8, get the columns decoded in Python instead
(transform.decode_text_columns), which is the old path.

Connections come from the session DSN (``db.session_dsn`` + ``db.with_application_name``), so
``connect_timeout``, ``statement_timeout``, ``lock_timeout`` and the ``application_name`` that
``db.cancel_backends`` selects by reach every driver alike (libpq reads them from the DSN).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import pyarrow as pa

from loadkit.errors import ConfigError
from loadkit.postgres.db import adbc_connect, connect_failure
from loadkit.security import qualified, quote_ident
from loadkit.transform import CLIENT_ENCODING_KEY, SERVER_ENCODINGS, decode_text_columns

ENCODERS: Tuple[str, ...] = ("pgpq", "adbc")
DEFAULT_ENCODER = "pgpq"


@dataclass(frozen=True)
class CopyEncoder:
    """How one driver opens a writer connection, binds query parameters and COPYs an Arrow table.

    ``connect(dsn)``: a non-autocommit connection (DB-API: cursor(), commit(), rollback(), close());
    a refused or failed connect raises the OperatorError / TransientDBError of ``db.connect_failure``.
    ``placeholder``: the driver's marker for the first query parameter (``$1`` ADBC, ``%s`` psycopg).
    ``copy_arrow(conn, schema, table, data)``: appends every row of ``data`` to ``schema.table``,
    columns matched by name (the table's other columns take their defaults), inside the connection's
    open transaction (never commits). Driver errors propagate unchanged (``errors.classify`` reads
    their SQLSTATE)."""

    name: str
    placeholder: str
    connect: Callable[[str], Any]
    copy_arrow: Callable[[Any, str, str, pa.Table], None]


def psycopg_connect(dsn: str) -> Any:
    """A psycopg 3 connection in a transaction (autocommit off); failures as ``db.connect_failure``."""
    import psycopg

    try:
        return psycopg.connect(dsn, autocommit=False)
    except psycopg.Error as exc:
        raise connect_failure(exc, dsn) from None


def pgpq_copy_arrow(conn: Any, schema: str, table: str, data: pa.Table) -> None:
    """COPY ``data`` into ``schema.table`` over psycopg 3, encoded by pgpq (one COPY statement).

    pgpq picks each column's binary encoding from its Arrow type (string -> text, which varchar(n)
    and char(n) read too; int16/32/64 -> int2/4/8; float64 -> float8; decimal128 -> numeric;
    date32 -> date; timestamp[us] -> timestamp; bool -> bool; binary -> length + bytes, the same
    wire form as text, read by the target's textrecv/bpcharrecv/varcharrecv); loadkit's typed
    batches carry exactly the target's types (transform.arrow_schema). A table marked with a client
    encoding (transform.CLIENT_ENCODING_KEY) is sent with client_encoding set to it for this COPY
    only, when the server encoding is UTF8 (else its text is decoded here first)."""
    from pgpq import ArrowToPostgresBinaryEncoder

    client = _client_encoding(data)
    if client and conn.info.parameter_status("server_encoding") != "UTF8":
        data, client = decode_text_columns(data), None  # SQL_ASCII would store the bytes unconverted
    encoder = ArrowToPostgresBinaryEncoder(data.schema)
    columns = ", ".join(quote_ident(c) for c in data.column_names)
    with conn.cursor() as cur:
        if client:
            before = conn.info.parameter_status("client_encoding")
            cur.execute(f"SET LOCAL client_encoding TO '{client}'")
        with cur.copy(f"COPY {qualified(schema, table)} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(encoder.write_header())
            for batch in data.to_batches(max_chunksize=_ENCODE_ROWS):
                copy.write(encoder.write_batch(batch))
            copy.write(encoder.finish())
        if client:  # not in a finally: after a failed COPY the transaction is aborted (rollback restores it)
            cur.execute(f"SET LOCAL client_encoding TO '{before}'")


# pgpq's write_batch holds the GIL while it encodes (~6 ms per 16k rows of a 30-column table, not
# 15+ ms for a whole 50k-row batch): the read/parse thread waits for the GIL no longer than that.
# Same CPU per row for 2k-row to whole-batch slices (benchmarks/typing_bench.py --encode).
_ENCODE_ROWS = 16384


def _client_encoding(data: pa.Table) -> Optional[str]:
    """The PostgreSQL encoding ``data``'s binary text columns are written in (transform.arrow_schema), or None."""
    meta = data.schema.metadata
    value = meta.get(CLIENT_ENCODING_KEY) if meta else None
    if value is None:
        return None
    name = value.decode()
    if name not in SERVER_ENCODINGS.values():  # never interpolate an unknown name into SQL
        raise ValueError(f"unsupported client encoding {name!r} in an Arrow batch")
    return name


def adbc_copy_arrow(conn: Any, schema: str, table: str, data: pa.Table) -> None:
    """COPY ``data`` into ``schema.table`` with ADBC's ``adbc_ingest`` (mode append, binary COPY).

    Source-byte text columns (server transcoding) are decoded to UTF-8 strings first: ADBC would
    send Arrow binary as bytea and offers no client_encoding switch per statement."""
    data = decode_text_columns(data)
    with conn.cursor() as cur:
        cur.adbc_ingest(table, data, mode="append", db_schema_name=schema)


_BY_NAME: Dict[str, CopyEncoder] = {
    "pgpq": CopyEncoder("pgpq", "%s", psycopg_connect, pgpq_copy_arrow),
    "adbc": CopyEncoder("adbc", "$1", adbc_connect, adbc_copy_arrow),
}


def encoder(name: str) -> CopyEncoder:
    """The encoder called ``name`` (one of ENCODERS); ConfigError naming ``sink.copy_encoder`` otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"sink.copy_encoder must be one of {', '.join(ENCODERS)}, not {name!r}",
                          key="sink.copy_encoder") from None
