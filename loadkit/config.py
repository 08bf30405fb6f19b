"""Structured configs (dataclasses registered with Hydra's ConfigStore) and validation.

The dataclasses are the schema: Hydra checks keys and types at compose time, and
``validate`` checks the cross-field rules after ``OmegaConf.to_object``. Configs stay
mutable so command-line overrides work; the compiled plan is what gets frozen.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from loadkit.errors import ConfigError
from loadkit.literals import bound_value
from loadkit.security import IDENTIFIER

class Choice(str, Enum):
    """A closed set of config values. Hydra/OmegaConf refuse any other value at compose time, naming the key.

    A member is its value: it compares, hashes, formats and serialises as the plain string
    (``WriteMode.merge == "merge"``, ``f"{WriteMode.merge}" == "merge"``)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class WriteMode(Choice):
    # The member names are the YAML values (OmegaConf matches by name); ``replace`` and ``count`` (Verify) shadow
    # str methods on the member, so the plan stores choices as plain str (loadkit.plan).
    append = "append"
    replace = "replace"  # type: ignore[assignment]
    merge = "merge"
    snapshot = "snapshot"


class SourceFormat(Choice):
    csv = "csv"
    gzip = "gzip"
    zip = "zip"
    parquet = "parquet"


class OnInvalid(Choice):
    reject = "reject"
    null = "null"


class Quoting(Choice):
    strict = "strict"
    lenient = "lenient"


class Discovery(Choice):
    webdav = "webdav"
    html = "html"
    list = "list"


class Verify(Choice):
    exists = "exists"
    count = "count"  # type: ignore[assignment]
    off = "off"


class OnDrift(Choice):
    reload = "reload"
    stop = "stop"


class BatchPolicyName(Choice):
    fixed = "fixed"
    adaptive = "adaptive"


class AlertLevel(Choice):
    info = "info"
    warning = "warning"
    critical = "critical"


class AlertAction(Choice):
    warn = "warn"
    abort = "abort"


class AlertSink(Choice):
    log = "log"
    jsonl = "jsonl"
    webhook = "webhook"


class EnvName(Choice):
    local = "local"
    cluster = "cluster"
    prod = "prod"


class CopyEncoder(Choice):
    pgpq = "pgpq"
    adbc = "adbc"


class Executor(Choice):
    auto = "auto"
    ray = "ray"
    inprocess = "inprocess"


class Flush(Choice):
    auto = "auto"
    sync = "sync"
    background = "background"


class Tracing(Choice):
    off = "off"
    console = "console"
    otlp = "otlp"


class LogFormat(Choice):
    text = "text"
    json = "json"


class LogLevel(Choice):
    """The level names Python's logging accepts."""

    CRITICAL = "CRITICAL"
    FATAL = "FATAL"
    ERROR = "ERROR"
    WARNING = "WARNING"
    WARN = "WARN"
    INFO = "INFO"
    DEBUG = "DEBUG"
    NOTSET = "NOTSET"


class FetchMode(Choice):
    auto = "auto"
    always = "always"
    only = "only"
    never = "never"


WRITE_MODES = tuple(m.value for m in WriteMode)
# Column types the transform and DDL understand; lengths/precisions in parentheses.
TYPE_PATTERN = re.compile(
    r"^(text|char\(\d+\)|varchar\(\d+\)|smallint|integer|bigint|double|"
    r"numeric\(\d+,\d+\)|date|timestamp|boolean)$"
)
# A collation name as pg_collation spells it (C, POSIX, C.UTF-8, pt-BR-x-icu, en_US.utf8): emitted double-quoted.
COLLATION_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,62}$")


@dataclass
class DialectConfig:
    """How a delimited text file is written."""

    delimiter: str = ","
    """The field separator: any single byte in the encoding (tab, `;`, `\\x1f`, ...)."""
    quote: Optional[str] = '"'
    """The quote character, or null for none."""
    escape: Optional[str] = None
    """null: a quote inside a quoted field is doubled (`""`); else the escape character (e.g. `\\\\`)."""
    header: bool = False
    """The first record (after skip_lines) is a header."""
    match_by_name: bool = False
    """With a header, match columns by name instead of by position."""
    encoding: str = "utf-8"
    """Any ASCII-compatible Python encoding (UTF-16/32 are refused: transcode first)."""
    null_values: List[str] = field(default_factory=lambda: [""])
    """Null markers, matched on the field as written (before escapes are resolved, after trim)."""
    # false says no value holds a newline, which lets a large plain file be read in parallel byte
    # ranges (pool.read_splits); records are the same either way.
    newlines_in_values: bool = True
    """A speed hint only: false lets a big plain file be read as parallel byte ranges."""
    strip_nul: bool = True
    """Remove NUL bytes from values after null detection (counted as coerced); false rejects the record."""
    trim: bool = False
    """Strip surrounding whitespace from every value (before null markers)."""
    # strict: a closing quote must be followed by the delimiter or the line end, else the record is
    # rejected (malformed quoting). lenient: a quote closes a quoted field only when followed by the
    # delimiter or the line end; any other quote is literal text (sources with unescaped inner quotes).
    quoting: Quoting = Quoting.strict
    """strict (a stray quote rejects the record) or lenient (a quote not before a delimiter is text)."""
    # Bounds memory whatever the input (zip bombs, a stray quote); reading goes on at the next line.
    max_record_bytes: int = 16 * 1024 * 1024
    """The longest record in bytes; a longer one (or an unterminated quote) is rejected. At least 1024."""
    skip_lines: int = 0
    """Physical lines skipped at the start of every member, before the header (banners); counted in line numbers."""
    quoted_can_be_null: bool = True
    """false is PostgreSQL COPY's rule: a quoted value is never NULL (`""` is an empty string)."""
    # Where transform.server_encoding allows it (latin-1, no trim, ASCII delimiter/quote/escape/null
    # markers): text columns are sent as the source's bytes with client_encoding LATIN1 for the data
    # COPY only, and PostgreSQL converts them. Same rows and rejects either way; false restores the
    # Python transcode.
    server_transcode: bool = True
    """latin-1 sources: PostgreSQL transcodes the text columns (false: Python does, as before)."""


@dataclass
class SourceConfig:
    """Where a table's rows come from. Paths are templates over the run parameters."""

    paths: List[str] = MISSING
    """Glob templates under data_root (a table may list alternatives)."""
    format: SourceFormat = SourceFormat.csv
    """csv, gzip, zip or parquet."""
    member: Optional[str] = None
    """zip members to read (fnmatch pattern); null reads every member."""
    dialect: DialectConfig = field(default_factory=DialectConfig)
    """How the text is written (see the dialect table)."""
    allow_empty: bool = True
    """An empty or header-only file loads zero rows; false makes it an error."""
    # Decompression guards for gzip/zip members (zip bombs), detected while streaming; the file fails
    # as source data. The ratio is over the member's compressed size (zip) or the file's (gzip),
    # never below 64 MiB.
    max_member_bytes: Optional[int] = None
    """A gzip/zip member that decompresses past this many bytes fails its file; null: no guard."""
    max_compression_ratio: Optional[float] = None
    """The same past this ratio x its compressed size (never below 64 MiB); null: no guard."""


@dataclass
class ColumnConfig:
    """One target column: its type and the rules a value must pass."""

    name: str = MISSING
    """The column name (a plain SQL identifier; `_lk_` is reserved)."""
    type: str = "text"
    """text, char(n), varchar(n), smallint, integer, bigint, double, numeric(p,s), date, timestamp or boolean."""
    nullable: bool = True
    """false: a NULL rejects the row ("required value is missing")."""
    # Matched on the raw value (after dialect.trim, before zfill and the length check), so a
    # placeholder such as "0" or "       0" becomes NULL instead of being padded to "00000000".
    # For typed Parquet columns they are matched on Arrow's text of the value (int 0 -> "0").
    null_values: List[str] = field(default_factory=list)
    """Extra null markers for this column (e.g. "0", "00000000" for dates some sources leave blank)."""
    format: Optional[str] = None
    """strptime format of a date / timestamp column; null: %Y%m%d / %Y-%m-%d %H:%M:%S (%z/%Z refused)."""
    decimal_comma: bool = False
    """Numbers written 1.234,56 (dot thousands, decimal comma)."""
    zfill: Optional[int] = None
    """Left-pad with zeros to this width (codes whose leading zero was lost upstream)."""
    on_invalid: OnInvalid = OnInvalid.reject
    """A value that does not parse: reject the row, or store NULL (counted as coerced)."""
    # Written as that type's literal: an integer, a decimal (numeric, double), an ISO date
    # (2000-01-31) or date-time (2000-01-31 08:00:00). Allowed on smallint/integer/bigint/numeric/
    # double/date/timestamp only (config error elsewhere); a value outside is handled like an invalid
    # one (on_invalid), reason "greater than max 10".
    min: Optional[str] = None
    """Inclusive lower bound on the typed value, written as the type's literal."""
    max: Optional[str] = None
    """Inclusive upper bound on the typed value, written as the type's literal."""
    collation: Optional[str] = None
    """Collation of a text/char/varchar column (e.g. C: bytewise, about 2x faster key sorts); null: the database's."""


@dataclass
class DerivedKeyConfig:
    """A deterministic surrogate key (md5 of the named columns) for tables with no natural key."""

    name: str = MISSING
    """The key column's name."""
    columns: List[str] = MISSING
    """The declared columns it is computed from."""


@dataclass
class TableConfig:
    """One target table: its source, columns and write mode."""

    source: SourceConfig = MISSING
    """Where its rows come from."""
    columns: List[ColumnConfig] = MISSING
    """The target columns, in source order."""
    mode: WriteMode = WriteMode.append
    """append, merge (upsert by key), replace (shadow + swap) or snapshot (one partition per period)."""
    key: List[str] = field(default_factory=list)
    """Primary key columns (merge needs one)."""
    derived_key: Optional[DerivedKeyConfig] = None
    """{name, columns}: an md5 surrogate key for keyless tables."""
    indexes: List[List[str]] = field(default_factory=list)
    """Secondary indexes built after the load, each a list of columns."""
    max_reject_rate: float = 0.05
    """Rejected / read above this aborts the table (judged on final counts too), 0..1."""
    max_rejects: Optional[int] = None
    """More rejects than this aborts the table; null: no count limit."""
    enabled: bool = True
    """false skips the table."""
    # Each month is a full snapshot: once every file of the table's month has loaded and no file of the
    # run failed, delete the target rows whose key the month no longer has (a key last written by an
    # older month). Counted as `deleted` in the summary and ledger (table_load.deleted). Not done for a
    # month with fewer files than the month before. Ignored by the other modes.
    delete_missing: bool = False
    """merge only: delete the rows whose key the month no longer has (makes year and month required)."""
    # The target gets date columns valid_from (first day of the month the key was last (re)opened) and
    # valid_to (first day of the month it went missing; NULL while present); a key that comes back is
    # reopened with a new valid_from.
    history: bool = False
    """With delete_missing: close those rows (valid_from / valid_to) instead of deleting them."""


@dataclass
class MigrateConfig:
    """What loadkit may change when an existing table differs from its declaration.

    Everything off: the run stops before loading with the full column diff."""

    add_columns: bool = False
    """ALTER TABLE ... ADD COLUMN for declared columns the table lacks (NULL in old rows)."""
    alter_types: bool = False
    """ALTER COLUMN ... TYPE <declared> USING col::<declared> (fails, changing nothing, if a value does not cast)."""
    allow_extra_columns: bool = False
    """Keep columns the declaration does not have; loads leave them NULL (or their default)."""


@dataclass
class RemoteConfig:
    """Where the fetch stage (loadkit.source.fetch) downloads a month from, before the load.

    A local mirror is one override away: ``job.remote.url=http://127.0.0.1:8000/{year:04d}-{month:02d}/``."""

    url: Optional[str] = None
    """The month folder's URL, a str.format template over year/month (http(s)://, s3://, gs://); null: no fetch."""
    discovery: Discovery = Discovery.html
    """webdav (PROPFIND), html (a directory listing's links, sized by HEAD) or list (files, sized by HEAD)."""
    files: List[str] = field(default_factory=list)
    """discovery=list: file names (templates over year/month) under url."""
    include: List[str] = field(default_factory=lambda: ["*.zip"])
    """fnmatch patterns of the listed names to download."""
    attempts: int = 5
    """Transfers per file (1 + retries); each retry resumes with an HTTP Range request."""
    initial_wait_s: float = 0.5
    """The first wait between attempts; waits grow exponentially up to max_wait_s."""
    max_wait_s: float = 30.0
    """The longest wait between attempts."""
    timeout_s: float = 60.0
    """Seconds without a byte (and for connecting) before a transfer counts as failed."""
    verify_zip: bool = True
    """CRC-test every member of a downloaded zip before it is renamed into place."""
    root_url: Optional[str] = None
    """Where month folders are listed for month=latest; null: the part of url before "{year"."""
    # Credentials come from the environment, never from the config. discovery does not apply to object stores.
    storage_options: Dict[str, Any] = field(default_factory=dict)
    """fsspec options for object-store urls (e.g. {endpoint_url: http://127.0.0.1:9000})."""


@dataclass
class JobConfig:
    """A job: named tables loaded together into one schema, per run parameters."""

    name: str = MISSING
    """Names ledger runs, the job lock and MLflow runs."""
    schema: str = "public"
    """The target schema."""
    tables: Dict[str, TableConfig] = field(default_factory=dict)
    """One entry per target table."""
    migrate: MigrateConfig = field(default_factory=MigrateConfig)
    """What a run may change on an existing table."""
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    """The fetch stage's source (url null: files must already be under data_root)."""
    # None: the placeholders its source path templates (and job.period, job.remote.url) use, plus year
    # and month for snapshot tables and merge tables with delete_missing. Only these are required on
    # the command line; a job with none is a one-off load.
    params: Optional[List[str]] = None
    """Run parameters this job needs (subset of year, month, day, partition); null: inferred from its templates."""
    # None: year-month[-day] and /partition from the params the job uses, or "all" for a job without params.
    period: Optional[str] = None
    """The ledger's period key, a template over its params (e.g. "{year:04d}-{month:02d}"); null: inferred."""
    # exists: the target table exists and holds rows of this period's batches (or of later ones for
    # merge/replace): one EXISTS, stops at the first row. count: append, the exact row count of those
    # batches. off: trust the ledger.
    verify: Verify = Verify.exists
    """Before skipping a file the ledger says is loaded, check the target: exists, count or off."""
    # reload: warn naming the table, forget the ledger's claim, remove this period's rows and load
    # again. stop: refuse the run (config error, exit 2, nothing changed).
    on_drift: OnDrift = OnDrift.reload
    """The target does not hold what the ledger says (dropped table, changed schema): reload or stop."""


@dataclass
class SinkConfig:
    """The PostgreSQL server and how every loadkit session is set up."""

    dsn: Optional[str] = "${oc.env:LOADKIT_DSN,null}"
    """libpq DSN or URI; null: an embedded PostgreSQL under embedded_dir. Never put a password here."""
    embedded_dir: str = "${loadkit_home:pgdata}"
    """The embedded server's data folder: <loadkit home>/pgdata (LOADKIT_HOME, else the per-user data folder)."""
    ledger_schema: str = "loadkit"
    """The schema of loadkit's ledger (runs, batches, rejects)."""
    connect_timeout: int = 10
    """Seconds libpq waits for a connection (every driver and writer connection); 0 waits forever."""
    # A statement over it fails with 57014 and is retried as transient (a COPY batch, a ledger query, a
    # finalize step).
    statement_timeout_ms: int = 0
    """Server-side statement_timeout of every loadkit session, ms (0 = none)."""
    # A statement waiting longer for a lock (a reader holding the table a finalize swaps) fails with 55P03
    # and is retried.
    lock_timeout_ms: int = 0
    """Server-side lock_timeout of every loadkit session, ms (0 = none)."""
    copy_encoder: CopyEncoder = CopyEncoder.pgpq
    """The writers' binary COPY encoder: pgpq (pgpq over psycopg 3) or adbc (adbc_driver_postgresql, the fallback)."""
    # PostgreSQL may use it per hash node, times hash_mem_multiplier (2 by default) and times the parallel
    # participants (up to 3 with the default max_parallel_workers_per_gather): 256MB measured ~840 MB for 4M
    # rows of a 36-column target; 64MB splits that join into 16 batches on disk (1.8x its time).
    compare_work_mem: str = "256MB"
    """work_mem of a merge reload's compare (staging hash-joined to the target), that statement only; e.g. 256MB."""
    publish_early: bool = True
    """In-process: publish each table once all its files are read, while others stream; false: after the stream."""
    # The publish builds keys and indexes: a merge first load's primary key, a replace's indexes. At the server's
    # default 64MB the sort of a 4M-row three-column key spills to disk; at 512MB it stays in memory (this
    # machine, warm cache, 3 alternated reps: 0.75 -> 0.52 s for the monthly job's widest table's key, 0.49 ->
    # 0.31 s for a 3.2M-row one-column key; one process: 1.50 -> 1.0 s). PostgreSQL's docs: "it's safe to set
    # this value significantly larger than work_mem". A parallel build shares it among its processes; two
    # tables publishing side by side may each use it.
    maintenance_work_mem: str = "512MB"
    """maintenance_work_mem of each publish transaction (key and index builds), e.g. 512MB; 1MB..2147483647kB."""


@dataclass
class BatchConfig:
    """How many rows go into one COPY transaction (one ledger batch)."""

    policy: BatchPolicyName = BatchPolicyName.fixed
    """fixed (one size for the run) or adaptive (moves within [min_size, max_size] from throughput and memory)."""
    size: int = 50_000
    """Approximate rows per COPY transaction (converted to bytes from a sample of the file)."""
    min_size: int = 5_000
    """adaptive: the smallest size."""
    max_size: int = 500_000
    """adaptive: the largest size."""
    read_block_bytes: int = 64 * 1024 * 1024
    """Ray Data block target while reading, bytes (at least 65536)."""
    window_s: float = 2.0
    """adaptive: seconds of evidence per sizing decision."""
    memory_ceiling: float = 0.80
    """adaptive: the host memory fraction in use above which the size halves."""


@dataclass
class PoolConfig:
    """Parallelism: writers, parse tasks, read splits, downloads."""

    writers: int = 2
    """Writer threads in process (one COPY stream each); on Ray the least number of loader actors."""
    connections_per_writer: int = 1
    """Connections each writer holds."""
    pre_ping: bool = True
    """Check a pooled connection before using it."""
    parse_concurrency: int = 0
    """Ray loader actors, each reading, parsing and writing whole units (0 = one per cluster CPU, >= writers)."""
    parse_threads: int = 0
    """Parse threads of the in-process executor (0 = one per two cores of env.num_cpus or the machine, 1 to 4)."""
    # Files under 2 x batch.read_block_bytes stay whole; zip/gzip members always stream in one task.
    read_splits: int = 2
    """Byte-range read tasks per large uncompressed file (no newlines in values)."""
    downloads: int = 4
    """Files the fetch stage downloads at once."""


@dataclass
class RetryConfig:
    """Retries of transient database errors (exponential backoff with jitter) and the circuit breaker."""

    attempts: int = 6
    """Tries per operation (1 + retries)."""
    initial_wait_s: float = 0.5
    """The first wait between tries."""
    max_wait_s: float = 20.0
    """The longest wait between tries."""
    multiplier: float = 2.0
    """The factor each wait grows by."""
    jitter_s: float = 0.5
    """Random seconds added to each wait."""
    breaker_failures: int = 5
    """Consecutive failures that open the circuit breaker."""
    breaker_cooldown_s: float = 10.0
    """Seconds the open breaker waits before trying again."""


@dataclass
class AlertRule:
    """A value above threshold fires once per rule and subject (table, writer, host, run)."""

    threshold: float = MISSING
    """The value above which the alert fires."""
    level: AlertLevel = AlertLevel.warning
    """info, warning or critical: the log level of the alert's record."""
    action: AlertAction = AlertAction.warn
    """warn, or abort (fails the run, exit 6)."""


@dataclass
class AlertsConfig:
    """Alert rules, evaluated as results stream in, and where alerts go besides the log."""

    reject_rate: AlertRule = field(default_factory=lambda: AlertRule(0.05, AlertLevel.critical))
    """Rejected / read, per table."""
    memory_fraction: AlertRule = field(default_factory=lambda: AlertRule(0.80))
    """Host memory in use."""
    pool_utilisation: AlertRule = field(default_factory=lambda: AlertRule(0.90))
    """Writer connection busy-time fraction."""
    stall_seconds: AlertRule = field(default_factory=lambda: AlertRule(300.0, AlertLevel.critical))
    """Seconds without a batch result (checked by the watchdog)."""
    sinks: List[AlertSink] = field(default_factory=lambda: [AlertSink.log])
    """Where alerts go: log, jsonl (one JSON object per line) and/or webhook (HTTP POST of the same JSON)."""
    jsonl_path: Optional[str] = None
    """The JSON-lines file of the jsonl sink."""
    webhook_url: Optional[str] = None
    """The URL the webhook sink posts to."""


@dataclass
class EnvConfig:
    """Where the run executes: a local or joined Ray, or in-process."""

    name: EnvName = EnvName.local
    """local, cluster or prod (the env group chosen)."""
    address: Optional[str] = None
    """null starts a local Ray; "auto" or ray://host:port joins an existing cluster."""
    num_cpus: Optional[int] = None
    """CPUs of a local Ray, and the cores env.executor=auto and in-process parse threads count; null: all."""
    object_store_memory: Optional[int] = 1_000_000_000
    """Cap on a local Ray's object store, bytes (sized to the input within 128-256 MB below it); null: no cap."""
    ship_code: bool = False
    """Ship loadkit/ (with its conf/ and examples/) to cluster workers as runtime-env py_modules."""
    progress_bars: bool = True
    """Draw progress lines on a terminal."""
    # auto: inprocess for a local run whose files to load total at most inprocess_max_bytes (Ray's
    # ~15 s start-up and ~17 CPU-s of processes are not paid back below it) or whose machine has at
    # most inprocess_max_cpus cores (Ray's 1.5-2x CPU per row is never paid back there), else ray.
    # A cluster address always means ray. The measurement: execute.choose_executor's docstring.
    executor: Executor = Executor.auto
    """ray (the Ray Data pipeline), inprocess (the same stages in this process) or auto."""
    inprocess_max_bytes: int = 2 * 1024 * 1024 * 1024
    """auto: a local run with at most this many bytes to read runs in-process."""
    inprocess_max_cpus: int = 4
    """auto: a machine with at most this many cores runs in-process."""
    # Past it the run stops like an interrupt (committed batches stay for the resume) and fails
    # transient (exit 4) with "run deadline exceeded".
    max_run_seconds: float = 0
    """The run's deadline in seconds (0 = none)."""
    worker_logs: bool = True
    """A local Ray streams its workers' output to this log (Ray's log monitor, ~50-70 MB); off: session logs only."""


@dataclass
class TrackingConfig:
    """MLflow: one run per load (the ledger records every run either way)."""

    enabled: bool = True
    """false: no MLflow run."""
    uri: Optional[str] = "${oc.env:MLFLOW_TRACKING_URI,null}"
    """The tracking store; null: sqlite:///<loadkit home>/mlflow.db."""
    experiment: str = "loadkit"
    """The MLflow experiment."""
    # sync: the run id is known when the run returns. background: a short run's record is written by a
    # detached `python -m loadkit.tracking flush`, so the shell is not held. auto: background for a
    # single run from the command line, else sync (see loadkit.tracking.RunTracker).
    flush: Flush = Flush.auto
    """When MLflow is written: sync, background or auto."""
    live_after_s: float = 20.0
    """background: past this long (s, >= 0), a stream with as long to go by its ETA (or none) logs live."""
    report: bool = True
    """Log report.html (plots, summary, rejects sample: loadkit.report) with the run's artifacts."""


@dataclass
class TelemetryConfig:
    """Live observability of a run (see loadkit.prom and loadkit.telemetry)."""

    metrics_port: Optional[int] = None
    """Serve Prometheus /metrics and /healthz on this port while a run streams; null: off, 0: any free port."""
    metrics_host: str = "127.0.0.1"
    """The address the metrics endpoint binds."""
    tracing: Tracing = Tracing.off
    """OpenTelemetry spans run -> table -> file -> batch: off, console (stderr) or otlp."""
    otlp_endpoint: Optional[str] = None
    """Where tracing=otlp sends spans."""


@dataclass
class LoggingConfig:
    """The log records on stderr."""

    format: LogFormat = LogFormat.text
    """text or json (one object per line)."""
    level: LogLevel = LogLevel.INFO
    """DEBUG, INFO, WARNING, ERROR or CRITICAL."""


@dataclass
class LoadkitConfig:
    """The whole run: parameters, the job and one choice per config group."""

    year: Optional[int] = None
    """Run parameter; required only by jobs that use it (job.params)."""
    month: Optional[int] = None
    """Run parameter, 1..12; `month=latest` asks the job's remote for the newest complete month."""
    day: Optional[int] = None
    """Run parameter of daily jobs ({day:02d}), 1..31."""
    partition: Optional[str] = None
    """An arbitrary partition key ({partition} in path templates), e.g. a region or batch label."""
    data_root: str = "data"
    """The folder source path templates resolve under; paths and symlinks may not escape it."""
    force: bool = False
    """Reload the files the ledger already marks as loaded for this table and period."""
    # auto downloads the month when its folder under data_root is missing, empty or half-fetched, then
    # loads; always lists the remote and downloads whatever is missing or incomplete, then loads; only
    # downloads (no load); never loads what is on disk.
    fetch: FetchMode = FetchMode.auto
    """The fetch stage (job.remote): auto, always, only or never."""
    job: Optional[JobConfig] = None
    """The job (+job=<name>)."""
    sink: SinkConfig = field(default_factory=SinkConfig)
    """The PostgreSQL server."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    """Rows per COPY transaction."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """Parallelism."""
    retry: RetryConfig = field(default_factory=RetryConfig)
    """Retries of transient errors."""
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    """Alert rules."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Where the run executes."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Log records."""
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    """Metrics endpoint and tracing."""


def register() -> None:
    """Register the schema so conf/config.yaml can name it in its defaults list."""
    from hydra.core.config_store import ConfigStore

    register_resolvers()
    ConfigStore.instance().store(name="loadkit_schema", node=LoadkitConfig)


def _home_path(sub: str = "") -> str:
    from loadkit.home import path

    return str(path(*[p for p in sub.split("/") if p]))


def register_resolvers() -> None:
    """``${loadkit_home:sub/dir}``: a path in loadkit's state folder (see loadkit.home)."""
    OmegaConf.register_new_resolver("loadkit_home", _home_path, replace=True)


def to_config(cfg: DictConfig | LoadkitConfig) -> LoadkitConfig:
    """Turn a composed DictConfig into the typed object and validate it."""
    register_resolvers()
    try:  # a config built in Python goes through the schema too: choices become their Enum, ${...} resolve
        composed = OmegaConf.to_object(OmegaConf.structured(cfg) if isinstance(cfg, LoadkitConfig) else cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"invalid configuration: {exc.msg if hasattr(exc, 'msg') else exc}", key=key) from None
    if not isinstance(composed, LoadkitConfig):
        raise ConfigError("configuration does not follow the loadkit schema")
    obj = composed
    validate(obj)
    return obj


def compose_groups(conf_dir: str, overrides: List[str], year: Optional[int],
                   month: Optional[int]) -> Tuple[AlertsConfig, BatchConfig]:
    """(alerts, batch) as the config files in ``conf_dir`` and the overrides say now (the hot reload);
    raises ConfigError when they do not compose or are invalid."""
    from hydra import compose, initialize_config_dir

    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("year", "month")]
    register()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            composed = compose("config", overrides=[*keep, f"year={year}", f"month={month}"])
        cfg = OmegaConf.to_object(composed)
    except Exception as exc:  # Hydra / OmegaConf errors: a typo in the edited file
        raise ConfigError(f"cannot compose the config: {str(exc).splitlines()[0]}") from None
    assert isinstance(cfg, LoadkitConfig)
    _validate_alerts(cfg.alerts)
    _validate_batch(cfg.batch)
    return cfg.alerts, cfg.batch


def compose_error(exc: BaseException) -> ConfigError:
    """A Hydra/OmegaConf composition error (unknown key, wrong type, a value outside a Choice) as a one-line
    ConfigError naming the key (the ``full_key`` of the cause).

    OmegaConf's message is its first line ("Key 'writerz' not in 'PoolConfig'"): the lines after it restate the
    key and name the schema's classes. Hydra's own errors keep their hints on one line ("Could not find
    'job/nope'; Available options in 'job': monthly; weather"), without the config search path."""
    cause = exc.__cause__ or exc
    key = getattr(cause, "full_key", None) or getattr(exc, "full_key", None)
    text = str(cause).strip()
    if isinstance(cause, OmegaConfBaseException) and key:
        text = text.splitlines()[0]
    else:
        text = text.split("\nConfig search path:")[0]
        text = re.sub(r":\s*\n\s*", ": ", text)  # "Available options in 'job':" then one option per line
        text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    return ConfigError(text or type(cause).__name__, key=key)


# PostgreSQL's range of work_mem, in kB (guc_tables.c: 64 .. MAX_KILOBYTES, INT_MAX on 64-bit servers), and
# maintenance_work_mem's lower bound (1024 kB; the same upper bound).
WORK_MEM_MIN_KB, WORK_MEM_MAX_KB = 64, 2**31 - 1
MAINTENANCE_WORK_MEM_MIN_KB = 1024
_MEMORY_UNITS_KB = {"kB": 1, "MB": 1024, "GB": 1024**2, "TB": 1024**3}


def _work_mem_kb(size: str, low: int = WORK_MEM_MIN_KB) -> Optional[int]:
    """``size`` (e.g. "256MB") in kB if PostgreSQL accepts it as work_mem (``low``: the setting's lower bound
    in kB, MAINTENANCE_WORK_MEM_MIN_KB for maintenance_work_mem), else None: the unit spelled as the
    server wants it and the value in its range (a run with a value it refuses would load everything, then
    fail its publish at the SET)."""
    m = re.fullmatch(r"([1-9][0-9]{0,12})(kB|MB|GB|TB)", size)
    if m is None:
        return None
    kb = int(m.group(1)) * _MEMORY_UNITS_KB[m.group(2)]
    return kb if low <= kb <= WORK_MEM_MAX_KB else None


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(message, key=key)


def validate(cfg: LoadkitConfig) -> None:
    """Cross-field checks that types alone cannot express. Raises ConfigError naming the key."""
    _require(cfg.job is not None, "job", "no job selected: add +job=<name> (e.g. +job=monthly)")
    assert cfg.job is not None
    _validate_params(cfg, job_params(cfg.job))
    _validate_batch(cfg.batch)
    _require(cfg.pool.writers >= 1, "pool.writers", "pool.writers must be >= 1")
    _require(cfg.pool.connections_per_writer >= 1, "pool.connections_per_writer",
             "pool.connections_per_writer must be >= 1")
    _require(cfg.pool.parse_concurrency >= 0, "pool.parse_concurrency", "pool.parse_concurrency must be >= 0")
    _require(cfg.pool.parse_threads >= 0, "pool.parse_threads", "pool.parse_threads must be >= 0")
    _require(cfg.pool.read_splits >= 1, "pool.read_splits", "pool.read_splits must be >= 1")
    _validate_retry(cfg.retry)
    _validate_alerts(cfg.alerts)
    _require(cfg.env.inprocess_max_bytes >= 0, "env.inprocess_max_bytes", "env.inprocess_max_bytes must be >= 0")
    _require(cfg.env.inprocess_max_cpus >= 0, "env.inprocess_max_cpus", "env.inprocess_max_cpus must be >= 0")
    _require(cfg.telemetry.metrics_port is None or 0 <= cfg.telemetry.metrics_port <= 65535,
             "telemetry.metrics_port", "telemetry.metrics_port must be null or 0..65535")
    _require(cfg.telemetry.tracing != "otlp" or bool(cfg.telemetry.otlp_endpoint), "telemetry.otlp_endpoint",
             "telemetry.tracing=otlp needs telemetry.otlp_endpoint")
    _require(cfg.tracking.live_after_s >= 0, "tracking.live_after_s", "tracking.live_after_s must be >= 0")
    for key, low, example in (("compare_work_mem", WORK_MEM_MIN_KB, "256MB"),
                              ("maintenance_work_mem", MAINTENANCE_WORK_MEM_MIN_KB, "512MB")):
        size = getattr(cfg.sink, key)
        _require(_work_mem_kb(size, low) is not None, f"sink.{key}", f"sink.{key} must be a PostgreSQL memory "
                 f"size from {low}kB to {WORK_MEM_MAX_KB}kB such as {example}, not {size!r}")
    for key in ("connect_timeout", "statement_timeout_ms", "lock_timeout_ms"):
        _require(getattr(cfg.sink, key) >= 0, f"sink.{key}", f"sink.{key} must be >= 0 (0 = no limit)")
    _require(cfg.env.max_run_seconds >= 0, "env.max_run_seconds", "env.max_run_seconds must be >= 0 (0 = none)")
    _require(IDENTIFIER.match(cfg.sink.ledger_schema) is not None, "sink.ledger_schema",
             f"not a valid SQL identifier: {cfg.sink.ledger_schema!r}")
    assert cfg.job is not None
    _validate_job(cfg.job)
    _validate_fetch(cfg)


def _validate_fetch(cfg: LoadkitConfig) -> None:
    _require(cfg.pool.downloads >= 1, "pool.downloads", "pool.downloads must be >= 1")
    remote = cfg.job.remote if cfg.job is not None else RemoteConfig()
    _require(cfg.fetch != "only" or bool(remote.url), "job.remote.url", "fetch=only needs job.remote.url")
    _require(remote.discovery != "list" or bool(remote.files), "job.remote.files", "discovery=list needs files")
    _require(remote.attempts >= 1, "job.remote.attempts", "job.remote.attempts must be >= 1")
    _require(remote.timeout_s > 0, "job.remote.timeout_s", "job.remote.timeout_s must be > 0")
    _require(remote.url is None or "://" in remote.url, "job.remote.url",
             "job.remote.url must be a URL template (http(s)://, s3://, gs://, ...)")


PARAMS = ("year", "month", "day", "partition")
_PLACEHOLDER = re.compile(r"{(\w+)")


def job_params(job: JobConfig) -> List[str]:
    """The run parameters a job needs: ``job.params`` if declared, else the {placeholders} its
    enabled tables' path templates (and job.period, job.remote.url) use, plus year and month for
    snapshot tables and for merge tables with delete_missing (their sync is per month)."""
    if job.params is not None:
        return list(job.params)
    used = set(_PLACEHOLDER.findall(job.period or ""))
    used.update(_PLACEHOLDER.findall(job.remote.url or ""))  # the fetch stage's URL template
    for t in job.tables.values():
        if not t.enabled:
            continue
        for template in t.source.paths or []:
            used.update(_PLACEHOLDER.findall(template))
        if t.mode == "snapshot" or (t.mode == "merge" and t.delete_missing):
            used.update(("year", "month"))  # a YYYYMM partition / the month a full-snapshot sync closes
    return [p for p in PARAMS if p in used] + sorted(used - set(PARAMS))


def _validate_params(cfg: LoadkitConfig, params: List[str]) -> None:
    name = cfg.job.name if cfg.job is not None else "?"
    for p in params:
        _require(p in PARAMS, "job.params", f"unknown run parameter {p!r}: a job may use {list(PARAMS)}")
        _require(getattr(cfg, p) is not None, p,
                 f"job {name} needs {p} (job.params, or its path templates or snapshot partitions use it): add {p}=...")
    if cfg.year is not None:
        _require(1900 <= cfg.year <= 2100, "year", f"year must be between 1900 and 2100, got {cfg.year}")
    if cfg.month is not None:
        _require(1 <= cfg.month <= 12, "month", f"month must be 1..12, got {cfg.month}")
    if cfg.day is not None:
        _require(1 <= cfg.day <= 31, "day", f"day must be 1..31, got {cfg.day}")


def _validate_batch(b: BatchConfig) -> None:
    _require(b.size >= 1, "batch.size", f"batch.size must be >= 1, got {b.size}")
    _require(1 <= b.min_size <= b.max_size, "batch.min_size", "need 1 <= batch.min_size <= batch.max_size")
    _require(b.read_block_bytes >= 64 * 1024, "batch.read_block_bytes", "batch.read_block_bytes must be >= 65536")
    _require(b.policy == "fixed" or b.min_size <= b.size <= b.max_size, "batch.size",
             "with batch.policy=adaptive, batch.size must lie within [min_size, max_size]")
    _require(b.window_s > 0, "batch.window_s", "batch.window_s must be > 0")
    _require(0 < b.memory_ceiling <= 1, "batch.memory_ceiling", "batch.memory_ceiling must be within (0, 1]")


def _validate_retry(r: RetryConfig) -> None:
    _require(r.attempts >= 1, "retry.attempts", "retry.attempts must be >= 1")
    _require(r.initial_wait_s >= 0 and r.max_wait_s >= r.initial_wait_s, "retry.max_wait_s",
             "need 0 <= retry.initial_wait_s <= retry.max_wait_s")
    _require(r.multiplier >= 1, "retry.multiplier", "retry.multiplier must be >= 1")
    _require(r.breaker_failures >= 1, "retry.breaker_failures", "retry.breaker_failures must be >= 1")


def _validate_alerts(a: AlertsConfig) -> None:
    for name in ("reject_rate", "memory_fraction", "pool_utilisation", "stall_seconds"):
        rule: AlertRule = getattr(a, name)
        _require(rule.threshold >= 0, f"alerts.{name}.threshold", "alert threshold must be >= 0")
    _require("jsonl" not in a.sinks or bool(a.jsonl_path), "alerts.jsonl_path",
             "alerts.sinks has jsonl but no jsonl_path")
    _require("webhook" not in a.sinks or bool(a.webhook_url), "alerts.webhook_url",
             "alerts.sinks has webhook but no webhook_url")


def _validate_job(job: JobConfig) -> None:
    _require(IDENTIFIER.match(job.schema) is not None, "job.schema", f"not a valid SQL identifier: {job.schema!r}")
    _require(bool(job.tables), "job.tables", "the job declares no tables")
    for tname, table in job.tables.items():
        _validate_table(tname, table)
    _validate_whole_period(job)


def _validate_whole_period(job: JobConfig) -> None:
    """replace, snapshot and merge with delete_missing take one run's files as its whole period: the publish
    rebuilds the period (or deletes the keys it lacks) from them. A ``job.period`` coarser than the table's path
    templates (paths by {day}, period by month) made each run replace the other runs' rows of the period while
    the ledger still called their files loaded (a review: 20,000 of 40,000 rows gone, the rerun skipped)."""
    if job.period is None:
        return  # inferred from every parameter the paths use
    period_uses = set(_PLACEHOLDER.findall(job.period))
    for tname, t in job.tables.items():
        if not t.enabled or not (t.mode in ("replace", "snapshot") or (t.mode == "merge" and t.delete_missing)):
            continue
        finer = sorted({p for template in t.source.paths or [] for p in _PLACEHOLDER.findall(template)}
                       - period_uses)
        what = "merge with delete_missing" if t.mode == "merge" else t.mode
        _require(not finer, f"job.tables.{tname}.mode",
                 f"{what} publishes each period from one run's files, but job.period {job.period!r} does not use "
                 f"{', '.join('{' + p + '}' for p in finer)}, which the table's paths do: each run would replace "
                 "the rows other runs loaded into the period. Put them in job.period, or use append or merge")


def _validate_table(tname: str, t: TableConfig) -> None:
    k = f"job.tables.{tname}"
    _require(IDENTIFIER.match(tname) is not None, k, f"table name is not a valid SQL identifier: {tname!r}")
    _require(bool(t.source.paths), f"{k}.source.paths", "no source paths declared")
    _validate_dialect(f"{k}.source.dialect", t.source.dialect)
    _require(t.source.max_member_bytes is None or t.source.max_member_bytes > 0, f"{k}.source.max_member_bytes",
             "max_member_bytes must be > 0 or null")
    _require(t.source.max_compression_ratio is None or t.source.max_compression_ratio >= 1,
             f"{k}.source.max_compression_ratio", "max_compression_ratio must be >= 1 or null")
    _require(bool(t.columns), f"{k}.columns", "no columns declared")
    names: list[str] = []
    for i, col in enumerate(t.columns):
        ck = f"{k}.columns[{i}]"
        _require(IDENTIFIER.match(col.name) is not None, f"{ck}.name", f"not a valid SQL identifier: {col.name!r}")
        _require(not col.name.startswith("_lk_"), f"{ck}.name", "column names starting with _lk_ are reserved")
        _require(TYPE_PATTERN.match(col.type) is not None, f"{ck}.type", f"unknown column type {col.type!r}")
        _require(col.format is None or col.type in ("date", "timestamp"), f"{ck}.format",
                 "format applies to date/timestamp columns only")
        _require(col.name not in names, f"{ck}.name", f"duplicate column {col.name!r}")
        _require(col.collation is None or COLLATION_NAME.match(col.collation) is not None, f"{ck}.collation",
                 f"not a plain collation name: {col.collation!r} (letters, digits, _ . - @)")
        _require(col.collation is None or col.type.split("(")[0] in ("text", "char", "varchar"), f"{ck}.collation",
                 "collation applies to text/char/varchar columns only")
        _validate_column_rules(ck, col)
        names.append(col.name)
    for kc in t.key:
        _require(kc in names or (t.derived_key is not None and kc == t.derived_key.name), f"{k}.key",
                 f"key column {kc!r} is not a declared column")
    if t.derived_key is not None:
        _require(IDENTIFIER.match(t.derived_key.name) is not None, f"{k}.derived_key.name", "invalid identifier")
        for dc in t.derived_key.columns:
            _require(dc in names, f"{k}.derived_key.columns", f"derived key column {dc!r} is not declared")
    for idx in t.indexes:
        for ic in idx:
            _require(ic in names or (t.derived_key is not None and ic == t.derived_key.name), f"{k}.indexes",
                     f"index column {ic!r} is not declared")
    _require(t.mode != "merge" or bool(t.key), f"{k}.key", "mode merge needs a key")
    _validate_sync(k, t, names)
    _require(0.0 <= t.max_reject_rate <= 1.0, f"{k}.max_reject_rate", "max_reject_rate must be within 0..1")
    _require(t.max_rejects is None or t.max_rejects >= 0, f"{k}.max_rejects", "max_rejects must be >= 0")


def _validate_column_rules(ck: str, col: ColumnConfig) -> None:
    """min/max (orderable kinds, parseable, min <= max), format (a strptime format without time zone)."""
    kind = col.type.split("(")[0]
    bounds = {}
    for name in ("min", "max"):
        text = getattr(col, name)
        if text is None:
            continue
        try:
            bounds[name] = bound_value(kind, text)
        except ValueError as exc:
            raise ConfigError(f"{name} {text!r} of a {col.type} column: {exc}", key=f"{ck}.{name}") from None
    _require(len(bounds) < 2 or bounds["min"] <= bounds["max"], f"{ck}.min",
             f"min {col.min!r} is greater than max {col.max!r}")
    if col.format is not None:
        import _strptime  # type: ignore[import-not-found]  # the stdlib module behind datetime.strptime

        try:
            _strptime.TimeRE().compile(col.format)
        except (KeyError, ValueError, IndexError) as exc:
            raise ConfigError(f"not a strptime format {col.format!r}: {exc}", key=f"{ck}.format") from None
        _require(not re.search(r"%[zZ]", col.format.replace("%%", "")), f"{ck}.format",
                 "%z/%Z (time zones) are not supported: date and timestamp columns are without time zone")
def _validate_sync(k: str, t: TableConfig, names: List[str]) -> None:
    """history needs delete_missing. Both act on mode merge only: replace and snapshot already publish exactly
    the month, append keeps every row by design (so a job can switch a table's mode without touching them)."""
    _require(not t.history or t.delete_missing, f"{k}.history", "history needs delete_missing=true")
    _require(not t.history or not {"valid_from", "valid_to"} & set(names), f"{k}.history",
             "history adds the columns valid_from and valid_to: the table must not declare them")


def _validate_dialect(k: str, d: DialectConfig) -> None:
    _require(len(d.delimiter) == 1, f"{k}.delimiter", f"delimiter must be one character, got {d.delimiter!r}")
    _require(d.quote is None or len(d.quote) == 1, f"{k}.quote", "quote must be one character or null")
    _require(d.escape is None or len(d.escape) == 1, f"{k}.escape", "escape must be one character or null")
    _require(d.delimiter != d.quote, f"{k}.delimiter", "delimiter and quote must differ")
    _require(not d.match_by_name or d.header, f"{k}.match_by_name", "match_by_name needs header=true")
    _require(d.escape is None or d.escape not in (d.quote, d.delimiter), f"{k}.escape",
             "escape must differ from quote and delimiter (escape: null means doubled quotes)")
    _require(d.max_record_bytes >= 1024, f"{k}.max_record_bytes", "max_record_bytes must be >= 1024")
    _require(d.skip_lines >= 0, f"{k}.skip_lines", "skip_lines must be >= 0")
    try:
        "".encode(d.encoding)
    except LookupError:
        raise ConfigError(f"unknown encoding {d.encoding!r}", key=f"{k}.encoding") from None
    # The scanner reads bytes: line ends and the special characters must be single ASCII-compatible
    # bytes. UTF-16/32 files are refused here rather than misread as one column.
    _require("\n\r".encode(d.encoding, errors="replace") == b"\n\r", f"{k}.encoding",
             f"encoding {d.encoding!r} is not ASCII-compatible (UTF-16/32); transcode the file to UTF-8 first")
    for name in ("delimiter", "quote", "escape"):
        ch = getattr(d, name)
        if ch is not None:
            _require(len(ch) == 1 and ord(ch) < 256 and ch.encode(d.encoding, errors="replace") == ch.encode("latin-1"),
                     f"{k}.{name}", f"{name} {ch!r} must be one byte in encoding {d.encoding!r}")


def as_plain_dict(cfg: Any) -> Dict[str, Any]:
    """A plain nested dict of any config (for params/artifacts; mask before saving)."""
    if is_dataclass(cfg) and not isinstance(cfg, type):  # ~100x faster than a round trip through OmegaConf
        return asdict(cfg)
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
