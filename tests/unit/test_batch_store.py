"""The Batch API's store (real SQLite in a temporary directory) and the batch-file checks."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from openai_frontend.batch import validation
from openai_frontend.batch.runner import INTERACTIVE_GRACE, BatchRunner, error_result
from openai_frontend.batch.store import MIGRATIONS, Store
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
