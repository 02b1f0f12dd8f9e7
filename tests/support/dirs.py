"""Temporary folders outside pytest's temp root, for state that an embedded PostgreSQL reads.

A concurrent pytest session resets pytest's root (/tmp/pytest-of-<user>) to mode 0700, and the embedded
PostgreSQL, which runs as an unprivileged user, then loses access to a data dir below it (initdb fails).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def open_dir(prefix: str) -> Iterator[Path]:
    """A fresh folder under the system temp dir, readable by other users, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
