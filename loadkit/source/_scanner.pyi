"""Types of the C extension built from _scanner.c (see that file and scanner._scan_accel)."""
from typing import Tuple, Union

def stretch(data: Union[bytes, bytearray, memoryview], pos: int, final: bool, delimiter: int, quote: int,
            escape: int, doublequote: bool, cap: int, lfs: int, /) -> Tuple[bytearray, int, int, int, int, int]:
    """Records of the clean stretch from the record start ``pos``: (int64 pairs (end, LFs before the
    record's start), pos, stop, LFs before pos, quoted newlines seen, capped)."""
