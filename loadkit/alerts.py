"""Alert rules from conf/alerts, evaluated by the driver as results stream in.

A breach is logged at its level, recorded through the tracker, sent to the configured
sinks (log, JSON-lines file, webhook) once per rule and subject, and raises AlertAbort
when the rule's action is ``abort``.
"""
from __future__ import annotations

import json
import logging
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from loadkit.config import AlertRule, AlertsConfig
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


class AlertEngine:
    def __init__(self, cfg: AlertsConfig, run_id: str, on_alert: Optional[Callable[[Alert], None]] = None) -> None:
        self._cfg = cfg
        self._run_id = run_id
        self._on_alert = on_alert
        self._fired: Set[Tuple[str, str]] = set()
        self.fired: List[Alert] = []

    def check(self, rule_name: str, subject: str, value: float, min_samples_ok: bool = True) -> None:
        rule: AlertRule = getattr(self._cfg, rule_name)
        if not min_samples_ok or value <= rule.threshold or (rule_name, subject) in self._fired:
            return
        self._fired.add((rule_name, subject))
        alert = Alert(rule_name, subject, value, rule.threshold, rule.level, rule.action, self._run_id, time.time())
        self.fired.append(alert)
        self._emit(alert)
        if rule.action == "abort":
            raise AlertAbort(f"alert {rule_name} on {subject}: {value:.4g} > {rule.threshold:.4g} (action=abort)",
                             rule=rule_name, subject=subject)

    def _emit(self, alert: Alert) -> None:
        log.log(_LEVELS[alert.level], "ALERT %s on %s: %.4g exceeds %.4g", alert.rule, alert.subject, alert.value,
                alert.threshold, extra={"alert": asdict(alert)})
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
        return [asdict(a) for a in self.fired]
