"""The exception hierarchy and error classification.

Every error loadkit raises on purpose derives from ``LoadkitError`` and carries a
``category`` that decides what happens next: config and source-data errors are
terminal and name what the user must fix; transient infrastructure errors are
retried with backoff; anything unclassified is a bug and fails fast.

Errors cross Ray process boundaries, so each one pickles with its fields
(``__reduce__`` rebuilds it from its constructor arguments).
"""
from __future__ import annotations

from enum import Enum
from typing import Any, List, Optional, Set


class Category(str, Enum):
    """What kind of failure, hence who acts: the value is stored in the ledger (run.error_category)."""

    CONFIG = "config"  # the job's config is wrong: fix it
    SOURCE_DATA = "source_data"  # a source file is bad: fix or replace it
    TRANSIENT = "transient_infrastructure"  # the server/network/cluster failed: retry later
    OPERATOR = "operator_environment"  # the environment refuses: grant, point at the primary, create the database
    ALERT = "alert_abort"  # an alert with action=abort stopped the run (memory, stall, pool, reject rate)
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM/Ctrl-C: rerun to resume
    BUG = "bug"


# SQLSTATE classes/codes that mean "the server or the network failed, try again".
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "57P0", "53", "40001", "40P01", "55P03", "58")
# SQLSTATEs that mean "the operator must change the environment" (PostgreSQL Appendix A): no retry
# fixes them, and they are not the job config's or the data's fault.
_OPERATOR_SQLSTATES = (
    "42501",  # insufficient_privilege: GRANT what the job needs
    "25006",  # read_only_sql_transaction: connected to a standby / read-only database
    "3D000",  # invalid_catalog_name: the database does not exist
    "28000",  # invalid_authorization_specification: no such role / pg_hba refuses
    "28P01",  # invalid_password
    "42P06",  # duplicate_schema raised by a role without CREATE on the database (defensive)
)
# Exit codes by category, so a scheduler can tell "fix your config" from "retry later".
# Documented in the README (Exit codes): 0 ok, 1 bug, 2 config, 3 source data, 4 transient
# infrastructure, 5 operator/environment, 6 alert abort, 130 interrupted.
EXIT_CODES = {
    Category.CONFIG: 2,
    Category.SOURCE_DATA: 3,
    Category.TRANSIENT: 4,
    Category.OPERATOR: 5,
    Category.ALERT: 6,
    Category.INTERRUPTED: 130,
    Category.BUG: 1,
}


class LoadkitError(Exception):
    """Base of every deliberate loadkit error."""

    category: Category = Category.BUG

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = {k: v for k, v in context.items() if v is not None}

    def __reduce__(self) -> tuple:
        return (_rebuild, (type(self), self.message, self.context))

    def __str__(self) -> str:
        if not self.context:
            return self.message
        where = ", ".join(f"{k}={v}" for k, v in self.context.items())
        return f"{self.message} [{where}]"


def _rebuild(cls: type, message: str, context: dict) -> LoadkitError:
    return cls(message, **context)


class ConfigError(LoadkitError):
    """A config key is missing, unknown, of the wrong type or impossible."""

    category = Category.CONFIG


class SourceDataError(LoadkitError):
    """A source file is missing, unreadable, corrupt, or breaks its declared layout."""

    category = Category.SOURCE_DATA


class RejectThresholdError(SourceDataError):
    """A table rejected more rows than its configured threshold allows."""


class TransientDBError(LoadkitError):
    """The database or the network failed in a way a retry may fix."""

    category = Category.TRANSIENT


class CircuitOpenError(TransientDBError):
    """The circuit breaker is open: the database failed repeatedly and is cooling down."""


class TransientSourceError(LoadkitError):
    """Reading a remote source object (s3://, gs://, http(s)://) kept failing on the network after every
    retry of ``retry.*``: nothing is wrong with the data; the batches committed so far stay, and a rerun
    resumes from the ledger's byte ranges. Exit code 4."""

    category = Category.TRANSIENT


class PermanentDBError(LoadkitError):
    """The database refused the work for a reason a retry will not fix."""

    category = Category.BUG


class OperatorError(LoadkitError):
    """The environment refuses the work: permissions, a read-only standby, a missing database or role.

    Not retried (waiting will not grant a privilege) and not a config or data error: the
    operator changes the environment and reruns. Exit code 5."""

    category = Category.OPERATOR


class BatchRangeConflict(TransientDBError):
    """The ledger holds this batch's id (its file, member and start) with another end: a commit landed after
    this read planned its ranges, at another batch size (a killed run's orphaned loader, a dead loader's
    COMMIT in flight). Writing or skipping the chunk would load rows twice or never, so the run stops (not
    retried in it: the same chunk conflicts again); the rerun plans from the ledger and reads the rest once.
    Exit code 4."""


class JobLockLost(TransientDBError):
    """The run's job lock vanished and another run has it: this run stops (not retried); rerun later."""


class RunDeadlineExceeded(TransientDBError):
    """The run passed env.max_run_seconds: stopped like an interrupt, committed batches kept; rerun to resume."""


class LedgerMismatch(LoadkitError):
    """The run's counts disagree with the batches it committed to the ledger: a result was lost or
    counted twice between a writer and the driver. A bug (exit 1); the ledger, written in each
    batch's own transaction, is right, and a rerun resumes from it."""


class InterruptedRun(LoadkitError):
    """The run was stopped by a signal; committed batches stay valid for the resume. Exit code 130."""

    category = Category.INTERRUPTED


class StopRequested(KeyboardInterrupt):
    """What the driver's signal handler raises (supervise.Signals): a stop that no library may swallow.

    It carries the error to record -- an InterruptedRun for SIGINT/SIGTERM, or the error a helper
    thread stopped the run with (watchdog, run deadline, lost job lock) -- and derives from
    KeyboardInterrupt, not Exception, because the handler raises wherever the main thread happens
    to be: a library's ``except Exception`` there would drop an Exception (Ray Data's iteration
    stats did), and Ray's C++ wait in ``ray.get`` turns anything but a KeyboardInterrupt raised by
    a handler into a SystemError once the awaited object arrives (measured: a SIGTERM during a 6 s
    ``ray.get`` surfaced after 6.4 s as SystemError; as a KeyboardInterrupt after 1.0 s). Ray
    re-raises its own plain KeyboardInterrupt then, so the runner recovers the error from the
    supervisor (Supervisor.stop_cause), not from this instance alone."""

    def __init__(self, error: LoadkitError) -> None:
        super().__init__(str(error))
        self.error = error


class AlertAbort(LoadkitError):
    """An alert configured with action=abort fired. Exit code 6."""

    category = Category.ALERT


def sqlstate_of(exc: BaseException) -> Optional[str]:
    """The SQLSTATE of a driver exception (psycopg2 or ADBC), if it has one."""
    for attr in ("pgcode", "sqlstate"):
        code = getattr(exc, attr, None)
        if isinstance(code, str) and code:
            return code
    diag = getattr(exc, "diag", None)
    code = getattr(diag, "sqlstate", None)
    return code if isinstance(code, str) and code else None


# deadlock_detected and serialization_failure: the transaction lost a lock race; a retry may succeed.
# Counted by resilience.retrying as they are retried (Prometheus loadkit_deadlocks_total).
DEADLOCK_SQLSTATES = ("40P01", "40001")


def is_deadlock(exc: BaseException) -> bool:
    """True when exc or an error it wraps is a deadlock or serialization failure (SQLSTATE 40P01/40001),
    read from the driver error or from a LoadkitError's ``sqlstate`` context (``as_loadkit_error``)."""
    for inner in _causes(exc):
        code = sqlstate_of(inner)
        if code is None and isinstance(inner, LoadkitError):
            code = inner.context.get("sqlstate")
        if code in DEADLOCK_SQLSTATES:
            return True
    return False


def is_transient_sqlstate(code: Optional[str]) -> bool:
    return code is not None and any(code.startswith(p) for p in _TRANSIENT_SQLSTATE_PREFIXES)


def _is_connection_failure(exc: BaseException) -> bool:
    """Driver errors that carry no SQLSTATE because the connection itself broke.

    Matched by class name (DB-API names shared by psycopg2 and ADBC) so this module stays
    driver-free and importable by the pure stages."""
    if any(cls.__name__ in ("OperationalError", "InterfaceError") for cls in type(exc).__mro__):
        return True
    text = str(exc).lower()
    markers = (
        "server closed the connection",
        "connection refused",
        "terminating connection",
        "connection to server",
        "could not connect",
        "connection already closed",
        "no connection to the server",
        "broken pipe",
        "connection reset",
        "ssl syscall",
        "eof detected",
        "io: ",
    )
    return any(m in text for m in markers)


# Network failures of the HTTP/object-store client libraries under fsspec (s3fs/aiobotocore, gcsfs and
# HTTPFileSystem on aiohttp, httpx, requests/urllib3, http.client), by (top-level module, class name) so
# this module imports none of them. Each means "the connection or the transfer broke": the bytes were
# not delivered, and asking again (from the same offset) may succeed. Deliberately absent: HTTP status
# errors (a 403/404 is not a network failure), protocol/URL misuse (httpx.UnsupportedProtocol,
# LocalProtocolError) and certificate failures (``_CERT_FAILURES``), which no retry fixes.
_NETWORK_FAILURES = {
    "aiohttp": frozenset({"ClientConnectionError", "ClientPayloadError", "ServerTimeoutError",
                          "ServerDisconnectedError", "ClientOSError", "ConnectionTimeoutError",
                          "SocketTimeoutError"}),
    "botocore": frozenset({"ConnectionError", "ConnectionClosedError", "EndpointConnectionError",
                           "ReadTimeoutError", "ConnectTimeoutError", "ResponseStreamingError",
                           "IncompleteReadError"}),
    "urllib3": frozenset({"ProtocolError", "ReadTimeoutError", "ConnectTimeoutError", "NewConnectionError",
                          "IncompleteRead"}),
    "http": frozenset({"IncompleteRead", "RemoteDisconnected"}),
    "httpx": frozenset({"NetworkError", "TimeoutException", "RemoteProtocolError"}),
    "httpcore": frozenset({"NetworkError", "TimeoutException", "RemoteProtocolError"}),
    "requests": frozenset({"ConnectionError", "ChunkedEncodingError", "Timeout"}),
    "google": frozenset({"TransportError"}),  # google.auth: the token endpoint unreachable
    "fsspec": frozenset({"FSTimeoutError"}),
}
_CERT_FAILURES = frozenset({"SSLCertVerificationError", "ClientConnectorCertificateError", "CertificateError"})


def is_network_failure(exc: BaseException) -> bool:
    """True when ``exc`` (or an error it wraps) is a dropped connection, a truncated transfer or a
    timeout of a network client: the builtin ConnectionError (reset, refused, aborted, broken pipe)
    and TimeoutError, ``http.client.IncompleteRead``, and the clients' own classes in
    ``_NETWORK_FAILURES``. A certificate failure, an HTTP status or any other error is not."""
    for inner in _causes(exc):
        mro = type(inner).__mro__
        if any(cls.__name__ in _CERT_FAILURES for cls in mro):
            return False
        if isinstance(inner, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _NETWORK_FAILURES.get(cls.__module__.split(".")[0], ()) for cls in mro):
            return True
    return False


# Ray's "a worker, actor or node died" errors, by name so this module stays Ray-free.
_CLUSTER_FAILURES = frozenset({"RaySystemError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
                               "NodeDiedError", "ObjectLostError", "OwnerDiedError", "LocalRayletDiedError"})


def _is_cluster_failure(exc: BaseException) -> bool:
    return any(cls.__name__ in _CLUSTER_FAILURES for cls in type(exc).__mro__)


def _causes(exc: BaseException) -> list:
    """exc and what it wraps: Ray re-raises a worker's error as RayTaskError/UserCodeException around it."""
    chain: List[BaseException] = []
    seen: Set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen and len(chain) < 16:
        seen.add(id(current))
        chain.append(current)
        current = getattr(current, "cause", None) or current.__cause__  # never __context__: an error raised
        # while handling another is its own failure, not that one
        if not isinstance(current, BaseException):
            current = None
    return chain


def unwrap(exc: BaseException) -> BaseException:
    """The outermost LoadkitError or SQLSTATE-carrying error in exc's cause chain (exc itself if none).

    Outermost, so a deliberate classification (``raise ConfigError(...) from driver_error``) wins."""
    for inner in _causes(exc):
        if isinstance(inner, LoadkitError) or sqlstate_of(inner):
            return inner
    return exc


def as_loadkit_error(exc: BaseException, **context: Any) -> LoadkitError:
    """A driver exception as the LoadkitError of its category, keeping its SQLSTATE and our context."""
    if isinstance(exc, LoadkitError):
        return exc
    code = sqlstate_of(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    cls = {Category.TRANSIENT: TransientDBError, Category.SOURCE_DATA: SourceDataError,
           Category.OPERATOR: OperatorError}.get(classify(exc), PermanentDBError)
    return cls(f"{type(exc).__name__}: {text}", sqlstate=code, **context)


def classify(exc: BaseException) -> Category:
    """Decide what kind of failure ``exc`` is; unknown errors are bugs, never retried."""
    inner = unwrap(exc)
    if inner is not exc:
        return classify(inner)
    if isinstance(exc, LoadkitError):
        return exc.category
    if isinstance(exc, KeyboardInterrupt):
        return Category.INTERRUPTED
    code = sqlstate_of(exc)
    if code:
        if code in _OPERATOR_SQLSTATES:
            return Category.OPERATOR
        if code == "57014":  # query_canceled: by statement_timeout (retry) or by our own shutdown's cancel
            return Category.TRANSIENT if "statement timeout" in str(exc) else Category.INTERRUPTED
        if is_transient_sqlstate(code):
            return Category.TRANSIENT
        if code.startswith(("22", "23")):
            return Category.SOURCE_DATA
        return Category.BUG
    if _is_operator_failure(exc):
        return Category.OPERATOR
    if is_network_failure(exc) or _is_connection_failure(exc) or _is_cluster_failure(exc):
        return Category.TRANSIENT
    return Category.BUG


def _is_operator_failure(exc: BaseException) -> bool:
    """Driver errors without a SQLSTATE whose text is a server FATAL refusal the operator must fix."""
    text = str(exc).lower()
    if "does not exist" in text and ("database \"" in text or "role \"" in text):
        return True
    return any(m in text for m in ("permission denied", "password authentication failed", "no pg_hba.conf entry",
                                   "read-only transaction"))


def is_transient(exc: BaseException) -> bool:
    return classify(exc) is Category.TRANSIENT
