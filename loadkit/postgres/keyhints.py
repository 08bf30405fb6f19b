"""Duplicate-key hints for merge: which keys the staged rows may repeat, known before the publish.

A merge first load swaps its staging in and needs the key's unique index; without hints the only way to
learn whether the month repeats a key is to try the index (a full sort, wasted when it fails) and then
group the whole table on its key (a hash aggregate of every key: ~3 s of server CPU for 4M rows, and a
second scan). A reload (or an insert-based first load) deduplicates with DISTINCT ON, a sort of every
whole staged row (~3 µs/row of backend CPU on a wide table). Here the in-process writer threads hash each
committed batch's key columns (64 bits a row, numpy over the Arrow buffers; every merge table) into a
per-run ``KeyHints``; at the publish, ``candidates`` returns the key values whose hash occurs more than
once in the table -- none, for a month without duplicate keys -- and the server compares or sorts only
the rows holding those keys (modes.Merge: _swap_in, _winners).

A hint only. Byte-equal is not always PostgreSQL-equal (a non-deterministic collation, ``-0.0`` and
``0.0``): a key equal in PostgreSQL but not in bytes is missed, and the unique index build, which stays
the authority, then fails and the publish falls back to the full search. A reload has no such authority,
so it uses hints only on key columns where the two equalities agree (modes.Merge._hints_exact). The
reverse (a hash collision of different keys) only adds a key to look up. ``char(n)`` values are hashed
without trailing spaces, as PostgreSQL compares them. Text keys are hashed as UTF-8: a batch sent as source
bytes for the server to transcode (transform.server_encoding: latin-1) has them decoded first, since the
batches of one table need not all be sent that way (a chunk with a bad row is parsed and sent as UTF-8), and
the same key in both would otherwise hash apart (ASCII values: a zero-copy view).

Memory: 8 bytes per hinted row, from the batch's commit to its table's publish; a 16 MB bitmap per run;
the key values of rows that may repeat an earlier key (the real repeats, plus the bitmap's false
positives: ~3.5% of the rows on average at MAX_ROWS); at the publish a sorted copy of one table's hashes
(8 bytes a row, freed at once). At most ``MAX_ROWS`` rows per run (80 MB of hashes): the table whose
batch would exceed it has its hints dropped (freed) and publishes without them -- a real 60M-row month
does, today -- as does every table of a run whose batches were written elsewhere (the Ray executor's
workers, an earlier run being resumed): ``candidates`` returns None unless it holds every staged batch
with its exact row count.
"""
from __future__ import annotations

import logging
import os
import threading
from types import ModuleType
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from loadkit.plan import TableSpec
from loadkit.transform import decode_text_columns

log = logging.getLogger("loadkit.postgres.keyhints")

_c: Optional[ModuleType]
try:
    from loadkit.postgres import _keyhash as _c  # the C fast path for string/binary key columns (setup.py; optional)
except ImportError:  # built without a compiler: the numpy path
    _c = None
# True when key_hashes folds string/binary columns in C: the extension is built and LOADKIT_KEYHASH is not
# "numpy" (which forces the numpy path, e.g. to compare the two). Both give the same numbers (tests).
ACCELERATED = _c is not None and os.environ.get("LOADKIT_KEYHASH", "").lower() != "numpy"

MAX_ROWS = 10_000_000  # rows hinted per run (8 bytes each); beyond, the table that overflowed goes without
BITMAP_BITS = 1 << 27  # the run's seen-bitmap (16 MB): at 10M rows ~7% of its bits are set (false "maybe"s)
MAX_KEY_BYTES = 256  # a longer key value: that table goes without hints (values are padded to the longest)

_P = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime: the per-byte multiplier
_NULL = np.uint64(0x9E3779B97F4A7C15)  # a NULL key value's hash (NULL keys fail the primary key anyway)
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))  # splitmix64's finaliser


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: spreads every input bit over the 64 output bits."""
    h ^= h >> np.uint64(30)
    h *= _MIX[0]
    h ^= h >> np.uint64(27)
    h *= _MIX[1]
    h ^= h >> np.uint64(31)
    return h


def _var_width_hash(arr: pa.Array, rstrip_spaces: bool) -> Optional[np.ndarray]:
    """Per value of a (large) string/binary array: its length and bytes (zero-padded to its own 8-byte
    lanes) folded into 64 bits -- the same for the same value in any batch; None if a value is longer than
    MAX_KEY_BYTES."""
    n = len(arr)
    wide = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], np.int64 if wide else np.int32)[arr.offset:arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None and bufs[2].size else np.zeros(1, np.uint8)
    starts, ends = offsets[:-1], offsets[1:].copy()
    if rstrip_spaces:  # char(n): PostgreSQL ignores trailing spaces
        while True:
            trailing = (ends > starts) & (data[np.maximum(ends - 1, 0)] == 32)
            if not trailing.any():
                break
            ends[trailing] -= 1
    lengths = ends - starts
    longest = int(lengths.max()) if n else 0
    if longest > MAX_KEY_BYTES:
        return None
    width = max(8, -(-longest // 8) * 8)  # the values zero-padded to whole 8-byte lanes, plus their length
    padded = np.zeros((n, width), np.uint8)
    if n and (lengths == longest).all() and (offsets[1:] - starts == longest).all():
        # every value as long as the longest, none trimmed (a char(n) key): the bytes are an (n, longest) block
        padded[:, :longest] = data[offsets[0]:offsets[-1]].reshape(n, longest)
    else:
        at = np.arange(width)
        inside = at < lengths[:, None]
        padded[inside] = data[(starts[:, None] + at)[inside]]
    lanes = padded.view(np.uint64)  # (n, width / 8)
    h = lengths.astype(np.uint64)
    own = np.maximum(1, -(-lengths // 8))  # a value's own lanes: its hash must not depend on its batch's longest
    for lane in range(lanes.shape[1]):
        step = h * _P + lanes[:, lane]
        h = step if lane == 0 or lane < own.min() else np.where(own > lane, step, h)
    return h


def _column_hash(arr: pa.Array, rstrip_spaces: bool) -> Optional[np.ndarray]:
    """uint64 per value of one key column (NULL: a constant); None for a type this does not hash."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        h = _var_width_hash(arr, rstrip_spaces)
    elif pa.types.is_boolean(t):
        h = np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), np.uint64)
    elif pa.types.is_decimal128(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_integer(t) or \
            pa.types.is_floating(t) or pa.types.is_temporal(t):
        width = t.byte_width
        raw = np.frombuffer(arr.buffers()[1], np.uint8)[arr.offset * width:(arr.offset + len(arr)) * width]
        lanes = raw.reshape(len(arr), width)
        padded = np.zeros((len(arr), -(-width // 8) * 8), np.uint8)  # 8-byte lanes, the last zero-padded
        padded[:, :width] = lanes
        h = np.zeros(len(arr), np.uint64)
        for lane in padded.view(np.uint64).T:
            h = h * _P + lane
    else:
        return None
    if h is None:
        return None
    h = _mix(np.array(h, np.uint64))
    if arr.null_count:
        h[np.asarray(arr.is_null())] = _NULL
    return h


def key_hashes(rows: pa.Table, key: Sequence[str], trimmed: Sequence[str] = ()) -> Optional[np.ndarray]:
    """uint64 per row of ``rows``: a hash of its ``key`` columns' values (equal values, equal hashes;
    ``trimmed`` columns without trailing spaces); None if a key column's type or width is not hashed."""
    h = np.zeros(rows.num_rows, np.uint64)
    for name in key:
        column = rows.column(name).combine_chunks()
        if ACCELERATED and _var_width(column.type):
            if not _fold_accel(h, column, name in trimmed):
                return None
            continue
        col = _column_hash(column, name in trimmed)
        if col is None:
            return None
        h = _mix(h * _MIX[0] + col)
    return h


def _var_width(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t) or \
        pa.types.is_large_binary(t)


def _fold_accel(h: np.ndarray, arr: pa.Array, rstrip_spaces: bool) -> bool:
    """Fold one string/binary column into the row hashes ``h`` in place, in C (_keyhash.c): the numbers of
    _column_hash and key_hashes' combine, one pass over the Arrow buffers without the GIL (3 char key
    columns: ~80 ns/row in numpy, a handful in C). False if a value is longer than MAX_KEY_BYTES."""
    assert _c is not None
    validity, offsets, data = arr.buffers()[:3]
    wide = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    return _c.fold_var_width(h, offsets, data if data is not None else b"", validity if arr.null_count else None,
                             arr.offset, len(arr), wide, rstrip_spaces, MAX_KEY_BYTES)


class KeyHints:
    """One run's hints (module doc). Thread-safe: writer threads ``add``, the publish asks ``candidates``
    and then ``drop``s the table.

    Per table it keeps every hinted batch's row count and key hashes (exact), and -- since the rows
    themselves are gone by the publish -- the key values of every row that may repeat an earlier one:
    a row whose hash's bit was already set in a run-wide bitmap of BITMAP_BITS bits, or whose hash
    repeats within its batch. The first row of a repeated key is not recorded, but its key is (from
    the later row): the server looks the rows up by key. ``candidates`` keeps the recorded keys whose
    hash really repeats (the bitmap's false positives, a few % of the rows, are dropped there)."""

    def __init__(self, tables: Sequence[TableSpec], max_rows: int = MAX_ROWS) -> None:
        self._keys: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
            t.name: (t.key, tuple(c.name for c in t.columns if c.kind == "char" and c.name in t.key))
            for t in tables if t.key}
        self._rows_of: Dict[str, Dict[int, int]] = {name: {} for name in self._keys}  # batch id -> rows
        self._hashes: Dict[str, Dict[int, np.ndarray]] = {name: {} for name in self._keys}  # batch id -> uint64
        self._maybe: Dict[str, List[Tuple[np.ndarray, pa.Table]]] = {name: [] for name in self._keys}
        self._given_up: Dict[str, str] = {}
        self._bitmap: Optional[np.ndarray] = None  # allocated at the first batch
        self._rows = 0
        self._max_rows = max_rows
        self._lock = threading.Lock()

    @property
    def rows(self) -> int:
        """Rows whose hashes are held now."""
        return self._rows

    def add(self, table: str, batch_id: int, rows: Optional[pa.Table]) -> None:
        """Keep the key hashes of one batch that is in staging (committed now, or found committed)."""
        if table not in self._keys or table in self._given_up:
            return
        n = rows.num_rows if rows is not None else 0
        hashes = np.zeros(0, np.uint64)
        if n:
            assert rows is not None
            key, trimmed = self._keys[table]
            # the key columns as UTF-8 text (a source-bytes batch decoded): the same key hashes alike in every batch
            rows = decode_text_columns(rows.select(list(key)))
            found = key_hashes(rows, key, trimmed)
            if found is None:
                self._give_up(table, "a key column's type or width is not hashed")
                return
            hashes = found
        with self._lock:
            if table in self._given_up:
                return
            if batch_id in self._rows_of[table]:  # the same batch again (a retry found it committed): same rows
                return
            if self._rows + n > self._max_rows:
                self._give_up_locked(table, f"over {self._max_rows:,} rows hinted in this run")
                return
            self._rows += n
            self._rows_of[table][batch_id] = n
            self._hashes[table][batch_id] = hashes
            if n:
                maybe = self._seen_before(hashes)
                if maybe.any():
                    assert rows is not None
                    at = np.flatnonzero(maybe)
                    self._maybe[table].append((hashes[at], rows.select(list(self._keys[table][0])).take(at)))

    def _seen_before(self, hashes: np.ndarray) -> np.ndarray:
        """Per row: its hash's bit was set by an earlier row, or the hash repeats within ``hashes``; sets
        the bits. (Under the lock.) In C (ACCELERATED): one pass that tests and sets each row's bit in turn,
        so a repeat within the batch flags its later rows only (their key is the first row's: ``candidates``
        gives the same keys); ~1 random read of the 16 MB bitmap a row instead of a gather, a sort and a
        scattered OR (~40 ns/row)."""
        if self._bitmap is None:
            self._bitmap = np.zeros(BITMAP_BITS // 64, np.uint64)
        if ACCELERATED:
            assert _c is not None
            flags = np.zeros(len(hashes), np.uint8)
            _c.seen_before(self._bitmap, np.ascontiguousarray(hashes, np.uint64), flags,
                           64 - BITMAP_BITS.bit_length() + 1)
            return flags.view(bool)
        bit = hashes >> np.uint64(64 - BITMAP_BITS.bit_length() + 1)
        word = (bit >> np.uint64(6)).astype(np.intp)
        mask = np.left_shift(np.uint64(1), bit & np.uint64(63))
        maybe = (self._bitmap[word] & mask) != 0
        ordered = np.sort(hashes)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if len(repeated):
            maybe |= np.isin(hashes, repeated)
        np.bitwise_or.at(self._bitmap, word, mask)
        return maybe

    def _give_up(self, table: str, why: str) -> None:
        with self._lock:
            self._give_up_locked(table, why)

    def _give_up_locked(self, table: str, why: str) -> None:
        if table in self._given_up:
            return
        self._given_up[table] = why
        self._free_locked(table)
        log.info("%s: no duplicate-key hints (%s); the publish searches the key on the server", table, why,
                 extra={"table": table})

    def _free_locked(self, table: str) -> None:
        self._rows -= sum(self._rows_of.get(table, {}).values())
        self._rows_of[table], self._hashes[table], self._maybe[table] = {}, {}, []

    def drop(self, table: str) -> None:
        """Free a table's hints (published)."""
        with self._lock:
            self._free_locked(table)

    def candidates(self, table: str, staged: Mapping[int, int]) -> Optional[pa.Table]:
        """The key values (the table's key columns, one row per key, as the batches had them) of every key
        whose hash occurs more than once among the ``staged`` batches' rows -- every duplicated key is
        among them; an empty table: no key repeats. None when the hints do not hold every batch of
        ``staged`` (batch id -> rows staged) with its row count: a batch written elsewhere (a Ray
        worker, an earlier run) or counted differently."""
        with self._lock:
            if table in self._given_up or table not in self._keys:
                return None
            rows_of = dict(self._rows_of[table])
            hashes = [self._hashes[table][i] for i in staged if i in rows_of]
            maybe = list(self._maybe[table])
        if any(rows_of.get(i) != n for i, n in staged.items()):
            return None
        everything = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
        repeated = np.unique(everything[1:][everything[1:] == everything[:-1]])
        del everything
        key = list(self._keys[table][0])
        if not len(repeated) or not maybe:
            return pa.table({k: pa.array([], pa.null()) for k in key}) if not maybe else maybe[0][1].slice(0, 0)
        found = pa.concat_tables([keys.filter(pa.array(np.isin(h, repeated))) for h, keys in maybe])
        return found.group_by(key).aggregate([]) if found.num_rows else found


# The hints of the runs in this process, by run id: the sink opens them, the in-process writer threads
# fill them, the publish reads them. A Ray worker has none (its batches are unhinted: see the module doc).
_ACTIVE: Dict[str, KeyHints] = {}
_ACTIVE_LOCK = threading.Lock()


def open_hints(run_id: str, tables: Sequence[TableSpec]) -> KeyHints:
    with _ACTIVE_LOCK:
        hints = _ACTIVE[run_id] = KeyHints(tables)
    return hints


def active(run_id: str) -> Optional[KeyHints]:
    with _ACTIVE_LOCK:
        return _ACTIVE.get(run_id)


def close_hints(run_id: str) -> None:
    with _ACTIVE_LOCK:
        _ACTIVE.pop(run_id, None)
