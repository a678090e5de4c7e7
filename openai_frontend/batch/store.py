"""The Batch API's state: SQLite (files, batches, one row per batch line with its stored result) and file
bodies on disk under the data directory as ``files/<file id>.jsonl``. The schema is created and migrated here
(``PRAGMA user_version``). Every change is one transaction; a line's result and its state change are written
together, so a counted line always has its result and a stored result is never run again.

Every file and batch belongs to a tenant (openai_frontend/tenants.py); reads take a ``scope``: a tenant, or
None for all (an admin key). Another tenant's row is "not found", never "forbidden".

Storage: a body is written and fsynced before its row is committed, and removed after its row is deleted, so a
crash leaves at most a body without a row, which the next start removes. The bytes counted against the budgets
(``StoragePolicy``) are the files' and the stored results of unfinished batches (moved into the output files
when the batch ends, then cleared); every check and the write it allows are one transaction."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import itertools
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

from openai_frontend.batch.schema import FINAL_STATES, MIGRATIONS, OPEN_SQL, OPEN_STATES
from openai_frontend.batch.storage import (
    DiskFull,
    FileInUse,
    QuotaExceeded,
    StorageError,
    StoragePolicy,
    fsync_dir,
    sqlite_full,  # fmt: skip
)
from openai_frontend.batch.validation import Scan
from openai_frontend.tenants import DEFAULT_TENANT


def _scope(scope: str | None, column: str = "tenant") -> tuple[str, tuple]:
    """SQL condition and arguments for rows visible to ``scope`` (None: every tenant's)."""
    return ("1", ()) if scope is None else (f"{column} = ?", (scope,))



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

    def __init__(self, data_dir: str | Path, db_path: str | Path | None = None,
                 policy: StoragePolicy | None = None):  # fmt: skip
        self.data_dir = Path(data_dir).expanduser()
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        path = Path(db_path).expanduser() if db_path else self.data_dir / "batches.sqlite3"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db_path = path
        self.policy = policy or StoragePolicy()
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
                if self._db.in_transaction:  # SQLite has rolled back already after some errors (SQLITE_FULL)
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._users.close()

    def _remove_orphans(self) -> None:
        """Bodies without a row (a crash between writing and committing, or between deleting a row and its body)
        and half-written temporaries, when no other process uses the directory (another frontend may be between
        writing a body and committing its row). Every store holds ``users.lock`` shared for its life; the one
        that gets it alone cleans up."""
        self._users = open(self.data_dir / "users.lock", "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fcntl.flock(self._users, fcntl.LOCK_SH)  # others run here: the next lone start cleans up
            return
        self._remove_orphans_locked()
        fcntl.flock(self._users, fcntl.LOCK_SH)

    def _remove_orphans_locked(self) -> None:
        with self._lock:
            known = {row[0] for row in self._db.execute("SELECT id FROM files")}
        for path in self.files_dir.iterdir():
            if path.name.endswith(".tmp") or path.name.removesuffix(".jsonl") not in known:
                with contextlib.suppress(OSError):
                    path.unlink()

    # ------------------------------------------------------------ storage
    def _used(self, db: sqlite3.Connection, tenant: str | None) -> int:
        where, args = _scope(tenant)
        files = db.execute(f"SELECT COALESCE(SUM(bytes), 0) FROM files WHERE {where}", args).fetchone()[0]
        results = db.execute(f"SELECT COALESCE(SUM(result_bytes), 0) FROM batches WHERE status IN {OPEN_SQL} AND "
                             f"{where}", args).fetchone()[0]  # fmt: skip
        return int(files) + int(results)

    def _check_budget(self, db: sqlite3.Connection, tenant: str, size: int) -> None:
        """Raises QuotaExceeded if ``size`` more bytes would pass the server's or the tenant's budget."""
        for limit, scope, whose in ((self.policy.max_bytes, None, "the server's"),
                                    (self.policy.max_tenant_bytes, tenant, "your")):  # fmt: skip
            if limit is not None and self._used(db, scope) + size > limit:
                raise QuotaExceeded(f"{whose} batch storage is full ({limit} bytes); delete files you no longer need")

    def check_budget(self, tenant: str, size: int) -> None:
        with self._lock:
            self._check_budget(self._db, tenant, size)

    def disk_used(self, tenant: str | None = None) -> int:
        """Bytes counted against the budgets: every tenant's, or one tenant's."""
        with self._lock:
            return self._used(self._db, tenant)

    def sweep(self, now: int | None = None) -> list[str]:
        """Deletes the files past their ``expires_at`` that no unfinished batch reads: rows first (one
        transaction), then bodies; a crash in between leaves bodies without rows, removed at the next start."""
        now = int(time.time()) if now is None else now
        with self._tx() as db:
            ids = [row[0] for row in db.execute(
                f"SELECT id FROM files WHERE expires_at <= ? AND id NOT IN (SELECT input_file_id FROM batches WHERE "
                f"status IN {OPEN_SQL})", (now,))]  # fmt: skip
            db.executemany("DELETE FROM files WHERE id = ?", [(i,) for i in ids])
        for file_id in ids:
            with contextlib.suppress(FileNotFoundError):
                self.file_path(file_id).unlink()
        return ids

    # ------------------------------------------------------------ files
    def file_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"  # file_id was checked against validation._FILE_ID

    def temp_path(self) -> Path:
        return self.files_dir / f"{secrets.token_hex(8)}.tmp"

    def add_file(self, temp: Path, filename: str, purpose: str, size: int, tenant: str = DEFAULT_TENANT,
                 expires_after: int | None = None) -> dict:  # fmt: skip
        """Records a written and fsynced temporary file as ``tenant``'s, if the budgets take it (QuotaExceeded
        otherwise, and nothing is kept). Readers see the file whole or not at all."""
        file_id = new_id("file-")
        now = int(time.time())
        expires_at = now + expires_after if expires_after else None
        try:
            with self._tx() as db:
                self._check_budget(db, tenant, size)
                os.replace(temp, self.file_path(file_id))
                fsync_dir(self.files_dir)
                db.execute("INSERT INTO files (id, filename, purpose, bytes, created_at, expires_at, tenant) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (file_id, filename, purpose, size, now, expires_at, tenant))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                self.file_path(file_id).unlink()
            raise
        return self.get_file(file_id)

    def get_file(self, file_id: str, scope: str | None = None) -> dict | None:
        where, args = _scope(scope)
        with self._lock:
            row = self._db.execute(f"SELECT * FROM files WHERE id = ? AND {where}", (file_id, *args)).fetchone()
        return dict(row) if row else None

    def list_files(self, purpose: str | None, limit: int, order: str, after: str | None,
                   scope: str | None = None) -> tuple[list[dict], bool]:  # fmt: skip
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, args = _scope(scope)
        where, args = [where], list(args)
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if after:
            where.append(f"rowid {op} COALESCE((SELECT rowid FROM files WHERE id = ?), -1)")
            args.append(after)
        sql = "SELECT * FROM files WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(f"{sql} ORDER BY rowid {direction} LIMIT ?", (*args, limit + 1)).fetchall()
        return [dict(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str, scope: str | None = None) -> bool:
        """Row, then body. False if ``scope`` sees no such file; FileInUse if an unfinished batch reads it."""
        where, args = _scope(scope)
        with self._tx() as db:
            if db.execute(f"SELECT 1 FROM files WHERE id = ? AND {where}", (file_id, *args)).fetchone() is None:
                return False
            batch = db.execute(f"SELECT id FROM batches WHERE input_file_id = ? AND status IN {OPEN_SQL}",
                               (file_id,)).fetchone()  # fmt: skip
            if batch is not None:
                raise FileInUse(batch[0])
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        with contextlib.suppress(FileNotFoundError):
            self.file_path(file_id).unlink()
        return True

    # ------------------------------------------------------------ batches
    def open_batches(self, tenant: str | None = None) -> int:
        """Unfinished batches: every tenant's, or one tenant's."""
        where, args = _scope(tenant)
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM batches WHERE status IN {OPEN_SQL} AND {where}",
                                        args).fetchone()[0])  # fmt: skip

    def create_batch(self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None,
                     scan: Scan, window_seconds: int, tenant: str = DEFAULT_TENANT, scope: str | None = None,
                     output_expires_after: int | None = None) -> dict | None:  # fmt: skip
        """None if the input file is gone (deleted or expired since it was read) or not visible to ``scope``."""
        batch_id = new_id("batch_")
        now = int(time.time())
        where, args = _scope(scope)
        with self._tx() as db:
            if db.execute(f"SELECT 1 FROM files WHERE id = ? AND COALESCE(expires_at > ?, 1) AND {where}",
                          (input_file_id, now, *args)).fetchone() is None:  # fmt: skip
                return None
            db.execute("INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, model, metadata, "
                       "total, created_at, expires_at, tenant, output_expires_after) VALUES (?, ?, ?, ?, 'validating', "
                       "?, ?, ?, ?, ?, ?, ?)",
                       (batch_id, endpoint, input_file_id, completion_window, scan.model,
                        json.dumps(metadata) if metadata is not None else None, len(scan.lines), now,
                        now + window_seconds, tenant, output_expires_after))  # fmt: skip
            db.executemany("INSERT INTO batch_lines (batch_id, line, custom_id, offset, length) "
                           "VALUES (?, ?, ?, ?, ?)",
                           [(batch_id, ln.number, ln.custom_id, ln.offset, ln.length) for ln in scan.lines])
        return self.get_batch(batch_id)

    def get_batch(self, batch_id: str, scope: str | None = None) -> dict | None:
        where, args = _scope(scope)
        with self._lock:
            row = self._db.execute(f"SELECT * FROM batches WHERE id = ? AND {where}", (batch_id, *args)).fetchone()
            if row is None:
                return None
            batch = dict(row)
            counts = self._db.execute(
                "SELECT SUM(state = 'completed'), SUM(state = 'failed'), SUM(prompt_tokens), SUM(completion_tokens) "
                "FROM batch_lines WHERE batch_id = ?", (batch_id,)).fetchone()  # fmt: skip
        batch["completed"], batch["failed"] = int(counts[0] or 0), int(counts[1] or 0)
        batch["prompt_tokens"], batch["completion_tokens"] = int(counts[2] or 0), int(counts[3] or 0)
        return batch

    def list_batches(self, limit: int, after: str | None, scope: str | None = None) -> tuple[list[dict], bool]:
        where, args = _scope(scope)
        with self._lock:
            if after:
                ids = self._db.execute(f"SELECT id FROM batches WHERE {where} AND rowid < COALESCE((SELECT rowid FROM "
                                       "batches WHERE id = ?), -1) ORDER BY rowid DESC LIMIT ?",
                                       (*args, after, limit + 1)).fetchall()  # fmt: skip
            else:
                ids = self._db.execute(f"SELECT id FROM batches WHERE {where} ORDER BY rowid DESC LIMIT ?",
                                       (*args, limit + 1)).fetchall()  # fmt: skip
        return [self.get_batch(r[0]) for r in ids[:limit]], len(ids) > limit

    def active_batches(self) -> list[dict]:
        with self._lock:
            ids = self._db.execute(f"SELECT id FROM batches WHERE status IN {OPEN_SQL} ORDER BY rowid").fetchall()
        return [self.get_batch(r[0]) for r in ids]

    def set_status(self, batch_id: str, status: str, only_from: tuple[str, ...] = OPEN_STATES) -> bool:
        """``status`` and its ``<status>_at`` timestamp, if the batch is in one of ``only_from``."""
        with self._tx() as db:
            sql = (f"UPDATE batches SET status = ?, {status}_at = ? WHERE id = ? AND status IN "
                   f"({','.join('?' * len(only_from))})")
            changed = db.execute(sql, (status, int(time.time()), batch_id, *only_from)).rowcount
        return changed > 0

    def stop_with_error(self, batch_id: str, error: StorageError) -> None:
        """Marks an unfinished batch to end "failed" with ``error`` (its results so far are kept): no more of its
        lines start, and the runner finishes it once those running are done."""
        errors = [{"code": error.code, "message": error.message, "param": None, "line": None}]
        with self._tx() as db:
            db.execute(f"UPDATE batches SET errors = ? WHERE id = ? AND errors IS NULL AND status IN {OPEN_SQL}",
                       (json.dumps(errors), batch_id))  # fmt: skip

    # ------------------------------------------------------------ lines
    def pending_lines(self, limit: int) -> list[PendingLine]:
        """Lines to run next, of batches in progress, within their window and not stopped: the tenants in turn
        (the one with the oldest batch first), each tenant's oldest batch first, so that one tenant's long batch
        does not hold up everyone else's."""
        now = int(time.time())
        live = "b.status = 'in_progress' AND b.errors IS NULL AND COALESCE(b.expires_at > ?, 1)"
        with self._lock:
            tenants = [row[0] for row in self._db.execute(
                f"SELECT b.tenant FROM batches b WHERE {live} GROUP BY b.tenant ORDER BY MIN(b.rowid)", (now,))]
            queues = [self._db.execute(
                "SELECT l.batch_id, l.line, l.custom_id, l.offset, l.length, l.attempts, b.input_file_id, b.endpoint "
                f"FROM batches b JOIN batch_lines l ON l.batch_id = b.id WHERE {live} AND b.tenant = ? "
                "AND l.state = 'pending' ORDER BY b.rowid, l.line LIMIT ?", (now, tenant, limit)).fetchall()
                for tenant in tenants]  # fmt: skip
        turns = (row for turn in itertools.zip_longest(*queues) for row in turn if row is not None)
        return [PendingLine(*row) for row in itertools.islice(turns, limit)]

    def pending_count(self, batch_id: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM batch_lines WHERE batch_id = ? AND state = 'pending'",
                                        (batch_id,)).fetchone()[0])  # fmt: skip

    def record(self, batch_id: str, line: int, state: str, result: dict, prompt_tokens: int = 0,
               completion_tokens: int = 0) -> bool:  # fmt: skip
        """Stores a line's result and its final state together; False if it already had one (never twice).
        A result the budgets (or the disk) can't take is not stored: the batch is stopped with the error
        (``stop_with_error``) and QuotaExceeded or DiskFull raised."""
        data = json.dumps(result, separators=(",", ":"))
        size = len(data.encode()) + 1  # and its newline in the output file
        try:
            with self._tx() as db:
                tenant = db.execute("SELECT tenant FROM batches WHERE id = ?", (batch_id,)).fetchone()
                self._check_budget(db, tenant[0] if tenant else DEFAULT_TENANT, size)
                stored = db.execute(
                    "UPDATE batch_lines SET state = ?, result = ?, prompt_tokens = ?, completion_tokens = ?, "
                    "attempts = attempts + 1 WHERE batch_id = ? AND line = ? AND state = 'pending'",
                    (state, data, prompt_tokens, completion_tokens, batch_id, line)).rowcount > 0  # fmt: skip
                if stored:
                    db.execute("UPDATE batches SET result_bytes = result_bytes + ? WHERE id = ?", (size, batch_id))
            return stored
        except QuotaExceeded as e:
            error: StorageError = e
        except sqlite3.OperationalError as e:
            if not sqlite_full(e):
                raise
            error = DiskFull("the server's disk is full")
        with contextlib.suppress(sqlite3.OperationalError):  # a full disk may refuse this too: it stays in progress
            self.stop_with_error(batch_id, error)
        raise error

    def add_attempt(self, batch_id: str, line: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE batch_lines SET attempts = attempts + 1 WHERE batch_id = ? AND line = ?",
                       (batch_id, line))  # fmt: skip

    def expire_pending(self, batch_id: str, make_result: Callable[[str], dict]) -> None:
        with self._tx() as db:
            rows = db.execute("SELECT line, custom_id FROM batch_lines WHERE batch_id = ? AND state = 'pending'",
                              (batch_id,)).fetchall()  # fmt: skip
            results = [(json.dumps(make_result(r[1]), separators=(",", ":")), batch_id, r[0]) for r in rows]
            db.executemany("UPDATE batch_lines SET state = 'failed', result = ? WHERE batch_id = ? AND line = ?",
                           results)  # fmt: skip
            db.execute("UPDATE batches SET result_bytes = result_bytes + ? WHERE id = ?",
                       (sum(len(r[0].encode()) + 1 for r in results), batch_id))  # fmt: skip

    def finish(self, batch_id: str, status: str) -> dict:
        """Writes the output and error files from the stored results (line order), records them and moves the
        batch to ``status``, all or nothing; the results then live in the files only. Safe to repeat after a
        crash: files of a failed attempt are orphans, removed at the next start. DiskFull if the disk can't take
        the files (nothing is left behind; the batch stays as it was, to be finished later)."""
        batch = self.get_batch(batch_id)
        if batch is None or batch["status"] in FINAL_STATES:
            return batch
        written: dict[str, tuple[Path, int]] = {}
        ids: dict[str, str] = {}
        try:
            for state, kind in (("completed", "output"), ("failed", "error")):
                temp, size = self.temp_path(), 0
                with self._lock:
                    rows = self._db.execute("SELECT result FROM batch_lines WHERE batch_id = ? AND state = ? ORDER "
                                            "BY line", (batch_id, state)).fetchall()  # fmt: skip
                if not rows:
                    continue
                written[kind] = (temp, 0)
                with open(temp, "wb") as f:
                    for (result,) in rows:
                        data = result.encode() + b"\n"
                        f.write(data)
                        size += len(data)
                    f.flush()
                    os.fsync(f.fileno())
                written[kind] = (temp, size)
            for kind, (temp, _) in written.items():
                ids[kind] = new_id("file-")
                os.replace(temp, self.file_path(ids[kind]))
            fsync_dir(self.files_dir)
            now = int(time.time())
            lifetime = batch["output_expires_after"] or self.policy.file_expiry
            with self._tx() as db:
                for kind, (_, size) in written.items():
                    db.execute("INSERT INTO files (id, filename, purpose, bytes, created_at, expires_at, tenant) "
                               "VALUES (?, ?, 'batch_output', ?, ?, ?, ?)",
                               (ids[kind], f"{batch_id}_{kind}.jsonl", size, now, now + lifetime if lifetime else None,
                                batch["tenant"]))  # fmt: skip
                db.execute(f"UPDATE batches SET status = ?, {status}_at = ?, output_file_id = ?, error_file_id = ?, "
                           "result_bytes = 0 WHERE id = ?",
                           (status, now, ids.get("output"), ids.get("error"), batch_id))  # fmt: skip
                db.execute("UPDATE batch_lines SET result = NULL WHERE batch_id = ?", (batch_id,))
        except (OSError, sqlite3.OperationalError) as e:
            for path in [temp for temp, _ in written.values()] + [self.file_path(i) for i in ids.values()]:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
                    isinstance(e, sqlite3.OperationalError) and sqlite_full(e)):  # fmt: skip
                raise DiskFull("the server's disk is full") from e
            raise
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
