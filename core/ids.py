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
    return new_ids(prefix, 1)[0]


def new_ids(prefix: str, n: int) -> list[str]:
    """`n` ids as new_id makes them, in order, with one lock and one urandom call (a JSONL batch's
    10,000 jobs: 12 against 75 ms)."""
    now = int(time.time() * 1000)
    stamps = []
    with _lock:
        for _ in range(n):
            if now <= _last[0]:
                now = _last[0]
                _last[1] += 1
                if _last[1] > 0xFFFF:  # more than 65536 ids in one millisecond: borrow the next one
                    now, _last[1] = now + 1, 0
            else:
                _last[1] = 0
            _last[0] = now
            stamps.append((now << 16) | _last[1])
    tails = os.urandom(4 * n).hex()
    return [f"{prefix}_{stamp:016x}{tails[8 * i : 8 * i + 8]}" for i, stamp in enumerate(stamps)]
