"""The batch runner's rules that a real tritonserver cannot be made to show on demand (Triton away, internal
errors, the 24 h window running out), in-process with a scripted backend and a real SQLite store. The whole
stack is tested in tests/frontend/test_batches.py."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi.testclient import TestClient

from openai_frontend.app import create_app
from openai_frontend.backend import BackendError, GenerateChunk
from openai_frontend.settings import Settings


class ScriptedBackend:
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

    async def server_ready(self):
        return True

    async def ready_models(self):
        return ["minicpm_v_2_6"]

    async def close(self):
        pass


def jsonl(n: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "minicpm_v_2_6", "messages": [{"role": "user", "content": "hi"}]}}) + "\n" for i in range(n)).encode()


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
