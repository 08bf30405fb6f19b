"""Compile a validated config into a frozen LoadPlan: what to load, where, and how.

The plan is plain frozen dataclasses (no OmegaConf, no callables), so it pickles
cheaply into Ray workers and can be logged as an artifact.
"""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from loadkit.source import files
from loadkit.config import (
    AlertRule,
    AlertsConfig,
    BatchConfig,
    ColumnConfig,
    JobConfig,
    LoadkitConfig,
    TableConfig,
    as_plain_dict,
    job_params,
)
from loadkit.errors import ConfigError, SourceDataError
from loadkit.security import confine, mask_dsn, render_path_template

# Reserved bookkeeping columns. _lk_batch traces every row to the batch that wrote it.
BATCH_COL = "_lk_batch"
ROW_COL = "_lk_row"
PERIOD_COL = "ref_period"
# The ledger period of a job that takes no run parameters (a one-off load).
NO_PERIOD = "all"


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str  # text|char|varchar|smallint|integer|bigint|double|numeric|date|timestamp|boolean
    length: Optional[int] = None
    precision: Optional[int] = None
    scale: Optional[int] = None
    nullable: bool = True
    null_values: Tuple[str, ...] = ()
    format: Optional[str] = None
    decimal_comma: bool = False
    zfill: Optional[int] = None
    on_invalid: str = "reject"
    min: Optional[str] = None
    max: Optional[str] = None
    collation: Optional[str] = None  # ColumnConfig.collation: emitted as COLLATE "<name>" in table DDL

    @property
    def collate(self) -> str:
        """' COLLATE "<name>"' for a column with a declared collation, else ''."""
        return f' COLLATE "{self.collation}"' if self.collation else ""

    @property
    def sql_type(self) -> str:
        if self.kind in ("char", "varchar"):
            return f"{self.kind}({self.length})"
        if self.kind == "numeric":
            return f"numeric({self.precision},{self.scale})"
        if self.kind == "double":
            return "double precision"
        return self.kind


@dataclass(frozen=True)
class Dialect:
    delimiter: str
    quote: Optional[str]
    escape: Optional[str]
    header: bool
    match_by_name: bool
    encoding: str
    null_values: Tuple[str, ...]
    newlines_in_values: bool
    strip_nul: bool
    trim: bool
    quoting: str = "strict"  # strict | lenient (see DialectConfig and loadkit.source.scanner)
    max_record_bytes: int = 16 * 1024 * 1024
    skip_lines: int = 0
    quoted_can_be_null: bool = True
    server_transcode: bool = True  # PostgreSQL transcodes latin-1 text columns (transform.server_encoding)


@dataclass(frozen=True)
class FileSpec:
    path: str  # absolute, or an fsspec URL (s3://, gs://, http(s)://) the read tasks open themselves
    rel: str  # relative to the data root, for humans
    ordinal: int  # position in the table's sorted file list: later files win on duplicate keys
    size: int
    sha256: str


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: str
    mode: str
    columns: Tuple[ColumnSpec, ...]
    key: Tuple[str, ...]
    derived_key: Optional[Tuple[str, Tuple[str, ...]]]
    indexes: Tuple[Tuple[str, ...], ...]
    format: str
    member: Optional[str]
    dialect: Dialect
    allow_empty: bool
    files: Tuple[FileSpec, ...]
    max_reject_rate: float
    max_rejects: Optional[int]

    @property
    def column_names(self) -> Tuple[str, ...]:
        names = tuple(c.name for c in self.columns)
        return names + ((self.derived_key[0],) if self.derived_key else ())

    @property
    def load_table(self) -> str:
        """The physical table batches are COPYed into: the target itself, or its staging table."""
        return self.name if self.mode == "append" else staging_name(self.name, self.period_tag)

    @property
    def load_schema(self) -> str:
        """The schema of ``load_table``: the target's (append), or loadkit's staging schema beside it,
        so no loadkit object is left in the user's schema."""
        return self.schema if self.mode == "append" else staging_schema(self.schema)

    period_tag: str = ""
    delete_missing: bool = False  # merge: delete (or close, with history) keys the month no longer has
    history: bool = False
    max_member_bytes: Optional[int] = None  # decompression guards (SourceConfig)
    max_compression_ratio: Optional[float] = None


@dataclass(frozen=True)
class BatchPolicy:
    policy: str
    size: int
    min_size: int
    max_size: int
    read_block_bytes: int
    window_s: float  # adaptive: seconds of evidence per move
    memory_ceiling: float  # adaptive: host memory fraction above which the size halves


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    initial_wait_s: float
    max_wait_s: float
    multiplier: float
    jitter_s: float
    breaker_failures: int
    breaker_cooldown_s: float


@dataclass(frozen=True)
class SinkPlan:
    """Where and how to connect (SinkConfig, resolved; the DSN is still the configured one or None)."""

    dsn: Optional[str] = field(repr=False)  # may hold a password: never in a repr or log line
    embedded_dir: str
    ledger_schema: str
    connect_timeout: int  # seconds, 0 = forever
    statement_timeout_ms: int  # 0 = none
    lock_timeout_ms: int  # 0 = none
    copy_encoder: str = "pgpq"  # the writers' binary COPY encoder: pgpq | adbc (postgres/copy.py)
    compare_work_mem: str = "256MB"  # work_mem of a merge reload's compare (postgres/modes.py: Merge._unchanged)
    publish_early: bool = True  # a table publishes once all its files are read (runner.EarlyPublish)
    maintenance_work_mem: str = "512MB"  # of each publish transaction: its key and index builds (sink.py)


@dataclass(frozen=True)
class EnvPlan:
    """Where the run executes (EnvConfig)."""

    name: str
    address: Optional[str]
    num_cpus: Optional[int]
    object_store_memory: Optional[int]
    ship_code: bool
    progress_bars: bool
    executor: str  # auto | ray | inprocess
    inprocess_max_bytes: int
    inprocess_max_cpus: int
    max_run_seconds: float  # 0 = no deadline
    worker_logs: bool = True  # a local Ray streams its workers' output to the driver (Ray's log monitor)


@dataclass(frozen=True)
class AlertRuleSpec:
    """One alert rule (AlertRule): fires once per subject when a value exceeds threshold."""

    threshold: float
    level: str  # info | warning | critical
    action: str  # warn | abort


@dataclass(frozen=True)
class AlertsPlan:
    """The alert rules and where alerts go (AlertsConfig)."""

    reject_rate: AlertRuleSpec
    memory_fraction: AlertRuleSpec
    pool_utilisation: AlertRuleSpec
    stall_seconds: AlertRuleSpec
    sinks: Tuple[str, ...]
    jsonl_path: Optional[str]
    webhook_url: Optional[str]


@dataclass(frozen=True)
class TrackingPlan:
    """MLflow tracking (TrackingConfig)."""

    enabled: bool
    uri: Optional[str]
    experiment: str
    flush: str  # auto | sync | background
    live_after_s: float
    report: bool


@dataclass(frozen=True)
class TelemetryPlan:
    """Live observability (TelemetryConfig)."""

    metrics_port: Optional[int]
    metrics_host: str
    tracing: str  # off | console | otlp
    otlp_endpoint: Optional[str]


@dataclass(frozen=True)
class MigratePolicy:
    """What a run may change on an existing table (MigrateConfig)."""

    add_columns: bool
    alter_types: bool
    allow_extra_columns: bool


@dataclass(frozen=True)
class FetchPlan:
    """The fetch stage (job.remote, fetch, pool.downloads), resolved without touching the file system,
    so it can run before ``build_plan`` lists the files it downloads."""

    mode: str  # auto | always | only | never
    url: Optional[str]  # None: no fetch stage
    discovery: str
    files: Tuple[str, ...]
    include: Tuple[str, ...]
    attempts: int
    initial_wait_s: float
    max_wait_s: float
    timeout_s: float
    verify_zip: bool
    root_url: Optional[str]
    storage_options: Tuple[Tuple[str, Any], ...]
    downloads: int
    progress_bars: bool
    data_root: str  # expanded, not resolved (as the fetch stage always used it)
    year: Optional[int]
    month: Optional[int]


@dataclass(frozen=True)
class LoadPlan:
    run_id: str
    job: str
    year: Optional[int]
    month: Optional[int]
    force: bool
    ledger_schema: str
    tables: Tuple[TableSpec, ...]
    batch: BatchPolicy
    retry: RetryPolicy
    writers: int
    connections_per_writer: int
    pre_ping: bool
    parse_concurrency: int
    sink: SinkPlan
    env: EnvPlan
    alerts: AlertsPlan
    tracking: TrackingPlan
    telemetry: TelemetryPlan
    migrate: MigratePolicy
    fetch: FetchPlan
    verify: str  # job.verify: exists | count | off
    on_drift: str  # job.on_drift: reload | stop
    # The whole validated config as JSON (sink.dsn masked): the run's parameters for the ledger and MLflow.
    settings: str
    data_root: str = ""
    read_splits: int = 1
    parse_threads: int = 0  # in-process parse threads (0: one per two cores, execute.inprocess.parse_threads)
    # The ledger's period key of this run (see period_key); "" means year-month.
    period_key: str = ""
    params: Tuple[Tuple[str, Any], ...] = ()  # the run parameters the job uses, (name, value)

    @property
    def period(self) -> str:
        """The ledger period of this run: "2024-05" for a monthly job, "all" for a one-off load."""
        if self.period_key:
            return self.period_key
        return f"{self.year:04d}-{self.month:02d}"

    def settings_dict(self) -> Dict[str, Any]:
        """The run's configuration as a fresh plain nested dict (sink.dsn masked)."""
        data: Dict[str, Any] = json.loads(self.settings)
        return data

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)


def staging_schema(schema: str) -> str:
    """``<target schema>__lk_stage``: loadkit's own schema for the staging tables of that schema (UNLOGGED, except a
    merge first load's direct staging, which is logged: it becomes the target, see postgres.modes)."""
    return f"{schema}__lk_stage"


def staging_name(table: str, period_tag: str) -> str:
    name = f"{table}__lk_stage_{period_tag}"
    if len(name) > 63:
        raise ConfigError(f"table name {table!r} too long for its staging table", key=f"job.tables.{table}")
    return name


def batch_id(table: str, period: str, file_sha: str, member: str, start: int) -> int:
    """A deterministic signed 64-bit id for a batch: same bytes, same id, in every run."""
    raw = f"{table}|{period}|{file_sha}|{member}|{start}".encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)


def read_rules(table: TableSpec) -> str:
    """A fingerprint (16 hex digits) of everything that turns one of ``table``'s files into rows: its format,
    archive member, dialect and columns (kinds, rules, null markers, formats, ...) and derived key, as declared.

    The writer stores it with every batch (ledger ``batch.rules``). A file's committed byte ranges are record
    boundaries only under the rules that cut them, and its rows are what those rules made of the bytes: a
    resume under other rules -- a dialect, a null marker, a date format changed since the crash -- would start
    reading mid-record or load one file by two sets of rules. So a file whose committed batches carry another
    fingerprint is read again whole (postgres.sink, at the run's start). Not in it: the batch size, pool and
    sink settings, the schema names (none changes what a record is or holds)."""
    declared = {"format": table.format, "member": table.member, "dialect": asdict(table.dialect),
                "columns": [asdict(c) for c in table.columns], "derived_key": table.derived_key}
    text = json.dumps(declared, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"read-rules-v1:{text}".encode()).hexdigest()[:16]


_TYPE = re.compile(r"^(?P<kind>[a-z]+)(\((?P<a>\d+)(,(?P<b>\d+))?\))?$")


def column_spec(col: ColumnConfig) -> ColumnSpec:
    m = _TYPE.match(col.type)
    if m is None:  # config validation already refused it; keep the plan total
        raise ConfigError(f"unknown column type {col.type!r}", key=col.name)
    kind, a, b = m.group("kind"), m.group("a"), m.group("b")
    return ColumnSpec(
        name=col.name,
        kind=kind,
        length=int(a) if kind in ("char", "varchar") else None,
        precision=int(a) if kind == "numeric" else None,
        scale=int(b) if kind == "numeric" and b is not None else None,
        nullable=col.nullable,
        null_values=tuple(col.null_values),
        format=col.format or ("%Y%m%d" if kind == "date" else "%Y-%m-%d %H:%M:%S" if kind == "timestamp" else None),
        decimal_comma=col.decimal_comma,
        zfill=col.zfill,
        on_invalid=str(col.on_invalid),
        min=col.min,
        max=col.max,
        collation=col.collation,
    )


def column_from(values: Mapping[str, Any]) -> ColumnSpec:
    """The ColumnSpec of a column declared as a mapping of ColumnConfig keys (loadkit init's guesses)."""
    return column_spec(ColumnConfig(**values))


def run_params(cfg: LoadkitConfig) -> Dict[str, Any]:
    """name -> value of the run parameters the job uses (validated: none is missing)."""
    assert cfg.job is not None
    return {p: getattr(cfg, p) for p in job_params(cfg.job)}


def period_key(job: JobConfig, values: Dict[str, Any]) -> str:
    """The ledger period for these parameter values: job.period rendered, else
    "YYYY-MM[-DD]" from year/month/day, "/<partition>" appended, or NO_PERIOD for none."""
    if job.period:
        return render_path_template(job.period, values)
    parts = []
    if "year" in values:
        parts.append(f"{values['year']:04d}")
    if "month" in values:
        parts.append(f"{values['month']:02d}")
    if "day" in values:
        parts.append(f"{values['day']:02d}")
    key = "-".join(parts)
    if "partition" in values:
        key = f"{key}/{values['partition']}" if key else str(values["partition"])
    return key or NO_PERIOD


def period_tag(period: str, values: Dict[str, Any]) -> str:
    """An identifier-safe tag of the period for staging names, one per period: YYYYMM for a monthly
    job (the snapshot partition value), the digits of a YYYY[-MM[-DD]] period, "all" for a job
    without parameters, else "p" + a 48-bit hash of the period (partition keys may hold anything)."""
    if set(values) == {"year", "month"}:
        return f"{values['year']:04d}{values['month']:02d}"
    if period == NO_PERIOD or re.fullmatch(r"\d{4}(-\d{2}){0,2}", period):
        return period.replace("-", "")
    return "p" + hashlib.blake2b(period.encode(), digest_size=6).hexdigest()


def _resolve_files(name: str, t: TableConfig, root: Path, values: Dict[str, Any], url_root: Optional[str] = None,
                   fingerprint: Callable[[Path], str] = files.fingerprint) -> Tuple[FileSpec, ...]:
    rendered = [render_path_template(template, values) for template in t.source.paths]
    if url_root is not None or any(files.is_url(p) for p in rendered):  # an object store: read via fsspec
        urls = [files.url_join(url_root, p) if url_root else p for p in rendered]
        if not all(files.is_url(u) for u in urls):
            raise ConfigError("a table's source paths are all URLs or all local paths", key=f"job.tables.{name}")
        return tuple(FileSpec(path=f.path, rel=f.rel, ordinal=i, size=f.size, sha256=f.fingerprint)
                     for i, f in enumerate(files.discover_urls(urls)))
    paths = _local_paths(rendered, root)
    return tuple(
        FileSpec(
            path=str(confine(p, root)),
            rel=str(p.relative_to(root)),
            ordinal=i,
            size=p.stat().st_size,
            sha256=fingerprint(p),
        )
        for i, p in enumerate(paths)
    )


def _local_paths(rendered: List[str], root: Path) -> List[Path]:
    """A table's local source files: its rendered patterns, each confined to the data root, discovered."""
    for pattern in rendered:
        confine(root / pattern, root)
    return files.discover(root, rendered)


def _hash_ahead(fingerprints: "files.Fingerprints", enabled: List[Tuple[str, TableConfig]], root: Path,
                values: Dict[str, Any]) -> None:
    """Start hashing every local source file of the run before the table specs ask for them, so the
    files of all tables hash at once (one thread per core) instead of one after the other. Patterns
    that are URLs are left to _resolve_files; so are errors: this is the same discovery it repeats,
    raising the same error there, in table order."""
    for _, t in enabled:
        rendered = [render_path_template(template, values) for template in t.source.paths]
        if any(files.is_url(p) for p in rendered):
            continue
        try:
            fingerprints.start(_local_paths(rendered, root))
        except (ConfigError, SourceDataError):
            return  # raised again, in order, by _resolve_files


def _table_spec(name: str, t: TableConfig, schema: str, root: Path, values: Dict[str, Any], tag: str,
                url_root: Optional[str] = None, fingerprint: Callable[[Path], str] = files.fingerprint) -> TableSpec:
    d = t.source.dialect
    return TableSpec(
        name=name,
        schema=schema,
        mode=str(t.mode),
        columns=tuple(column_spec(c) for c in t.columns),
        key=tuple(t.key),
        derived_key=(t.derived_key.name, tuple(t.derived_key.columns)) if t.derived_key else None,
        indexes=tuple(tuple(i) for i in t.indexes),
        format=str(t.source.format),
        member=t.source.member,
        dialect=Dialect(
            delimiter=d.delimiter, quote=d.quote, escape=d.escape, header=d.header,
            match_by_name=d.match_by_name, encoding=d.encoding, null_values=tuple(d.null_values),
            newlines_in_values=d.newlines_in_values, strip_nul=d.strip_nul, trim=d.trim,
            quoting=str(d.quoting), max_record_bytes=d.max_record_bytes, skip_lines=d.skip_lines,
            quoted_can_be_null=d.quoted_can_be_null, server_transcode=d.server_transcode,
        ),
        allow_empty=t.source.allow_empty,
        files=_resolve_files(name, t, root, values, url_root, fingerprint),
        max_reject_rate=t.max_reject_rate,
        max_rejects=t.max_rejects,
        period_tag=tag,
        delete_missing=t.delete_missing and t.mode == "merge",
        history=t.history and t.delete_missing and t.mode == "merge",
        max_member_bytes=t.source.max_member_bytes,
        max_compression_ratio=t.source.max_compression_ratio,
    )


def sink_plan(cfg: LoadkitConfig) -> SinkPlan:
    s = cfg.sink
    return SinkPlan(s.dsn, s.embedded_dir, s.ledger_schema, s.connect_timeout, s.statement_timeout_ms,
                    s.lock_timeout_ms, str(s.copy_encoder), s.compare_work_mem, s.publish_early,
                    s.maintenance_work_mem)


def _rule(r: AlertRule) -> AlertRuleSpec:
    return AlertRuleSpec(float(r.threshold), str(r.level), str(r.action))


def alerts_plan(a: AlertsConfig) -> AlertsPlan:
    """The frozen alert rules of an AlertsConfig (also used by loadkit.reload for a hot reload)."""
    return AlertsPlan(_rule(a.reject_rate), _rule(a.memory_fraction), _rule(a.pool_utilisation),
                      _rule(a.stall_seconds), tuple(str(s) for s in a.sinks), a.jsonl_path, a.webhook_url)


def batch_policy(b: BatchConfig) -> BatchPolicy:
    """The frozen batch policy of a BatchConfig (also used by loadkit.reload for a hot reload)."""
    return BatchPolicy(str(b.policy), b.size, b.min_size, b.max_size, b.read_block_bytes, b.window_s, b.memory_ceiling)


def reloaded_policies(conf_dir: str, overrides: List[str], year: Optional[int],
                      month: Optional[int]) -> Tuple[AlertsPlan, BatchPolicy]:
    """The alert rules and batch policy the config files say now (loadkit.reload); ConfigError if invalid."""
    from loadkit.config import compose_groups

    alerts, batch = compose_groups(conf_dir, overrides, year, month)
    return alerts_plan(alerts), batch_policy(batch)


def fetch_plan(cfg: LoadkitConfig) -> FetchPlan:
    """The fetch stage's settings; lists nothing, so it runs before the files exist."""
    from loadkit.config import RemoteConfig

    remote = cfg.job.remote if cfg.job is not None else RemoteConfig()
    return FetchPlan(
        mode=str(cfg.fetch), url=remote.url, discovery=str(remote.discovery), files=tuple(remote.files),
        include=tuple(remote.include), attempts=remote.attempts, initial_wait_s=remote.initial_wait_s,
        max_wait_s=remote.max_wait_s, timeout_s=remote.timeout_s, verify_zip=remote.verify_zip,
        root_url=remote.root_url, storage_options=tuple(dict(remote.storage_options).items()),
        downloads=cfg.pool.downloads, progress_bars=cfg.env.progress_bars,
        data_root=cfg.data_root if files.is_url(cfg.data_root) else str(Path(cfg.data_root).expanduser()),
        year=cfg.year, month=cfg.month,
    )


def settings_json(cfg: LoadkitConfig) -> str:
    """The validated config as JSON with the DSN masked (the run's parameters)."""
    data = as_plain_dict(cfg)
    data["sink"]["dsn"] = mask_dsn(data["sink"]["dsn"])
    return json.dumps(data, default=str, sort_keys=True)


def build_plan(cfg: LoadkitConfig, run_id: Optional[str] = None) -> LoadPlan:
    """Resolve files, schemas and knobs. Raises ConfigError/SourceDataError before any load starts."""
    assert cfg.job is not None
    url_root = cfg.data_root if files.is_url(cfg.data_root) else None  # s3://bucket/prefix etc.
    root = Path(cfg.data_root).expanduser()
    if url_root is None and not root.is_dir():
        raise ConfigError(f"data_root {root.resolve()} is not a directory", key="data_root")
    values = run_params(cfg)
    period = period_key(cfg.job, values)
    tag = period_tag(period, values)
    for name, t in cfg.job.tables.items():
        if t.enabled and t.mode == "snapshot" and not tag.isdigit():
            raise ConfigError(f"mode snapshot keeps one integer {PERIOD_COL} partition per period (YYYYMM or "
                              f"YYYYMMDD), but this job's period is {period!r}: its params may be year, month, day",
                              key=f"job.tables.{name}.mode")
    enabled = [(name, t) for name, t in cfg.job.tables.items() if t.enabled]
    # sha256 of every source file (the ledger's file identity): ~0.55 CPU-s/GB, most of a CLI run's
    # start-up on a large month, hashed on one thread per core (hashlib and reads release the GIL).
    with files.Fingerprints(files.usable_cpus(cfg.env.num_cpus)) as fingerprint:
        if url_root is None:
            _hash_ahead(fingerprint, enabled, root, values)
        tables = tuple(_table_spec(name, t, cfg.job.schema, root, values, tag, url_root, fingerprint)
                       for name, t in enabled)
    r, p, e, tr, tel, m = cfg.retry, cfg.pool, cfg.env, cfg.tracking, cfg.telemetry, cfg.job.migrate
    return LoadPlan(
        run_id=run_id or uuid.uuid4().hex[:16],
        job=cfg.job.name,
        year=cfg.year,
        month=cfg.month,
        force=cfg.force,
        ledger_schema=cfg.sink.ledger_schema,
        tables=tables,
        batch=batch_policy(cfg.batch),
        retry=RetryPolicy(r.attempts, r.initial_wait_s, r.max_wait_s, r.multiplier, r.jitter_s,
                          r.breaker_failures, r.breaker_cooldown_s),
        writers=p.writers,
        connections_per_writer=p.connections_per_writer,
        pre_ping=p.pre_ping,
        parse_concurrency=p.parse_concurrency,
        sink=sink_plan(cfg),
        env=EnvPlan(str(e.name), e.address, e.num_cpus, e.object_store_memory, e.ship_code, e.progress_bars,
                    str(e.executor), e.inprocess_max_bytes, e.inprocess_max_cpus, e.max_run_seconds,
                    e.worker_logs),
        alerts=alerts_plan(cfg.alerts),
        tracking=TrackingPlan(tr.enabled, tr.uri, tr.experiment, str(tr.flush), tr.live_after_s, tr.report),
        telemetry=TelemetryPlan(tel.metrics_port, tel.metrics_host, str(tel.tracing), tel.otlp_endpoint),
        migrate=MigratePolicy(m.add_columns, m.alter_types, m.allow_extra_columns),
        fetch=fetch_plan(cfg),
        verify=str(cfg.job.verify),
        on_drift=str(cfg.job.on_drift),
        settings=settings_json(cfg),
        read_splits=p.read_splits,
        parse_threads=p.parse_threads,
        data_root=url_root or str(root.resolve()),
        period_key=period,
        params=tuple(values.items()),
    )
