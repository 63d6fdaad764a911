"""Where dms_flex keeps what it builds once (``$DMS_FLEX_HOME``), and the lock that lets processes
asked at the same time wait for the one that builds."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["dms_flex_home", "file_lock"]


def dms_flex_home() -> Path:
    """``$DMS_FLEX_HOME``, default ``~/.cache/dms_flex``."""
    return Path(os.environ.get("DMS_FLEX_HOME") or "~/.cache/dms_flex").expanduser()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (so two first calls do not both convert)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the atomic rename alone keeps things whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
