"""Alert rules from conf/alerts, evaluated by the driver as results stream in, plus a stall watchdog.

A breach is logged at its level (a structured record carrying the alert), recorded
through the tracker (tag + metric), sent to the configured sinks (log, JSON-lines file,
webhook) once per rule and subject, and raises AlertAbort when the rule's action is
``abort``. The "no progress" rule cannot wait for a result to arrive (a blocked pipeline
sends none), so ``Watchdog`` checks it from its own thread and interrupts the driver.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from loadkit.plan import AlertRuleSpec, AlertsPlan
from loadkit.errors import AlertAbort

log = logging.getLogger("loadkit.alerts")
_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.CRITICAL}


@dataclass
class Alert:
    rule: str
    subject: str
    value: float
    threshold: float
    level: str
    action: str
    run_id: str
    at: float

    def describe(self) -> str:
        return f"alert {self.rule} on {self.subject}: {self.value:.4g} > {self.threshold:.4g} (action={self.action})"


class AlertEngine:
    """Evaluates rules; thread-safe, since the watchdog thread checks the stall rule."""

    def __init__(self, cfg: AlertsPlan, run_id: str, on_alert: Optional[Callable[[Alert], None]] = None) -> None:
        self._cfg = cfg
        self._run_id = run_id
        self._on_alert = on_alert
        self._fired: Set[Tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.fired: List[Alert] = []

    def rule(self, name: str) -> AlertRuleSpec:
        return getattr(self._cfg, name)

    def evaluate(self, rule_name: str, subject: str, value: float, min_samples_ok: bool = True) -> Optional[Alert]:
        """Emit the alert if the rule is breached for the first time on this subject; never raises it."""
        rule = self.rule(rule_name)
        with self._lock:
            if not min_samples_ok or value <= rule.threshold or (rule_name, subject) in self._fired:
                return None
            self._fired.add((rule_name, subject))
            alert = Alert(rule_name, subject, value, rule.threshold, rule.level, rule.action, self._run_id,
                          time.time())
            self.fired.append(alert)
        self._emit(alert)
        return alert

    def check(self, rule_name: str, subject: str, value: float, min_samples_ok: bool = True) -> None:
        """evaluate, then raise AlertAbort if the rule says abort."""
        alert = self.evaluate(rule_name, subject, value, min_samples_ok)
        if alert is not None and alert.action == "abort":
            raise abort_error(alert)

    def _emit(self, alert: Alert) -> None:
        log.log(_LEVELS[alert.level], "ALERT %s", alert.describe(), extra={"alert": asdict(alert)})
        if self._on_alert is not None:
            self._on_alert(alert)
        record = json.dumps(asdict(alert))
        if "jsonl" in self._cfg.sinks and self._cfg.jsonl_path:
            with open(self._cfg.jsonl_path, "a", encoding="utf-8") as fh:
                fh.write(record + "\n")
        if "webhook" in self._cfg.sinks and self._cfg.webhook_url:
            self._post(record)

    def _post(self, record: str) -> None:
        req = urllib.request.Request(self._cfg.webhook_url or "", data=record.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5):
                return
        except OSError as exc:  # an alert sink failing must not fail the load; say so loudly
            log.error("alert webhook failed: %s", exc)

    def summary(self) -> List[Dict[str, Any]]:
        with self._lock:
            return [asdict(a) for a in self.fired]


def abort_error(alert: Alert) -> AlertAbort:
    return AlertAbort(alert.describe(), rule=alert.rule, subject=alert.subject)


class Watchdog:
    """Checks "no progress" every few seconds from its own thread, whatever the driver is blocked on.

    With action=abort it stores the AlertAbort and calls ``interrupt`` (the runner raises it
    in the driver's main thread); the driver also polls ``error`` between results.
    """

    def __init__(self, alerts: AlertEngine, seconds_since_progress: Callable[[], float],
                 interrupt: Optional[Callable[[], None]] = None) -> None:
        self._alerts = alerts
        self._since = seconds_since_progress
        self._interrupt = interrupt
        self._stop = threading.Event()
        self.error: Optional[AlertAbort] = None
        threshold = alerts.rule("stall_seconds").threshold
        self._every = min(5.0, max(0.05, threshold / 4))
        self._thread = threading.Thread(target=self._run, name="loadkit-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            alert = self._alerts.evaluate("stall_seconds", "run", self._since())
            if alert is not None and alert.action == "abort":
                self.error = abort_error(alert)
                if self._interrupt is not None and not self._stop.is_set():
                    self._interrupt()
                return

    def raise_if_tripped(self) -> None:
        if self.error is not None:
            raise self.error
