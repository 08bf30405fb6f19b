"""Hydra callback for multirun sweeps: print the sweep id first and one comparison table last.

Registered in conf/config.yaml under ``hydra.callbacks.loadkit_sweep``. Each point's own summary
is headed by its sweep id, job number and overrides (``loadkit.runner.run_label``). The table
comes from MLflow (every run of the sweep carries the ``sweep_dir`` tag); with tracking off
there is nothing to compare and the callback says so.

A sweep over a month that is already loaded measures nothing unless each point reloads it:
add ``force=true`` (or give each point its own target, e.g. ``job.schema=sweep_${hydra:job.num}``).
Points that read no rows are marked in the table.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from loadkit.metrics import format_table

_COLUMNS = ("rows_read", "rows_rejected", "wall_s", "stream_s", "finalise_s", "rows_per_s", "batch_write_s_p50",
            "peak_rss_bytes")


SWEEP_KEYS_ENV = "LOADKIT_SWEEP_KEYS"


def sweep_keys(overrides: Sequence[str]) -> List[str]:
    """The keys a multirun sweeps over (``batch.size=1,2``, ``range(...)``, ``choice(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def point_overrides(overrides: str, keys: Optional[Sequence[str]] = None) -> str:
    """A point's overrides reduced to the swept keys (all of them when the keys are unknown)."""
    if keys is None:
        raw = os.environ.get(SWEEP_KEYS_ENV)
        keys = raw.split(",") if raw else None
    if not keys:
        return overrides
    return " ".join(o for o in overrides.split() if o.split("=", 1)[0].lstrip("+~") in keys)


def sweep_id(sweep_dir: str) -> str:
    """LOADKIT_SWEEP_ID, else the sweep folder's last two parts (the same rule as loadkit.__main__)."""
    return os.environ.get("LOADKIT_SWEEP_ID") or "/".join(Path(sweep_dir).parts[-2:])


class SweepCallback(Callback):
    """Prints ``sweep <id>`` when a multirun starts and the points' comparison when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        keys = sweep_keys(list(config.hydra.overrides.task))
        os.environ[SWEEP_KEYS_ENV] = ",".join(keys)  # the points' summaries show only these overrides
        sys.stdout.write(f"sweep {sweep_id(config.hydra.sweep.dir)} ({Path(config.hydra.sweep.dir).resolve()}) "
                         f"over {', '.join(keys) or 'nothing'}\n")
        sys.stdout.flush()
        if config.get("tracking") and config.tracking.enabled:
            try:  # open the store once now, so that the first point's wall time does not include it
                from loadkit import tracking

                tracking.find_runs(config.tracking.uri, config.tracking.experiment, max_results=1)
            except Exception as exc:  # noqa: BLE001 - the first point reports a broken store with its context
                sys.stderr.write(f"sweep: MLflow store not opened yet: {type(exc).__name__}\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            text = comparison_table(config)
        except Exception as exc:  # a report: never turn a finished sweep into a failure
            text = f"no sweep comparison: {type(exc).__name__}: {exc}"
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def comparison_table(config: DictConfig) -> str:
    """One row per point of the sweep in ``config.hydra.sweep.dir``, from its MLflow runs."""
    if not config.get("tracking") or not config.tracking.enabled:
        return "no sweep comparison: tracking is off"
    from loadkit import tracking

    sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
    runs = tracking.find_runs(config.tracking.uri, config.tracking.experiment,
                              filter_string=f"tags.sweep_dir = '{sweep_dir}'", max_results=1000)
    return render(sweep_id(config.hydra.sweep.dir), runs)


def render(sweep: str, runs: Sequence[Any]) -> str:
    """The comparison table of a sweep's MLflow runs, ordered by job number."""
    if not runs:
        return f"sweep {sweep}: no tracked runs found"
    lines: List[Sequence[str]] = [("point", "overrides", "status") + _COLUMNS]
    nothing = False
    for r in sorted(runs, key=lambda r: int(r.data.tags.get("sweep_job", "0"))):
        m, tags = r.data.metrics, r.data.tags
        status = tags.get("status", "?")
        if m.get("rows_read", 0) == 0 and status == "succeeded":
            status, nothing = "nothing loaded*", True
        lines.append((tags.get("sweep_job", "?"), point_overrides(tags.get("overrides", "")), status,
                      *(_fmt(k, m.get(k)) for k in _COLUMNS)))
    out = f"sweep {sweep}: {len(runs)} point(s)\n" + format_table(lines)
    if nothing:
        out += ("\n* every file was already loaded, so the point measured nothing: "
                "add force=true (or a target per point, job.schema=sweep_${hydra:job.num})")
    return out


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        return f"{value / 2**20:,.0f} MiB"
    if key.endswith(("_s", "_p50")):
        return f"{value:.2f}"
    return f"{value:,.0f}"
