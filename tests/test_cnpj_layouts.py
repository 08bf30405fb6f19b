"""Every real layout of the CNPJ release: 2021 zip names, reference members ``F.K03200$Z...``, and archives
re-zipped on a Mac (``__MACOSX/._member`` AppleDouble forks, directory entries) load like the originals."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadkit.source import files
from loadkit.examples.cnpj.sample import generate_month
from loadkit.plan import build_plan
from loadkit.runner import run_job
from tests.helpers import compose, query


def _rezip_like_a_mac(path: Path) -> None:
    """Add what macOS Archive Utility adds: a directory entry, an AppleDouble fork, a .DS_Store."""
    with zipfile.ZipFile(path) as zf:
        (info,) = zf.infolist()
        data = zf.read(info)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__MACOSX/", b"")
        zf.writestr(f"__MACOSX/._{info.filename}", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
        zf.writestr(".DS_Store", b"\x00\x00\x00\x01Bud1")
        zf.writestr("sub/", b"")
        zf.writestr(info.filename, data)


def test_foreign_zip_entries_are_not_members(tmp_path: Path) -> None:
    path = tmp_path / "Naturezas.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("F.K03200$Z.D51213.NATJUCSV", b'"2062";"Sociedade Empresaria Limitada"\n')
    _rezip_like_a_mac(path)
    assert len(zipfile.ZipFile(path).infolist()) == 5
    members = [name for name, _ in files.open_members(path, "zip", "*NATJUCSV")]
    assert members == ["F.K03200$Z.D51213.NATJUCSV"]
    assert [name for name, _ in files.open_members(path, "zip", None)] == members
    flags = {i.filename: files.is_foreign_member(i) for i in zipfile.ZipFile(path).infolist()}
    assert flags == {"__MACOSX/": True, "__MACOSX/._F.K03200$Z.D51213.NATJUCSV": True, ".DS_Store": True,
                     "sub/": True, "F.K03200$Z.D51213.NATJUCSV": False}


@pytest.mark.parametrize("naming", ["current", "2021"])
def test_both_namings_resolve_to_the_same_files_per_table(tmp_path: Path, naming: str) -> None:
    month = generate_month(tmp_path, 2021, 6, rows=200, shards=2, seed=1, naming=naming)
    plan = build_plan(compose(["+job=monthly", "year=2021", "month=6", f"data_root={tmp_path}"]))
    for table in plan.tables:
        assert [f.rel for f in table.files] == month.files[table.name], table.name


@pytest.mark.e2e
def test_2021_named_month_rezipped_on_a_mac_loads(tmp_path: Path, pg_dsn: str, schemas: tuple,
                                                  job_overrides) -> None:
    month = generate_month(tmp_path, 2021, 6, rows=200, shards=2, seed=1, naming="2021")
    for rel in (month.files["naturezas"][0], month.files["estabelecimentos"][1]):
        _rezip_like_a_mac(month.root / rel)
    result = run_job(compose(job_overrides(month.root, "env.executor=inprocess", year=2021, month=6)))
    assert result.status == "succeeded", result.error
    target, _ = schemas
    for table, rows in month.rows.items():
        tm = result.metrics.tables[table]
        assert (tm.rows_read, tm.rows_rejected) == (rows, 0), table
    assert query(pg_dsn, f'SELECT count(*) FROM "{target}".naturezas')[0][0] == month.rows["naturezas"]


SEGMENT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\x00"), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(SEGMENT, min_size=1, max_size=4))
def test_foreign_member_rule(parts: list) -> None:
    """Data members are every file entry except directories, AppleDouble forks and Finder/Explorer metadata."""
    name = "/".join(parts)
    data = files.is_foreign_member(zipfile.ZipInfo(name))
    expected_foreign = ("__MACOSX" in parts[:-1] or parts[-1].startswith("._")
                        or parts[-1] in (".DS_Store", "Thumbs.db"))
    assert data == expected_foreign
    assert files.is_foreign_member(zipfile.ZipInfo(name + "/"))  # a directory entry
    assert files.is_foreign_member(zipfile.ZipInfo("__MACOSX/" + name))
