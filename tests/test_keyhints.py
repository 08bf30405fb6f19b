"""Merge's duplicate-key hints (loadkit.postgres.keyhints): equal keys hash equal, and ``candidates`` holds
every repeated key -- checked against collections.Counter over the very values, never against the
module's own output."""
from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import date
from decimal import Decimal
from typing import Any, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st

from loadkit.plan import ROW_COL, ColumnSpec, TableSpec
from loadkit.postgres.keyhints import KeyHints, key_hashes
from tests import corpus
from tests.helpers import c_path_only


def spec(name: str = "t", key: Tuple[str, ...] = ("a", "b"), kinds: Tuple[str, ...] = ("char", "varchar")) -> TableSpec:
    """A merge TableSpec keyed by ``key`` (one column of each kind)."""
    base = corpus.spec([(k, "text") for k in key])
    cols = tuple(ColumnSpec(name=k, kind=kind, length=8) for k, kind in zip(key, kinds))
    return dataclasses.replace(base, name=name, mode="merge", columns=cols, key=key)


def batch(rows: List[Tuple[Any, ...]], names: Tuple[str, ...] = ("a", "b"), first: int = 0) -> pa.Table:
    cols = {n: pa.array([r[i] for r in rows]) for i, n in enumerate(names)}
    cols[ROW_COL] = pa.array(np.arange(first, first + len(rows), dtype=np.int32))
    return pa.table(cols)


@pytest.mark.parametrize("values", [
    ["x", "y", "x", "", "xy", None],
    [b"\xe9t\xe9", b"ete", b"\xe9t\xe9"],
    [1, 2, 1, None, -1],
    [1.5, -2.25, 1.5],
    [date(2024, 5, 1), date(2024, 5, 2), date(2024, 5, 1)],
    [Decimal("1.20"), Decimal("1.30"), Decimal("1.20")],
    [True, False, True],
])
def test_equal_values_hash_equal_and_different_ones_differ(values: List[Any]) -> None:
    h = key_hashes(pa.table({"k": pa.array(values)}), ["k"])
    assert h is not None
    for i, vi in enumerate(values):
        for j, vj in enumerate(values):
            assert (h[i] == h[j]) == (vi == vj), (vi, vj)


def _column_values() -> Any:
    """(Arrow type, a strategy of lists of its values, NULLs among them): var-width values of every length
    up to past MAX_KEY_BYTES' lane count, so batches differ in their longest value."""
    text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
    binary = st.binary(max_size=40)
    return st.one_of(
        st.tuples(st.just(pa.string()), st.lists(st.none() | text, min_size=1, max_size=12)),
        st.tuples(st.just(pa.large_string()), st.lists(st.none() | text, min_size=1, max_size=12)),
        st.tuples(st.just(pa.binary()), st.lists(st.none() | binary, min_size=1, max_size=12)),
        st.tuples(st.just(pa.int64()), st.lists(st.none() | st.integers(-(2**63), 2**63 - 1), min_size=1,
                                                max_size=12)),
        st.tuples(st.just(pa.date32()), st.lists(st.none() | st.dates(), min_size=1, max_size=12)),
    )


@settings(max_examples=300, deadline=None)
@given(columns=st.lists(_column_values(), min_size=1, max_size=3), trim=st.booleans(), data=st.data())
def test_a_rows_hash_does_not_depend_on_the_other_rows_of_its_batch(
        columns: List[Tuple[pa.DataType, List[Any]]], trim: bool, data: st.DataObject) -> None:
    """The same key in two batches must hash alike whatever else each batch holds: every row hashed within a
    random batch (sliced at a random offset, as Arrow hands batches over) equals the row hashed alone. A
    value's lanes once depended on the batch's longest value, so a key repeated across a batch of short
    values and one with a long value was missed (a swapped first load then searched the whole table)."""
    n = min(len(values) for _, values in columns)
    names = [f"c{i}" for i in range(len(columns))]
    table = pa.table({name: pa.array(values[:n], kind) for name, (kind, values) in zip(names, columns)})
    start = data.draw(st.integers(0, n - 1))
    part = table.slice(start)
    trimmed = [name for name, (kind, _) in zip(names, columns) if trim and pa.types.is_string(kind)]
    together = key_hashes(part, names, trimmed)
    assert together is not None
    for i in range(part.num_rows):
        alone = key_hashes(pa.Table.from_pylist([part.slice(i, 1).to_pylist()[0]], schema=part.schema), names, trimmed)
        assert alone is not None and alone[0] == together[i], (part.slice(i, 1).to_pylist(), i)


@settings(max_examples=300, deadline=None)
@given(columns=st.lists(_column_values(), min_size=1, max_size=3), trim=st.booleans(), data=st.data())
def test_the_c_key_hashes_equal_the_numpy_ones(columns: List[Tuple[pa.DataType, List[Any]]], trim: bool,
                                               data: st.DataObject) -> None:
    """keyhints' C path (_keyhash.fold_var_width) gives the numpy path's numbers for every row: random
    string/binary columns (NULLs, empty and long values, sliced), with and without the char(n) trim, beside
    columns the C path does not take (int64, date32)."""
    import loadkit.postgres.keyhints as kh

    n = min(len(values) for _, values in columns)
    names = [f"c{i}" for i in range(len(columns))]
    table = pa.table({name: pa.array(values[:n], kind) for name, (kind, values) in zip(names, columns)})
    part = table.slice(data.draw(st.integers(0, n - 1)))
    trimmed = [name for name, (kind, _) in zip(names, columns) if trim and pa.types.is_string(kind)]
    results, saved = [], kh.ACCELERATED
    try:
        for accelerated in (True, False):
            kh.ACCELERATED = accelerated
            results.append(key_hashes(part, names, trimmed))
    finally:
        kh.ACCELERATED = saved
    assert results[0] is not None and results[1] is not None
    assert results[0].tolist() == results[1].tolist()


def test_the_c_key_hashes_are_built_and_used_in_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent fallback: the extension imports (``python setup.py build_ext --inplace`` or ``pip install -e
    .``), key_hashes folds string columns with it, a value over MAX_KEY_BYTES still gives no hashes, bad
    buffers raise instead of reading outside them, and LOADKIT_KEYHASH=numpy (read at import) is the only way
    to the numpy path."""
    import loadkit.postgres.keyhints as kh

    c_path_only(monkeypatch, kh, "LOADKIT_KEYHASH", "_var_width_hash", "loadkit.postgres._keyhash")
    h = key_hashes(pa.table({"k": pa.array(["ab", "ab  ", None, "x" * 30])}), ["k"], ["k"])
    assert h is not None and h[0] == h[1] and len(set(h.tolist())) == 3
    assert key_hashes(pa.table({"k": pa.array(["x" * (kh.MAX_KEY_BYTES + 1)])}), ["k"]) is None
    rows = np.zeros(2, np.uint64)
    with pytest.raises(ValueError, match="outside the data"):
        kh._c.fold_var_width(rows, np.array([0, 4, 99], np.int32).tobytes(), b"abcd", None, 0, 2, False, False, 256)
    with pytest.raises(ValueError, match="offsets"):
        kh._c.fold_var_width(rows, np.array([0, 4], np.int32).tobytes(), b"abcd", None, 0, 2, False, False, 256)
    with pytest.raises(ValueError, match="bitmap"):
        kh._c.seen_before(np.zeros(1, np.uint64), np.array([2**63], np.uint64), np.zeros(1, np.uint8), 37)


def test_char_keys_ignore_trailing_spaces_like_postgresql() -> None:
    t = pa.table({"k": pa.array(["ab", "ab  ", "a b", "ab\t"])})
    trimmed = key_hashes(t, ["k"], ["k"])
    exact = key_hashes(t, ["k"])
    assert trimmed is not None and exact is not None
    assert trimmed[0] == trimmed[1] and len({trimmed[0], trimmed[2], trimmed[3]}) == 3
    assert exact[0] != exact[1]


def test_columns_do_not_run_into_each_other() -> None:
    t = pa.table({"a": pa.array(["a", "ab", ""]), "b": pa.array(["bc", "c", "abc"])})
    h = key_hashes(t, ["a", "b"])
    assert h is not None and len(set(h.tolist())) == 3


def test_an_unhashed_type_gives_no_hints() -> None:
    t = pa.table({"k": pa.array([[1], [2]])})
    assert key_hashes(t, ["k"]) is None
    hints = KeyHints([spec(key=("k",), kinds=("text",))])
    hints.add("t", 1, batch([([1],), ([2],)], ("k",)))
    assert hints.candidates("t", {1: 2}) is None


keys = st.tuples(st.sampled_from(["k1", "k2", "K1", "k10", "x"]), st.sampled_from(["", "1", "1 ", "22"]))


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.lists(keys, max_size=30), min_size=1, max_size=6), bits=st.sampled_from([64, 1 << 12]),
       accelerated=st.booleans())
def test_candidates_are_exactly_the_repeated_keys(batches: List[List[Tuple[str, str]]], bits: int,
                                                  accelerated: bool) -> None:
    """Any batches (repeats within a batch and across batches; char column a with trailing spaces): the
    candidates are exactly the repeated keys (trailing spaces of the char column ignored), whatever the
    bitmap's size (a tiny one: nearly every row a false "maybe"), on the C path and the numpy path."""
    import loadkit.postgres.keyhints as kh

    old, old_accel = kh.BITMAP_BITS, kh.ACCELERATED
    kh.BITMAP_BITS, kh.ACCELERATED = bits, accelerated and kh._c is not None
    try:
        hints = KeyHints([spec(kinds=("varchar", "char"))])
        staged = {}
        for i, rows in enumerate(batches):
            hints.add("t", 100 + i, batch(rows) if rows else None)
            staged[100 + i] = len(rows)
        found = hints.candidates("t", staged)
    finally:
        kh.BITMAP_BITS, kh.ACCELERATED = old, old_accel
    assert found is not None
    seen = Counter((a, b.rstrip(" ")) for rows in batches for a, b in rows)
    want = {k for k, n in seen.items() if n > 1}
    got = [(a, b.rstrip(" ")) for a, b in zip(found.column("a").to_pylist(), found.column("b").to_pylist())]
    assert set(got) == want  # (one row per key value as a batch had it: "1" and "1 " may both be there)


def test_hints_must_cover_every_staged_batch_with_its_rows() -> None:
    hints = KeyHints([spec()])
    hints.add("t", 1, batch([("a", "1"), ("b", "1")]))
    hints.add("t", 2, batch([("a", "1")]))
    assert hints.candidates("t", {1: 2, 2: 1}).num_rows == 1  # type: ignore[union-attr]
    assert hints.candidates("t", {1: 2, 2: 1, 3: 5}) is None  # a batch written elsewhere (an earlier run)
    assert hints.candidates("t", {1: 2, 2: 2}) is None  # counted differently
    assert hints.candidates("t", {1: 2}).num_rows == 0  # type: ignore[union-attr]  # batch 2's file discarded
    assert hints.candidates("other", {1: 2}) is None


def test_the_row_cap_drops_the_overflowing_table_and_frees_it() -> None:
    hints = KeyHints([spec("t"), spec("u")], max_rows=5)
    hints.add("t", 1, batch([("a", "1"), ("b", "1"), ("c", "1")]))
    hints.add("u", 2, batch([("a", "1"), ("a", "1")]))
    assert hints.rows == 5
    hints.add("u", 3, batch([("z", "1")]))  # over the cap: u goes without hints
    assert hints.rows == 3
    assert hints.candidates("u", {2: 2, 3: 1}) is None
    assert hints.candidates("t", {1: 3}).num_rows == 0  # type: ignore[union-attr]
    hints.drop("t")
    assert hints.rows == 0


def test_the_same_batch_twice_counts_once() -> None:
    hints = KeyHints([spec()])
    rows = batch([("a", "1"), ("b", "2")])
    hints.add("t", 7, rows)
    hints.add("t", 7, rows)  # a retry that found it committed
    found: Optional[pa.Table] = hints.candidates("t", {7: 2})
    assert found is not None and found.num_rows == 0 and hints.rows == 2


def test_a_key_sent_as_source_bytes_and_as_text_is_one_key() -> None:
    """A latin-1 table's batches are sent as source bytes for the server to transcode (binary columns, the
    encoding in the schema's metadata) -- except a chunk with a bad row, parsed and sent as UTF-8 text. The
    same key in both kinds of batch is one key in PostgreSQL: it must be a candidate (it was not: the
    hints hashed latin-1 bytes against UTF-8 bytes, and an insert-path first load failed on the key)."""
    from loadkit.transform import CLIENT_ENCODING_KEY

    hints = KeyHints([spec(kinds=("varchar", "char"))])
    raw = batch([("JOS\xc9".encode("latin-1"), b"1"), (b"ANA", b"2 ")])
    hints.add("t", 1, raw.replace_schema_metadata({CLIENT_ENCODING_KEY: b"LATIN1"}))
    hints.add("t", 2, batch([("JOS\u00c9", "1"), ("ANA", "2"), ("ZOE", "3")]))
    found = hints.candidates("t", {1: 2, 2: 3})
    assert found is not None
    assert sorted(zip(found.column("a").to_pylist(), [b.rstrip() for b in found.column("b").to_pylist()])) == [
        ("ANA", "2"), ("JOS\u00c9", "1")]
