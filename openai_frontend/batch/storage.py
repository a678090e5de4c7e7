"""Storage rules of the Batch API: the budgets and default lifetime (``StoragePolicy``), the errors of a write
that the budgets or the disk refuse, and the fsync of a directory after a rename."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoragePolicy:
    """Budgets in bytes (None: none) and the default lifetime of output files in seconds (0: until deleted)."""

    max_bytes: int | None = None
    max_tenant_bytes: int | None = None
    file_expiry: int = 0


class StorageError(Exception):
    """A write refused for lack of space: ``code`` for the client, ``message`` saying which limit."""

    code = "insufficient_storage"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class QuotaExceeded(StorageError):
    code = "storage_quota_exceeded"


class DiskFull(StorageError):
    pass


class FileInUse(Exception):
    def __init__(self, batch_id: str):
        super().__init__(batch_id)
        self.batch_id = batch_id


def sqlite_full(e: sqlite3.OperationalError) -> bool:
    return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def fsync_dir(path: Path) -> None:
    """Makes a rename in ``path`` durable (the entry, not only the file's data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
