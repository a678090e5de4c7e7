"""The batch runner's rules that a real tritonserver cannot be made to show on demand (Triton away, internal
errors, the 24 h window running out), in-process with a scripted backend and a real SQLite store. The whole
stack is tested in tests/frontend/test_batches.py."""

from __future__ import annotations

import asyncio
import collections
import json
import time

from fastapi.testclient import TestClient

from openai_frontend.app import create_app
from openai_frontend.backend import BackendError, GenerateChunk
from openai_frontend.settings import Settings
from tests.unit.fakes import ServerOnly, sample, until


class ScriptedBackend(ServerOnly):
    """Fails the first ``failures`` requests with ``kind`` (all of them with ``failures=None``), answers the rest."""

    def __init__(self, kind: str | None = None, failures: int | None = 0, delay: float = 0.0):
        self.kind, self.failures, self.delay = kind, failures, delay
        self.calls = 0

    async def generate(self, model, request):
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.kind and (self.failures is None or self.calls <= self.failures):
            raise BackendError(self.kind, f"scripted {self.kind}")
        yield GenerateChunk(0, "ok", "stop", prompt_tokens=3, completion_tokens=1)


def jsonl(n: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "minicpm_v_2_6", "messages": [{"role": "user", "content": f"line {i}"}]}}) + "\n" for i in range(n)).encode()


def run_batch(client: TestClient, n: int) -> str:
    file_id = client.post("/v1/files", files={"file": ("in.jsonl", jsonl(n))}, data={"purpose": "batch"}).json()["id"]
    return client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                            "completion_window": "24h"}).json()["id"]  # fmt: skip


def wait(client: TestClient, batch_id: str, statuses=("completed", "failed", "expired", "cancelled")) -> dict:
    deadline = time.monotonic() + 60
    while (batch := client.get(f"/v1/batches/{batch_id}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)
    return batch


def lines(client: TestClient, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in client.get(f"/v1/files/{file_id}/content").text.splitlines()] if file_id else []


def app(backend, tmp_path, **settings) -> TestClient:
    return TestClient(create_app(Settings(batch_data_dir=str(tmp_path), **settings), backend_factory=lambda s: backend))


def test_an_unavailable_server_delays_lines_without_failing_them(tmp_path):
    backend = ScriptedBackend(BackendError.UNAVAILABLE, failures=3)
    with app(backend, tmp_path, batch_concurrency=1) as client:
        batch = wait(client, run_batch(client, 4))
    assert batch["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    assert backend.calls == 4 + 3


def test_internal_errors_are_retried_then_recorded(tmp_path):
    backend = ScriptedBackend(BackendError.INTERNAL, failures=None)
    with app(backend, tmp_path, batch_max_attempts=2) as client:
        batch = wait(client, run_batch(client, 3))
        errors = lines(client, batch["error_file_id"])
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert backend.calls == 3 * 2
    assert {e["response"]["status_code"] for e in errors} == {500}
    assert batch["output_file_id"] is None


def test_the_completion_window_running_out_expires_the_batch(tmp_path):
    backend = ScriptedBackend(delay=0.3)
    with app(backend, tmp_path, batch_concurrency=1) as client:
        batch_id = run_batch(client, 20)
        while client.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] < 1:
            time.sleep(0.05)
        store = client.app.state.batch_store.sync
        with store._tx() as db:  # the 24 h are over
            db.execute("UPDATE batches SET expires_at = ? WHERE id = ?", (int(time.time()) - 1, batch_id))
        batch = wait(client, batch_id)
        output, errors = lines(client, batch["output_file_id"]), lines(client, batch["error_file_id"])
    assert batch["status"] == "expired" and batch["expired_at"]
    counts = batch["request_counts"]
    assert counts["completed"] >= 1 and counts["completed"] + counts["failed"] == 20
    assert len(output) == counts["completed"] and len(errors) == counts["failed"]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"} and all(e["response"] is None for e in errors)
    assert {r["custom_id"] for r in output + errors} == {f"c{i}" for i in range(20)}


def test_a_second_frontend_on_the_same_directory_serves_the_api_but_does_not_run_lines(tmp_path):
    first, second = ScriptedBackend(), ScriptedBackend()
    with app(first, tmp_path) as a, app(second, tmp_path) as b:
        batch = wait(a, run_batch(b, 5))  # created through the second, run by the first (which holds the lock)
        assert b.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"] == 5
    assert (first.calls, second.calls) == (5, 0)


# ---------------------------------------------------------------- exactly once


class CountingBackend(ServerOnly):
    """Answers after ``delay`` s, counting the requests per prompt (each line of jsonl() asks its own)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls: collections.Counter[str] = collections.Counter()

    async def generate(self, model, request):
        self.calls[request.messages[-1]["content"]] += 1
        await asyncio.sleep(self.delay)
        yield GenerateChunk(0, "ok", "stop", prompt_tokens=3, completion_tokens=1)


def hold_refill_reads(state) -> list[set]:
    """Makes the refill race happen every time it can: a refill's read of the pending lines returns only once the
    lines it saw still running (pending in the store, but at the model or having their result stored) have
    finished, so their results are stored while the refill holds them as pending. Returns, per refill that
    raced, the lines that finished during its read."""
    store, runner = state.batch_store, state.batch_runner
    read = store.pending_lines
    raced: list[set] = []

    def running(keys: set) -> set:
        return keys & (runner.inflight.keys() | runner.storing.keys())

    async def pending_lines(limit):
        lines = await read(limit)
        seen = running({(x.batch_id, x.line) for x in lines})
        if seen:
            raced.append(seen)
            await until(lambda: not running(seen), "the running lines to finish")
        return lines

    store.pending_lines = pending_lines  # the instance's attribute wins over AsyncStore.__getattr__
    return raced


def test_a_line_that_finished_during_a_refill_never_runs_again(tmp_path):
    backend = CountingBackend(delay=0.01)
    n = 40
    with app(backend, tmp_path, batch_concurrency=2, batch_concurrency_busy=2) as client:
        state = client.app.state
        raced = hold_refill_reads(state)
        batch = wait(client, run_batch(client, n))
        output = lines(client, batch["output_file_id"])
        in_flight = state.chat.in_flight, len(state.batch_runner.inflight), len(state.batch_runner.storing)
    assert raced, "no refill read a line that was still running: the race was not exercised"
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
    repeated = {prompt: count for prompt, count in backend.calls.items() if count != 1}
    assert not repeated, f"lines run more than once: {repeated}"
    assert len(backend.calls) == n
    assert sorted(r["custom_id"] for r in output) == sorted(f"c{i}" for i in range(n))
    # Counted once per line: the batch's own counter and the chat path's request counter.
    assert sample(client.app, "minicpmv_frontend_batch_lines_total", result="completed") == n
    assert sample(client.app, "minicpmv_frontend_requests_total", model="minicpm_v_2_6", status="200") == n
    assert sample(client.app, "minicpmv_frontend_batch_lines_in_flight") == 0
    assert sample(client.app, "minicpmv_frontend_batches_total", status="completed") == 1
    assert in_flight == (0, 0, 0)


def test_retried_lines_count_once(tmp_path):
    backend = ScriptedBackend(BackendError.INTERNAL, failures=3)  # the first three tries fail, the retries pass
    with app(backend, tmp_path, batch_concurrency=1, batch_max_attempts=2) as client:
        batch = wait(client, run_batch(client, 5))
    assert batch["request_counts"] == {"total": 5, "completed": 5, "failed": 0} and backend.calls == 5 + 3
    assert sample(client.app, "minicpmv_frontend_batch_lines_total", result="completed") == 5
    assert sample(client.app, "minicpmv_frontend_batch_lines_total", result="failed") == 0
    assert sample(client.app, "minicpmv_frontend_batch_lines_in_flight") == 0


# ---------------------------------------------------------------- input files


def upload(client: TestClient, content: bytes, purpose: str = "batch"):
    return client.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": purpose})


def create(client: TestClient, file_id: str):
    return client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                            "completion_window": "24h"})  # fmt: skip


def test_only_files_uploaded_for_batches_are_batch_inputs(tmp_path):
    with app(ScriptedBackend(), tmp_path) as client:
        done = wait(client, run_batch(client, 2))
        output_id = done["output_file_id"]
        assert client.get(f"/v1/files/{output_id}").json()["purpose"] == "batch_output"
        refused = create(client, output_id)  # a batch's own output file
        # A batch_output file whose lines would be a valid batch: only its purpose stands in the way.
        store = client.app.state.batch_store.sync
        temp = store.temp_path()
        temp.write_bytes(jsonl(2))
        disguised = store.add_file(temp, "out.jsonl", "batch_output", len(jsonl(2)))["id"]
        refused_too = create(client, disguised)
        uploaded = upload(client, jsonl(2), purpose="batch_output")
        batches = client.get("/v1/batches").json()["data"]
    for r in (refused, refused_too):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "input_file_id" and "batch_output" in error["message"], error
    assert uploaded.status_code == 400 and uploaded.json()["error"]["code"] == "unsupported_purpose"
    assert [b["id"] for b in batches] == [done["id"]]  # no batch was made of them
