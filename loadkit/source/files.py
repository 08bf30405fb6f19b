"""Source files: discovery, fingerprints, container formats and record-aligned chunks.

A source file is streamed member by member (plain, gzip, zip) and cut into chunks of
roughly ``target_bytes`` that always end on a record boundary, so each chunk parses on
its own and has a stable identity (its byte range in the decompressed member). Byte
ranges, not row counts, identify batches: a rerun with another batch size can still
skip exactly the ranges a previous run committed.
"""
from __future__ import annotations

import fnmatch
import gzip
import hashlib
import os
import re
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union, cast

import numpy as np

from loadkit.source import scanner
from loadkit.errors import SourceDataError

if TYPE_CHECKING:
    from loadkit.plan import RetryPolicy

_READ_SIZE = 4 * 1024 * 1024
_FINGERPRINT_BLOCK = 8 * 1024 * 1024
_MIN_TARGET = 1024  # smallest chunk target in bytes (tests lower it to cut tiny inputs into many chunks)
_HEAD_BYTES = 4096  # raw text kept of a record too long to hold
_MIN_READ = 64 * 1024  # ChunkReader's smallest read: what it holds past a chunk's window is at most this


@dataclass(frozen=True)
class Chunk:
    """A record-aligned slice of one member's decompressed bytes."""

    member: str
    start: int  # byte offset of the first record in the member
    end: int  # byte offset just after the last record
    first_line: int  # 1-based physical line number of the first record
    data: bytes
    # Set when the chunk is one record the reader rejected itself (longer than max_record_bytes):
    # the reason; ``data`` then holds only the record's first bytes, for the reject's raw text.
    reject: Optional[str] = None
    # The scanner's verdict on ``data`` (scanner.Summary), when the reader scanned exactly it.
    summary: Optional["scanner.Summary"] = None


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Environment variables holding object-store credentials (botocore, gcsfs, adlfs): never printed.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING",
               "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY")
# Object metadata fields that change whenever the content does (S3/HTTP ETag, GCS md5/crc32c, Azure
# content_md5), in order of preference: with one of them a remote file's identity costs no download.
_CONTENT_TAGS = ("etag", "md5hash", "content-md5", "content_md5", "crc32c", "digest", "checksum")


def is_url(path: Union[str, Path]) -> bool:
    """True for an fsspec URL (``s3://``, ``gs://``, ``http(s)://``, ``memory://`` ...): read through fsspec.
    ``file://`` URLs and plain paths are local files."""
    m = _URL.match(str(path))
    return m is not None and m.group(1).lower() not in ("file", "local")


def url_join(root: str, rel: str) -> str:
    """``rel`` under the URL ``root`` (``s3://b/data`` + ``2024-05/*.zip``); an absolute URL ``rel`` as is."""
    if is_url(rel):
        return rel
    return root.rstrip("/") + "/" + rel.lstrip("/")


def basename(path: Union[str, Path]) -> str:
    """The last path component of a local path or URL (the member name of a plain or gzip file)."""
    return PurePosixPath(str(path).split("?", 1)[0].rstrip("/")).name if is_url(path) else Path(path).name


@dataclass(frozen=True)
class Found:
    """One discovered source file: where to open it, what to call it, its size and its identity."""

    path: str  # absolute local path, or the fsspec URL the read tasks open
    rel: str  # for humans and the ledger: relative to the data root, or the URL (credentials masked)
    size: int  # bytes
    fingerprint: str  # 64 hex digits (see ``fingerprint`` / ``remote_fingerprint``)


def fingerprint(path: Union[str, Path]) -> str:
    """sha256 of the file's bytes: the identity of a file across runs and renames.

    For a URL, see ``remote_fingerprint`` (from the object's ETag/checksum when the store gives one)."""
    if is_url(path):
        fs, key = _url_fs(str(path))
        return remote_fingerprint(fs, key, fs.info(key))
    digest = hashlib.sha256()
    block = bytearray(_FINGERPRINT_BLOCK)  # one buffer read into: no fresh 8 MB object (page faults) per read
    with open(path, "rb") as fh, memoryview(block) as view:
        while got := fh.readinto(view):
            digest.update(view[:got])
    return digest.hexdigest()


def usable_cpus(configured: Optional[int] = None) -> int:
    """Cores this process may use: ``configured`` (``env.num_cpus``) when set, else its CPU affinity."""
    if configured:
        return configured
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Fingerprints:
    """``fingerprint`` of local files on up to ``threads`` threads, started ahead of use.

    ``start(paths)`` queues files; calling the object with a path returns its sha256 (hashing it now if
    it was not started), raising what ``fingerprint`` raises. sha256 is sequential within a file, so the
    parallelism is across files: hashlib and file reads release the GIL, so N files hash on N cores.
    Leaving the ``with`` block cancels hashes nobody asked for (a plan that failed part-way)."""

    def __init__(self, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="loadkit-hash")
        self._futures: Dict[str, Any] = {}

    def start(self, paths: Sequence[Union[str, Path]]) -> None:
        for p in paths:
            if str(p) not in self._futures:
                self._futures[str(p)] = self._pool.submit(fingerprint, p)

    def __call__(self, path: Union[str, Path]) -> str:
        self.start([path])
        return cast(str, self._futures[str(path)].result())

    def __enter__(self) -> "Fingerprints":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def remote_fingerprint(fs: Any, key: str, info: Mapping[str, Any]) -> str:
    """A remote object's identity, 64 hex digits like a local sha256.

    sha256 over (protocol, content tag, size) when the listing carries a content tag (S3/HTTP ETag,
    GCS md5Hash/crc32c ...): a changed object gets a new tag, so a rerun skips exactly what it loaded,
    and no byte is downloaded twice. Without a tag (some HTTP servers, memory://): the sha256 of the
    content, streamed (an HTTP object without a tag in its listing is asked for its ETag with a HEAD
    first). The same bytes on disk and in a bucket are therefore two files to the ledger
    (load a month from one place)."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    tags = {str(k).lower(): v for k, v in info.items()}
    if proto in ("http", "https") and not any(tags.get(n) for n in _CONTENT_TAGS):
        # An HTML listing carries no ETag, the object's HEAD does: one request instead of a download.
        tags.update({str(k).lower(): v for k, v in fs.info(key).items()})
    for name in _CONTENT_TAGS:
        value = tags.get(name)
        if value:
            text = f"{proto}|{name}|{str(value).strip(chr(34))}|{info.get('size')}"
            return hashlib.sha256(text.encode()).hexdigest()
    digest = hashlib.sha256()
    with open_source(fs.unstrip_protocol(key)) as fh:  # retried from the offset if the connection drops
        while block := fh.read(_FINGERPRINT_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _url_fs(url: str) -> Tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL. Options (endpoint, credentials) come from the
    standard places only: the protocol's own environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, an IAM
    role ...) and fsspec's config (``FSSPEC_S3='{"endpoint_url": ...}'``, ``FSSPEC_CONFIG_DIR``), so no
    credential passes through loadkit's config, logs or the ledger."""
    import os

    from fsspec.core import url_to_fs

    from loadkit.security import register_secret

    for name in _SECRET_ENV:  # masked from here on in logs, errors and ledger text (security.mask_text)
        register_secret(os.environ.get(name))
    return url_to_fs(url)


def discover_urls(patterns: Sequence[str]) -> List[Found]:
    """Objects matching the (rendered) URL glob patterns, sorted by URL, deduplicated; each with its size
    and fingerprint from the listing (one LIST per pattern, plus a download only for objects without a
    content tag). Raises SourceDataError when nothing matches, like ``discover``; OperatorError when the
    store refuses the listing (credentials, policy); ConfigError for an unknown protocol or one whose
    fsspec package is not installed. Network failures propagate (classified transient)."""
    from loadkit.errors import ConfigError, OperatorError
    from loadkit.security import mask_text

    found: Dict[str, Found] = {}
    for pattern in patterns:
        try:
            fs, key = _url_fs(pattern)
            hits = fs.glob(key, detail=True)
        except FileNotFoundError:  # no such bucket/prefix: nothing matches this pattern
            continue
        except PermissionError as exc:
            raise OperatorError(f"the store refuses to list {mask_text(pattern)}: {mask_text(str(exc))}") from None
        except (ValueError, ImportError) as exc:
            raise ConfigError(f"cannot read {mask_text(pattern)} through fsspec: {type(exc).__name__}: "
                              f"{mask_text(str(exc))}") from None
        for name, info in sorted(hits.items()):
            if info.get("type", "file") != "file":
                continue
            url = fs.unstrip_protocol(name)
            if url not in found:
                found[url] = Found(url, mask_text(url), int(info.get("size") or 0),
                                   remote_fingerprint(fs, name, info))
    if not found:
        raise SourceDataError(f"no source file matches {', '.join(mask_text(p) for p in patterns)}")
    return [found[k] for k in sorted(found)]


@contextmanager
def open_source(path: Union[str, Path], retry: Optional["RetryPolicy"] = None) -> Iterator[BinaryIO]:
    """A seekable binary file for a local path or an fsspec URL (opened by whoever reads: a Ray read
    task opens the object itself, no shared mount). Zip members need random access: fsspec files
    seek with ranged GETs over a read-ahead cache.

    A URL's file is a ``Resumable``: a dropped connection or a truncated transfer while opening or
    reading it is retried under ``retry`` (the run's ``retry.*``; None: RetryConfig's defaults) from
    the exact byte offset of the read that failed, so the bytes handed on are those of the object,
    once each. Retries exhausted: TransientSourceError (exit 4; a rerun resumes from the ledger)."""
    if not is_url(path):
        with open(path, "rb") as fh:
            yield fh
        return
    fs, key = _url_fs(str(path))
    remote = Resumable(fs, key, retry or default_retry(), label=str(path))
    try:
        yield cast(BinaryIO, remote)
    finally:
        remote.close()


def default_retry() -> "RetryPolicy":
    """RetryConfig's defaults as a policy, for readers without a plan (tests, tools)."""
    from loadkit.plan import RetryPolicy

    return RetryPolicy(attempts=6, initial_wait_s=0.5, max_wait_s=20.0, multiplier=2.0, jitter_s=0.5,
                       breaker_failures=5, breaker_cooldown_s=10.0)


class _ShortRead(ConnectionError):
    """The transfer delivered fewer bytes than the object holds before its end (a silent cut)."""


class Resumable:
    """A read-only, seekable view of a remote object that survives network failures mid-read.

    Every ``read`` starts at a known offset of the object (``tell``). When the transfer breaks (a
    network failure by ``errors.is_network_failure``: a reset, a cut mid-body, a timeout, or a read
    that returns short of the object's known size), the underlying fsspec file is dropped, reopened
    and positioned at that same offset, and the read is tried again under ``policy`` (tenacity:
    exponential backoff with jitter, ``policy.attempts`` tries per read). Callers above (zipfile, gzip,
    the chunk reader) never see the failure, so no record is handed on twice or skipped: the retry
    is exact at the byte. Any other error (404, permission, a bug) passes through untouched.

    The object must not change under the reader: a reopened object whose size or ETag differs from
    the first open fails the file (SourceDataError). Retries exhausted: TransientSourceError.
    ``retries`` counts the reopens (for tests and logs)."""

    def __init__(self, fs: Any, key: str, policy: "RetryPolicy", label: str = "",
                 sleep: Optional[Any] = None) -> None:
        self._fs, self._key, self._policy, self._sleep = fs, key, policy, sleep
        self._label = label or key
        self._pos = 0
        self.retries = 0
        self._size: Optional[int] = None
        self._tag: Optional[str] = None
        self._fh: Any = None
        self._fh = self._call(lambda: self._fh, "open")  # ``attempt`` opens it
        self._size = getattr(self._fh, "size", None)
        self._tag = self._etag(self._fh)
        self.closed = False

    @staticmethod
    def _etag(fh: Any) -> Optional[str]:
        details = getattr(fh, "details", None) or {}
        for name in ("ETag", "etag", "md5Hash", "crc32c"):
            if details.get(name):
                return str(details[name]).strip('"')
        return None

    def _open(self) -> Any:
        fh = self._fs.open(self._key, "rb")
        if self._fh is not None or self.retries:  # a reopen: the same object, or the file fails
            size, tag = getattr(fh, "size", None), self._etag(fh)
            if (self._size is not None and size is not None and size != self._size) or \
                    (self._tag and tag and tag != self._tag):
                fh.close()
                raise SourceDataError("the object changed while it was read (size or ETag differs)",
                                      file=self._label)
        if self._pos:
            fh.seek(self._pos)
        return fh

    def _call(self, fn: Any, what: str) -> Any:
        from loadkit.errors import TransientSourceError, is_network_failure
        from loadkit.resilience import retrying
        from loadkit.security import mask_text

        def attempt() -> Any:
            if self._fh is None:
                self._fh = self._open()
            return fn()

        def dropped(state: Any) -> None:  # before the backoff sleep: the broken transfer is discarded
            self.retries += 1
            fh, self._fh = self._fh, None
            if fh is not None:
                try:
                    fh.close()
                except Exception:  # noqa: BLE001 - closing a broken transfer may fail again; it is gone
                    pass

        kw = {"sleep": self._sleep} if self._sleep is not None else {}
        try:
            return retrying(self._policy, on_retry=dropped, count_deadlocks=False, **kw)(attempt)
        except Exception as exc:
            if is_network_failure(exc):
                raise TransientSourceError(
                    f"reading the remote source failed on the network after {self._policy.attempts} attempts "
                    f"({what} at byte {self._pos}): {type(exc).__name__}: {mask_text(str(exc))}",
                    file=mask_text(self._label)) from exc
            raise

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all the rest when negative) from the current offset; b"" at the end."""
        def once() -> bytes:
            block = self._fh.read(size)
            if self._size is not None:
                want = self._size - self._pos if size is None or size < 0 else min(size, self._size - self._pos)
                if len(block) < want:
                    raise _ShortRead(f"got {len(block)} of {want} bytes at offset {self._pos}")
            return bytes(block)

        block = self._call(once, "read")
        self._pos += len(block)
        return block

    def readinto(self, buffer: Any) -> int:
        block = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[:len(block)] = block
        return len(block)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            pos = offset
        elif whence == 1:
            pos = self._pos + offset
        elif self._size is not None:
            pos = self._size + offset
        else:  # size unknown: ask the file itself
            pos = self._call(lambda: self._fh.seek(offset, whence), "seek")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        if self._fh is not None:
            self._fh.seek(pos)
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    @property
    def size(self) -> Optional[int]:
        return self._size

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = None
        self.closed = True

    def __enter__(self) -> "Resumable":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stream_size(fh: BinaryIO) -> int:
    here = fh.tell()
    size = fh.seek(0, 2)
    fh.seek(here)
    return size


def discover(root: Path, patterns: Sequence[str]) -> List[Path]:
    """Files matching the (already rendered) glob patterns under root, sorted, deduplicated."""
    found: dict[str, Path] = {}
    for pattern in patterns:
        for p in sorted(root.glob(pattern)):
            if p.is_file():
                found[str(p)] = p
    if not found:
        searched = ", ".join(str(root / p) for p in patterns)
        raise SourceDataError(f"no source file matches {searched}", root=str(root))
    return [found[k] for k in sorted(found)]


class Guarded:
    """A decompressed stream that fails its file once it yields more than ``limit`` bytes (zip bombs)."""

    def __init__(self, stream: BinaryIO, limit: int, why: str, file: str, member: str) -> None:
        self._stream, self._limit, self._why, self._file, self._member = stream, limit, why, file, member
        self._read = 0

    def read(self, size: int = -1) -> bytes:
        block = self._stream.read(size)
        self._read += len(block)
        if self._read > self._limit:
            raise SourceDataError(f"member decompresses past {self._limit} bytes ({self._why})",
                                  file=self._file, member=self._member)
        return block


def _guard(stream: BinaryIO, path: Union[str, Path], member: str, compressed: int, max_bytes: Optional[int],
           max_ratio: Optional[float]) -> BinaryIO:
    limits = []
    if max_bytes is not None:
        limits.append((max_bytes, "source.max_member_bytes"))
    if max_ratio is not None:
        limits.append((max(64 << 20, int(compressed * max_ratio)), f"source.max_compression_ratio {max_ratio:g}"))
    if not limits:
        return stream
    limit, why = min(limits)
    return Guarded(stream, limit, why, basename(path), member)  # type: ignore[return-value]


def open_members(path: Union[str, Path], fmt: str, member_pattern: Optional[str], max_bytes: Optional[int] = None,
                 max_ratio: Optional[float] = None,
                 retry: Optional["RetryPolicy"] = None) -> Iterator[Tuple[str, BinaryIO]]:
    """Yield (member name, binary stream) for each readable member of a source file.

    ``max_bytes`` / ``max_ratio`` guard compressed members: reading past the limit raises
    SourceDataError for the file (the ratio is taken against the member's compressed size for
    zip, the file's for gzip, never below 64 MiB). ``path`` may be an fsspec URL (``open_source``,
    whose network failures are retried under ``retry`` from the failed read's byte offset).
    """
    name = basename(path)
    if fmt == "csv":
        with open_source(path, retry) as fh:
            yield name, fh
        return
    if fmt == "gzip":
        with open_source(path, retry) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            yield name, _guard(gz, path, name, _stream_size(raw), max_bytes, max_ratio)  # type: ignore
        return
    if fmt == "zip":
        with open_source(path, retry) as raw:
            for member_name, member, compressed in _zip_members(raw, str(path), member_pattern):
                yield member_name, _guard(member, path, member_name, compressed, max_bytes, max_ratio)
        return
    raise SourceDataError(f"format {fmt!r} is not a streamed text format", file=str(path))


def is_foreign_member(info: zipfile.ZipInfo) -> bool:
    """True for zip entries that are never data: directories, and the metadata macOS and Windows
    archivers add (``__MACOSX/`` AppleDouble ``._name`` forks, ``.DS_Store``, ``Thumbs.db``).

    A re-zipped archive holding ``__MACOSX/._DATA.CSV`` next to ``DATA.CSV`` would otherwise match
    the member pattern twice and fail as layout drift.
    """
    name = info.filename.replace("\\", "/")
    parts = [p for p in name.split("/") if p]
    if info.is_dir() or name.endswith("/") or not parts:
        return True
    base = parts[-1]
    return "__MACOSX" in parts[:-1] or base.startswith("._") or base in (".DS_Store", "Thumbs.db")


def data_members(zf: zipfile.ZipFile, member_pattern: Optional[str]) -> List[zipfile.ZipInfo]:
    """The entries of a zip that are read as data: not foreign (``is_foreign_member``: directories,
    ``__MACOSX``/AppleDouble, .DS_Store), and matching ``member_pattern`` (fnmatch, case-sensitive)
    when one is given. The one filter of both the reader and the progress figure's sizes."""
    return [i for i in zf.infolist()
            if not is_foreign_member(i) and (not member_pattern or fnmatch.fnmatchcase(i.filename, member_pattern))]


def _zip_members(raw: BinaryIO, path: str, member_pattern: Optional[str]) -> Iterator[Tuple[str, BinaryIO, int]]:
    try:
        zf = zipfile.ZipFile(raw)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceDataError(f"corrupt zip: {exc}", file=path) from None
    with zf:
        names = sorted(i.filename for i in data_members(zf, member_pattern))
        if not names:
            raise SourceDataError(
                f"zip has no member matching {member_pattern!r}", file=path, members=len(zf.infolist())
            )
        for name in names:
            with zf.open(name) as fh:
                yield name, fh, zf.getinfo(name).compress_size  # type: ignore[misc]


def is_cr_only(sample: bytes) -> bool:
    """True for old Mac-style files whose records end in a bare CR."""
    return b"\r" in sample and b"\n" not in sample


class CrToLf:
    """A stream that turns every CR into LF, byte for byte.

    Offsets stay those of the file, so committed byte ranges keep their meaning, and
    everything downstream (chunk cuts, line numbers, the CSV parser) sees LF endings.
    A CR inside a quoted value of a CR-only file becomes LF, its only plausible meaning.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size).replace(b"\r", b"\n")


def read_errors() -> tuple:
    """Exceptions that mean a compressed stream is corrupt or truncated."""
    return (zipfile.BadZipFile, zlib.error, EOFError, gzip.BadGzipFile, OSError)


def record_start(fh: BinaryIO, offset: int, size: int, syntax: "scanner.Syntax", origin: int = 0,
                 origin_line: int = 1) -> Tuple[int, int]:
    """(The first record start at or after ``offset``, its 1-based line number), read exactly.

    Scans from ``origin`` (a record start: 0, or the end of ``dialect.skip_lines``) with the record
    scanner, so a quoted newline or an unterminated quote before ``offset`` is seen as what it is.
    Two neighbouring spans of a split file compute the same boundary, so together they cover
    every record once. Time is linear in ``offset``; memory one read block plus one record.
    """
    if offset <= origin:
        return origin, origin_line
    if offset >= size:
        return size, origin_line + count_lines(fh, size) - count_lines(fh, origin)
    fh.seek(origin)
    buf, base, line, eof = b"", origin, origin_line, False
    while True:
        block = fh.read(_READ_SIZE)
        eof = not block
        buf += block
        sc = scanner.scan(buf, syntax, final=eof, first_line=line)
        if len(sc):
            k = int(np.searchsorted(sc.ends, offset - base))
            if k < len(sc):
                return base + int(sc.ends[k]), _line_after(buf, sc, k)
        if eof:
            return size, line + buf.count(b"\n")
        used = sc.consumed
        if len(sc):  # the scan's own line numbers: no count of every LF of the prefix (0.2 CPU-s per 0.46 GB)
            line = _line_after(buf, sc, len(sc) - 1)
        buf, base = buf[used:], base + used


def _line_after(data: bytes, sc: "scanner.Scan", k: int) -> int:
    """The line on which the record after record ``k`` of ``sc`` (a scan of ``data``) starts: record k's
    start line plus the LFs it holds."""
    return int(sc.lines[k]) + data.count(b"\n", *sc.span(k))


def span_reader(fh: BinaryIO, member: str, span: Tuple[int, int], size: int, syntax: "scanner.Syntax",
                target_bytes: int, committed: Sequence[Tuple[int, int]] = (), origin: int = 0,
                origin_line: int = 1) -> "ChunkReader":
    """The ChunkReader of byte range ``span`` = [lo, hi) of a plain file of ``size`` bytes: its records are
    those starting in [record_start(lo), record_start(hi)), so the spans of a file, cut anywhere, cover
    each record once (``origin``/``origin_line``: where the data starts, past ``dialect.skip_lines``).

    The start is found by scanning from ``origin`` (``record_start``: exact under quoted newlines); the end
    by the reader itself (``ChunkReader``'s ``stop_at``), as it cuts its chunks -- not by a second scan from
    the file's start: each cut used to be scanned twice, once by each neighbour (0.48 CPU-s per edge for
    the 0.92 GB benchmark file). A span ending at ``size`` reads to the end. ``committed``: the member's
    committed ranges, record-aligned as ChunkReader requires (batches of earlier runs under the same syntax;
    those outside the span are left out). ``fh`` is seekable; it is left positioned
    at the span's start, read through a ``Window`` that ends at ``size``."""
    lo, hi = max(span[0], origin), max(span[1], origin)
    start, line = record_start(fh, lo, size, syntax, origin, origin_line)
    fh.seek(start)
    mine = [(max(s, start), e) for s, e in committed if e > start]
    return ChunkReader(cast(BinaryIO, Window(fh, size)), member, target_bytes, None, None, False,
                       mine, origin=start, origin_line=line, syntax=syntax, stop_at=None if hi >= size else hi)


def count_lines(fh: BinaryIO, end: int) -> int:
    """Newlines in the first ``end`` bytes: the line number a span starting at ``end`` continues from."""
    fh.seek(0)
    lines, left = 0, end
    while left > 0:
        block = fh.read(min(_READ_SIZE, left))
        if not block:
            break
        lines += block.count(b"\n")
        left -= len(block)
    return lines


class Window:
    """A stream that ends at an absolute offset: a span's reader sees EOF at its last record.

    ``readinto`` reads straight into the caller's buffer (ChunkReader's one reused buffer): with
    ``read`` alone every fill of a split file's span allocated a fresh bytes object of up to a
    chunk's size, which the kernel faulted in zeroed before it was copied on (a Ray loader actor's
    perf profile: ~6% of its samples in page faults and clearing pages, none in process)."""

    def __init__(self, stream: BinaryIO, end: int) -> None:
        self._stream = stream
        self._left = end - stream.tell()

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        block = self._stream.read(self._left if size < 0 else min(size, self._left))
        self._left -= len(block)
        return block

    def readinto(self, buffer: Any) -> int:
        """Up to ``len(buffer)`` bytes of the span into ``buffer``; 0 at the span's end.

        Raises OSError if the stream has no data to give without being at its end (a non-blocking
        stream's None): never taken for the span's end, which would cut the span short."""
        with memoryview(buffer) as view, view.cast("B") as flat:
            want = min(len(flat), max(self._left, 0))
            if not want:
                return 0
            with flat[:want] as part:  # released even if the read raises: the caller's buffer can grow
                readinto = getattr(self._stream, "readinto", None)
                if readinto is None:
                    block = self._stream.read(want)
                    got: Optional[int] = len(block)
                    part[:len(block)] = block
                else:
                    got = readinto(part)
            if got is None:
                raise OSError("the source stream had no data ready (a non-blocking stream): cannot read the span")
        self._left -= got
        return got


class ChunkReader:
    """Cuts a member stream into record-aligned chunks, skipping committed byte ranges.

    ``committed`` are (start, end) ranges a previous run already loaded; they are
    record boundaries by construction, so chunks are cut exactly at their edges and
    never straddle them. Record ends come from the record scanner (``syntax``; built from
    ``quote``/``escape`` when not given), so a chunk never ends inside a record, whatever
    ``newlines_in_values`` says (a speed hint only). A record longer than
    ``syntax.max_record_bytes`` is skipped without being held in memory and yielded as a
    chunk of its own with ``reject`` set.

    One buffer, reused: a bytearray the stream reads into (``readinto``, where the stream has it:
    no intermediate bytes object; it only grows, so no fresh pages are faulted in per chunk),
    of which the first ``_n`` bytes are data. The scanner reads a window of it through a
    memoryview, so a chunk's bytes are copied once, into its ``data``; what follows a taken chunk
    (at most a read's overshoot) moves to the front. Lines are counted from the scan where every
    record ends at its own LF.

    ``stop_at`` (a member offset; None: read to the end of the stream): the reader ends with the first
    record that ends at or after it -- a split file's span ends where the next span starts
    (``record_start(stop_at)``: the same scanner, the same record ends), found by the scan that cuts the
    chunks instead of a scan of its own from the file's start. Committed ranges that start at or after
    ``stop_at`` belong to later spans and are left out; one that straddles it is skipped and ends the reader.
    """

    def __init__(
        self,
        stream: BinaryIO,
        member: str,
        target_bytes: int,
        quote: Optional[str],
        escape: Optional[str],
        newlines_in_values: bool,
        committed: Sequence[Tuple[int, int]] = (),
        prefix: bytes = b"",
        origin: int = 0,
        origin_line: int = 1,
        syntax: Optional["scanner.Syntax"] = None,
        stop_at: Optional[int] = None,
    ) -> None:
        self._stream = stream
        self._member = member
        self._syntax = syntax or scanner.Syntax(quote=quote, escape=escape)
        self._target = self._bounded(target_bytes)
        # A range starting at or after stop_at starts at a record end at or after it: past this reader's end.
        self._committed = sorted(r for r in committed if stop_at is None or r[0] < stop_at)
        self._stop_at = stop_at
        self._buf = bytearray(prefix)  # its first _n bytes: read from the stream, not yet taken (a sample first)
        self._n = len(prefix)
        self._pos = origin  # member offset of _buf[0] (a span of a split file starts past 0)
        self._line = origin_line  # line number at _buf[0]
        self._eof = False

    def retarget(self, target_bytes: int) -> None:
        """Chunk size from the next chunk on (adaptive batch sizing; byte ranges stay record-aligned)."""
        self._target = self._bounded(target_bytes)

    def _bounded(self, target_bytes: int) -> int:
        """At most 4 x max_record_bytes: a chunk's memory is bounded by the record cap, whatever
        the average line length of the sample said (a bomb's sample is one endless line)."""
        return max(_MIN_TARGET, min(target_bytes, 4 * self._syntax.max_record_bytes))

    def __iter__(self) -> Iterator[Chunk]:
        while not self._ended():
            self._skip_committed()
            if self._ended():
                return
            self._fill(self._target + 1)
            if not self._n:
                return
            cut, summary = self._cut_point()
            if cut < 0:
                yield self._skip_long_record()
                continue
            chunk = self._take(cut, summary)
            yield replace(chunk, summary=summary) if summary is not None else chunk

    def _ended(self) -> bool:
        """The reader is at or past ``stop_at``: the record it took last ended there or after (the span's end)."""
        return self._stop_at is not None and self._pos >= self._stop_at

    def _fill(self, size: int) -> None:
        """Read until the buffer holds ``size`` bytes or the stream ends (reads of what is missing,
        at least _MIN_READ: the window is cut by the scanner, never by a read's size)."""
        readinto = getattr(self._stream, "readinto", None)
        while not self._eof and self._n < size:
            want = max(_MIN_READ, size - self._n)
            if len(self._buf) < self._n + want:  # grow (no view of the buffer is alive here)
                self._buf += bytes(max(self._n + want, 2 * len(self._buf)) - len(self._buf))
            if readinto is not None:
                with memoryview(self._buf)[self._n:self._n + want] as free:
                    got = readinto(free) or 0
            else:
                block = self._stream.read(want)
                got = len(block)
                self._buf[self._n:self._n + got] = block
            if not got:
                self._eof = True
                break
            self._n += got

    def _next_committed(self) -> Optional[Tuple[int, int]]:
        for start, end in self._committed:
            if end > self._pos:
                return start, end
        return None

    def _skip_committed(self) -> None:
        """Drop bytes that a previous run committed (line numbers keep counting)."""
        rng = self._next_committed()
        while rng is not None and rng[0] <= self._pos:
            to_skip = rng[1] - self._pos
            while to_skip > 0:
                self._fill(min(to_skip, _READ_SIZE))
                if not self._n:
                    raise SourceDataError(
                        "source is shorter than the ranges the ledger says were committed",
                        member=self._member, offset=self._pos,
                    )
                step = min(to_skip, self._n)
                self._advance(step)
                to_skip -= step
            rng = self._next_committed()

    def _advance(self, n: int, lines: Optional[int] = None) -> None:
        """Drop the first ``n`` bytes (``lines``: the LFs among them, when the caller knows); the bytes
        after them move to the front of the buffer."""
        self._line += self._buf.count(b"\n", 0, n) if lines is None else lines
        rest = self._n - n
        if rest > 0:
            with memoryview(self._buf) as view:
                view[:rest] = view[n:self._n]  # memmove: the two ranges may overlap
        self._n = max(rest, 0)
        self._pos += n

    def _take(self, cut: int, summary: Optional["scanner.Summary"]) -> Chunk:
        start, line = self._pos, self._line
        with memoryview(self._buf) as view:
            data = view[:cut].tobytes()
        # A clean scan without quoted newlines: every record ends at its own LF, and only there.
        lines = summary.records if summary is not None and summary.clean and not summary.quoted_newlines else None
        self._advance(cut, lines)
        return Chunk(self._member, start, self._pos, line, data)

    def _cut_point(self) -> Tuple[int, Optional["scanner.Summary"]]:
        """Bytes to take (up to the next committed range, else the last record end within target),
        with the scanner's summary of them when it scanned exactly those bytes.

        -1: the first record is longer than max_record_bytes and its end is not in memory.
        """
        rng = self._next_committed()
        limit = self._target
        if rng is not None and rng[0] - self._pos <= limit:
            return rng[0] - self._pos, None
        cap = self._syntax.max_record_bytes
        while True:
            final = self._eof and self._n <= limit
            # The scan window, as a view: the buffer's first ``limit`` bytes (all of them at the end).
            # ``scan`` and ``summarize`` take any buffer (scanner.scan's docstring).
            with memoryview(self._buf)[:self._n if final else min(limit, self._n)] as window:
                buf = cast(bytes, window)
                sc = scanner.scan(buf, self._syntax, final=final)
                cut = sc.consumed
                end = self._span_end(sc)
                if end is not None:  # the first record end at or after stop_at: the chunk (and the reader) ends there
                    return end, scanner.summarize(buf, sc) if end == cut else None
                summary = scanner.summarize(buf, sc) if cut > 0 or final else None
            if final:
                return self._n, summary
            if cut > 0:
                return cut, summary
            if limit > cap + _READ_SIZE:
                return -1, None
            # A record longer than the window: widen it (geometrically, so scanning stays linear).
            limit *= 2
            self._fill(limit + 1)
            if rng is not None and rng[0] - self._pos <= limit:
                return rng[0] - self._pos, None

    def _span_end(self, sc: "scanner.Scan") -> Optional[int]:
        """Bytes up to the first record end at or after ``stop_at`` among the scan's records (relative to
        the buffer), or None (no ``stop_at``, or every record the scan holds ends before it)."""
        if self._stop_at is None or not len(sc):
            return None
        k = int(np.searchsorted(sc.ends, self._stop_at - self._pos))  # first end >= stop_at (ends ascend)
        return int(sc.ends[k]) if k < len(sc) else None

    def _skip_long_record(self) -> Chunk:
        """Consume a record longer than max_record_bytes: up to the first LF at or after that length."""
        start, line = self._pos, self._line
        head = bytes(self._buf[:min(_HEAD_BYTES, self._n)])
        self._advance(self._syntax.max_record_bytes - 1)
        while True:
            found = self._buf.find(b"\n", 0, self._n)
            if found >= 0:
                self._advance(found + 1)
                break
            self._advance(self._n)
            self._fill(_READ_SIZE)
            if not self._n:
                break
        return Chunk(self._member, start, self._pos, line, head, reject=scanner.TOO_LONG)
