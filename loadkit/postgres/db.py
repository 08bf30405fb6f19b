"""Database access: DSN resolution (incl. the embedded server), connections and pools.

Drivers, each for what it does best: psycopg2 for DDL, ledger queries and finalisation
in the driver process; for the data path in writer actors, the COPY encoder's driver
(postgres/copy.py: psycopg 3 for pgpq, the default, or ADBC). Only this module and
copy.py import a driver's connect function.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import quote

import psycopg2
import psycopg2.extensions

from loadkit.errors import (Category, ConfigError, LoadkitError, OperatorError, TransientDBError,
                            classify)
from loadkit.security import mask_dsn, mask_text, register_dsn, register_secret, uri_password_misread

log = logging.getLogger("loadkit.postgres.db")


def resolve_dsn(dsn: Optional[str], embedded_dir: str) -> str:
    """The DSN to use: explicit, else LOADKIT_DSN, else an embedded server (started if needed)."""
    if dsn:
        return dsn
    env = os.environ.get("LOADKIT_DSN")
    if env:
        return env
    return embedded_dsn(embedded_dir)


def embedded_dsn(embedded_dir: str) -> str:
    """Start (or reuse) a pgserver PostgreSQL whose data lives in embedded_dir."""
    import platformdirs

    path = Path(embedded_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # pgserver asks platformdirs for a runtime folder (its lock file) at import and start. Without a usable
        # $XDG_RUNTIME_DIR (a container, cron, sudo) platformdirs >= 4.14 warns and falls back to a per-user
        # folder, which serves the lock as well: the warning told a user nothing they could act on.
        category = getattr(platformdirs, "RuntimeDirWarning", None)
        if category is not None:
            warnings.simplefilter("ignore", category)
        import pgserver

        server = pgserver.get_server(str(path), cleanup_mode=None)
    log.info("using embedded PostgreSQL in %s", path)
    return server.get_uri()


def parse_dsn(dsn: str) -> Dict[str, str]:
    """The DSN's parameters by libpq's own rules (URI or key=value; psycopg2's ``parse_dsn``).

    A DSN libpq cannot parse is a ConfigError whose message never quotes the DSN or libpq's
    complaint (both may hold the password). Every password found is registered with
    ``security.register_secret`` so no later output can show it."""
    register_dsn(dsn)
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        raise ConfigError("sink.dsn is not a valid libpq connection URI or key=value string (its text is "
                          "withheld because it may contain the password; percent-encode reserved characters "
                          "such as @ / # % ? : in a URI password)", key="sink.dsn") from None
    if params.get("password"):
        register_secret(params["password"])
    if uri_password_misread(dsn, params.get("password")):
        # libpq split the password at an unencoded '@', '/', '?', '#' or ':': the pieces would
        # become host, port or database names and show up in its error messages. Checked before the
        # port: a piece read as the port made the error say "not a port number" (a fresh-user review).
        raise ConfigError("sink.dsn's password is not read by libpq as written (an unencoded reserved "
                          "character in a URI password): percent-encode @ / # % ? : in it", key="sink.dsn")
    if not all(_is_port(p) for p in params.get("port", "").split(",")):
        # libpq reads the port only when it connects ("invalid integer value ... for connection option
        # "port""), which came after the fetch stage and quoted the DSN's other parameters.
        raise ConfigError("sink.dsn's port is not a port number (1-65535; a comma-separated list with several "
                          "hosts; in a URI, a password with an unencoded @ / # ? : is read as host and port: "
                          "percent-encode them)", key="sink.dsn")
    return params


def _is_port(text: str) -> bool:
    """A libpq port entry: empty (the default, 5432) or a number 1-65535 (libpq's parse_int_param, port checks)."""
    text = text.strip()
    return not text or (text.isascii() and text.isdigit() and 0 < int(text) < 65536)


def session_dsn(dsn: str, connect_timeout: int = 10, statement_timeout_ms: int = 0, lock_timeout_ms: int = 0,
                app_name: str = "loadkit") -> str:
    """The DSN every loadkit connection uses: libpq key=value form with ``sink.connect_timeout`` and
    the server-side ``statement_timeout``/``lock_timeout`` (0 = none) in ``options``.

    Set in the DSN, the limits reach every connection (psycopg2 in the driver, ADBC in the
    writers, Ray workers included) without each connect call knowing them."""
    params = parse_dsn(dsn)
    options = [params.get("options", "")]
    if statement_timeout_ms:
        options.append(f"-c statement_timeout={int(statement_timeout_ms)}")
    if lock_timeout_ms:
        options.append(f"-c lock_timeout={int(lock_timeout_ms)}")
    extra: Dict[str, Any] = {"application_name": app_name[:63]}
    if connect_timeout:
        extra["connect_timeout"] = int(connect_timeout)
    if any(options[1:]):
        extra["options"] = " ".join(o for o in options if o)
    return psycopg2.extensions.make_dsn(dsn, **extra)


def connect_failure(exc: BaseException, dsn: str) -> LoadkitError:
    """A connect-time driver error as the LoadkitError of its category, its text scrubbed of secrets.

    A refusal the operator must fix (missing database or role, bad password, no pg_hba entry,
    permission) is an OperatorError; anything else (server down, restarting) is transient."""
    text = mask_text(str(exc).strip())
    if classify(exc) is Category.OPERATOR:
        return OperatorError(f"PostgreSQL refused the connection: {text}", dsn=mask_dsn(dsn))
    return TransientDBError(f"cannot connect to PostgreSQL: {text}", dsn=mask_dsn(dsn))


def connect(dsn: str, connect_timeout: Optional[int] = None, autocommit: bool = False,
            application_name: Optional[str] = None) -> psycopg2.extensions.connection:
    """A psycopg2 connection; failures surface as TransientDBError / OperatorError with a masked DSN.

    ``connect_timeout`` / ``application_name`` None: the DSN's own (``session_dsn`` sets both)."""
    kwargs: Dict[str, Any] = {}
    if application_name is not None:
        kwargs["application_name"] = application_name
    if connect_timeout is not None:
        kwargs["connect_timeout"] = connect_timeout
    try:
        conn = psycopg2.connect(dsn, **kwargs)
    except psycopg2.OperationalError as exc:
        raise connect_failure(exc, dsn) from None
    conn.autocommit = autocommit
    return conn


@contextmanager
def transaction(dsn: str, application_name: Optional[str] = None) -> Iterator[psycopg2.extensions.cursor]:
    """A cursor in one transaction: committed on success, rolled back on error, always closed."""
    conn = connect(dsn, application_name=application_name)
    try:
        with conn:
            with conn.cursor() as cur:
                yield cur
    finally:
        conn.close()


def application_name(run_id: str, role: str) -> str:
    """``loadkit:<run id>:<role>``: one run's sessions are selectable in pg_stat_activity."""
    return f"loadkit:{run_id}:{role}"


def with_application_name(dsn: str, name: str) -> str:
    """The DSN with application_name set (replacing any), so an operator, a fault test or the run's own
    shutdown (``cancel_backends``) can find these sessions."""
    name = name[:63]  # NAMEDATALEN - 1: the server truncates longer names anyway
    try:
        return psycopg2.extensions.make_dsn(dsn, application_name=name)
    except psycopg2.ProgrammingError:  # not parseable: let the connect report it (masked)
        if "://" in dsn:
            return f"{dsn}{'&' if '?' in dsn else '?'}application_name={quote(name)}"
        return f"{dsn} application_name='{name}'"


def _like_prefix(text: str) -> str:
    """A LIKE pattern matching the strings that start with ``text`` (its \\, % and _ escaped)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def sessions_in_transaction(dsn: str, run_id: str, role: str) -> int:
    """How many of this run's sessions in ``role`` (application_name ``loadkit:<run id>:<role>...``) are inside a
    transaction right now (pg_stat_activity.xact_start set): a commit of theirs may still land."""
    with transaction(dsn) as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s "
                    "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL",
                    (_like_prefix(application_name(run_id, role)),))
        return int(cur.fetchone()[0])


def cancel_backends(dsn: str, run_id: str, timeout_s: int = 2, prefix: Optional[str] = None) -> int:
    """pg_cancel_backend on every session of this run (application_name ``loadkit:<run id>:*``, or
    starting with ``prefix`` when given).

    Stops statements in progress (a COPY blocked on a lock, a finalize step) at once so a
    stop takes well under a second; the transactions roll back, committed batches stay. Best
    effort: returns how many were signalled, 0 if the server cannot be reached."""
    pattern = _like_prefix(prefix or application_name(run_id, ""))
    try:
        conn = psycopg2.connect(dsn, connect_timeout=timeout_s, application_name=f"loadkit-cancel:{run_id}"[:63])
    except psycopg2.Error as exc:
        log.warning("could not reach the server to cancel run %s's statements: %s", run_id, mask_text(str(exc)))
        return 0
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FILTER (WHERE pg_cancel_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name LIKE %s AND pid <> pg_backend_pid() AND state = 'active'",
                        (pattern,))
            return int(cur.fetchone()[0])
    except psycopg2.Error as exc:
        log.warning("cancelling run %s's statements failed: %s", run_id, mask_text(str(exc)))
        return 0
    finally:
        conn.close()


def diag_constraint(exc: BaseException) -> Optional[Tuple[Optional[str], str]]:
    """(schema, constraint) a driver error names in its diagnostics -- psycopg2 ``e.diag.schema_name`` /
    ``constraint_name``, ADBC ``e.details`` PG_DIAG_SCHEMA_NAME / PG_DIAG_CONSTRAINT_NAME -- or None.
    Never parsed out of the message text (which a data value or a table name can imitate)."""
    diag = getattr(exc, "diag", None)
    name = getattr(diag, "constraint_name", None)
    if isinstance(name, str) and name:
        return getattr(diag, "schema_name", None), name
    details: Dict[str, str] = {}
    for key, value in getattr(exc, "details", None) or ():
        k = key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)
        details[k] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if details.get("PG_DIAG_CONSTRAINT_NAME"):
        return details.get("PG_DIAG_SCHEMA_NAME"), details["PG_DIAG_CONSTRAINT_NAME"]
    return None


def adbc_connect(dsn: str) -> Any:
    import adbc_driver_postgresql.dbapi as adbc

    try:
        return adbc.connect(dsn, autocommit=False)
    except Exception as exc:  # ADBC raises its own OperationalError hierarchy
        raise connect_failure(exc, dsn) from None


@dataclass
class PoolStats:
    size: int
    in_use: int  # borrowed right now
    opened: int
    replaced: int  # broken connections swapped for new ones (pre-ping or error)
    waits: int  # borrows that found no idle connection
    busy_s: float  # connection-seconds spent borrowed since the pool opened
    age_s: float  # seconds since the pool opened

    @property
    def utilisation(self) -> float:
        """Busy-time fraction in [0, 1]: connection-seconds borrowed / (size x seconds open).

        A time average, unlike ``in_use / size``, which is 1.0 whenever it is sampled from
        inside a borrow and so says nothing about how loaded the pool was."""
        capacity = self.size * self.age_s
        return min(1.0, self.busy_s / capacity) if capacity > 0 else 0.0


class ConnectionPool:
    """A fixed-size pool of writer connections, opened eagerly, pinged before use, replaced when broken.

    ``connect(dsn)`` opens one (non-autocommit) connection: ADBC by default, psycopg 3 for the
    pgpq COPY encoder (``postgres.copy.encoder(name).connect``).

    One owner (a writer actor) and one lifetime: opened in the owner's __init__,
    closed by ``close()`` on every exit path.
    """

    def __init__(self, dsn: str, size: int, pre_ping: bool = True,
                 clock: Callable[[], float] = time.monotonic, connect: Callable[[str], Any] = adbc_connect) -> None:
        self._dsn = dsn
        self._connect = connect
        self._clock = clock
        self._busy_s = 0.0
        self._busy_since: dict = {}  # id(borrow) -> clock at borrow, for borrows still open
        self._size = size
        self._pre_ping = pre_ping
        self._idle: "queue.Queue[Any]" = queue.Queue()
        self._lock = threading.Lock()
        self._in_use = 0
        self._opened = 0
        self._replaced = 0
        self._waits = 0
        self._closed = False
        opened: List[Any] = []
        try:
            for _ in range(size):
                opened.append(self._open())
        except BaseException:
            for conn in opened:
                _close_quietly(conn)
            raise
        for conn in opened:
            self._idle.put(conn)
        self._opened_at = clock()

    def _open(self) -> Any:
        conn = self._connect(self._dsn)
        self._opened += 1
        return conn

    def _healthy(self, conn: Any) -> bool:
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchall()
            conn.rollback()
            return True
        except Exception as exc:
            log.warning("pooled connection failed its health check, replacing it: %s", exc)
            return False

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """Borrow a healthy connection; a broken one (or one that raised) is replaced."""
        if self._closed:
            raise TransientDBError("connection pool is closed")
        if self._idle.empty():
            self._waits += 1
        conn = self._idle.get()
        token = object()
        with self._lock:
            self._in_use += 1
            self._busy_since[id(token)] = self._clock()
        broken = False
        try:
            if self._pre_ping and not self._healthy(conn):
                _close_quietly(conn)
                conn = None
                conn = self._open()
                self._replaced += 1
            yield conn
        except BaseException:
            broken = True
            raise
        finally:
            with self._lock:
                self._in_use -= 1
                self._busy_s += self._clock() - self._busy_since.pop(id(token))
            self._return(conn, broken)

    def _return(self, conn: Any, broken: bool) -> None:
        if conn is not None and broken:
            try:
                conn.rollback()
            except KeyboardInterrupt:  # a stop (errors.StopRequested) that landed in the rollback
                _close_quietly(conn)
                raise
            except Exception:
                _close_quietly(conn)
                conn = None
        if conn is None:
            try:
                conn = self._open()
                self._replaced += 1
            except TransientDBError as exc:
                log.warning("could not replace a broken connection yet: %s", exc)
                conn = _LazyConnection()
        self._idle.put(conn)

    def stats(self) -> PoolStats:
        with self._lock:
            now = self._clock()
            busy = self._busy_s + sum(now - t for t in self._busy_since.values())
            return PoolStats(self._size, self._in_use, self._opened, self._replaced, self._waits, busy,
                             now - self._opened_at)

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                _close_quietly(self._idle.get_nowait())
            except queue.Empty:
                return


class _LazyConnection:
    """Placeholder for a connection that could not be reopened; fails its health check."""

    def cursor(self) -> Any:
        raise TransientDBError("connection not available")

    def rollback(self) -> None:
        raise TransientDBError("connection not available")

    def close(self) -> None:
        return None


def _close_quietly(conn: Any) -> None:
    """Close a connection that may already be broken; a failure here has nothing left to protect.
    A stop landing here (errors.StopRequested, a KeyboardInterrupt) is not an Exception: it goes on."""
    try:
        conn.close()
    except Exception as exc:
        log.info("closing a broken connection raised %s (ignored: it is being discarded)", type(exc).__name__)


def server_check(dsn: str) -> str:
    """The server version; a ConfigError for a malformed DSN, an OperatorError for a refusal (missing
    database or role, bad password), a TransientDBError for a server that is down."""
    parse_dsn(dsn)  # a malformed DSN: ConfigError, its text withheld
    try:
        conn = psycopg2.connect(dsn)
    except psycopg2.OperationalError as exc:
        text = mask_text(str(exc).strip())
        if "invalid" in text and classify(exc) is not Category.OPERATOR:
            raise ConfigError(f"cannot use sink.dsn: {text}", key="sink.dsn", dsn=mask_dsn(dsn)) from None
        raise connect_failure(exc, dsn) from None
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            return str(cur.fetchone()[0])
    finally:
        conn.close()
