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
    newlines_in_values: bool = True
    strip_nul: bool = True
    trim: bool = False


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


@dataclass
class ColumnConfig:
    name: str = MISSING
    type: str = "text"
    nullable: bool = True
    # Extra null markers for this column (e.g. "0", "00000000" for dates some sources leave blank).
    null_values: List[str] = field(default_factory=list)
    # strptime format for date/timestamp columns.
    format: Optional[str] = None
    # Numbers written as 1.234,56 (dot thousands, decimal comma).
    decimal_comma: bool = False
    # Left-pad with zeros to this width (codes whose leading zero was lost upstream).
    zfill: Optional[int] = None
    # What to do with a value that does not parse: reject the row, or store NULL (counted).
    on_invalid: str = "reject"
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
class JobConfig:
    name: str = MISSING
    schema: str = "public"
    tables: Dict[str, TableConfig] = field(default_factory=dict)
    migrate: MigrateConfig = field(default_factory=MigrateConfig)


@dataclass
class SinkConfig:
    # None: use LOADKIT_DSN, else an embedded PostgreSQL under embedded_dir.
    dsn: Optional[str] = None
    embedded_dir: str = ".loadkit/pgdata"
    ledger_schema: str = "loadkit"
    # Seconds libpq waits for a connection (every driver and writer connection); 0 waits forever.
    connect_timeout: int = 10
    # Server-side statement_timeout of every loadkit session, ms (0 = none). A statement over it
    # fails with 57014 and is retried as transient (a COPY batch, a ledger query, a finalize step).
    statement_timeout_ms: int = 0
    # Server-side lock_timeout of every loadkit session, ms (0 = none): a statement waiting longer
    # for a lock (a reader holding the table a finalize swaps) fails with 55P03 and is retried.
    lock_timeout_ms: int = 0


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


@dataclass
class LoggingConfig:
    format: str = "text"
    level: str = "INFO"


@dataclass
class LoadkitConfig:
    year: int = MISSING
    month: int = MISSING
    data_root: str = "data"
    force: bool = False
    job: Optional[JobConfig] = None
    sink: SinkConfig = field(default_factory=SinkConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register() -> None:
    """Register the schema so conf/config.yaml can name it in its defaults list."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="loadkit_schema", node=LoadkitConfig)


def to_config(cfg: DictConfig | LoadkitConfig) -> LoadkitConfig:
    """Turn a composed DictConfig into the typed object and validate it."""
    if isinstance(cfg, LoadkitConfig):
        obj = cfg
    else:
        try:
            obj = OmegaConf.to_object(cfg)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None)
            raise ConfigError(f"invalid configuration: {exc.msg if hasattr(exc, 'msg') else exc}", key=key) from None
        if not isinstance(obj, LoadkitConfig):
            raise ConfigError("configuration does not follow the loadkit schema")
    validate(obj)
    return obj


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(message, key=key)


def validate(cfg: LoadkitConfig) -> None:
    """Cross-field checks that types alone cannot express. Raises ConfigError naming the key."""
    _require(1900 <= cfg.year <= 2100, "year", f"year must be between 1900 and 2100, got {cfg.year}")
    _require(1 <= cfg.month <= 12, "month", f"month must be 1..12, got {cfg.month}")
    _require(cfg.job is not None, "job", "no job selected: add +job=<name> (e.g. +job=monthly)")
    _validate_batch(cfg.batch)
    _require(cfg.pool.writers >= 1, "pool.writers", "pool.writers must be >= 1")
    _require(cfg.pool.connections_per_writer >= 1, "pool.connections_per_writer", "pool.connections_per_writer must be >= 1")
    _require(cfg.pool.parse_concurrency >= 0, "pool.parse_concurrency", "pool.parse_concurrency must be >= 0")
    _require(cfg.pool.read_splits >= 1, "pool.read_splits", "pool.read_splits must be >= 1")
    _validate_retry(cfg.retry)
    _validate_alerts(cfg.alerts)
    _require(cfg.env.name in ("local", "cluster", "prod"), "env.name", "env.name must be local, cluster or prod")
    _require(cfg.env.executor in ("auto", "ray", "inprocess"), "env.executor",
             f"env.executor must be auto, ray or inprocess, got {cfg.env.executor!r}")
    _require(cfg.env.inprocess_max_bytes >= 0, "env.inprocess_max_bytes", "env.inprocess_max_bytes must be >= 0")
    _require(cfg.env.inprocess_max_cpus >= 0, "env.inprocess_max_cpus", "env.inprocess_max_cpus must be >= 0")
    _require(cfg.logging.format in ("text", "json"), "logging.format", "logging.format must be text or json")
    for key in ("connect_timeout", "statement_timeout_ms", "lock_timeout_ms"):
        _require(getattr(cfg.sink, key) >= 0, f"sink.{key}", f"sink.{key} must be >= 0 (0 = no limit)")
    _require(cfg.env.max_run_seconds >= 0, "env.max_run_seconds", "env.max_run_seconds must be >= 0 (0 = none)")
    _require(IDENTIFIER.match(cfg.sink.ledger_schema) is not None, "sink.ledger_schema",
             f"not a valid SQL identifier: {cfg.sink.ledger_schema!r}")
    assert cfg.job is not None
    _validate_job(cfg.job)


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
    _require("jsonl" not in a.sinks or bool(a.jsonl_path), "alerts.jsonl_path", "alerts.sinks has jsonl but no jsonl_path")
    _require("webhook" not in a.sinks or bool(a.webhook_url), "alerts.webhook_url", "alerts.sinks has webhook but no webhook_url")


def _validate_job(job: JobConfig) -> None:
    _require(IDENTIFIER.match(job.schema) is not None, "job.schema", f"not a valid SQL identifier: {job.schema!r}")
    _require(bool(job.tables), "job.tables", "the job declares no tables")
    for tname, table in job.tables.items():
        _validate_table(tname, table)


def _validate_table(tname: str, t: TableConfig) -> None:
    k = f"job.tables.{tname}"
    _require(IDENTIFIER.match(tname) is not None, k, f"table name is not a valid SQL identifier: {tname!r}")
    _require(t.mode in WRITE_MODES, f"{k}.mode", f"mode must be one of {WRITE_MODES}, got {t.mode!r}")
    _require(t.source.format in FORMATS, f"{k}.source.format", f"format must be one of {FORMATS}, got {t.source.format!r}")
    _require(bool(t.source.paths), f"{k}.source.paths", "no source paths declared")
    _validate_dialect(f"{k}.source.dialect", t.source.dialect)
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
    _require(0.0 <= t.max_reject_rate <= 1.0, f"{k}.max_reject_rate", "max_reject_rate must be within 0..1")
    _require(t.max_rejects is None or t.max_rejects >= 0, f"{k}.max_rejects", "max_rejects must be >= 0")


def _validate_dialect(k: str, d: DialectConfig) -> None:
    _require(len(d.delimiter) == 1, f"{k}.delimiter", f"delimiter must be one character, got {d.delimiter!r}")
    _require(d.quote is None or len(d.quote) == 1, f"{k}.quote", "quote must be one character or null")
    _require(d.escape is None or len(d.escape) == 1, f"{k}.escape", "escape must be one character or null")
    _require(d.delimiter != d.quote, f"{k}.delimiter", "delimiter and quote must differ")
    _require(not d.match_by_name or d.header, f"{k}.match_by_name", "match_by_name needs header=true")
    try:
        "".encode(d.encoding)
    except LookupError:
        raise ConfigError(f"unknown encoding {d.encoding!r}", key=f"{k}.encoding") from None


def as_plain_dict(cfg: Any) -> Dict[str, Any]:
    """A plain nested dict of any config (for params/artifacts; mask before saving)."""
    if is_dataclass(cfg) and not isinstance(cfg, type):  # ~100x faster than a round trip through OmegaConf
        return asdict(cfg)
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
