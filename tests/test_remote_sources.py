"""Object stores as sources: a month in a local S3 endpoint (moto, on 127.0.0.1) loads exactly like the
same month on disk, on both executors, and a rerun loads nothing twice.

The S3 endpoint and credentials reach loadkit only the standard way (AWS_* environment variables, read
by botocore/s3fs), as they would on a laptop or a cluster node. The Ray run goes through the CLI in a
subprocess with a private local Ray (RAY_ADDRESS=local): its read tasks open the objects themselves,
with the environment they inherit, and the pytest process's Ray (started earlier, without these
variables) is never involved.
"""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from loadkit.errors import ConfigError, SourceDataError
from loadkit.examples.cnpj.sample import SampleManifest, generate_month
from loadkit.runner import run_job
from loadkit.source import files, scanner
from tests.conftest import ROOT, compose, query
from tests.helpers import drop_load_schemas, free_port
from tests.test_e2e_monthly import canon, table_rows

pytestmark = pytest.mark.e2e

BUCKET = "lk-months"
# A credential value the test can look for in every output: it must never be printed.
SECRET = "S3cr3t-never-printed-7f3a9c"



@pytest.fixture(scope="module")
def s3() -> Iterator[Dict[str, str]]:
    """A moto S3 server on 127.0.0.1 and the AWS_* variables that point botocore at it."""
    from moto.server import ThreadedMotoServer
    import s3fs

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "lk-test-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep another endpoint
    try:
        yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def month(tmp_path_factory: pytest.TempPathFactory, s3: Dict[str, str]) -> SampleManifest:
    """A generated month on disk, and the same files uploaded under s3://BUCKET/cnpj/2024-05/."""
    import boto3

    m = generate_month(tmp_path_factory.mktemp("data"), 2024, 5, rows=300, shards=2, seed=11)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for path in sorted((m.root / "2024-05").iterdir()):
        client.put_object(Bucket=BUCKET, Key=f"cnpj/2024-05/{path.name}", Body=path.read_bytes())
    return m


def _contents(dsn: str, schema: str, manifest: SampleManifest) -> Dict[str, Counter]:
    out = {}
    for table, expected in manifest.expected.items():
        columns = list(expected[0].keys())
        out[table] = Counter(canon(r) for r in table_rows(dsn, schema, table, columns))
    return out


def _overrides(pg_dsn: str, mlflow_uri: str, schemas: tuple, root: str, executor: str) -> List[str]:
    target, led = schemas
    return ["+job=monthly", "year=2024", "month=5", f"data_root={root}", f"sink.dsn={pg_dsn}",
            f"job.schema={target}", f"sink.ledger_schema={led}", f"tracking.uri={mlflow_uri}",
            "tracking.enabled=false", "env.progress_bars=false", f"env.executor={executor}"]


@pytest.fixture(scope="module")
def on_disk(month: SampleManifest, pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Counter]:
    """The month loaded from disk (in-process): the reference the object-store loads must equal."""
    import uuid


    tag = uuid.uuid4().hex[:8]
    schemas = (f"t_{tag}", f"l_{tag}")
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'm.db'}"
    try:
        result = run_job(compose(_overrides(pg_dsn, uri, schemas, str(month.root), "inprocess")))
        assert result.status == "succeeded", result.error
        return _contents(pg_dsn, schemas[0], month)
    finally:
        drop_load_schemas(pg_dsn, *schemas)


def _ledger(pg_dsn: str, led: str) -> List[Any]:
    return query(pg_dsn, f'SELECT run_id, status, rows_read, rows_loaded FROM "{led}".run ORDER BY started_at')


def _check_loaded_once(pg_dsn: str, schemas: tuple, month: SampleManifest, counts: Dict[str, int]) -> None:
    target, led = schemas
    assert {t: query(pg_dsn, f'SELECT count(*) FROM "{target}"."{t}"')[0][0] for t in month.rows} == counts
    runs = _ledger(pg_dsn, led)
    assert [r[1] for r in runs] == ["succeeded", "succeeded"]
    assert runs[0][2] == sum(month.rows.values()) and runs[1][2] == 0, "the rerun read nothing"
    paths = [r[0] for r in query(pg_dsn, f'SELECT path FROM "{led}".file WHERE status = %s', ("loaded",))]
    assert len(paths) == sum(len(v) for v in month.files.values())
    assert all(p.startswith(f"s3://{BUCKET}/cnpj/2024-05/") for p in paths), paths
    batches = query(pg_dsn, f'SELECT sum(rows_in), count(DISTINCT run_id) FROM "{led}".batch')
    assert batches[0] == (sum(month.rows.values()), 1), "every batch committed once, by the first run"


def test_s3_month_loads_like_disk_inprocess(month: SampleManifest, on_disk: Dict[str, Counter], pg_dsn: str,
                                            schemas: tuple, mlflow_uri: str) -> None:
    overrides = _overrides(pg_dsn, mlflow_uri, schemas, f"s3://{BUCKET}/cnpj", "inprocess")
    first = run_job(compose(overrides))
    assert first.status == "succeeded", first.error
    assert _contents(pg_dsn, schemas[0], month) == on_disk
    counts = {t: sum(c.values()) for t, c in on_disk.items()}
    second = run_job(compose(overrides))
    assert second.status == "succeeded", second.error
    assert all(t.files_skipped == t.files for t in second.metrics.tables.values())
    _check_loaded_once(pg_dsn, schemas, month, counts)


def test_s3_month_loads_like_disk_on_ray(month: SampleManifest, on_disk: Dict[str, Counter], pg_dsn: str,
                                         schemas: tuple, mlflow_uri: str, s3: Dict[str, str]) -> None:
    overrides = _overrides(pg_dsn, mlflow_uri, schemas, f"s3://{BUCKET}/cnpj", "ray") + ["env.num_cpus=2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(s3, RAY_ADDRESS="local", PYTHONPATH=str(ROOT))  # a private Ray that inherits the AWS_* variables
    outputs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-m", "loadkit", *overrides], cwd=ROOT, capture_output=True,
                             text=True, timeout=900, env=env)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        outputs.append(out.stdout + out.stderr)
    assert all(SECRET not in text for text in outputs)
    assert _contents(pg_dsn, schemas[0], month) == on_disk
    _check_loaded_once(pg_dsn, schemas, month, {t: sum(c.values()) for t, c in on_disk.items()})
    executors = query(pg_dsn, f'SELECT config->\'env\'->>\'executor\' FROM "{schemas[1]}".run')
    assert {r[0] for r in executors} == {"ray"}


def test_containers_and_spans_read_the_same_from_s3(s3: Dict[str, str], tmp_path: Path) -> None:
    """Plain, gzip and zip (random access to the central directory) through fsspec equal the local
    read; a span's exact record start is found on the remote file as on the local one."""
    import boto3

    body = b"".join(b'"%d";"line %d\nwith a quoted newline";"x"\n' % (i, i) for i in range(2000))
    local = {"a.csv": body, "a.csv.gz": gzip.compress(body)}
    zpath = tmp_path / "a.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__MACOSX/._A.CSV", b"junk")
        zf.writestr("A.CSV", body)
        zf.writestr("B.CSV", body[:100])
    local["a.zip"] = zpath.read_bytes()
    client = boto3.client("s3")
    client.create_bucket(Bucket="lk-formats")
    for name, data in local.items():
        (tmp_path / name).write_bytes(data)
        client.put_object(Bucket="lk-formats", Key=f"in/{name}", Body=data)
    found = files.discover_urls(["s3://lk-formats/in/*.csv*", "s3://lk-formats/in/a.zip"])
    assert [(f.path, f.size) for f in found] == [(f"s3://lk-formats/in/{n}", len(local[n]))
                                                 for n in ("a.csv", "a.csv.gz", "a.zip")]
    assert len({f.fingerprint for f in found}) == 3 and all(len(f.fingerprint) == 64 for f in found)
    assert files.discover_urls(["s3://lk-formats/in/a.csv"])[0].fingerprint == found[0].fingerprint
    for name, fmt, member in (("a.csv", "csv", None), ("a.csv.gz", "gzip", None), ("a.zip", "zip", "*.CSV")):
        remote = [(m, s.read()) for m, s in files.open_members(f"s3://lk-formats/in/{name}", fmt, member)]
        assert remote == [(m, s.read()) for m, s in files.open_members(tmp_path / name, fmt, member)]
    assert [m for m, _ in files.open_members("s3://lk-formats/in/a.zip", "zip", "*.CSV")] == ["A.CSV", "B.CSV"]
    syntax = scanner.Syntax(quote='"', escape=None)
    for offset in (1, 777, len(body) // 2, len(body) - 3):
        with files.open_source("s3://lk-formats/in/a.csv") as fh:
            remote_start = files.record_start(fh, offset, len(body), syntax)
        with files.open_source(tmp_path / "a.csv") as fh:
            assert remote_start == files.record_start(fh, offset, len(body), syntax)
    with pytest.raises(SourceDataError, match="no source file matches s3://lk-formats/in/none"):
        files.discover_urls(["s3://lk-formats/in/none*.zip"])
    with pytest.raises(SourceDataError, match="no source file matches"):
        files.discover_urls(["s3://no-such-bucket/in/*.zip"])
    with pytest.raises(ConfigError, match="cannot read nosuchproto://"):
        files.discover_urls(["nosuchproto://x/*.zip"])


def test_a_large_remote_plain_file_is_read_whole_not_split(s3: Dict[str, str],
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """pool.read_splits would cut a large local CSV into spans; an object is read as one unit (a span
    scans from the file's start to find its first record: a download of that prefix per span), and
    its chunks equal the local file's."""
    import boto3

    from loadkit.source.read import ReadUnit, read_unit, split_units
    from loadkit.plan import build_plan
    from tests.test_split_read import raw_overrides

    raw = generate_month(tmp_path_factory.mktemp("raw"), 2024, 5, rows=3000, shards=1, seed=11, compress=False)
    client = boto3.client("s3")
    client.create_bucket(Bucket="lk-raw")
    for path in sorted((raw.root / "2024-05").iterdir()):
        client.put_object(Bucket="lk-raw", Key=f"m/2024-05/{path.name}", Body=path.read_bytes())
    common = ["+job=monthly", "year=2024", "month=5", "batch.size=200", "batch.read_block_bytes=65536",
              "pool.read_splits=3", *raw_overrides("estabelecimentos")]
    chunks = {}
    for where, root in (("local", str(raw.root)), ("s3", "s3://lk-raw/m")):
        plan = build_plan(compose([f"data_root={root}", *common]))
        table = plan.table("estabelecimentos")
        units = split_units([ReadUnit(table, table.files[0], (), plan.batch.size)], plan.read_splits,
                            plan.batch.read_block_bytes)
        assert [u.span is None for u in units] == ([False] * 3 if where == "local" else [True])
        chunks[where] = sorted((c.start, c.end, c.first_line, c.data) for u in units
                               for c in read_unit(u) if c.kind == "data")
    assert chunks["s3"] and b"".join(c[3] for c in chunks["s3"]) == b"".join(c[3] for c in chunks["local"])
    assert [c[:3] for c in chunks["s3"]][0] == (0, chunks["s3"][0][1], 1)
