"""JSON parsing by orjson where it reads exactly what the standard library reads, by the stdlib elsewhere."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

# A number of 19 digits or more may not fit orjson's 64-bit integers, which it reads as a float, silently.
_LONG_NUMBER = re.compile(rb"[0-9]{19}")  # not \d: the same on bytes, 1.5 times as fast


def loads(document: bytes | str, exact: Callable[[bytes], Any] = json.loads) -> Any:
    """`document` parsed by orjson (a quarter of `json.loads`' CPU), except a document with a number that
    may exceed 64 bits (a tenant's metadata may hold one) and whatever orjson refuses (NaN, lone
    surrogates, invalid JSON): those go to `exact`, which reads the first exactly and raises on the last."""
    data = document.encode() if isinstance(document, str) else bytes(document)
    if _LONG_NUMBER.search(data) is None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return exact(data)
