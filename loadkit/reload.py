"""Hot reload: SIGHUP re-reads the ``alerts`` and ``batch`` config groups of a running load.

The run's config is composed again from the same config folder (``LOADKIT_CONF`` or the
packaged ``conf/``) and the same command-line overrides (so the command line still wins over
the edited files); only ``alerts`` and ``batch`` are taken from the result. Each is validated
with the rules ``loadkit.config`` applies at start (through ``loadkit.plan``); if either is invalid
nothing is applied and the reason is logged. Applied:

- ``alerts``: thresholds, levels and actions of every rule, for alerts evaluated from now on
  (an alert already fired stays fired; the stall watchdog keeps the interval it started with);
- ``batch``: policy, size, min/max, window and memory ceiling go to the sizing policy; a new
  ``batch.size`` is published to the read tasks at once. ``read_block_bytes`` applies to the next
  run only (the dataset's blocks are planned at start); a change to it is logged as not applied.

The work happens on a thread (``loadkit-reload``), never inside the signal handler. SIGHUP is
only caught when the run owns the main thread; the previous handler is restored at the end.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, List, Optional, Tuple

from loadkit.plan import AlertsPlan, BatchPolicy, LoadPlan, reloaded_policies

log = logging.getLogger("loadkit.reload")


def _conf_dir() -> str:
    for candidate in (os.environ.get("LOADKIT_CONF"), str(Path(__file__).resolve().parent / "conf")):
        if candidate and os.path.isfile(os.path.join(candidate, "config.yaml")):
            return os.path.abspath(candidate)
    raise FileNotFoundError("cannot find conf/config.yaml (set LOADKIT_CONF)")


def compose_groups(overrides: List[str], year: Optional[int], month: Optional[int]) -> Tuple[AlertsPlan, BatchPolicy]:
    """(alerts, batch) as the config files and overrides say now; raises ConfigError when invalid."""
    return reloaded_policies(_conf_dir(), overrides, year, month)


class HotReload:
    """SIGHUP -> re-read, validate, apply (see the module doc). ``done`` is set after each attempt.

    ``current_alerts`` and ``current_batch`` start as the plan's and follow every applied reload."""

    def __init__(self, plan: LoadPlan, overrides: str, alerts: Any, sizer: Any, channel: Any, metrics: Any) -> None:
        self.plan, self.alerts, self.sizer, self.channel, self.metrics = plan, alerts, sizer, channel, metrics
        self.current_alerts: AlertsPlan = plan.alerts
        self.current_batch: BatchPolicy = plan.batch
        self.overrides = overrides.split() if overrides else []  # as Hydra recorded them (escapes kept)
        self.done = threading.Event()
        self.applied = 0
        self._previous: Any = None
        self._installed = False

    def install(self) -> "HotReload":
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._handle)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.done.clear()
        threading.Thread(target=self.reload, name="loadkit-reload", daemon=True).start()

    def reload(self) -> bool:
        """Re-read and apply; True if applied. Never raises: a bad edit must not stop the load."""
        try:
            alerts, batch = compose_groups(self.overrides, self.plan.year, self.plan.month)
            self._apply(alerts, batch)
            self.applied += 1
            return True
        except Exception as exc:
            log.warning("SIGHUP: configuration not applied, the run keeps its settings: %s", exc)
            return False
        finally:
            self.done.set()

    def _apply(self, alerts: AlertsPlan, batch: BatchPolicy) -> None:
        old_alerts, old_batch = asdict(self.current_alerts), asdict(self.current_batch)
        self.alerts._cfg = alerts  # AlertEngine reads its rules from this config at every evaluation
        self.current_alerts = alerts
        skipped = []
        if batch.read_block_bytes != self.current_batch.read_block_bytes:
            skipped.append("batch.read_block_bytes (next run)")
            batch = replace(batch, read_block_bytes=self.current_batch.read_block_bytes)
        s = self.sizer.settings
        self.sizer.settings = replace(s, policy=batch.policy, size=batch.size, min_size=batch.min_size,
                                      max_size=batch.max_size, window_s=batch.window_s,
                                      memory_ceiling=batch.memory_ceiling)
        if batch.size != self.current_batch.size:
            self.sizer.size = self.sizer._clamp(batch.size)
            self.sizer.restart_window()
            self.channel.publish(self.sizer.size)
            self.metrics.size_changed(self.sizer.size, "reload")
        self.current_batch = batch
        changed = [f"alerts.{k}" for k in old_alerts if old_alerts[k] != asdict(alerts)[k]]
        changed += [f"batch.{k}" for k in old_batch if old_batch[k] != asdict(batch)[k]]
        log.info("SIGHUP: configuration reloaded; changed: %s%s", ", ".join(changed) or "nothing",
                 f"; not applied: {', '.join(skipped)}" if skipped else "")


def install(plan: LoadPlan, overrides: Optional[str], alerts: Any, sizer: Any, channel: Any,
            metrics: Any) -> HotReload:
    """Catch SIGHUP for the rest of the stream (the caller uninstalls)."""
    return HotReload(plan, overrides or "", alerts, sizer, channel, metrics).install()
