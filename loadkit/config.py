"""Structured configs (dataclasses registered with Hydra's ConfigStore) and validation.

The dataclasses are the schema: Hydra checks keys and types at compose time, and
``validate`` checks the cross-field rules after ``OmegaConf.to_object``. Configs stay
mutable so command-line overrides work; the compiled plan is what gets frozen.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from loadkit.errors import ConfigError

WRITE_MODES = ("append", "replace", "merge", "snapshot")
FORMATS = ("csv", "gzip", "zip", "parquet")
ON_INVALID = ("reject", "null")
QUOTING = ("strict", "lenient")
# Column types the transform and DDL understand; lengths/precisions in parentheses.
TYPE_PATTERN = re.compile(
    r"^(text|char\(\d+\)|varchar\(\d+\)|smallint|integer|bigint|double|"
    r"numeric\(\d+,\d+\)|date|timestamp|boolean)$"
)
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass
class DialectConfig:
    """How a delimited text file is written."""

    delimiter: str = ","
    quote: Optional[str] = '"'
    # None: a quote inside a quoted field is doubled (""); otherwise the escape char (e.g. "\\").
    escape: Optional[str] = None
    header: bool = False
    # With header=true, match columns by name instead of by position.
    match_by_name: bool = False
    encoding: str = "utf-8"
    null_values: List[str] = field(default_factory=lambda: [""])
    # A speed hint only (records are the same either way): false says no value holds a newline,
    # which lets a large plain file be read in parallel byte ranges (pool.read_splits).
    newlines_in_values: bool = True
    # Remove NUL bytes from values (after null detection; values altered are counted as coerced).
    # false: a record with a NUL byte is rejected.
    strip_nul: bool = True
    trim: bool = False
    # strict: a closing quote must be followed by the delimiter or the line end, else the record is
    # rejected (malformed quoting). lenient: a quote closes a quoted field only when followed by the
    # delimiter or the line end; any other quote is literal text (sources with unescaped inner quotes).
    quoting: str = "strict"
    # The longest record in bytes; a longer one (or an unterminated quote) is rejected and reading
    # goes on at the next line. Bounds memory whatever the input (zip bombs, a stray quote).
    max_record_bytes: int = 16 * 1024 * 1024
    # Physical lines to skip at the start of every member before the header / first record
    # (export banners); they still count in line numbers.
    skip_lines: int = 0
    # false: PostgreSQL COPY's rule, a quoted value is never NULL ("" is an empty string, unquoted
    # empty is NULL with the default null_values). true: null markers apply to quoted values too.
    quoted_can_be_null: bool = True


@dataclass
class SourceConfig:
    """Where a table's rows come from. Paths are templates over year/month."""

    paths: List[str] = MISSING
    format: str = "csv"
    # zip members to read (fnmatch pattern); None reads every member.
    member: Optional[str] = None
    dialect: DialectConfig = field(default_factory=DialectConfig)
    # An empty file (or header-only) is an error only if this is false.
    allow_empty: bool = True
    # Decompression guards for gzip/zip members (zip bombs): a member that decompresses past this
    # many bytes, or past max_compression_ratio x its compressed size (zip: the member's; gzip: the
    # file's; never below 64 MiB), fails its file as source data. None: no guard.
    max_member_bytes: Optional[int] = None
    max_compression_ratio: Optional[float] = None


@dataclass
class ColumnConfig:
    name: str = MISSING
    type: str = "text"
    nullable: bool = True
    # Extra null markers for this column (e.g. "0", "00000000" for dates some sources leave blank).
    # Matched on the raw value (after dialect.trim, before zfill and the length check), so a
    # placeholder such as "0" or "       0" becomes NULL instead of being padded to "00000000".
    # For typed Parquet columns they are matched on Arrow's text of the value (int 0 -> "0").
    null_values: List[str] = field(default_factory=list)
    # strptime format for date/timestamp columns.
    format: Optional[str] = None
    # Numbers written as 1.234,56 (dot thousands, decimal comma).
    decimal_comma: bool = False
    # Left-pad with zeros to this width (codes whose leading zero was lost upstream).
    zfill: Optional[int] = None
    # What to do with a value that does not parse: reject the row, or store NULL (counted).
    on_invalid: str = "reject"
    # Inclusive bounds on the typed value, written as that type's literal: an integer, a decimal
    # (numeric, double), an ISO date (2000-01-31) or date-time (2000-01-31 08:00:00). Allowed on
    # smallint/integer/bigint/numeric/double/date/timestamp only (config error elsewhere); a
    # value outside is handled like an invalid one (on_invalid), reason "greater than max 10".
    min: Optional[str] = None
    max: Optional[str] = None


@dataclass
class DerivedKeyConfig:
    """A deterministic surrogate key (md5 of the named columns) for tables with no natural key."""

    name: str = MISSING
    columns: List[str] = MISSING


@dataclass
class TableConfig:
    source: SourceConfig = MISSING
    columns: List[ColumnConfig] = MISSING
    mode: str = "append"
    key: List[str] = field(default_factory=list)
    derived_key: Optional[DerivedKeyConfig] = None
    indexes: List[List[str]] = field(default_factory=list)
    max_reject_rate: float = 0.05
    max_rejects: Optional[int] = None
    enabled: bool = True
    # mode merge only (ignored by the other modes). Each month is a full snapshot: once every file of
    # the table's month has loaded and no file of the run failed, delete the target rows whose key the
    # month no longer has (a key last written by an older month). Counted as `deleted` in the summary
    # and ledger (table_load.deleted). Not done for a month with fewer files than the month before.
    delete_missing: bool = False
    # with delete_missing: keep those rows and close them instead. The target gets date columns valid_from
    # (first day of the month the key was last (re)opened) and valid_to (first day of the month it went
    # missing; NULL while present); a key that comes back is reopened with a new valid_from.
    history: bool = False


@dataclass
class MigrateConfig:
    """What loadkit may change when an existing table differs from its declaration.

    Everything off: the run stops before loading with the full column diff."""

    # ALTER TABLE ... ADD COLUMN for declared columns the table lacks (new columns are NULL in old rows).
    add_columns: bool = False
    # ALTER COLUMN ... TYPE <declared> USING col::<declared> (fails, and changes nothing, if a value does not cast).
    alter_types: bool = False
    # Keep columns the declaration does not have; loads leave them NULL (or their default).
    allow_extra_columns: bool = False


@dataclass
class RemoteConfig:
    """Where the fetch stage (loadkit.source.fetch) downloads a month from, before the load.

    A local mirror is one override away: ``job.remote.url=http://127.0.0.1:8000/{year:04d}-{month:02d}/``."""

    # The month folder's URL, a template over year/month (str.format); None: no fetch stage.
    url: Optional[str] = None
    # How to list the month: webdav (PROPFIND, e.g. a Nextcloud public share), html (a plain HTTP
    # directory listing), list (the names in `files`, sized with HEAD).
    discovery: str = "html"
    # discovery=list: file names (templates over year/month) under url.
    files: List[str] = field(default_factory=list)
    # fnmatch patterns of the listed names to download.
    include: List[str] = field(default_factory=lambda: ["*.zip"])
    # Transfers per file (1 + retries); each retry resumes with an HTTP Range request. Waits grow
    # exponentially from initial_wait_s up to max_wait_s.
    attempts: int = 5
    initial_wait_s: float = 0.5
    max_wait_s: float = 30.0
    # Seconds without a byte (and for connecting) before a transfer counts as failed.
    timeout_s: float = 60.0
    # CRC-test every member of a downloaded zip before it is renamed into place.
    verify_zip: bool = True
    # Where month folders are listed for month=latest; None: the part of url before "{year".
    root_url: Optional[str] = None
    # An object-store url (s3://bucket/{year:04d}-{month:02d}/, gs://...) is listed and read through
    # fsspec with these options (e.g. {endpoint_url: http://127.0.0.1:9000}); credentials come from the
    # environment, never from the config. discovery does not apply to object stores.
    storage_options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class JobConfig:
    name: str = MISSING
    schema: str = "public"
    tables: Dict[str, TableConfig] = field(default_factory=dict)
    migrate: MigrateConfig = field(default_factory=MigrateConfig)
    # The fetch stage's source (remote.url None: files must already be under data_root).
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    # Run parameters this job needs (subset of year, month, day, partition). None: the
    # placeholders its source path templates use ({year}, {month}, {day}, {partition}),
    # plus year and month for a snapshot table (its partition is YYYYMM). Only these are
    # required on the command line; a job with none is a one-off load.
    params: Optional[List[str]] = None
    # The ledger's period key for one run of this job, a template over its params
    # (e.g. "{year:04d}-{month:02d}"). None: year-month[-day] and /partition from the
    # params the job uses, or "all" for a job without params.
    period: Optional[str] = None
    # Before skipping a file the ledger says is loaded, check the target still holds its
    # rows: "exists" (the target table exists and holds rows of this period's batches, or
    # of later ones for merge/replace: one indexed-free EXISTS, stops at the first row),
    # "count" (append: the exact row count of those batches), "off" (trust the ledger).
    verify: str = "exists"
    # What to do when the target does not hold what the ledger says (dropped table,
    # changed job.schema, deleted rows): "reload" (warn naming the table, forget the
    # ledger's claim, remove this period's rows and load again) or "stop" (refuse the run).
    on_drift: str = "reload"


@dataclass
class SinkConfig:
    # None: use LOADKIT_DSN, else an embedded PostgreSQL under embedded_dir.
    dsn: Optional[str] = None
    # The embedded server's data folder: <loadkit home>/pgdata (LOADKIT_HOME, else the per-user
    # data folder; see loadkit.home), the same whatever the current folder.
    embedded_dir: str = field(default_factory=lambda: str(_home_path("pgdata")))
    ledger_schema: str = "loadkit"
    # Seconds libpq waits for a connection (every driver and writer connection); 0 waits forever.
    connect_timeout: int = 10
    # Server-side statement_timeout of every loadkit session, ms (0 = none). A statement over it
    # fails with 57014 and is retried as transient (a COPY batch, a ledger query, a finalize step).
    statement_timeout_ms: int = 0
    # Server-side lock_timeout of every loadkit session, ms (0 = none): a statement waiting longer
    # for a lock (a reader holding the table a finalize swaps) fails with 55P03 and is retried.
    lock_timeout_ms: int = 0
    # The writers' binary COPY encoder (loadkit/postgres/copy.py): "pgpq" (pgpq encodes Arrow in Rust,
    # psycopg 3 streams it; ~3x less CPU per row, issue 16) or "adbc" (adbc_driver_postgresql, the
    # fallback). Both give identical tables; each batch's rows, rejects and ledger row share one
    # connection and transaction of the chosen driver.
    copy_encoder: str = "pgpq"


@dataclass
class BatchConfig:
    policy: str = "fixed"
    # Approximate rows per COPY transaction (converted to bytes from a sample of the file).
    size: int = 50_000
    min_size: int = 5_000
    max_size: int = 500_000
    # Ray Data block target while reading (bytes).
    read_block_bytes: int = 64 * 1024 * 1024
    # adaptive: seconds of evidence per sizing decision, and the host memory use that halves the size.
    window_s: float = 2.0
    memory_ceiling: float = 0.80


@dataclass
class PoolConfig:
    # Writer actors, each holding its own connections (one COPY stream each).
    writers: int = 2
    connections_per_writer: int = 1
    pre_ping: bool = True
    # Parse tasks allowed at once (0 = as many as Ray schedules).
    parse_concurrency: int = 0
    # Byte-range read tasks per large uncompressed file (no newlines in values), so one big
    # file still parses on every core; files under 2 x batch.read_block_bytes stay whole.
    read_splits: int = 2
    # Files the fetch stage downloads at once.
    downloads: int = 4


@dataclass
class RetryConfig:
    attempts: int = 6
    initial_wait_s: float = 0.5
    max_wait_s: float = 20.0
    multiplier: float = 2.0
    jitter_s: float = 0.5
    breaker_failures: int = 5
    breaker_cooldown_s: float = 10.0


@dataclass
class AlertRule:
    threshold: float = MISSING
    level: str = "warning"
    action: str = "warn"


@dataclass
class AlertsConfig:
    reject_rate: AlertRule = field(default_factory=lambda: AlertRule(0.05, "critical", "warn"))
    memory_fraction: AlertRule = field(default_factory=lambda: AlertRule(0.80, "warning", "warn"))
    pool_utilisation: AlertRule = field(default_factory=lambda: AlertRule(0.90, "warning", "warn"))
    stall_seconds: AlertRule = field(default_factory=lambda: AlertRule(300.0, "critical", "warn"))
    sinks: List[str] = field(default_factory=lambda: ["log"])
    jsonl_path: Optional[str] = None
    webhook_url: Optional[str] = None


@dataclass
class EnvConfig:
    name: str = "local"
    # None starts a local Ray; "auto" or ray://host:port joins an existing cluster.
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    object_store_memory: Optional[int] = 1_000_000_000
    ship_code: bool = False
    progress_bars: bool = True
    # ray: always the Ray Data pipeline. inprocess: the same read/parse/write stages in the
    # driver (a parse thread, pool.writers writer threads). auto: inprocess for a local run
    # whose files to load total at most inprocess_max_bytes (Ray's start-up would be most of
    # the run) or whose machine has at most inprocess_max_cpus cores (Ray's processes cost
    # more CPU than they add there), else ray.
    executor: str = "auto"
    inprocess_max_bytes: int = 32 * 1024 * 1024
    inprocess_max_cpus: int = 2
    # The run's deadline in seconds (0 = none): past it the run stops like an interrupt (committed
    # batches stay for the resume) and fails transient (exit 4) with "run deadline exceeded".
    max_run_seconds: float = 0


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None
    experiment: str = "loadkit"
    # When MLflow is written (see loadkit.tracking.RunTracker): sync (the run id is known when the
    # run returns), background (a short run's record is written by a detached process, so the
    # shell is not held), auto (background for a single run from the command line, else sync).
    flush: str = "auto"
    # background: a run still going after this many seconds opens the store and logs live.
    live_after_s: float = 20.0
    # Log report.html (plots, summary, rejects sample: loadkit.report) with the run's artifacts.
    report: bool = True


@dataclass
class TelemetryConfig:
    """Live observability of a run (see loadkit.prom and loadkit.telemetry)."""

    # Serve Prometheus /metrics and /healthz on metrics_host:metrics_port while a run streams;
    # None: off, 0: any free port (logged at start).
    metrics_port: Optional[int] = None
    metrics_host: str = "127.0.0.1"
    # OpenTelemetry spans run -> table -> file -> batch: off, console (stderr) or otlp (to otlp_endpoint).
    tracing: str = "off"
    otlp_endpoint: Optional[str] = None


@dataclass
class LoggingConfig:
    format: str = "text"
    level: str = "INFO"


@dataclass
class LoadkitConfig:
    # Run parameters; each is required only by jobs that use it (JobConfig.params).
    year: Optional[int] = None
    month: Optional[int] = None
    day: Optional[int] = None
    # An arbitrary partition key ({partition} in path templates), e.g. a region or batch label.
    partition: Optional[str] = None
    data_root: str = "data"
    force: bool = False
    # The fetch stage (job.remote): auto downloads the month when its folder under data_root is missing,
    # empty or half-fetched, then loads; always lists the remote and downloads whatever is missing or
    # incomplete, then loads; only downloads (no load); never loads what is on disk.
    fetch: str = "auto"
    job: Optional[JobConfig] = None
    sink: SinkConfig = field(default_factory=SinkConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


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
    if isinstance(cfg, LoadkitConfig):
        obj = cfg
    else:
        try:
            composed = OmegaConf.to_object(cfg)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None)
            raise ConfigError(f"invalid configuration: {exc.msg if hasattr(exc, 'msg') else exc}", key=key) from None
        if not isinstance(composed, LoadkitConfig):
            raise ConfigError("configuration does not follow the loadkit schema")
        obj = composed
    validate(obj)
    return obj


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(message, key=key)


def validate(cfg: LoadkitConfig) -> None:
    """Cross-field checks that types alone cannot express. Raises ConfigError naming the key."""
    _require(cfg.job is not None, "job", "no job selected: add +job=<name> (e.g. +job=monthly)")
    assert cfg.job is not None
    _validate_params(cfg, job_params(cfg.job))
    _validate_batch(cfg.batch)
    _require(cfg.sink.copy_encoder in ("pgpq", "adbc"), "sink.copy_encoder",
             f"sink.copy_encoder must be pgpq or adbc, got {cfg.sink.copy_encoder!r}")
    _require(cfg.pool.writers >= 1, "pool.writers", "pool.writers must be >= 1")
    _require(cfg.pool.connections_per_writer >= 1, "pool.connections_per_writer",
             "pool.connections_per_writer must be >= 1")
    _require(cfg.pool.parse_concurrency >= 0, "pool.parse_concurrency", "pool.parse_concurrency must be >= 0")
    _require(cfg.pool.read_splits >= 1, "pool.read_splits", "pool.read_splits must be >= 1")
    _validate_retry(cfg.retry)
    _validate_alerts(cfg.alerts)
    _require(cfg.env.name in ("local", "cluster", "prod"), "env.name", "env.name must be local, cluster or prod")
    _require(cfg.env.executor in ("auto", "ray", "inprocess"), "env.executor",
             f"env.executor must be auto, ray or inprocess, got {cfg.env.executor!r}")
    _require(cfg.env.inprocess_max_bytes >= 0, "env.inprocess_max_bytes", "env.inprocess_max_bytes must be >= 0")
    _require(cfg.env.inprocess_max_cpus >= 0, "env.inprocess_max_cpus", "env.inprocess_max_cpus must be >= 0")
    _require(cfg.tracking.flush in ("auto", "sync", "background"), "tracking.flush",
             f"tracking.flush must be auto, sync or background, got {cfg.tracking.flush!r}")
    _require(cfg.telemetry.metrics_port is None or 0 <= cfg.telemetry.metrics_port <= 65535,
             "telemetry.metrics_port", "telemetry.metrics_port must be null or 0..65535")
    _require(cfg.telemetry.tracing in ("off", "console", "otlp"), "telemetry.tracing",
             f"telemetry.tracing must be off, console or otlp, got {cfg.telemetry.tracing!r}")
    _require(cfg.telemetry.tracing != "otlp" or bool(cfg.telemetry.otlp_endpoint), "telemetry.otlp_endpoint",
             "telemetry.tracing=otlp needs telemetry.otlp_endpoint")
    _require(cfg.tracking.live_after_s >= 0, "tracking.live_after_s", "tracking.live_after_s must be >= 0")
    _require(cfg.logging.format in ("text", "json"), "logging.format", "logging.format must be text or json")
    for key in ("connect_timeout", "statement_timeout_ms", "lock_timeout_ms"):
        _require(getattr(cfg.sink, key) >= 0, f"sink.{key}", f"sink.{key} must be >= 0 (0 = no limit)")
    _require(cfg.env.max_run_seconds >= 0, "env.max_run_seconds", "env.max_run_seconds must be >= 0 (0 = none)")
    _require(IDENTIFIER.match(cfg.sink.ledger_schema) is not None, "sink.ledger_schema",
             f"not a valid SQL identifier: {cfg.sink.ledger_schema!r}")
    assert cfg.job is not None
    _validate_job(cfg.job)
    _validate_fetch(cfg)


def _validate_fetch(cfg: LoadkitConfig) -> None:
    _require(cfg.fetch in ("auto", "always", "only", "never"), "fetch",
             f"fetch must be auto, always, only or never, got {cfg.fetch!r}")
    _require(cfg.pool.downloads >= 1, "pool.downloads", "pool.downloads must be >= 1")
    remote = cfg.job.remote if cfg.job is not None else RemoteConfig()
    _require(cfg.fetch != "only" or bool(remote.url), "job.remote.url", "fetch=only needs job.remote.url")
    _require(remote.discovery in ("webdav", "html", "list"), "job.remote.discovery",
             f"job.remote.discovery must be webdav, html or list, got {remote.discovery!r}")
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
    _require(b.policy in ("fixed", "adaptive"), "batch.policy", "batch.policy must be fixed or adaptive")
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
        _require(rule.level in ("info", "warning", "critical"), f"alerts.{name}.level",
                 "alert level must be info, warning or critical")
        _require(rule.action in ("warn", "abort"), f"alerts.{name}.action", "alert action must be warn or abort")
        _require(rule.threshold >= 0, f"alerts.{name}.threshold", "alert threshold must be >= 0")
    for sink in a.sinks:
        _require(sink in ("log", "jsonl", "webhook"), "alerts.sinks", f"unknown alert sink {sink!r}")
    _require("jsonl" not in a.sinks or bool(a.jsonl_path), "alerts.jsonl_path",
             "alerts.sinks has jsonl but no jsonl_path")
    _require("webhook" not in a.sinks or bool(a.webhook_url), "alerts.webhook_url",
             "alerts.sinks has webhook but no webhook_url")


def _validate_job(job: JobConfig) -> None:
    _require(IDENTIFIER.match(job.schema) is not None, "job.schema", f"not a valid SQL identifier: {job.schema!r}")
    _require(bool(job.tables), "job.tables", "the job declares no tables")
    _require(job.verify in ("exists", "count", "off"), "job.verify", "job.verify must be exists, count or off")
    _require(job.on_drift in ("reload", "stop"), "job.on_drift", "job.on_drift must be reload or stop")
    for tname, table in job.tables.items():
        _validate_table(tname, table)


def _validate_table(tname: str, t: TableConfig) -> None:
    k = f"job.tables.{tname}"
    _require(IDENTIFIER.match(tname) is not None, k, f"table name is not a valid SQL identifier: {tname!r}")
    _require(t.mode in WRITE_MODES, f"{k}.mode", f"mode must be one of {WRITE_MODES}, got {t.mode!r}")
    _require(t.source.format in FORMATS, f"{k}.source.format",
             f"format must be one of {FORMATS}, got {t.source.format!r}")
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
        _require(col.on_invalid in ON_INVALID, f"{ck}.on_invalid", f"on_invalid must be one of {ON_INVALID}")
        _require(col.format is None or col.type in ("date", "timestamp"), f"{ck}.format",
                 "format applies to date/timestamp columns only")
        _require(col.name not in names, f"{ck}.name", f"duplicate column {col.name!r}")
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


ORDERABLE = ("smallint", "integer", "bigint", "numeric", "double", "date", "timestamp")


def bound_value(kind: str, text: str) -> Any:
    """A column's min/max as a Python value of its kind (int, Decimal, float, date, naive datetime).

    Raises ValueError when the text is not a literal of that kind or the kind is not orderable."""
    import datetime as dt
    from decimal import Decimal, InvalidOperation

    text = str(text).strip()
    if kind in ("smallint", "integer", "bigint"):
        return int(text)
    if kind in ("numeric", "double"):
        try:
            value = Decimal(text)
        except InvalidOperation:
            raise ValueError(f"not a number: {text!r}") from None
        if not value.is_finite():
            raise ValueError(f"not a finite number: {text!r}")
        return value if kind == "numeric" else float(value)
    if kind == "date":
        return dt.date.fromisoformat(text)
    if kind == "timestamp":
        moment = dt.datetime.fromisoformat(text)
        if moment.tzinfo is not None:
            raise ValueError("timestamp columns are without time zone: give a bound without an offset")
        return moment
    raise ValueError(f"min/max do not apply to {kind} columns (allowed: {', '.join(ORDERABLE)})")


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
    _require(d.quoting in QUOTING, f"{k}.quoting", f"quoting must be one of {QUOTING}, got {d.quoting!r}")
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
