"""Structured logging: readable text by default, JSON lines with logging.format=json.

Every record carries ``run_id``, ``table`` and ``file`` (null when they do not apply):
the run id is set once per run with ``set_context``, table/file come from ``extra=``.
Secrets are masked on the way out, whatever the format.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from typing import Any, Dict, Iterator, Optional

from loadkit.security import mask_text

_context: Dict[str, Any] = {"run_id": None, "table": None, "file": None}
_FIELDS = ("run_id", "table", "file")
_OPTIONAL = ("alert",)


def set_context(**values: Any) -> None:
    _context.update(values)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key in _FIELDS:
            if getattr(record, key, None) is None:
                setattr(record, key, _context.get(key))
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
            data[key] = getattr(record, key, None)
        for key in _OPTIONAL:
            value = getattr(record, key, None)
            if value is not None:
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        # Mask each value, then encode: masking the encoded line could cut through its JSON syntax
        # (a registered secret may contain quotes, commas or braces).
        return json.dumps({k: mask_text(v) if isinstance(v, str) else v for k, v in data.items()}, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s [%(where)s] %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.where = " ".join(str(v) for v in (getattr(record, k, None) for k in _FIELDS) if v is not None) or "-"
        return mask_text(super().format(record))


def setup_logging(fmt: str = "text", level: str = "INFO", stream: Optional[Any] = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger("loadkit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@contextlib.contextmanager
def heartbeat(logger: logging.Logger, what: str, every_s: float = 5.0, **extra: Any) -> Iterator[None]:
    """Log ``what`` at DEBUG, then "still <what> (N s)" at INFO every ``every_s`` seconds until the
    block ends, and "<what>: done in N s" at INFO if it took longer than one beat: a long step
    (a merge's upsert, an index build) never leaves the console silent, a short one adds no line."""
    started = time.perf_counter()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            logger.info("still %s (%.0f s)", what, time.perf_counter() - started, extra=extra)

    logger.debug("%s", what, extra=extra)
    thread = threading.Thread(target=beat, name="loadkit-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        took = time.perf_counter() - started
        if took >= every_s:
            logger.info("%s: done in %.1f s", what, took, extra=extra)
