"""The batch-size channel between the driver and the read tasks (no Ray here: see execute.ray).

Driver -> read tasks: the rows per batch the sizing policy wants now (``publish``). Read tasks
-> driver: chunks handed downstream and the seconds spent handing them (parse plus
backpressure), so the driver sees queue depth and blocked time without executor internals
(``counters``). The in-process executor uses a :class:`SizeBoard` directly; the Ray executor
keeps the same figures in Ray's key-value store (``execute.ray.RaySizeChannel``: no actor process).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Tuple


class SizeBoard:
    """The board itself: the wanted rows per batch, and what the read tasks reported."""

    def __init__(self, rows: int) -> None:
        self._rows = rows
        self._chunks = 0
        self._wait_s = 0.0

    def set(self, rows: int) -> None:
        self._rows = rows

    def poll(self, chunks: int, wait_s: float) -> Optional[int]:
        """A read task's report (see ``source.read.Board``); the rows per batch wanted now."""
        self._chunks += chunks
        self._wait_s += wait_s
        return self._rows

    def counters(self) -> Tuple[int, float]:
        """(chunks handed downstream, seconds spent handing them) since the run started."""
        return self._chunks, self._wait_s


class SizeChannel(Protocol):
    """The driver's end of the board, whichever executor runs the read tasks."""

    board: Any  # what the read tasks poll (a source.read.Board)

    def publish(self, rows: int) -> None:
        """Ask the read tasks for ``rows`` records per batch from their next chunk on."""
        ...

    def counters(self) -> Tuple[int, float]:
        """(chunks handed downstream, seconds spent handing them) so far."""
        ...

    def close(self) -> None:
        """Release the board (an actor, for Ray)."""
        ...


class LocalSizeChannel:
    """The SizeChannel of the in-process executor: the board as a plain object in this process."""

    def __init__(self, rows: int) -> None:
        self.board = SizeBoard(rows)

    def publish(self, rows: int) -> None:
        self.board.set(rows)

    def counters(self) -> Tuple[int, float]:
        return self.board.counters()

    def close(self) -> None:
        """Nothing to release: the board lives in this process."""
