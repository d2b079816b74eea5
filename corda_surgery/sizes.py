"""Byte sizes as users write them (``512MB``, ``8GiB``), parsed once at the edge."""

from __future__ import annotations

import re

from corda_surgery.errors import OptionsError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: int | str, option: str) -> int:
    """Bytes from ``512MB``, ``8GiB``, ``2GB`` or a plain number of bytes; an error names ``option``."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise OptionsError(f"`{option}` {value!r}: not a size (e.g. 512MB, 8GiB, 2GB)")
        size = int(float(match[1]) * _UNITS[(match[2] or "b").lower()])
    if size < 1:
        raise OptionsError(f"`{option}` {value!r}: must be at least 1 byte")
    return size
