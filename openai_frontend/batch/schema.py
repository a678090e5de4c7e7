"""The Batch API's SQLite schema: its migrations (``PRAGMA user_version`` counts those applied; store.py applies
the rest at start) and the batch states."""

from __future__ import annotations

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
    # 3: tenants (rows from before belong to the default tenant), retention of batch outputs, stored result bytes
    # of unfinished batches (results of finished batches are in their output files, and cleared).
    """
    ALTER TABLE files ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE batches ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE batches ADD COLUMN output_expires_after INTEGER;
    ALTER TABLE batches ADD COLUMN result_bytes INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX files_tenant ON files (tenant, bytes);
    CREATE INDEX files_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;
    CREATE INDEX batches_tenant ON batches (tenant);
    UPDATE batch_lines SET result = NULL WHERE result IS NOT NULL AND batch_id IN
        (SELECT id FROM batches WHERE status IN ('completed', 'failed', 'expired', 'cancelled'));
    UPDATE batches SET result_bytes = (SELECT COALESCE(SUM(LENGTH(CAST(result AS BLOB)) + 1), 0) FROM batch_lines
        WHERE batch_id = batches.id AND result IS NOT NULL);
    """,
]
OPEN_SQL = f"({','.join(repr(s) for s in OPEN_STATES)})"  # constants, for SQL
