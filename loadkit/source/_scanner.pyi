"""Types of the C extension built from _scanner.c (see that file and scanner._scan_accel)."""
from typing import List, Tuple, Union

def scan(data: Union[bytes, bytearray, memoryview], final: bool, delimiter: int, quote: int, escape: int,
         doublequote: bool, lenient: bool, cap: int, /) -> Tuple[bytearray, bytearray, List[Tuple[int, int, int]], int]:
    """Every complete record of ``data``: (int64 pairs (end, LFs before the record's start), int64 indexes
    of the slow records, errors as (record index, kind, aux), quoted newlines seen)."""
