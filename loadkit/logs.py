"""Structured logging: readable text by default, JSON lines with logging.format=json.

Every record carries the run id (set once per run) plus table/file when the caller
passes them in ``extra``; secrets are masked on the way out.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any, Dict, Optional

from loadkit.security import mask_text

_context: Dict[str, Any] = {"run_id": None}
_FIELDS = ("run_id", "table", "file", "alert")


def set_context(**values: Any) -> None:
    _context.update(values)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: Dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": mask_text(record.getMessage()),
        }
        for key in _FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                data[key] = value
        if record.exc_info:
            data["exc"] = mask_text(self.formatException(record.exc_info))
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s [%(run_id)s] %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return mask_text(super().format(record))


def setup_logging(fmt: str = "text", level: str = "INFO", stream: Optional[Any] = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger("loadkit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
