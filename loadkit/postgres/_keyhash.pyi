"""Types of the C extension built from _keyhash.c (see that file and keyhints.key_hashes)."""
from typing import Any, Optional

def fold_var_width(rows: Any, offsets: Any, data: Any, validity: Optional[Any], start: int, n: int, wide: bool,
                   rstrip: bool, max_key_bytes: int, /) -> bool:
    """Fold one string/binary key column (Arrow buffers) into the running uint64 row hashes ``rows`` in place,
    as keyhints' numpy path does; False if a value is longer than max_key_bytes."""

def seen_before(bitmap: Any, hashes: Any, maybe: Any, shift: int, /) -> None:
    """Per hash, in order: maybe[i] = its bit (hash >> shift) of ``bitmap`` was already set; then set it."""
