"""The Batch API's state: SQLite (files, batches, one row per batch line with its stored result) and file
bodies on disk under the data directory as ``files/<file id>.jsonl``. The schema is created and migrated here
(``PRAGMA user_version``). Every change is one transaction; a line's result and its state change are written
together, so a counted line always has its result and a stored result is never run again."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openai_frontend.batch.validation import Scan

OPEN_STATES = ("validating", "in_progress", "finalizing", "cancelling")
FINAL_STATES = ("completed", "failed", "expired", "cancelled")

# Migrations: the schema at version i+1 is MIGRATIONS[: i+1] applied in order. Append, never edit.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE files (
        id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL, expires_at INTEGER);
    CREATE TABLE batches (
        id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
        completion_window TEXT NOT NULL, status TEXT NOT NULL, model TEXT, metadata TEXT, errors TEXT,
        total INTEGER NOT NULL, output_file_id TEXT, error_file_id TEXT,
        created_at INTEGER NOT NULL, expires_at INTEGER, in_progress_at INTEGER, finalizing_at INTEGER,
        completed_at INTEGER, failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER);
    CREATE INDEX batches_status ON batches (status);
    CREATE TABLE batch_lines (
        batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL,
        offset INTEGER NOT NULL, length INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, result TEXT,
        PRIMARY KEY (batch_id, line));
    CREATE INDEX batch_lines_state ON batch_lines (batch_id, state, line);
    """,
    # 2: token usage per line, summed into the batch's "usage" object.
    """
    ALTER TABLE batch_lines ADD COLUMN prompt_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE batch_lines ADD COLUMN completion_tokens INTEGER NOT NULL DEFAULT 0;
    """,
]


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


@dataclass
class PendingLine:
    batch_id: str
    line: int
    custom_id: str
    offset: int
    length: int
    attempts: int
    input_file_id: str
    endpoint: str


class Store:
    """Synchronous; one connection guarded by a lock (the async side calls it through ``AsyncStore``)."""

    def __init__(self, data_dir: str | Path, db_path: str | Path | None = None):
        self.data_dir = Path(data_dir).expanduser()
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        path = Path(db_path).expanduser() if db_path else self.data_dir / "batches.sqlite3"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db_path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self.migrate()
        self._remove_orphans()

    # ------------------------------------------------------------ schema
    def migrate(self) -> int:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(f"{self.db_path}: schema version {version} is newer than this server's "
                                   f"({len(MIGRATIONS)}); upgrade the server")  # fmt: skip
            for i in range(version, len(MIGRATIONS)):
                with self._tx() as db:
                    for statement in filter(str.strip, MIGRATIONS[i].split(";")):
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version={i + 1}")
            return len(MIGRATIONS)

    @contextlib.contextmanager
    def _tx(self):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _remove_orphans(self) -> None:
        """Bodies without a row (a crash between writing and committing) and half-written temporaries."""
        with self._lock:
            known = {row[0] for row in self._db.execute("SELECT id FROM files")}
        for path in self.files_dir.iterdir():
            if path.name.endswith(".tmp") or path.name.removesuffix(".jsonl") not in known:
                with contextlib.suppress(OSError):
                    path.unlink()

    # ------------------------------------------------------------ files
    def file_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"  # file_id was checked against validation._FILE_ID

    def temp_path(self) -> Path:
        return self.files_dir / f"{secrets.token_hex(8)}.tmp"

    def disk_used(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM files").fetchone()[0])

    def add_file(self, temp: Path, filename: str, purpose: str, size: int) -> dict:
        """Moves a written temporary file into place and records it, in one step as far as readers can see."""
        file_id = new_id("file-")
        os.replace(temp, self.file_path(file_id))
        now = int(time.time())
        with self._tx() as db:
            db.execute("INSERT INTO files (id, filename, purpose, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
                       (file_id, filename, purpose, size, now))  # fmt: skip
        return self.get_file(file_id)

    def get_file(self, file_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return dict(row) if row else None

    def list_files(self, purpose: str | None, limit: int, order: str, after: str | None) -> tuple[list[dict], bool]:
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, args = [], []
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if after:
            where.append(f"rowid {op} COALESCE((SELECT rowid FROM files WHERE id = ?), -1)")
            args.append(after)
        sql = "SELECT * FROM files" + (" WHERE " + " AND ".join(where) if where else "")
        with self._lock:
            rows = self._db.execute(f"{sql} ORDER BY rowid {direction} LIMIT ?", (*args, limit + 1)).fetchall()
        return [dict(r) for r in rows[:limit]], len(rows) > limit

    def file_in_use(self, file_id: str) -> str | None:
        """The id of an unfinished batch reading this file, if any."""
        with self._lock:
            row = self._db.execute(
                f"SELECT id FROM batches WHERE input_file_id = ? AND status IN ({','.join('?' * len(OPEN_STATES))})",
                (file_id, *OPEN_STATES)).fetchone()  # fmt: skip
        return row[0] if row else None

    def delete_file(self, file_id: str) -> bool:
        with self._tx() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        with contextlib.suppress(FileNotFoundError):
            self.file_path(file_id).unlink()
        return deleted

    # ------------------------------------------------------------ batches
    def open_batches(self) -> int:
        with self._lock:
            sql = f"SELECT COUNT(*) FROM batches WHERE status IN ({','.join('?' * len(OPEN_STATES))})"
            return int(self._db.execute(sql, OPEN_STATES).fetchone()[0])

    def create_batch(self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None,
                     scan: Scan, window_seconds: int) -> dict:  # fmt: skip
        batch_id = new_id("batch_")
        now = int(time.time())
        with self._tx() as db:
            db.execute("INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, model, metadata, "
                       "total, created_at, expires_at) VALUES (?, ?, ?, ?, 'validating', ?, ?, ?, ?, ?)",
                       (batch_id, endpoint, input_file_id, completion_window, scan.model,
                        json.dumps(metadata) if metadata is not None else None, len(scan.lines), now,
                        now + window_seconds))  # fmt: skip
            db.executemany("INSERT INTO batch_lines (batch_id, line, custom_id, offset, length) "
                           "VALUES (?, ?, ?, ?, ?)",
                           [(batch_id, ln.number, ln.custom_id, ln.offset, ln.length) for ln in scan.lines])
        return self.get_batch(batch_id)

    def get_batch(self, batch_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                return None
            batch = dict(row)
            counts = self._db.execute(
                "SELECT SUM(state = 'completed'), SUM(state = 'failed'), SUM(prompt_tokens), SUM(completion_tokens) "
                "FROM batch_lines WHERE batch_id = ?", (batch_id,)).fetchone()  # fmt: skip
        batch["completed"], batch["failed"] = int(counts[0] or 0), int(counts[1] or 0)
        batch["prompt_tokens"], batch["completion_tokens"] = int(counts[2] or 0), int(counts[3] or 0)
        return batch

    def list_batches(self, limit: int, after: str | None) -> tuple[list[dict], bool]:
        with self._lock:
            if after:
                ids = self._db.execute("SELECT id FROM batches WHERE rowid < COALESCE((SELECT rowid FROM batches "
                                       "WHERE id = ?), -1) ORDER BY rowid DESC LIMIT ?", (after, limit + 1)).fetchall()
            else:
                ids = self._db.execute("SELECT id FROM batches ORDER BY rowid DESC LIMIT ?", (limit + 1,)).fetchall()
        return [self.get_batch(r[0]) for r in ids[:limit]], len(ids) > limit

    def active_batches(self) -> list[dict]:
        with self._lock:
            ids = self._db.execute(f"SELECT id FROM batches WHERE status IN ({','.join('?' * len(OPEN_STATES))}) "
                                   "ORDER BY rowid", OPEN_STATES).fetchall()  # fmt: skip
        return [self.get_batch(r[0]) for r in ids]

    def set_status(self, batch_id: str, status: str, only_from: tuple[str, ...] = OPEN_STATES) -> bool:
        """``status`` and its ``<status>_at`` timestamp, if the batch is in one of ``only_from``."""
        with self._tx() as db:
            sql = (f"UPDATE batches SET status = ?, {status}_at = ? WHERE id = ? AND status IN "
                   f"({','.join('?' * len(only_from))})")
            changed = db.execute(sql, (status, int(time.time()), batch_id, *only_from)).rowcount
        return changed > 0

    def fail_batch(self, batch_id: str, errors: list[dict]) -> None:
        with self._tx() as db:
            db.execute("UPDATE batches SET status = 'failed', failed_at = ?, errors = ? WHERE id = ?",
                       (int(time.time()), json.dumps(errors), batch_id))  # fmt: skip

    # ------------------------------------------------------------ lines
    def pending_lines(self, limit: int) -> list[PendingLine]:
        """Lines to run next, oldest batch first, of batches in progress and within their window."""
        with self._lock:
            rows = self._db.execute(
                "SELECT l.batch_id, l.line, l.custom_id, l.offset, l.length, l.attempts, b.input_file_id, b.endpoint "
                "FROM batches b JOIN batch_lines l ON l.batch_id = b.id "
                "WHERE b.status = 'in_progress' AND l.state = 'pending' AND COALESCE(b.expires_at > ?, 1) "
                "ORDER BY b.rowid, l.line LIMIT ?", (int(time.time()), limit)).fetchall()  # fmt: skip
        return [PendingLine(*row) for row in rows]

    def pending_count(self, batch_id: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM batch_lines WHERE batch_id = ? AND state = 'pending'",
                                        (batch_id,)).fetchone()[0])  # fmt: skip

    def record(self, batch_id: str, line: int, state: str, result: dict, prompt_tokens: int = 0,
               completion_tokens: int = 0) -> bool:  # fmt: skip
        """Stores a line's result and its final state together; False if it already had one (never twice)."""
        with self._tx() as db:
            return db.execute(
                "UPDATE batch_lines SET state = ?, result = ?, prompt_tokens = ?, completion_tokens = ?, "
                "attempts = attempts + 1 WHERE batch_id = ? AND line = ? AND state = 'pending'",
                (state, json.dumps(result, separators=(",", ":")), prompt_tokens, completion_tokens, batch_id,
                 line)).rowcount > 0  # fmt: skip

    def add_attempt(self, batch_id: str, line: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE batch_lines SET attempts = attempts + 1 WHERE batch_id = ? AND line = ?",
                       (batch_id, line))  # fmt: skip

    def expire_pending(self, batch_id: str, make_result: Callable[[str], dict]) -> None:
        with self._tx() as db:
            rows = db.execute("SELECT line, custom_id FROM batch_lines WHERE batch_id = ? AND state = 'pending'",
                              (batch_id,)).fetchall()  # fmt: skip
            db.executemany("UPDATE batch_lines SET state = 'failed', result = ? WHERE batch_id = ? AND line = ?",
                           [(json.dumps(make_result(r[1])), batch_id, r[0]) for r in rows])  # fmt: skip

    def finish(self, batch_id: str, status: str) -> dict:
        """Writes the output and error files from the stored results (line order), records them and moves the
        batch to ``status``, all or nothing. Safe to repeat after a crash: files of a failed attempt are
        orphans, removed at the next start."""
        batch = self.get_batch(batch_id)
        if batch is None or batch["status"] in FINAL_STATES:
            return batch
        written: dict[str, tuple[Path, int]] = {}
        for state, kind in (("completed", "output"), ("failed", "error")):
            temp, size, count = self.temp_path(), 0, 0
            with self._lock:
                rows = self._db.execute("SELECT result FROM batch_lines WHERE batch_id = ? AND state = ? ORDER BY "
                                        "line", (batch_id, state)).fetchall()  # fmt: skip
            with open(temp, "wb") as f:
                for (result,) in rows:
                    data = result.encode() + b"\n"
                    f.write(data)
                    size += len(data)
                    count += 1
                f.flush()
                os.fsync(f.fileno())
            if count:
                written[kind] = (temp, size)
            else:
                temp.unlink()
        now = int(time.time())
        ids: dict[str, str] = {}
        for kind, (temp, _) in written.items():
            ids[kind] = new_id("file-")
            os.replace(temp, self.file_path(ids[kind]))
        with self._tx() as db:
            for kind, (_, size) in written.items():
                db.execute("INSERT INTO files (id, filename, purpose, bytes, created_at) VALUES (?, ?, "
                           "'batch_output', ?, ?)", (ids[kind], f"{batch_id}_{kind}.jsonl", size, now))  # fmt: skip
            db.execute(f"UPDATE batches SET status = ?, {status}_at = ?, output_file_id = ?, error_file_id = ? "
                       "WHERE id = ?", (status, now, ids.get("output"), ids.get("error"), batch_id))  # fmt: skip
        return self.get_batch(batch_id)


class AsyncStore:
    """The store's methods as coroutines, run on the store's own thread: SQLite commits wait for the disk (fsync);
    neither the event loop nor the default thread pool (image decoding of interactive requests) may wait for
    them. One thread is enough: the connection serves one call at a time anyway."""

    def __init__(self, store: Store):
        self.sync = store
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch-store")

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.sync, name)

        async def call(*args, **kwargs):
            return await asyncio.get_running_loop().run_in_executor(self._executor,
                                                                    functools.partial(method, *args, **kwargs))

        return call

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.sync.close()
