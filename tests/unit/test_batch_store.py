"""The Batch API's store (real SQLite in a temporary directory) and the batch-file checks."""

from __future__ import annotations

import errno
import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from openai_frontend.batch import validation
from openai_frontend.batch.runner import INTERACTIVE_GRACE, BatchRunner, error_result
from openai_frontend.batch.schema import MIGRATIONS
from openai_frontend.batch.storage import DiskFull, FileInUse, QuotaExceeded, StoragePolicy
from openai_frontend.batch.store import Store
from openai_frontend.errors import APIError
from openai_frontend.settings import Settings


def request_line(custom_id: str, url: str = "/v1/chat/completions", **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, **extra}  # fmt: skip


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def new_batch(store: Store, tmp_path: Path, n: int = 4) -> tuple[str, validation.Scan]:
    temp = write(store.temp_path(), [request_line(f"c{i}") for i in range(n)])
    size = temp.stat().st_size
    file = store.add_file(temp, "in.jsonl", "batch", size)
    scan = validation.scan(store.file_path(file["id"]), 100)
    return store.create_batch(file["id"], "/v1/chat/completions", "24h", {"k": "v"}, scan, 3600)["id"], scan


def test_scan_records_offsets_and_skips_blank_lines(tmp_path):
    path = write(tmp_path / "in.jsonl", [request_line("a"), "", request_line("b")])
    scan = validation.scan(path, 10)
    assert scan.url == "/v1/chat/completions" and scan.model == "m"
    assert [(ln.number, ln.custom_id) for ln in scan.lines] == [(1, "a"), (3, "b")]
    raw = path.read_bytes()
    second = scan.lines[1]
    assert json.loads(raw[second.offset:second.offset + second.length])["custom_id"] == "b"


@pytest.mark.parametrize("lines, message", [
    (["{not json"], "line 1: not valid JSON"),
    ([request_line("a"), "[1]"], "line 2: not a JSON object"),
    ([request_line("a"), request_line("a")], "line 2: duplicate custom_id"),
    ([request_line("")], "line 1: 'custom_id'"),
    ([{**request_line("a"), "method": "GET"}], "line 1: 'method'"),
    ([request_line("a"), request_line("b", url="/v1/embeddings")], "line 2: 'url'"),
    ([{**request_line("a"), "body": "text"}], "line 1: 'body'"),
    ([request_line("a", extra_field=1)], "line 1: unknown field"),
    ([request_line(str(i)) for i in range(4)], "more than 3 requests"),
    (["", "  "], "no requests"),
])  # fmt: skip
def test_scan_refuses_malformed_files(tmp_path, lines, message):
    with pytest.raises(APIError) as e:
        validation.scan(write(tmp_path / "in.jsonl", lines), 3)
    assert e.value.status == 400 and message in e.value.message and e.value.param == "file"


@pytest.mark.parametrize("value", ["../batches.sqlite3", "file-../../etc/passwd", "file-" + "A" * 24, "file-1",
                                   "file-" + "0" * 24 + "/x", "file-" + "0" * 23 + "\n"])  # fmt: skip
def test_ids_that_could_leave_the_data_directory_are_refused(value):
    with pytest.raises(APIError) as e:
        validation.check_file_id(value)
    assert e.value.status == 404


def test_filenames_are_display_only():
    assert validation.clean_filename("../../etc/passwd") == "passwd"
    assert validation.clean_filename("C:\\x\\in.jsonl") == "in.jsonl"
    assert validation.clean_filename("") == "upload.jsonl"


def test_endpoints():
    validation.check_endpoint("/v1/chat/completions")
    validation.check_endpoint("/v1/responses")
    for endpoint in ("/v1/embeddings", "/v1/completions", "/etc", ""):
        with pytest.raises(APIError) as e:
            validation.check_endpoint(endpoint)
        assert e.value.status == 400 and e.value.param == "endpoint"


def test_schema_is_created_and_an_old_database_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "batches.sqlite3")
    for statement in filter(str.strip, MIGRATIONS[0].split(";")):
        db.execute(statement)
    db.execute("PRAGMA user_version=1")
    running, done = "batch_" + "1" * 24, "batch_" + "2" * 24
    for batch_id, status in ((running, "in_progress"), (done, "completed")):
        db.execute("INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, total, created_at) "
                   f"VALUES ('{batch_id}', '/v1/chat/completions', 'file-x', '24h', '{status}', 1, 5)")
        db.execute("INSERT INTO batch_lines (batch_id, line, custom_id, offset, length, state, result) VALUES "
                   f"('{batch_id}', 1, 'a', 0, 10, 'completed', '{{\"é\":1}}')")  # fmt: skip
    db.execute("INSERT INTO files (id, filename, purpose, bytes, created_at) VALUES ('file-x', 'a', 'batch', 7, 5)")
    db.commit()
    db.close()
    store = Store(tmp_path)
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3
    batch = store.get_batch(running)  # kept, with the new usage columns, in the default tenant
    assert batch["status"] == "in_progress" and batch["prompt_tokens"] == 0 and batch["total"] == 1
    assert batch["tenant"] == "default" and store.get_file("file-x", "default")["expires_at"] is None
    # Stored results count as bytes (UTF-8, with their newline) while the batch runs; a finished batch's are in its
    # output file already and are cleared.
    assert batch["result_bytes"] == len('{"é":1}'.encode()) + 1 and store.get_batch(done)["result_bytes"] == 0
    assert store._db.execute(f"SELECT result FROM batch_lines WHERE batch_id = '{done}'").fetchone()[0] is None
    assert store.disk_used() == 7 + batch["result_bytes"]
    store.close()
    assert Store(tmp_path).migrate() == 3  # idempotent


def test_a_newer_schema_is_refused(tmp_path):
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "batches.sqlite3")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(tmp_path)


def test_results_are_stored_once_and_survive_reopening(tmp_path):
    store = Store(tmp_path)
    batch_id, _ = new_batch(store, tmp_path)
    store.set_status(batch_id, "in_progress", only_from=("validating",))
    assert [p.custom_id for p in store.pending_lines(10)] == ["c0", "c1", "c2", "c3"]
    assert store.record(batch_id, 2, "completed", {"custom_id": "c1"}, 7, 3)
    assert not store.record(batch_id, 2, "completed", {"custom_id": "c1", "again": True})  # never twice
    assert store.record(batch_id, 3, "failed", {"custom_id": "c2"})
    store.close()

    store = Store(tmp_path)  # a restart: nothing was only in memory
    batch = store.get_batch(batch_id)
    assert (batch["completed"], batch["failed"], batch["prompt_tokens"]) == (1, 1, 7)
    assert [p.custom_id for p in store.pending_lines(10)] == ["c0", "c3"]
    assert store.pending_count(batch_id) == 2


def test_finish_writes_results_in_input_order_and_is_final(tmp_path):
    store = Store(tmp_path)
    batch_id, _ = new_batch(store, tmp_path)
    store.set_status(batch_id, "in_progress", only_from=("validating",))
    for number, custom_id in ((4, "c3"), (1, "c0"), (2, "c1")):
        store.record(batch_id, number, "completed", {"custom_id": custom_id})
    error = error_result("c2", APIError(400, "bad", param="messages"))
    store.record(batch_id, 3, "failed", error)
    batch = store.finish(batch_id, "completed")
    assert batch["status"] == "completed" and batch["completed_at"]
    output = [json.loads(x) for x in store.file_path(batch["output_file_id"]).read_text().splitlines()]
    assert [r["custom_id"] for r in output] == ["c0", "c1", "c3"]
    (err,) = [json.loads(x) for x in store.file_path(batch["error_file_id"]).read_text().splitlines()]
    assert err["response"]["status_code"] == 400 and err["response"]["body"]["error"]["param"] == "messages"
    assert store.get_file(batch["output_file_id"])["purpose"] == "batch_output"
    assert store.finish(batch_id, "completed")["output_file_id"] == batch["output_file_id"]  # no second output
    assert not store.set_status(batch_id, "cancelling", only_from=("validating", "in_progress"))
    assert store.disk_used() == sum(f["bytes"] for f in store.list_files(None, 100, "desc", None)[0])


def test_orphan_bodies_are_removed_at_start(tmp_path):
    store = Store(tmp_path)
    batch_id, _ = new_batch(store, tmp_path)
    kept = store.list_files(None, 10, "asc", None)[0][0]["id"]
    (store.files_dir / ("file-" + "f" * 24 + ".jsonl")).write_text("written, never committed\n")
    (store.files_dir / "abc.tmp").write_text("half an upload")
    store.close()
    store = Store(tmp_path)
    assert sorted(p.name for p in store.files_dir.iterdir()) == [f"{kept}.jsonl"]


def test_listing_pages_with_after(tmp_path):
    store = Store(tmp_path)
    ids = [new_batch(store, tmp_path, 1)[0] for _ in range(5)]
    first, more = store.list_batches(2, None)
    assert [b["id"] for b in first] == ids[::-1][:2] and more
    rest, more = store.list_batches(10, first[-1]["id"])
    assert [b["id"] for b in rest] == ids[::-1][2:] and not more


def test_runner_yields_to_interactive_requests(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("openai_frontend.batch.runner.time.monotonic", lambda: clock[0])
    state = SimpleNamespace(settings=Settings(batch_concurrency=8, batch_concurrency_busy=2),
                            chat=SimpleNamespace(in_flight=0), metrics=None)  # fmt: skip
    runner = BatchRunner(state, store=None)
    assert runner._limit() == 8
    runner.inflight = {("b", i): None for i in range(3)}
    state.chat.in_flight = 3  # only the runner's own lines
    assert runner._limit() == 8
    state.chat.in_flight = 4  # one interactive request
    assert runner._limit() == 2
    state.chat.in_flight = 3  # it finished: the runner stays small for the grace period, then grows again
    clock[0] += INTERACTIVE_GRACE / 2
    assert runner._limit() == 2
    clock[0] += INTERACTIVE_GRACE
    assert runner._limit() == 8


# ---------------------------------------------------------------- tenants, retention, storage (issue 26)
def test_rows_are_seen_only_in_their_tenants_scope(tmp_path):
    store = Store(tmp_path)
    temp = write(store.temp_path(), [request_line("c0")])
    mine = store.add_file(temp, "in.jsonl", "batch", temp.stat().st_size, tenant="team-a")
    scan = validation.scan(store.file_path(mine["id"]), 10)
    assert store.create_batch(mine["id"], "/v1/chat/completions", "24h", None, scan, 3600, "team-b", "team-b") is None
    batch = store.create_batch(mine["id"], "/v1/chat/completions", "24h", None, scan, 3600, "team-a", "team-a")
    for scope, visible in (("team-a", True), ("team-b", False), (None, True)):  # None: an admin key
        assert (store.get_file(mine["id"], scope) is not None) == visible
        assert (store.get_batch(batch["id"], scope) is not None) == visible
        assert len(store.list_files(None, 10, "desc", None, scope)[0]) == visible
        assert len(store.list_batches(10, None, scope)[0]) == visible
    assert not store.delete_file(mine["id"], "team-b")
    with pytest.raises(FileInUse):  # the batch has not finished
        store.delete_file(mine["id"], "team-a")
    assert store.disk_used("team-a") == mine["bytes"] and store.disk_used("team-b") == 0


def test_the_sweeper_deletes_expired_files_but_not_a_running_batchs_input(tmp_path):
    store = Store(tmp_path)
    batch_id, _ = new_batch(store, tmp_path)
    source = store.get_batch(batch_id)["input_file_id"]
    temp = write(store.temp_path(), [request_line("x")])
    other = store.add_file(temp, "other.jsonl", "batch", temp.stat().st_size, expires_after=3600)
    assert other["expires_at"] == other["created_at"] + 3600
    store._db.execute("UPDATE files SET expires_at = 1")  # both long expired
    assert store.sweep() == [other["id"]]  # the batch's input stays while the batch runs
    assert not store.file_path(other["id"]).exists() and store.file_path(source).exists()
    store.set_status(batch_id, "cancelling")
    store.finish(batch_id, "cancelled")
    assert store.sweep() == [source] and sorted(store.files_dir.iterdir()) == []


SWEEP_THEN_DIE = """
import os, pathlib, signal, sys
from openai_frontend.batch.store import Store
store = Store(sys.argv[1])
unlink = pathlib.Path.unlink
def die(path, *args, **kwargs):  # the rows are deleted and committed; the process dies before any body goes
    os.kill(os.getpid(), signal.SIGKILL)
pathlib.Path.unlink = die
store.sweep()
"""


def test_a_kill_between_deleting_rows_and_bodies_leaves_no_orphan_after_restart(tmp_path):
    store = Store(tmp_path)
    expired, kept = [], None
    for i in range(3):
        temp = write(store.temp_path(), [request_line(f"c{i}")])
        row = store.add_file(temp, f"{i}.jsonl", "batch", temp.stat().st_size, expires_after=3600)
        if i < 2:
            expired.append(row["id"])
            store._db.execute("UPDATE files SET expires_at = 1 WHERE id = ?", (row["id"],))
        else:
            kept = row["id"]
    store.close()
    killed = subprocess.run([sys.executable, "-c", SWEEP_THEN_DIE, str(tmp_path)], cwd=Path(__file__).parents[2],
                            capture_output=True, timeout=60)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert len(list((tmp_path / "files").iterdir())) == 3  # rows gone, bodies still there: the crash window

    store = Store(tmp_path)  # the restart
    assert [f["id"] for f in store.list_files(None, 10, "asc", None)[0]] == [kept]
    assert [p.name for p in store.files_dir.iterdir()] == [f"{kept}.jsonl"]  # rows and bodies agree


def test_a_result_past_the_budget_stops_its_batch_and_the_stored_ones_are_kept(tmp_path):
    store = Store(tmp_path)
    batch_id, _ = new_batch(store, tmp_path)
    used = store.disk_used()
    result = {"custom_id": "c0", "response": {"body": "x" * 100}}
    size = len(json.dumps(result, separators=(",", ":"))) + 1
    store.close()
    store = Store(tmp_path, policy=StoragePolicy(max_bytes=used + size + size // 2))
    store.set_status(batch_id, "in_progress", only_from=("validating",))
    assert store.record(batch_id, 1, "completed", result)
    assert store.disk_used() == used + size
    with pytest.raises(QuotaExceeded):
        store.record(batch_id, 2, "completed", {**result, "custom_id": "c1"})
    batch = store.get_batch(batch_id)
    assert batch["completed"] == 1 and json.loads(batch["errors"])[0]["code"] == "storage_quota_exceeded"
    assert store.pending_lines(10) == []  # no more of its lines start
    done = store.finish(batch_id, "failed")
    assert done["status"] == "failed" and done["completed"] == 1 and done["error_file_id"] is None
    assert [json.loads(x)["custom_id"] for x in store.file_path(done["output_file_id"]).read_text().splitlines()] \
        == ["c0"]
    assert store.disk_used() == used + size  # now the output file's bytes, counted once


def test_a_full_disk_while_finishing_leaves_nothing_half_written(tmp_path, monkeypatch):
    store = Store(tmp_path)
    batch_id, _ = new_batch(store, tmp_path)
    store.set_status(batch_id, "in_progress", only_from=("validating",))
    store.record(batch_id, 1, "completed", {"custom_id": "c0"})
    store.record(batch_id, 2, "failed", {"custom_id": "c1"})
    before = sorted(store.files_dir.iterdir())
    real_open = open

    def full(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            f.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return f

    monkeypatch.setattr("openai_frontend.batch.store.open", full, raising=False)
    with pytest.raises(DiskFull):
        store.finish(batch_id, "completed")
    assert sorted(store.files_dir.iterdir()) == before  # no temporary, no output
    assert store.get_batch(batch_id)["status"] == "in_progress"
    monkeypatch.undo()
    done = store.finish(batch_id, "completed")  # space came back: the stored results are all there
    assert (done["completed"], done["failed"]) == (1, 1) and done["output_file_id"] and done["error_file_id"]


def test_a_full_database_stops_the_batch_as_a_full_disk(tmp_path):
    store = Store(tmp_path)
    batch_id, _ = new_batch(store, tmp_path)
    store.set_status(batch_id, "in_progress", only_from=("validating",))
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 1}")  # SQLite's own SQLITE_FULL, as on a full disk
    with pytest.raises(DiskFull):
        store.record(batch_id, 1, "completed", {"custom_id": "c0", "big": "x" * 200_000})
    assert store.pending_count(batch_id) == 4  # not stored, not counted


def test_a_start_beside_a_running_frontend_leaves_its_uploads_alone(tmp_path):
    running = Store(tmp_path)  # another frontend on the directory, in the middle of an upload
    temp = running.temp_path()
    temp.write_text("half an upload")
    beside = Store(tmp_path)
    assert temp.exists()  # not an orphan: its writer is alive
    beside.close()
    running.close()
    Store(tmp_path).close()  # alone: cleans up
    assert not temp.exists()


def test_tenants_take_turns_at_the_runner(tmp_path):
    store = Store(tmp_path)
    batches = {}
    for tenant, n in (("big", 6), ("small", 2), ("big", 2)):  # the big tenant's long batch came first
        temp = write(store.temp_path(), [request_line(f"{tenant}{len(batches)}-{i}") for i in range(n)])
        row = store.add_file(temp, "in.jsonl", "batch", temp.stat().st_size, tenant=tenant)
        scan = validation.scan(store.file_path(row["id"]), 100)
        batch = store.create_batch(row["id"], "/v1/chat/completions", "24h", None, scan, 3600, tenant, tenant)
        store.set_status(batch["id"], "in_progress", only_from=("validating",))
        batches[batch["id"]] = tenant
    order = [p.custom_id for p in store.pending_lines(6)]
    assert order == ["big0-0", "small1-0", "big0-1", "small1-1", "big0-2", "big0-3"]
