"""Prefixed, time-ordered identifiers (`job_...`, `bat_...`): ids made in order sort in order."""

from __future__ import annotations

import os
import threading
import time

_lock = threading.Lock()
_last = [0, 0]  # [milliseconds, sequence within that millisecond]


def new_id(prefix: str) -> str:
    """Return `prefix_` + 12 hex digits of milliseconds + 4 of sequence + 8 random hex digits.

    Rows inserted in one statement share created_at, so the id breaks ties in submission order.
    """
    now = int(time.time() * 1000)
    with _lock:
        if now <= _last[0]:
            now = _last[0]
            _last[1] += 1
            if _last[1] > 0xFFFF:  # more than 65536 ids in one millisecond: borrow the next one
                now, _last[1] = now + 1, 0
        else:
            _last[1] = 0
        _last[0] = now
        seq = _last[1]
    return f"{prefix}_{now:012x}{seq:04x}{os.urandom(4).hex()}"
