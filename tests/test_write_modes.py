"""The write-mode registry: one class per config mode name, Sync for a merge that deletes missing keys,
and the per-mode facts the sink and the identity check ask instead of comparing mode names."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from loadkit.config import WRITE_MODES
from loadkit.errors import ConfigError
from loadkit.examples.cnpj.sample import generate_month
from loadkit.plan import build_plan
from loadkit.postgres.modes import MODES, Append, Merge, Replace, Snapshot, Sync, mode_for
from tests.conftest import compose


def test_every_config_mode_has_exactly_one_class() -> None:
    assert sorted(MODES) == sorted(WRITE_MODES)
    assert {MODES[m] for m in WRITE_MODES} == {Append, Merge, Replace, Snapshot}


def test_mode_for_picks_the_class_and_its_facts(tmp_path: Path) -> None:
    month = generate_month(tmp_path / "data", 2024, 5, rows=50, shards=1, seed=3)
    base = build_plan(compose(["+job=monthly", "year=2024", "month=5", f"data_root={month.root}"])).table("empresas")
    facts = {}
    for name in WRITE_MODES:
        mode = mode_for(dataclasses.replace(base, mode=name, delete_missing=False))
        facts[name] = (type(mode), mode.staged, mode.whole_period, mode.partitioned, mode.overwritten_later,
                       mode.settled_status)
    assert facts == {
        "append": (Append, False, False, False, False, "loaded"),
        "merge": (Merge, True, False, False, True, "staged"),
        "replace": (Replace, True, True, False, True, "staged"),
        "snapshot": (Snapshot, True, True, True, False, "staged"),
    }
    assert type(mode_for(dataclasses.replace(base, mode="merge", delete_missing=True))) is Sync
    with pytest.raises(ConfigError, match="unknown write mode"):
        mode_for(dataclasses.replace(base, mode="upsert"))
