"""The fetch stage: download a month's source files from a remote folder into ``data_root/YYYY-MM/``.

Declared in YAML (``job.remote``): a URL template per month and how to list it -- ``webdav``
(PROPFIND, e.g. a public Nextcloud share), ``html`` (a plain HTTP directory listing) or ``list``
(explicit file names). Files are downloaded ``pool.downloads`` at a time with httpx; every
transfer is retried with exponential backoff (tenacity) on network errors and 5xx/429 answers,
and each retry resumes where the partial file ends (HTTP ``Range``, guarded by ``If-Range`` with
the ETag, so a file that changed on the server restarts from zero). A file is complete only when
its size matches the listing (or Content-Length) and, for zips, every member passes its CRC test;
a corrupt download is fetched once more from scratch, then fails the run. Complete files are
renamed atomically from ``<name>.part`` into place, so a loader never sees half a file.

Errors are classified: a month or file the server does not have (404) and a file corrupt twice
are source-data errors (exit 3); network failures that outlast the retries are transient (exit 4);
a missing or impossible ``job.remote`` is a config error (exit 2).
"""
from __future__ import annotations

import fnmatch
import functools
import logging
import os
import re
import sys
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import quote, unquote, urljoin, urlsplit
from xml.etree import ElementTree

from loadkit.errors import Category, ConfigError, LoadkitError, SourceDataError
from loadkit.security import mask_dsn, qualified

if TYPE_CHECKING:  # httpx and tenacity (~0.1 CPU-s) are imported by the functions that fetch: a run
    import httpx    # whose month is already here (fetch=auto) or has no remote never pays for them

    from loadkit.plan import FetchPlan

log = logging.getLogger("loadkit.source.fetch")

DISCOVERY = ("webdav", "html", "list")
FETCH_MODES = ("auto", "always", "only", "never")
IN_PROGRESS = ".loadkit-fetching"  # in the month folder while a fetch has not completed
_MONTH_DIR = re.compile(r"(\d{4})-(\d{2})/?$")


class DownloadError(LoadkitError):
    """The network or the server kept failing after every retry: try again later."""

    category = Category.TRANSIENT


class _Retryable(Exception):
    """A transfer failed in a way a retry (resuming the partial file) may fix."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of the remote month: its name, URL, and the size/ETag the listing announced (None: unknown)."""

    name: str
    url: str
    size: Optional[int] = None
    etag: Optional[str] = None


@dataclass
class Fetched:
    """What the fetch stage did for one file (a row of the ledger's ``fetched`` table)."""

    name: str
    url: str
    path: str
    size: int
    etag: Optional[str]
    status: str  # fetched | present
    seconds: float = 0.0
    resumed_from: int = 0  # bytes a previous, interrupted download had already written
    attempts: int = 1  # transfers (1 + retries), across integrity refetches
    refetched: bool = False  # the first complete download failed its integrity check
    started: float = 0.0  # time.monotonic() when this file's download began (for the stage's wall time)


@dataclass
class Settings:
    """The fetch knobs, from ``job.remote`` and ``pool.downloads`` (see loadkit.config.RemoteConfig)."""

    url: str
    discovery: str = "html"
    files: Tuple[str, ...] = ()
    include: Tuple[str, ...] = ("*.zip",)
    downloads: int = 4
    attempts: int = 5
    initial_wait_s: float = 0.5
    max_wait_s: float = 30.0
    timeout_s: float = 60.0
    verify_zip: bool = True
    chunk_bytes: int = 1 << 20
    progress_every_s: float = 5.0
    bar: bool = False  # redraw a progress line on stderr (interactive terminals)
    headers: Dict[str, str] = field(default_factory=dict)
    # Non-HTTP URLs (s3://, gs://, ...): fsspec filesystem options (e.g. endpoint_url). Credentials come
    # from the environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...), never from here.
    storage_options: Dict[str, Any] = field(default_factory=dict)


def settings_from(plan: FetchPlan) -> Settings:
    """The fetch knobs of a run's FetchPlan (job.remote, pool.downloads; see loadkit.plan.fetch_plan)."""
    if not plan.url:
        raise ConfigError("no job.remote.url: the job declares no remote to fetch from", key="job.remote.url")
    return Settings(url=plan.url, discovery=plan.discovery, files=plan.files, include=plan.include,
                    downloads=plan.downloads, attempts=plan.attempts, initial_wait_s=plan.initial_wait_s,
                    max_wait_s=plan.max_wait_s, timeout_s=plan.timeout_s, verify_zip=plan.verify_zip,
                    storage_options=dict(plan.storage_options), bar=plan.progress_bars and sys.stderr.isatty())


def month_url(template: str, year: int, month: int) -> str:
    """The month's folder URL: the template rendered with year/month, ending in '/'."""
    try:
        url = template.format(year=year, month=month)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"job.remote.url is not a valid template: {exc}", key="job.remote.url") from None
    return url if url.endswith("/") else url + "/"


def _safe(url: str) -> str:
    """The URL without credentials, for logs, errors and the ledger."""
    return (mask_dsn(url) or url) if "@" in urlsplit(url).netloc else url


# ---------------------------------------------------------------- discovery


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: List[str] = []

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)


def _check_listing(resp: httpx.Response, url: str) -> None:
    if resp.status_code == 404:
        raise SourceDataError("the remote month does not exist (HTTP 404): not published yet, or a wrong "
                              "job.remote.url", url=_safe(url))
    if resp.status_code in (401, 403):
        raise ConfigError(f"the remote refused the listing (HTTP {resp.status_code}): check job.remote.url and "
                          "its credentials", key="job.remote.url")
    if resp.status_code == 429 or resp.status_code >= 500:
        raise _Retryable(f"HTTP {resp.status_code} listing {_safe(url)}")
    if resp.status_code >= 400:
        raise SourceDataError(f"listing failed with HTTP {resp.status_code}", url=_safe(url))


def list_html(client: httpx.Client, url: str) -> List[Tuple[str, str]]:
    """(name, absolute URL) of every link in a plain HTTP directory listing (child entries only)."""
    resp = client.get(url)
    _check_listing(resp, url)
    parser = _Links()
    parser.feed(resp.text)
    out = []
    for href in parser.hrefs:
        absolute = urljoin(url, href)
        if not absolute.startswith(url) or absolute == url:
            continue  # parent links, sorting links (?C=M), other sites
        rel = absolute[len(url):].split("#")[0].split("?")[0]  # raw: an encoded %3F is part of a name
        if rel and "/" not in rel.rstrip("/"):  # a child (file, or folder ending in '/'), not deeper
            out.append((unquote(rel), absolute.split("#")[0]))
    return out


_DAV = "{DAV:}"


def list_webdav(client: httpx.Client, url: str) -> List[Tuple[str, str, Optional[int], Optional[str]]]:
    """(name, URL, size, ETag) of a WebDAV collection's children (PROPFIND, Depth: 1); folders end in '/'."""
    body = ('<?xml version="1.0"?><d:propfind xmlns:d="DAV:"><d:prop><d:getcontentlength/><d:getetag/>'
            "<d:resourcetype/></d:prop></d:propfind>")
    resp = client.request("PROPFIND", url, headers={"Depth": "1", "Content-Type": "application/xml"}, content=body)
    _check_listing(resp, url)
    try:
        root = ElementTree.fromstring(resp.content)
    except ElementTree.ParseError as exc:
        raise SourceDataError(f"the WebDAV listing is not XML: {exc}", url=_safe(url)) from None
    base_path = unquote(urlsplit(url).path).rstrip("/") + "/"
    out = []
    for r in root.iter(f"{_DAV}response"):
        href = unquote(r.findtext(f"{_DAV}href") or "")
        path = urlsplit(href).path if "://" in href else href
        if path.rstrip("/") + "/" == base_path or not path.startswith(base_path):
            continue
        is_dir = r.find(f".//{_DAV}resourcetype/{_DAV}collection") is not None
        name = path[len(base_path):].rstrip("/") + ("/" if is_dir else "")
        size = r.findtext(f".//{_DAV}getcontentlength")
        etag = r.findtext(f".//{_DAV}getetag")
        out.append((name, urljoin(url, quote(name)), int(size) if size and size.isdigit() else None, etag or None))
    return out


def _head(client: httpx.Client, url: str) -> Tuple[Optional[int], Optional[str]]:
    resp = client.head(url)
    if resp.status_code == 404:
        raise SourceDataError("a declared remote file does not exist (HTTP 404)", url=_safe(url))
    if resp.status_code == 429 or resp.status_code >= 500:
        raise _Retryable(f"HTTP {resp.status_code} on HEAD {_safe(url)}")
    if resp.status_code >= 400:
        return None, None
    length = resp.headers.get("content-length")
    return (int(length) if length and length.isdigit() else None), resp.headers.get("etag")


def discover(client: httpx.Client, s: Settings, year: int, month: int) -> List[RemoteFile]:
    """The month's remote files matching ``include``, sorted by name, with size/ETag where known."""
    url = month_url(s.url, year, month)
    retry = _retrying(s)
    if s.discovery == "list":
        names = [n.format(year=year, month=month) for n in s.files]
        files = []
        for n in names:
            size, etag = retry(functools.partial(_head, client, urljoin(url, quote(n))))
            files.append(RemoteFile(n, urljoin(url, quote(n)), size, etag))
        return files
    if s.discovery == "webdav":
        entries = retry(lambda: list_webdav(client, url))
        found = [RemoteFile(n, u, size, etag) for n, u, size, etag in entries if not n.endswith("/")]
    else:
        found = []
        for name, u in retry(lambda: list_html(client, url)):
            if not name.endswith("/"):
                found.append(RemoteFile(name, u))
    found = [f for f in found if any(fnmatch.fnmatchcase(f.name, p) for p in s.include)]
    if s.discovery == "html":  # a directory listing gives no reliable size: ask the server
        found = [RemoteFile(f.name, f.url, *retry(functools.partial(_head, client, f.url))) for f in found]
    if not found:
        raise SourceDataError(f"the remote month lists no file matching {list(s.include)}", url=_safe(url))
    return sorted(found, key=lambda f: f.name)


def latest_month(s: Settings, root_url: Optional[str] = None) -> Tuple[int, int]:
    """(year, month) of the newest complete month folder under ``root_url``.

    ``root_url`` defaults to the part of the URL template before ``{year``. A month counts as
    complete when it lists at least one file matching ``include`` and no fewer than the month
    before it: a folder the publisher has created but is still filling is skipped."""
    base = root_url or s.url.split("{year", 1)[0]
    listing = s if s.discovery != "list" else _as_listing(s)
    opener: Any = _client(s) if is_http(s.url) else _FsClient(s)
    with opener as client:
        if not is_http(s.url):
            names = [str(e["name"]).rstrip("/") + "/" for e in
                     _retrying(s)(lambda: _fs_call(lambda: client.fs.ls(base, detail=True), base))
                     if e.get("type") == "directory"]
        elif listing.discovery == "webdav":
            names = [n for n, _, _, _ in _retrying(s)(lambda: list_webdav(client, base))]
        else:
            names = [n for n, _ in _retrying(s)(lambda: list_html(client, base))]
        months = sorted({(int(m.group(1)), int(m.group(2))) for n in names if (m := _MONTH_DIR.search(n))},
                        reverse=True)

        def count(ym: Tuple[int, int]) -> int:
            try:
                return len(discover(client, listing, *ym) if is_http(s.url) else client.discover(*ym))
            except SourceDataError:
                return 0

        counts = [count(ym) for ym in months[:2]]
        for i, ym in enumerate(months):
            if i + 1 < len(months) and len(counts) < i + 2:
                counts.append(count(months[i + 1]))
            older = counts[i + 1] if i + 1 < len(counts) else 0
            if counts[i] > 0 and counts[i] >= older:
                return ym
            log.info("fetch: %04d-%02d lists %d file(s), the month before %d: not complete yet", *ym, counts[i], older)
    raise SourceDataError("no complete published month found", url=_safe(base))


def _as_listing(s: Settings) -> Settings:
    return Settings(**{**s.__dict__, "discovery": "html"})


# ---------------------------------------------------------------- transfer


def _is_retryable(exc: BaseException) -> bool:  # Stopped is not: an interrupt ends the fetch at once
    import httpx

    return isinstance(exc, (_Retryable, httpx.TransportError))


def _log_retry(state: Any) -> None:
    log.warning("fetch: %s; retrying", state.outcome.exception() if state.outcome is not None else "failed")


def _retrying(s: Settings, sleep: Callable[[float], None] = time.sleep) -> Callable[[Callable[[], Any]], Any]:
    """Call a function under the fetch retry policy; the last failure becomes a DownloadError (transient)."""
    import httpx
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

    def call(fn: Callable[[], Any]) -> Any:
        try:
            for attempt in Retrying(stop=stop_after_attempt(s.attempts), reraise=True, sleep=sleep,
                                    wait=wait_exponential(multiplier=s.initial_wait_s, max=s.max_wait_s),
                                    retry=retry_if_exception(_is_retryable),
                                    before_sleep=_log_retry):
                with attempt:
                    return fn()
        except (_Retryable, httpx.TransportError) as exc:
            raise DownloadError(f"download failed after {s.attempts} attempts: {type(exc).__name__}: {exc}") from None
    return call


class Stopped(Exception):
    """The fetch was asked to stop (the run was interrupted): partial files stay for the next run."""


class Progress:
    """Bytes done vs expected across every file, logged every few seconds with the rate and the ETA;
    with ``bar`` (an interactive terminal), also redrawn in place on stderr twice a second.

    ``stop`` is set when the run is interrupted: every transfer checks it between blocks."""

    def __init__(self, total: int, files: int, every_s: float, label: str, bar: bool = False) -> None:
        self.total, self.files, self.every_s, self.label, self.bar = total, files, every_s, label, bar
        self.done = 0  # bytes on disk for the month, resumed ones included
        self.moved = 0  # bytes transferred by this run
        self.finished = 0
        self.stop = threading.Event()
        self._start = time.monotonic()
        self._last = self._drawn = self._start
        self._lock = threading.Lock()

    def add(self, n: int, moved: bool = True) -> None:
        if self.stop.is_set():
            raise Stopped("fetch interrupted")
        with self._lock:
            self.done += n
            self.moved += n if moved else 0
            now = time.monotonic()
            if self.bar and now - self._drawn >= 0.5:
                self._drawn = now
                sys.stderr.write("\r" + self.line()[:150].ljust(110))
                sys.stderr.flush()
            if now - self._last >= self.every_s:
                self._last = now
                log.info("%s", self.line())

    def file_done(self) -> None:
        with self._lock:
            self.finished += 1

    @property
    def rate(self) -> float:
        """Bytes per second moved by this run."""
        elapsed = time.monotonic() - self._start
        return self.moved / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        left = max(0, self.total - self.done)
        eta = f"{left / rate:,.0f}s" if rate > 0 else "?"
        pct = 100 * self.done / self.total if self.total else 100.0
        return (f"fetch {self.label}: {self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB ({pct:.0f}%), "
                f"{rate / 1e6:,.1f} MB/s, ETA {eta}, {self.finished}/{self.files} files")


def zip_problem(path: Path) -> Optional[str]:
    """None if the zip opens and every member passes its CRC test, else what is wrong."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        return f"not a readable zip ({exc})"
    return None if bad is None else f"member {bad} fails its CRC check"


def _resume_from(f: RemoteFile, part: Path, progress: Progress) -> Optional[int]:
    """Bytes of ``part`` to keep and resume after (a partial file longer than the remote one is
    started over); None when it is already complete."""
    have = part.stat().st_size if part.exists() else 0
    if f.size is not None and have > f.size:
        part.unlink()
        progress.add(-have, moved=False)
        have = 0
    if f.size is not None and have == f.size:
        return None
    return have


def _transfer(client: httpx.Client, f: RemoteFile, part: Path, s: Settings, progress: Progress,
              etag: List[Optional[str]]) -> None:
    """One GET of whatever the partial file lacks; raises _Retryable (or a transport error) to resume."""
    have = _resume_from(f, part, progress)
    if have is None:
        return
    headers = dict(s.headers)
    if have:
        headers["Range"] = f"bytes={have}-"
        if etag[0] and not etag[0].startswith("W/"):
            headers["If-Range"] = etag[0]
    with client.stream("GET", f.url, headers=headers) as resp:
        if resp.status_code == 404:
            raise SourceDataError("the remote file does not exist (HTTP 404)", url=_safe(f.url))
        if resp.status_code == 416:  # our partial file is not a prefix of theirs: start again
            part.unlink(missing_ok=True)
            progress.add(-have, moved=False)
            raise _Retryable("range not satisfiable; restarting the file")
        if resp.status_code == 429 or resp.status_code >= 500:
            raise _Retryable(f"HTTP {resp.status_code}")
        if resp.status_code not in (200, 206):
            raise SourceDataError(f"download failed with HTTP {resp.status_code}", url=_safe(f.url))
        etag[0] = resp.headers.get("etag") or etag[0]
        if resp.status_code == 200 and have:  # the server ignored the range (or the file changed)
            progress.add(-have, moved=False)
            have = 0
        if resp.status_code == 206:
            start = re.match(r"bytes (\d+)-", resp.headers.get("content-range", ""))
            if start is None or int(start.group(1)) != have:
                part.unlink(missing_ok=True)
                progress.add(-have, moved=False)
                raise _Retryable("unexpected Content-Range; restarting the file")
        expected = f.size
        length = resp.headers.get("content-length")
        if expected is None and length and length.isdigit():
            expected = have + int(length)
        with open(part, "ab" if have else "wb") as fh:
            for block in resp.iter_bytes(s.chunk_bytes):
                fh.write(block)
                progress.add(len(block))
            fh.flush()
            os.fsync(fh.fileno())
    got = part.stat().st_size
    if expected is not None and got < expected:
        raise _Retryable(f"connection ended at {got:,} of {expected:,} bytes")


def fetch_file(client: Any, f: RemoteFile, folder: Path, s: Settings, progress: Progress,
               sleep: Callable[[float], None] = time.sleep) -> Fetched:
    """Download one file into folder (resuming a ``.part`` left by an earlier attempt), verify, rename."""
    import httpx

    dest, part = folder / f.name, folder / (f.name + ".part")
    started = time.monotonic()
    resumed = part.stat().st_size if part.exists() else 0
    if resumed:
        progress.add(resumed, moved=False)
        log.info("fetch: resuming %s at %s bytes", f.name, f"{resumed:,}")
    attempts = 0
    etag: List[Optional[str]] = [f.etag]
    for integrity_try in (1, 2):
        def transfer() -> None:
            nonlocal attempts
            attempts += 1
            if isinstance(client, httpx.Client):
                _transfer(client, f, part, s, progress, etag)
            else:
                _transfer_fs(client, f, part, s, progress)
        _retrying(s, sleep)(transfer)
        size = part.stat().st_size
        problem = None
        if f.size is not None and size != f.size:
            problem = f"size {size:,} bytes, the listing says {f.size:,}"
        elif s.verify_zip and f.name.lower().endswith(".zip"):
            problem = zip_problem(part)
        if problem is None:
            os.replace(part, dest)  # atomic: the loader sees the whole file or none of it
            progress.file_done()
            return Fetched(f.name, _safe(f.url), str(dest), size, etag[0], "fetched", time.monotonic() - started,
                           resumed, attempts, integrity_try > 1, started)
        part.unlink(missing_ok=True)
        progress.add(-size, moved=False)
        if integrity_try == 1:
            log.warning("fetch: %s is corrupt (%s); downloading it again", f.name, problem)
    raise SourceDataError(f"downloaded twice, corrupt both times: {problem}", file=f.name, url=_safe(f.url))


def is_http(url: str) -> bool:
    """True for http(s) remotes (httpx); anything else goes through fsspec."""
    return url.startswith(("http://", "https://"))


class _FsClient:
    """An fsspec filesystem (s3://, gs://, abfs://, file://, ...) as a remote: listing with sizes and ETags."""

    def __init__(self, s: Settings) -> None:
        import fsspec

        self.s = s
        protocol = s.url.split("://", 1)[0]
        try:
            self.fs = fsspec.filesystem(protocol, **s.storage_options)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"cannot open {protocol}:// remotes: {exc}", key="job.remote.url") from None

    def __enter__(self) -> "_FsClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def discover(self, year: int, month: int) -> List[RemoteFile]:
        url = month_url(self.s.url, year, month)
        try:
            entries = _retrying(self.s)(lambda: _fs_call(lambda: self.fs.ls(url, detail=True), url))
        except FileNotFoundError:
            entries = []
        files = []
        for e in entries:
            name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") == "directory" or not any(fnmatch.fnmatchcase(name, p) for p in self.s.include):
                continue
            etag = e.get("ETag") or e.get("etag") or e.get("md5Hash")
            files.append(RemoteFile(name, url + name, int(e["size"]) if e.get("size") is not None else None,
                                    str(etag) if etag else None))
        if not files:
            raise SourceDataError(f"the remote month lists no file matching {list(self.s.include)} (missing, or "
                                  "not published yet)", url=_safe(url))
        return sorted(files, key=lambda f: f.name)


def _fs_call(fn: Callable[[], Any], url: str) -> Any:
    """Run an fsspec call; transient-looking failures become _Retryable, the rest are classified."""
    try:
        return fn()
    except FileNotFoundError:
        raise
    except PermissionError as exc:
        raise ConfigError(f"the remote refused access: {exc}", key="job.remote.url") from None
    except (OSError, TimeoutError, ConnectionError) as exc:
        raise _Retryable(f"{type(exc).__name__}: {exc}") from None


def _transfer_fs(client: _FsClient, f: RemoteFile, part: Path, s: Settings, progress: Progress) -> None:
    """Append what the partial file lacks, reading the object from that offset (ranged GETs underneath)."""
    have = _resume_from(f, part, progress)
    if have is None:
        return

    def copy() -> None:
        with client.fs.open(f.url, "rb", block_size=s.chunk_bytes) as src, open(part, "ab" if have else "wb") as fh:
            src.seek(have)
            while block := src.read(s.chunk_bytes):
                fh.write(block)
                progress.add(len(block))
            fh.flush()
            os.fsync(fh.fileno())

    try:
        _fs_call(copy, f.url)
    except FileNotFoundError:
        raise SourceDataError("the remote file does not exist", url=_safe(f.url)) from None
    if f.size is not None and part.stat().st_size < f.size:
        raise _Retryable(f"read ended at {part.stat().st_size:,} of {f.size:,} bytes")


def _client(s: Settings) -> httpx.Client:
    """One pooled HTTP client for the whole month (keep-alive across files), redirects followed."""
    import httpx

    return httpx.Client(timeout=httpx.Timeout(s.timeout_s, connect=min(s.timeout_s, 30.0)), follow_redirects=True,
                        headers={"User-Agent": "loadkit-fetch"})


def needs_fetch(folder: Path) -> bool:
    """fetch=auto: contact the remote only for a month folder that is missing or empty, or whose last
    fetch did not finish (its in-progress marker or a ``.part`` file is still there). A folder filled
    by hand is trusted as it is; fetch=always re-lists the remote every run."""
    if not folder.is_dir():
        return True
    if (folder / IN_PROGRESS).exists() or any(folder.glob("*.part")):
        return True
    return not any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir())


def _present(folder: Path, f: RemoteFile) -> bool:
    """A complete local copy: same size as the listing (no size known: the file exists)."""
    dest = folder / f.name
    return dest.is_file() and (f.size is None or dest.stat().st_size == f.size)


def fetch_month(s: Settings, data_root: Path, year: int, month: int,
                sleep: Callable[[float], None] = time.sleep) -> List[Fetched]:
    """Download what ``data_root/YYYY-MM/`` lacks of the remote month; return one record per remote file.

    Files already present with the listed size are kept (status ``present``). Raises SourceDataError
    (404, corrupt twice), DownloadError (network, after retries) or ConfigError.
    """
    folder = Path(data_root) / f"{year:04d}-{month:02d}"
    label = f"{year:04d}-{month:02d}"
    opener: Any = _client(s) if is_http(s.url) else _FsClient(s)
    with opener as client:
        files = discover(client, s, year, month) if is_http(s.url) else client.discover(year, month)
        todo = [f for f in files if not _present(folder, f)]
        out = [Fetched(f.name, _safe(f.url), str(folder / f.name), (folder / f.name).stat().st_size, f.etag,
                       "present") for f in files if f not in todo]
        if not todo:
            log.info("fetch %s: all %d file(s) already present", label, len(files))
            return out
        folder.mkdir(parents=True, exist_ok=True)
        (folder / IN_PROGRESS).write_text(_safe(month_url(s.url, year, month)) + "\n", encoding="utf-8")
        progress = Progress(sum(f.size or 0 for f in todo), len(todo), s.progress_every_s, label, s.bar)
        log.info("fetch %s: %d of %d file(s) to download from %s (%s MB), %d at a time", label, len(todo),
                 len(files), _safe(month_url(s.url, year, month)), f"{progress.total / 1e6:,.1f}", s.downloads)
        pool = ThreadPoolExecutor(max_workers=max(1, s.downloads), thread_name_prefix="fetch")
        errors = []
        try:
            futures = [pool.submit(fetch_file, client, f, folder, s, progress, sleep) for f in todo]
            for fut in futures:
                try:
                    out.append(fut.result())
                except LoadkitError as exc:
                    errors.append(exc)
        except BaseException:  # interrupted: stop every transfer now; the .part files resume next run
            progress.stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if s.bar:
                sys.stderr.write("\n")
        log.info("%s", progress.line())
        if errors:  # the first one, by the remote's order; the rest are in the log
            for other in errors[1:]:
                log.error("fetch: %s", other)
            raise errors[0]
    (folder / IN_PROGRESS).unlink(missing_ok=True)
    return sorted(out, key=lambda r: r.name)


def summary_line(rows: List[Fetched]) -> str:
    """One line for the run summary: files fetched vs present, bytes, time, throughput."""
    got = [r for r in rows if r.status == "fetched"]
    size = sum(r.size - r.resumed_from for r in got)
    secs = (max(r.started + r.seconds for r in got) - min(r.started for r in got)) if got else 0.0
    rate = f", {size / secs / 1e6:,.1f} MB/s" if secs > 0 else ""
    return (f"fetch: {len(got)} file(s) downloaded ({size / 1e6:,.1f} MB in {secs:,.1f} s{rate}), "
            f"{len(rows) - len(got)} already present")


# ---------------------------------------------------------------- ledger


def ledger_ddl(schema: str) -> str:
    """The ledger's ``fetched`` table: one row per file a run downloaded (created on first use)."""
    return (f"CREATE TABLE IF NOT EXISTS {qualified(schema, 'fetched')} ("
            "period text NOT NULL, name text NOT NULL, url text NOT NULL, path text NOT NULL, size bigint NOT NULL, "
            "etag text, status text NOT NULL, seconds double precision, resumed_from bigint, attempts int, "
            "refetched boolean, run_id text, fetched_at timestamptz NOT NULL DEFAULT now(), "
            "PRIMARY KEY (period, name, fetched_at))")


def record(cur: Any, schema: str, run_id: Optional[str], period: str, rows: List[Fetched]) -> None:
    """One ``fetched`` ledger row per file this run downloaded (files already present are not repeated)."""
    cur.execute(ledger_ddl(schema))
    for r in rows:
        if r.status != "fetched":
            continue
        cur.execute(f"INSERT INTO {qualified(schema, 'fetched')} (period, name, url, path, size, etag, status, "
                    "seconds, resumed_from, attempts, refetched, run_id) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    (period, r.name, r.url, r.path, r.size, r.etag, r.status, r.seconds, r.resumed_from, r.attempts,
                     r.refetched, run_id))
