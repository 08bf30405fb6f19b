"""Typed values of config literals: a column's ``min``/``max`` bound as the Python value of its kind.

Used by config validation (the bound must parse) and by the transform (it compares on the typed value);
pure, so both can import it without importing each other.
"""
from __future__ import annotations

import datetime as dt
from decimal import Decimal, InvalidOperation
from typing import Any

ORDERABLE = ("smallint", "integer", "bigint", "numeric", "double", "date", "timestamp")


def bound_value(kind: str, text: str) -> Any:
    """A column's min/max as a Python value of its kind (int, Decimal, float, date, naive datetime).

    Raises ValueError when the text is not a literal of that kind or the kind is not orderable."""
    text = str(text).strip()
    if kind in ("smallint", "integer", "bigint"):
        return int(text)
    if kind in ("numeric", "double"):
        try:
            value = Decimal(text)
        except InvalidOperation:
            raise ValueError(f"not a number: {text!r}") from None
        if not value.is_finite():
            raise ValueError(f"not a finite number: {text!r}")
        return value if kind == "numeric" else float(value)
    if kind == "date":
        return dt.date.fromisoformat(text)
    if kind == "timestamp":
        moment = dt.datetime.fromisoformat(text)
        if moment.tzinfo is not None:
            raise ValueError("timestamp columns are without time zone: give a bound without an offset")
        return moment
    raise ValueError(f"min/max do not apply to {kind} columns (allowed: {', '.join(ORDERABLE)})")
