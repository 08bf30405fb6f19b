"""The fetch stage against real local servers on 127.0.0.1: a plain HTTP directory listing (http.server with
Range support and injected faults) and a WebDAV share (wsgidav + cheroot, as the RFB's Nextcloud share)."""
from __future__ import annotations

import html
import os
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List
from urllib.parse import quote, unquote, urlsplit

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from loadkit.source import fetch
from loadkit.errors import EXIT_CODES, Category, SourceDataError
from loadkit.examples.cnpj.sample import SampleManifest, generate_month
from loadkit.runner import run_job
from tests.helpers import compose, free_port, query


class Faults:
    """What the server does wrong, per file name: cut after N bytes, serve corrupt bytes, answer 503."""

    def __init__(self) -> None:
        self.cut: Dict[str, int] = {}  # name -> bytes sent before the connection drops (first GET only)
        self.corrupt: Dict[str, int] = {}  # name -> how many GETs get a corrupted body
        self.unavailable: Dict[str, int] = {}  # name -> how many GETs get 503
        self.ranges: List[tuple] = []  # (name, Range header) of every GET
        self.no_range = False


def _handler(root: Path, faults: Faults) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep pytest output quiet
            pass

        def _path(self) -> Path:
            return root / self.path.split("?")[0].lstrip("/")

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = self._path()
            if path.is_dir():
                names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
                page = "<html><body><a href='../'>Parent</a><a href='?C=M;O=A'>sort</a>" + "".join(
                    f"<a href='{html.escape(n)}'>{html.escape(n)}</a> 2024-05-11 10:00 1.2M<br>" for n in names)
                data = (page + "</body></html>").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)
                return
            if not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            name, data = path.name, path.read_bytes()
            if not body:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{len(data)}-{int(path.stat().st_mtime)}"')
                self.end_headers()
                return
            faults.ranges.append((name, self.headers.get("Range")))
            if faults.unavailable.get(name, 0) > 0:
                faults.unavailable[name] -= 1
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if faults.corrupt.get(name, 0) > 0:
                faults.corrupt[name] -= 1
                mid = len(data) // 2
                data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]
            start = 0
            m = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
            if m and not faults.no_range:
                start = int(m.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("ETag", f'"{len(data)}-{int(path.stat().st_mtime)}"')
            self.end_headers()
            cut = faults.cut.pop(name, None)
            if cut is not None:
                self.wfile.write(data[start:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
                self.close_connection = True
                return
            self.wfile.write(data[start:])

    return Handler


@pytest.fixture()
def remote(tmp_path: Path) -> Iterator[tuple]:
    """(base URL, served root, faults): an HTTP server with directory listings on a free port."""
    root = tmp_path / "remote"
    root.mkdir()
    faults = Faults()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, faults))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root, faults
    server.shutdown()
    server.server_close()


@pytest.fixture()
def published(remote: tuple) -> SampleManifest:
    _, root, _ = remote
    return generate_month(root, 2024, 5, rows=400, shards=2, seed=5)


def settings(base: str, **kw: object) -> fetch.Settings:
    defaults = dict(url=base + "{year:04d}-{month:02d}/", discovery="html", downloads=3, attempts=4,
                    initial_wait_s=0.01, max_wait_s=0.05, timeout_s=10.0, chunk_bytes=4096)
    defaults.update(kw)
    return fetch.Settings(**defaults)  # type: ignore[arg-type]


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.zip"))
    assert names == sorted(p.name for p in b.iterdir()), "nothing but the zips lands in the month folder"
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_html_listing_downloads_the_month_then_keeps_it(remote: tuple, published: SampleManifest,
                                                        tmp_path: Path) -> None:
    base, _, faults = remote
    data = tmp_path / "data"
    got = fetch.fetch_month(settings(base), data, 2024, 5)
    assert len(got) == 13 and {r.status for r in got} == {"fetched"}
    same_files(published.folder, data / "2024-05")
    assert all(r.etag and r.size == (data / "2024-05" / r.name).stat().st_size for r in got)
    again = fetch.fetch_month(settings(base), data, 2024, 5)
    assert {r.status for r in again} == {"present"} and len(faults.ranges) == 13  # nothing downloaded twice


def test_connection_cut_mid_file_resumes_with_range(remote: tuple, published: SampleManifest,
                                                    tmp_path: Path) -> None:
    base, _, faults = remote
    name = "Estabelecimentos0.zip"
    size = (published.folder / name).stat().st_size
    faults.cut[name] = size // 2
    got = {r.name: r for r in fetch.fetch_month(settings(base), tmp_path / "data", 2024, 5)}
    assert got[name].attempts == 2
    first, second = [r for n, r in faults.ranges if n == name]
    assert first is None  # the second GET asks only for what the first did not deliver
    assert second is not None and 0 < int(second[len("bytes="):-1]) <= size // 2
    same_files(published.folder, tmp_path / "data" / "2024-05")


def test_a_partial_file_from_an_earlier_run_is_resumed(remote: tuple, published: SampleManifest,
                                                       tmp_path: Path) -> None:
    base, _, faults = remote
    folder = tmp_path / "data" / "2024-05"
    folder.mkdir(parents=True)
    full = (published.folder / "Socios0.zip").read_bytes()
    (folder / "Socios0.zip.part").write_bytes(full[:1000])
    got = {r.name: r for r in fetch.fetch_month(settings(base), tmp_path / "data", 2024, 5)}
    assert got["Socios0.zip"].resumed_from == 1000
    assert ("Socios0.zip", "bytes=1000-") in faults.ranges
    same_files(published.folder, folder)


def test_server_ignoring_range_restarts_the_file(remote: tuple, published: SampleManifest, tmp_path: Path) -> None:
    base, _, faults = remote
    faults.no_range = True
    name = "Empresas0.zip"
    faults.cut[name] = 500
    fetch.fetch_month(settings(base), tmp_path / "data", 2024, 5)
    same_files(published.folder, tmp_path / "data" / "2024-05")


def test_corrupt_zip_is_refetched_once_then_fails_clearly(remote: tuple, published: SampleManifest,
                                                          tmp_path: Path) -> None:
    base, _, faults = remote
    faults.corrupt["Socios1.zip"] = 1
    got = {r.name: r for r in fetch.fetch_month(settings(base), tmp_path / "a", 2024, 5)}
    assert got["Socios1.zip"].refetched and not got["Socios0.zip"].refetched
    same_files(published.folder, tmp_path / "a" / "2024-05")
    faults.corrupt["Socios1.zip"] = 2
    with pytest.raises(SourceDataError, match="corrupt both times") as err:
        fetch.fetch_month(settings(base), tmp_path / "b", 2024, 5)
    assert "Socios1.zip" in str(err.value) and EXIT_CODES[err.value.category] == 3
    assert not (tmp_path / "b" / "2024-05" / "Socios1.zip").exists()  # never renamed into place
    assert not (tmp_path / "b" / "2024-05" / "Socios1.zip.part").exists()


def test_503_is_retried_and_a_dead_server_is_transient(remote: tuple, published: SampleManifest,
                                                       tmp_path: Path) -> None:
    base, _, faults = remote
    faults.unavailable["Cnaes.zip"] = 2
    got = {r.name: r for r in fetch.fetch_month(settings(base), tmp_path / "a", 2024, 5)}
    assert got["Cnaes.zip"].attempts == 3
    faults.unavailable["Cnaes.zip"] = 99
    with pytest.raises(fetch.DownloadError) as err:
        fetch.fetch_month(settings(base), tmp_path / "b", 2024, 5)
    assert err.value.category is Category.TRANSIENT and EXIT_CODES[err.value.category] == 4


def test_a_month_not_published_is_a_clear_source_error(remote: tuple, published: SampleManifest,
                                                       tmp_path: Path) -> None:
    base, _, _ = remote
    with pytest.raises(SourceDataError, match="does not exist \\(HTTP 404\\)") as err:
        fetch.fetch_month(settings(base), tmp_path, 2024, 6)
    assert EXIT_CODES[err.value.category] == 3
    with pytest.raises(SourceDataError, match="does not exist"):
        fetch.fetch_month(settings(base, discovery="list", files=("Nope.zip",)), tmp_path, 2024, 5)


def test_latest_month_skips_a_folder_not_filled_yet(remote: tuple, published: SampleManifest) -> None:
    base, root, _ = remote
    (root / "2024-07").mkdir()  # created by the publisher, no zip yet
    (root / "2024-06").mkdir()  # being filled: fewer files than May
    (root / "2024-06" / "Cnaes.zip").write_bytes((published.folder / "Cnaes.zip").read_bytes())
    (root / "2023-12").mkdir()
    assert fetch.latest_month(settings(base)) == (2024, 5)


@pytest.mark.e2e
def test_fetch_then_load_records_fetched_files(remote: tuple, published: SampleManifest, tmp_path: Path,
                                               pg_dsn: str, schemas: tuple, job_overrides) -> None:
    base, _, faults = remote
    data = tmp_path / "data"
    # The CNPJ job declares the RFB's WebDAV share; a local mirror with an HTML listing is two overrides away
    # (the URL quoted: Hydra's override grammar reserves braces).
    url = f'job.remote.url="{base}{{year:04d}}-{{month:02d}}/"'
    only = run_job(compose(job_overrides(data, url, "job.remote.discovery=html", "fetch=only")))
    assert only.status == "succeeded" and len(only.fetched) == 13
    assert "fetch: 13 file(s) downloaded" in only.summary
    _, led = schemas
    assert query(pg_dsn, f'SELECT count(*), count(DISTINCT name) FROM "{led}".fetched WHERE run_id IS NULL') == \
        [(13, 13)]
    (data / "2024-05" / "Paises.zip").unlink()  # lost locally: fetched again by the next run
    result = run_job(compose(job_overrides(data, url, "job.remote.discovery=html", "fetch=always",
                                          "env.executor=inprocess")))
    assert result.status == "succeeded", result.error
    assert [r.name for r in result.fetched if r.status == "fetched"] == ["Paises.zip"]
    assert result.metrics.tables["estabelecimentos"].rows_read == published.rows["estabelecimentos"]
    assert query(pg_dsn, f'SELECT name FROM "{led}".fetched WHERE run_id = %s', (result.run_id,)) == \
        [("Paises.zip",)]
    (tmp_path / "empty").mkdir()
    requests = len(faults.ranges)
    with pytest.raises(SourceDataError, match="no source file matches"):  # never: the remote is not asked
        run_job(compose(job_overrides(tmp_path / "empty", url, "fetch=never", "env.executor=inprocess")))
    assert len(faults.ranges) == requests


# ---------------------------------------------------------------- WebDAV (the RFB's Nextcloud share)


@pytest.fixture()
def webdav(tmp_path: Path) -> Iterator[tuple]:
    """(share URL, served root): wsgidav on cheroot, anonymous read access, on a free port."""
    try:
        from cheroot import wsgi
        from wsgidav.wsgidav_app import WsgiDAVApp
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"wsgidav/cheroot missing: {exc}")
        pytest.skip(f"wsgidav/cheroot missing: {exc}")
    served = tmp_path / "dav"
    root = served / "public.php" / "dav" / "files" / "SHARE"  # the Nextcloud public-share layout
    root.mkdir(parents=True)
    app = WsgiDAVApp({"provider_mapping": {"/": str(served)},
                      "simple_dc": {"user_mapping": {"*": True}}, "verbose": 0,
                      "logging": {"enable": False, "enable_loggers": []}, "property_manager": True,
                      "lock_storage": True})
    server = wsgi.Server(("127.0.0.1", 0), app)
    server.prepare()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    port = server.bind_addr[1]
    yield f"http://127.0.0.1:{port}/public.php/dav/files/SHARE/", root
    server.stop()


def test_webdav_share_lists_with_propfind_and_downloads(webdav: tuple, tmp_path: Path) -> None:
    base, root = webdav
    month = generate_month(root, 2024, 5, rows=200, shards=2, seed=2)
    (root / "2024-06").mkdir()
    s = settings(base, discovery="webdav")
    listed = fetch.discover(fetch._client(s), s, 2024, 5)
    assert [f.name for f in listed] == sorted(p.name for p in month.folder.glob("*.zip"))
    assert all(f.size == (month.folder / f.name).stat().st_size and f.etag for f in listed)
    got = fetch.fetch_month(s, tmp_path / "data", 2024, 5)
    assert len(got) == 13
    same_files(month.folder, tmp_path / "data" / "2024-05")
    assert fetch.latest_month(s) == (2024, 5)


def test_zip_problem_names_the_bad_member(tmp_path: Path) -> None:
    good = tmp_path / "ok.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("A.CSV", os.urandom(50_000))
    assert fetch.zip_problem(good) is None
    data = bytearray(good.read_bytes())
    data[20_000:20_010] = bytes(b ^ 0xFF for b in data[20_000:20_010])  # same size, wrong bytes
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    assert fetch.zip_problem(bad) == "member A.CSV fails its CRC check"
    truncated = tmp_path / "cut.zip"
    truncated.write_bytes(good.read_bytes()[:200])
    assert "not a readable zip" in (fetch.zip_problem(truncated) or "")


def test_progress_reports_bytes_rate_and_eta() -> None:
    p = fetch.Progress(total=10_000_000, files=2, every_s=999, label="2024-05")
    p.add(2_500_000, moved=False)
    p.add(2_500_000)
    line = p.line()
    assert "5.0/10.0 MB (50%)" in line and "ETA" in line and "0/2 files" in line


def test_remote_config_is_validated() -> None:
    from loadkit.errors import ConfigError
    from loadkit.plan import fetch_plan

    base = ["+job=monthly", "year=2024", "month=5"]
    with pytest.raises(ConfigError, match="fetch=only needs job.remote.url"):
        compose(base + ["job.remote.url=null", "fetch=only"])
    with pytest.raises(ConfigError, match="discovery"):
        compose(base + ['job.remote.url="http://x/{year}/"', "job.remote.discovery=ftp"])
    cfg = compose(base + ['job.remote.url="http://127.0.0.1:8000/{year:04d}-{month:02d}/"', "pool.downloads=2"])
    assert cfg.job is not None and cfg.job.remote is not None and cfg.pool.downloads == 2
    assert fetch.month_url(cfg.job.remote.url or "", 2024, 5) == "http://127.0.0.1:8000/2024-05/"
    s3 = compose(base + ['job.remote.url="s3://rfb/{year:04d}-{month:02d}/"',
                         "+job.remote.storage_options.endpoint_url=http://127.0.0.1:9000"])
    assert fetch.settings_from(fetch_plan(s3)).storage_options == {"endpoint_url": "http://127.0.0.1:9000"}
    with pytest.raises(ConfigError, match="URL template"):
        compose(base + ["job.remote.url=rfb"])


@pytest.mark.e2e
def test_cli_month_latest_fetch_only_and_404_exit_codes(remote: tuple, published: SampleManifest, tmp_path: Path,
                                                         pg_dsn: str, schemas: tuple) -> None:
    """`python -m loadkit +job=monthly month=latest fetch=only` against a local mirror; a 404 month exits 3."""
    from tests.test_cli import cli

    base, root, _ = remote
    (root / "2024-06").mkdir()  # not filled yet
    _, led = schemas
    common = ["+job=monthly", f'job.remote.url="{base}{{year:04d}}-{{month:02d}}/"', "job.remote.discovery=html",
              f"data_root={tmp_path}", f"sink.dsn={pg_dsn}", f"sink.ledger_schema={led}", "tracking.enabled=false",
              "job.remote.attempts=2", "job.remote.initial_wait_s=0.01"]
    out = cli([*common, "month=latest", "fetch=only"])
    assert out.returncode == 0, out.stderr
    assert "month=latest is 2024-05" in out.stderr and "fetch: 13 file(s) downloaded" in out.stdout
    same_files(published.folder, tmp_path / "2024-05")
    missing = cli([*common, "year=2024", "month=8", "fetch=only"])
    assert missing.returncode == 3 and "HTTP 404" in missing.stderr and "Traceback" not in missing.stderr


# ---------------------------------------------------------------- object stores (moto's S3 server)


@pytest.fixture()
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    """(endpoint URL, boto3 client): moto's S3 server on a free 127.0.0.1 port, fake credentials in the env."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"moto[server]/boto3 missing: {exc}")
        pytest.skip(f"moto[server]/boto3 missing: {exc}")
    port = free_port()
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield endpoint, boto3.client("s3", endpoint_url=endpoint)
    server.stop()


def test_s3_bucket_as_remote_resumes_and_verifies(s3: tuple, tmp_path: Path) -> None:
    endpoint, client = s3
    month = generate_month(tmp_path / "src", 2024, 5, rows=200, shards=2, seed=4)
    client.create_bucket(Bucket="rfb")
    for f in month.folder.glob("*.zip"):
        client.upload_file(str(f), "rfb", f"cnpj/2024-05/{f.name}")
    client.put_object(Bucket="rfb", Key="cnpj/2024-06/Cnaes.zip", Body=b"not yet")
    s = settings("", url="s3://rfb/cnpj/{year:04d}-{month:02d}/", storage_options={"endpoint_url": endpoint})
    folder = tmp_path / "data" / "2024-05"
    folder.mkdir(parents=True)
    full = (month.folder / "Estabelecimentos1.zip").read_bytes()
    (folder / "Estabelecimentos1.zip.part").write_bytes(full[:3000])  # an earlier run stopped here
    got = {r.name: r for r in fetch.fetch_month(s, tmp_path / "data", 2024, 5)}
    assert len(got) == 13 and got["Estabelecimentos1.zip"].resumed_from == 3000
    assert all(r.etag for r in got.values())
    same_files(month.folder, folder)
    assert fetch.latest_month(s) == (2024, 5)  # 2024-06 lists 1 file, fewer than May
    with pytest.raises(SourceDataError, match="lists no file"):
        fetch.fetch_month(s, tmp_path / "data", 2024, 9)


def test_an_interrupted_fetch_stops_every_transfer_and_resumes(remote: tuple, published: SampleManifest,
                                                               tmp_path: Path) -> None:
    """Ctrl-C during a fetch: the downloads stop at once (not after finishing 1.5 GB files), the .part files
    and the in-progress marker stay, and fetch=auto resumes the month."""
    base, _, _ = remote
    s = settings(base, downloads=2, chunk_bytes=1024)
    calls = {"n": 0}
    real_add = fetch.Progress.add

    def interrupt_after_some_bytes(self: fetch.Progress, n: int, moved: bool = True) -> None:
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        real_add(self, n, moved)

    folder = tmp_path / "data" / "2024-05"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetch.Progress, "add", interrupt_after_some_bytes)
        with pytest.raises(KeyboardInterrupt):
            fetch.fetch_month(s, tmp_path / "data", 2024, 5)
    assert (folder / fetch.IN_PROGRESS).exists() and fetch.needs_fetch(folder)
    assert calls["n"] < 60, "the other transfers stopped instead of running to the end"
    fetch.fetch_month(s, tmp_path / "data", 2024, 5)
    same_files(published.folder, folder)
    assert not (folder / fetch.IN_PROGRESS).exists() and not fetch.needs_fetch(folder)


# ---------------------------------------------------------------- the listing parsers, property-tested

NAMES = st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
                         min_size=1, max_size=30).filter(lambda n: n not in (".", "..") and n.strip() == n and n),
                 min_size=1, max_size=8, unique=True)


def _mock(body: bytes, status: int = 207) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(status, content=body)))


@hsettings(max_examples=60, deadline=None)
@given(NAMES)
def test_html_listing_round_trips_any_file_name(names: list) -> None:
    """Whatever the names (spaces, $, #, ?, %, accents), a percent-encoded listing gives them back exactly."""
    base = "http://mirror.test/dados/2024-05/"
    links = "".join(f'<a href="{html.escape(quote(n))}">{html.escape(n)}</a>' for n in names)
    page = f'<a href="../">Parent</a><a href="?C=N;O=D">Name</a><a href="http://other.test/x">x</a>{links}'
    got = fetch.list_html(_mock(page.encode(), 200), base)
    assert [n for n, _ in got] == names
    assert all(u.startswith(base) for _, u in got)


@hsettings(max_examples=60, deadline=None)
@given(NAMES, st.lists(st.integers(0, 2**40), min_size=8, max_size=8))
def test_webdav_listing_round_trips_names_and_sizes(names: list, sizes: list) -> None:
    base = "https://share.test/public.php/dav/files/SHARE/2024-05/"
    path = "/public.php/dav/files/SHARE/2024-05/"
    entries = [f"<d:response><d:href>{path}</d:href><d:propstat><d:prop><d:resourcetype><d:collection/>"
               "</d:resourcetype></d:prop></d:propstat></d:response>"]
    for n, size in zip(names, sizes):
        entries.append(f"<d:response><d:href>{html.escape(path + quote(n))}</d:href><d:propstat><d:prop>"
                       f"<d:getcontentlength>{size}</d:getcontentlength><d:getetag>&quot;{size}&quot;</d:getetag>"
                       "<d:resourcetype/></d:prop></d:propstat></d:response>")
    body = f'<?xml version="1.0"?><d:multistatus xmlns:d="DAV:">{"".join(entries)}</d:multistatus>'
    got = fetch.list_webdav(_mock(body.encode()), base)
    assert [(n, size, etag) for n, _, size, etag in got] == [(n, s, f'"{s}"') for n, s in zip(names, sizes)]
    assert all(unquote(urlsplit(u).path) == path + n and not urlsplit(u).query and not urlsplit(u).fragment
               for n, u, _, _ in got)  # the download URL names the same file, whatever its characters
