"""A network drop in the middle of reading a remote source object (http(s)://, s3://) is transient
infrastructure, not bad data: the read is retried from the exact byte offset of the read that broke
(files.Resumable under retry.*), so the table holds exactly the source; when the retries run out the
run exits 4 and a rerun completes exactly once from the ledger's byte ranges.

The servers run on 127.0.0.1 (tests/servers.py): a ranged HTTP file server that drops connections
mid-body, and moto's S3 behind a proxy that does the same.
"""
from __future__ import annotations

import gzip
import http.client
import ssl
import zipfile
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from loadkit.errors import EXIT_CODES, Category, TransientSourceError, classify, is_network_failure
from loadkit.examples.cnpj.sample import SampleManifest, generate_month
from loadkit.plan import RetryPolicy
from loadkit.runner import exit_code, run_job
from loadkit.source import files
from loadkit.source.read import ReadUnit, read_unit
from tests.conftest import compose, query
from tests.helpers import drop_load_schemas, free_port
from tests.servers import CuttingServer
from tests.test_e2e_monthly import canon, table_rows

FAST = RetryPolicy(attempts=3, initial_wait_s=0.01, max_wait_s=0.05, multiplier=2.0, jitter_s=0.0,
                   breaker_failures=5, breaker_cooldown_s=1.0)
BLOCK = 16 * 1024  # fsspec's HTTP block size in these tests: an object is read in many ranged GETs


@pytest.fixture()
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsspec's HTTP filesystem reads BLOCK bytes per GET (default 5 MB), so a small object takes many
    GETs and a cut can land after some records were already handed on."""
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "http", {"block_size": BLOCK})


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[CuttingServer]:
    root = tmp_path / "served"
    root.mkdir()
    s = CuttingServer(root)
    yield s
    s.stop()


def _body(n: int) -> bytes:
    return b"".join(b'"%d";"line %d\nwith a quoted newline";"x"\n' % (i, i) for i in range(n))


# ---------------------------------------------------------------- classification


def test_network_failures_are_transient_and_real_bugs_are_not() -> None:
    import aiohttp
    import botocore.exceptions as bx
    import httpx
    from fsspec.exceptions import FSTimeoutError

    transient: List[BaseException] = [
        ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(), TimeoutError(),
        http.client.IncompleteRead(b"abc", 10), aiohttp.ClientPayloadError("Response payload is not completed"),
        aiohttp.ServerDisconnectedError(), bx.ConnectionClosedError(endpoint_url="http://x"),
        bx.ReadTimeoutError(endpoint_url="http://x"), bx.EndpointConnectionError(endpoint_url="http://x"),
        httpx.ReadError("reset"), httpx.RemoteProtocolError("peer closed"), httpx.ReadTimeout("slow"),
        FSTimeoutError(), TransientSourceError("gave up")]
    for exc in transient:
        assert classify(exc) is Category.TRANSIENT, exc
        assert EXIT_CODES[classify(exc)] == 4
    wrapped = RuntimeError("reader failed")
    wrapped.__cause__ = aiohttp.ClientPayloadError("cut")
    assert is_network_failure(wrapped)
    not_network: List[BaseException] = [
        ValueError("bad"), KeyError("k"), FileNotFoundError("s3://b/k"), PermissionError("denied"),
        zipfile.BadZipFile("corrupt"), httpx.UnsupportedProtocol("ftp"),
        ssl.SSLCertVerificationError("certificate verify failed"), OSError("generic"), EOFError()]
    for exc in not_network:
        assert not is_network_failure(exc), exc
        assert classify(exc) is not Category.TRANSIENT, exc


# ---------------------------------------------------------------- the resumable object, alone


def test_a_cut_mid_object_is_retried_from_the_failed_reads_offset(server: CuttingServer,
                                                                  small_blocks: None) -> None:
    body = _body(3000)
    (server.root / "a.csv").write_bytes(body)
    url = server.url + "a.csv"
    got, cut_from = [], None
    with files.open_source(url, FAST) as fh:
        while block := fh.read(10_000):
            got.append(block)
            if cut_from is None and fh.tell() > len(body) // 3:
                server.cut_next["a.csv"] = 2  # the next two GETs break half-way
                cut_from = len(server.gets)
        assert fh.tell() == len(body) and fh.retries == 2  # type: ignore[attr-defined]
    assert b"".join(got) == body, "every byte once, in order"
    assert server.cuts == 2
    # The GET that broke and its two retries start at the same byte: the failed read's offset.
    assert cut_from is not None
    starts = {str(r).split("-")[0] for _, r in server.gets[cut_from:cut_from + 3]}
    assert len(starts) == 1 and starts != {"bytes=0"} and starts != {"None"}, server.gets


def test_every_container_reads_exactly_through_cuts(server: CuttingServer, small_blocks: None,
                                                    tmp_path: Path) -> None:
    """Plain, gzip and zip (central directory at the end, then members from the front): the first two
    GETs of each object are cut; the members read equal the local ones, and read_unit's chunks (byte
    ranges, first lines, data) equal the local file's."""
    body = _body(4000)
    zpath = tmp_path / "a.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__MACOSX/._A.CSV", b"junk")
        zf.writestr("A.CSV", body)
        zf.writestr("B.CSV", body[: len(body) // 3])
    objects = {"a.csv": body, "a.csv.gz": gzip.compress(body), "a.zip": zpath.read_bytes()}
    for name, data in objects.items():
        (server.root / name).write_bytes(data)
        (tmp_path / name).write_bytes(data)
    for name, fmt, member in (("a.csv", "csv", None), ("a.csv.gz", "gzip", None), ("a.zip", "zip", "*.CSV")):
        server.cut_next[name] = 2  # attempts=3: a read survives two cuts in a row
        remote = [(m, s.read()) for m, s in files.open_members(server.url + name, fmt, member, retry=FAST)]
        assert remote == [(m, s.read()) for m, s in files.open_members(tmp_path / name, fmt, member)], name
        assert server.cut_next[name] == 0, f"{name}: the cuts happened"
    assert server.cuts == 6

    from loadkit.plan import build_plan
    from tests.test_split_read import raw_overrides

    raw = generate_month(tmp_path / "raw", 2024, 5, rows=1500, shards=1, seed=3, compress=False)
    for p in sorted((raw.root / "2024-05").iterdir()):
        (server.root / "m" / "2024-05").mkdir(parents=True, exist_ok=True)
        (server.root / "m" / "2024-05" / p.name).write_bytes(p.read_bytes())
    chunks = {}
    for where, root in (("local", str(raw.root)), ("http", server.url + "m")):
        plan = build_plan(compose([f"data_root={root}", "+job=monthly", "year=2024", "month=5", "batch.size=100",
                                   *raw_overrides("estabelecimentos")]))
        table = plan.table("estabelecimentos")
        if where == "http":
            server.cut_next[files.basename(table.files[0].path)] = 2
        unit = ReadUnit(table, table.files[0], (), plan.batch.size, retry=FAST)
        chunks[where] = [(c.kind, c.member, c.start, c.end, c.first_line, c.data) for c in read_unit(unit)]
    assert server.cuts == 8
    assert len(chunks["http"]) > 5 and chunks["http"] == chunks["local"]


def test_exhausted_retries_are_transient_and_a_missing_object_is_not(server: CuttingServer,
                                                                     small_blocks: None) -> None:
    body = _body(3000)
    (server.root / "a.csv").write_bytes(body)
    server.cut_at["a.csv"] = len(body) // 2  # no GET ever gets past the middle
    seen = bytearray()
    with pytest.raises(TransientSourceError, match="after 3 attempts") as info:
        with files.open_source(server.url + "a.csv", FAST) as fh:
            while block := fh.read(10_000):
                seen += block
    assert classify(info.value) is Category.TRANSIENT and is_network_failure(info.value.__cause__)
    assert bytes(seen) == body[: len(seen)] and len(seen) <= len(body) // 2, "nothing past the cut, nothing wrong"
    with pytest.raises(FileNotFoundError):
        with files.open_source(server.url + "missing.csv", FAST):
            pass


def test_an_object_that_changes_between_retries_fails_its_file(server: CuttingServer, small_blocks: None) -> None:
    from loadkit.errors import SourceDataError

    body = _body(3000)
    path = server.root / "a.csv"
    path.write_bytes(body)
    with pytest.raises(SourceDataError, match="changed while it was read"):
        with files.open_source(server.url + "a.csv", FAST) as fh:
            fh.read(10_000)
            path.write_bytes(body + b"more\n")  # a new version (size and ETag) ...
            server.cut_next["a.csv"] = 1  # ... seen by the reopen after a cut
            while fh.read(10_000):
                pass


# ---------------------------------------------------------------- a whole month over http(s)://


@pytest.fixture()
def month(server: CuttingServer, tmp_path: Path) -> SampleManifest:
    """A generated month on disk, the same files served under <server>/cnpj/2024-05/."""
    m = generate_month(tmp_path / "disk", 2024, 5, rows=400, shards=2, seed=17)
    dest = server.root / "cnpj" / "2024-05"
    dest.mkdir(parents=True)
    for p in sorted(m.folder.iterdir()):
        (dest / p.name).write_bytes(p.read_bytes())
    return m


def _overrides(pg_dsn: str, schemas: tuple, root: str) -> List[str]:
    target, led = schemas
    return ["+job=monthly", "year=2024", "month=5", f"data_root={root}", f"sink.dsn={pg_dsn}",
            f"job.schema={target}", f"sink.ledger_schema={led}", "tracking.enabled=false",
            "env.progress_bars=false", "env.executor=inprocess", "batch.size=40", "batch.policy=fixed",
            "retry.attempts=3", "retry.initial_wait_s=0.01", "retry.max_wait_s=0.05", "retry.jitter_s=0"]


def _contents(dsn: str, schema: str, manifest: SampleManifest) -> Dict[str, Counter]:
    out = {}
    for table, expected in manifest.expected.items():
        out[table] = Counter(canon(r) for r in table_rows(dsn, schema, table, list(expected[0].keys())))
    return out


def _reference(pg_dsn: str, month: SampleManifest, schemas: tuple) -> Dict[str, Counter]:
    """The month loaded from disk: what the remote loads must equal."""
    ref = (schemas[0] + "_disk", schemas[1] + "_disk")
    try:
        result = run_job(compose(_overrides(pg_dsn, ref, str(month.root))))
        assert result.status == "succeeded", result.error
        return _contents(pg_dsn, ref[0], month)
    finally:
        drop_load_schemas(pg_dsn, *ref)


@pytest.mark.e2e
def test_http_month_with_cuts_loads_exactly_then_exhausted_retries_exit_4_and_rerun_is_exact(
        server: CuttingServer, month: SampleManifest, pg_dsn: str, schemas: tuple, small_blocks: None) -> None:
    reference = _reference(pg_dsn, month, schemas)
    counts = {t: sum(c.values()) for t, c in reference.items()}
    zips = sorted(p.name for p in month.folder.glob("*.zip"))
    root = server.url + "cnpj"

    # 1. Every object's first GET of its data breaks half-way: retried from the offset, exact content.
    for name in zips:
        server.cut_next[name] = 1
    first = run_job(compose(_overrides(pg_dsn, schemas, root)))
    assert first.status == "succeeded", first.error
    assert server.cuts >= len(zips)
    assert _contents(pg_dsn, schemas[0], month) == reference
    rows = query(pg_dsn, f'SELECT sum(rows_in), count(*) FROM "{schemas[1]}".batch')[0]
    assert rows[0] == sum(month.rows.values()), "every source row in exactly one committed batch"

    # 2. Fresh schemas: the biggest object never gets past 60% of its bytes -> exit 4 (transient).
    target, led = schemas[0] + "_x", schemas[1] + "_x"
    try:
        big = max(zips, key=lambda n: (month.folder / n).stat().st_size)
        server.cut_at[big] = int((month.folder / big).stat().st_size * 0.6)
        failed = run_job(compose(_overrides(pg_dsn, (target, led), root)))
        assert failed.status == "failed" and exit_code(failed) == 4, failed.error
        assert isinstance(failed.error, TransientSourceError) or classify(failed.error) is Category.TRANSIENT
        assert query(pg_dsn, f'SELECT error_category FROM "{led}".run')[0][0] == "transient_infrastructure"
        # 3. The network is back: the rerun loads the rest, each row exactly once.
        del server.cut_at[big]
        rerun = run_job(compose(_overrides(pg_dsn, (target, led), root)))
        assert rerun.status == "succeeded", rerun.error
        assert _contents(pg_dsn, target, month) == reference
        assert {t: query(pg_dsn, f'SELECT count(*) FROM "{target}"."{t}"')[0][0] for t in counts} == counts
        batches = query(pg_dsn, f'SELECT sum(rows_in), count(DISTINCT run_id) FROM "{led}".batch')[0]
        assert batches[0] == sum(month.rows.values()), "no batch committed twice, none lost"
        assert rerun.metrics.tables and sum(t.rows_read for t in rerun.metrics.tables.values()) < \
            sum(month.rows.values()), "the rerun read only what the failed run had not committed"
    finally:
        import psycopg2

        conn = psycopg2.connect(pg_dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            for s in (target, led, f"{target}__lk_stage"):
                cur.execute(f'DROP SCHEMA IF EXISTS "{s}" CASCADE')
        conn.close()


# ---------------------------------------------------------------- gs:// through a local emulator


@pytest.fixture()
def gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """gcp-storage-emulator on 127.0.0.1 (in memory), and gcsfs pointed at it the standard way
    (STORAGE_EMULATOR_HOST). gcsfs's experimental HNS/zonal probe is switched off: it asks a gRPC
    control API the emulator does not have and waits 60 s per bucket before falling back."""
    import os

    try:
        from gcp_storage_emulator.server import create_server
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"gcp-storage-emulator missing: {exc}")
        pytest.skip(f"gcp-storage-emulator / gcsfs missing (the test extra installs them): {exc}")
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="lk-gcs")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        yield "lk-gcs"
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()
        server.stop()


@pytest.mark.e2e
def test_gs_month_loads_like_disk(gcs: str, month: SampleManifest, pg_dsn: str, schemas: tuple,
                                  tmp_path: Path) -> None:
    import gcsfs

    reference = _reference(pg_dsn, month, schemas)
    fs = gcsfs.GCSFileSystem()
    for p in sorted(month.folder.iterdir()):
        fs.pipe(f"{gcs}/cnpj/2024-05/{p.name}", p.read_bytes())
    found = files.discover_urls([f"gs://{gcs}/cnpj/2024-05/*.zip"])
    assert [f.size for f in found] == [p.stat().st_size for p in sorted(month.folder.glob("*.zip"))]
    assert all(len(f.fingerprint) == 64 for f in found) and len({f.fingerprint for f in found}) == len(found)
    for f in found[:2]:  # zip members through gcsfs equal the local ones
        local = month.folder / files.basename(f.path)
        assert [(m, s.read()) for m, s in files.open_members(f.path, "zip", None, retry=FAST)] == \
            [(m, s.read()) for m, s in files.open_members(local, "zip", None)]
    result = run_job(compose(_overrides(pg_dsn, schemas, f"gs://{gcs}/cnpj")))
    assert result.status == "succeeded", result.error
    assert _contents(pg_dsn, schemas[0], month) == reference
    paths = [r[0] for r in query(pg_dsn, f'SELECT path FROM "{schemas[1]}".file WHERE status = %s', ("loaded",))]
    assert paths and all(p.startswith(f"gs://{gcs}/cnpj/2024-05/") for p in paths), paths


def test_progress_sizes_count_only_the_members_the_reader_reads(tmp_path: Path) -> None:
    """metrics.uncompressed_size uses the reader's member filter (files.data_members): AppleDouble
    ``__MACOSX`` forks, directories and members outside source.member are not planned bytes."""
    from loadkit.metrics import uncompressed_size

    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("F.K03200$Z.D51213.NATJUCSV", b"x" * 1000)
        zf.writestr("__MACOSX/._F.K03200$Z.D51213.NATJUCSV", b"y" * 4000)
        zf.writestr("dir/", b"")
        zf.writestr("README.TXT", b"z" * 300)
    size = path.stat().st_size
    assert uncompressed_size(str(path), "zip", size) == (1300, 2)
    assert uncompressed_size(str(path), "zip", size, "*CSV") == (1000, 1)
    with zipfile.ZipFile(path) as zf:
        assert [i.filename for i in files.data_members(zf, "*CSV")] == \
            [m for m, _ in files.open_members(path, "zip", "*CSV")]
