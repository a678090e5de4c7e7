"""Files and batches in a shared deployment (issue 26), with the official ``openai`` SDK against the frontend in front
of the real tritonserver: tenants see only their own (404 for the others', an admin key sees all, keys of one
tenant share), files expire (but not under a running batch), and storage budgets refuse uploads before anything
is written and stop a batch cleanly. Each test starts its own frontend on its own data directory."""

from __future__ import annotations

import sqlite3
import time

import openai
import pytest

from tests.frontend.helpers import metric
from tests.frontend.test_batches import CHAT, finished, jsonl, line, long_lines, results, upload, wait_for

pytestmark = pytest.mark.slow
DAY = 86400


def file_ids(client: openai.OpenAI) -> set[str]:
    return {f.id for f in client.files.list()}


def bodies(data_dir) -> list[str]:
    """What is on disk under the data directory's files/ (bodies and temporaries)."""
    return sorted(p.name for p in (data_dir / "files").iterdir())


def not_found(call) -> dict:
    with pytest.raises(openai.NotFoundError) as e:
        call()
    return e.value.body


def test_tenants_see_only_their_own_files_and_batches(make_frontend, tmp_path):
    keys = {"a1": "sk-team-a-first", "a2": "sk-team-a-second", "b": "sk-own-tenant-b", "root": "sk-admin-root"}
    fe = make_frontend(batch_data_dir=tmp_path, api_keys=f"{keys['a1']}:team-a,{keys['a2']}:team-a,{keys['b']}",
                       admin_api_keys=keys["root"])  # fmt: skip
    a1, a2, b, root = (fe.client(api_key=keys[k]) for k in ("a1", "a2", "b", "root"))
    with pytest.raises(openai.AuthenticationError):
        fe.client(api_key="sk-nobody").files.list()

    fa = upload(a1, [line("a-1"), line("a-2")])
    fb = upload(b, [line("b-1")])
    batch_a = a1.batches.create(input_file_id=fa.id, endpoint=CHAT, completion_window="24h")
    done = wait_for(a2, batch_a.id, finished)  # the other key of team a sees it
    assert done.status == "completed" and done.request_counts.completed == 2
    out = done.output_file_id
    batch_b = b.batches.create(input_file_id=fb.id, endpoint=CHAT, completion_window="24h")

    # Tenant b: team a's files, outputs and batches do not exist, in every call, with the body an unknown id gets.
    unknown_file, unknown_batch = "file-" + "0" * 24, "batch_" + "0" * 24
    expected_file = not_found(lambda: b.files.retrieve(unknown_file))
    expected_batch = not_found(lambda: b.batches.retrieve(unknown_batch))
    for file_id in (fa.id, out):
        for call in (b.files.retrieve, b.files.content, b.files.delete):
            assert not_found(lambda call=call, file_id=file_id: call(file_id)) == {
                **expected_file, "message": expected_file["message"].replace(unknown_file, file_id)}
    for call in (b.batches.retrieve, b.batches.cancel):  # cancel: a 409 (finished) would say it exists
        assert not_found(lambda call=call: call(batch_a.id)) == {
            **expected_batch, "message": expected_batch["message"].replace(unknown_batch, batch_a.id)}
    body = not_found(lambda: b.batches.create(input_file_id=fa.id, endpoint=CHAT, completion_window="24h"))
    assert body["param"] == "input_file_id" and body["code"] == "file_not_found"
    assert file_ids(b) == {fb.id} and [x.id for x in b.batches.list()] == [batch_b.id]

    # Team a: both keys see the same files and batches, outputs included; not b's.
    assert file_ids(a1) == file_ids(a2) == {fa.id, out}
    assert [x.id for x in a2.batches.list()] == [batch_a.id]
    assert {r["custom_id"] for r in results(a2, out)} == {"a-1", "a-2"}
    not_found(lambda: a1.batches.retrieve(batch_b.id))
    not_found(lambda: a2.files.content(fb.id))

    # The admin key sees every tenant's.
    assert file_ids(root) >= {fa.id, fb.id, out}
    assert {x.id for x in root.batches.list()} >= {batch_a.id, batch_b.id}
    assert root.files.content(fb.id).content == jsonl([line("b-1")])
    assert wait_for(root, batch_b.id, finished).status == "completed"

    # A member of team a deletes the other member's file (they share); b's is untouched.
    assert a2.files.delete(fa.id).deleted
    not_found(lambda: a1.files.retrieve(fa.id))
    assert b.files.retrieve(fb.id).id == fb.id

    # Tenants are stored by name or by a hash of the key, never the key itself.
    db = sqlite3.connect(tmp_path / "batches.sqlite3")
    tenants = {t for (t,) in db.execute("SELECT tenant FROM files UNION SELECT tenant FROM batches")}
    db.close()
    assert "team-a" in tenants and len(tenants) == 2
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("batches.sqlite3*"))
    assert not any(key.encode() in stored for key in keys.values())


def test_an_expired_input_is_kept_until_its_batch_ends_then_swept(make_frontend, tmp_path):
    fe = make_frontend(batch_data_dir=tmp_path, batch_concurrency=1, batch_sweep_interval=0.2)
    client = fe.client()
    source = client.files.create(file=("in.jsonl", jsonl(long_lines(40, "exp"))), purpose="batch",
                                 expires_after={"anchor": "created_at", "seconds": 3600})  # fmt: skip
    assert source.expires_at == source.created_at + 3600
    kept = upload(client, [line("kept")])
    assert kept.expires_at == kept.created_at + 30 * DAY  # the server's default, as OpenAI's for batch files
    for bad in ({"anchor": "created_at", "seconds": 60}, {"anchor": "created_at", "seconds": 31 * DAY},
                {"anchor": "last_active_at", "seconds": 3600}):  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            client.files.create(file=("x.jsonl", jsonl([line("x")])), purpose="batch", expires_after=bad)
        with pytest.raises(openai.BadRequestError):
            client.batches.create(input_file_id=kept.id, endpoint=CHAT, completion_window="24h",
                                  output_expires_after=bad)  # fmt: skip

    batch = client.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h",
                                  output_expires_after={"anchor": "created_at", "seconds": 7200})  # fmt: skip
    wait_for(client, batch.id, lambda b: b.request_counts.completed >= 1)
    db = sqlite3.connect(tmp_path / "batches.sqlite3", timeout=30)
    with db:  # an hour passes for the input file
        db.execute("UPDATE files SET expires_at = ? WHERE id = ?", (int(time.time()) - 1, source.id))
    time.sleep(1.5)  # sweeps run meanwhile
    assert client.batches.retrieve(batch.id).status == "in_progress"  # 40 lines of 24 tokens, one at a time
    assert client.files.retrieve(source.id).id == source.id and f"{source.id}.jsonl" in bodies(tmp_path)
    wait_for(client, batch.id, lambda b: b.request_counts.completed >= 3)

    client.batches.cancel(batch.id)
    done = wait_for(client, batch.id, finished)
    assert done.status == "cancelled" and done.request_counts.failed == 0  # every line that ran read its input
    output = client.files.retrieve(done.output_file_id)
    assert output.expires_at == output.created_at + 7200

    deadline = time.monotonic() + 30
    while source.id in file_ids(client):
        assert time.monotonic() < deadline, "the expired input was not deleted after its batch ended"
        time.sleep(0.2)
    not_found(lambda: client.files.content(source.id))
    assert bodies(tmp_path) == sorted(f"{f}.jsonl" for f in (kept.id, output.id))  # row and body gone, others kept
    assert metric(fe.base_url + "/metrics", "minicpmv_frontend_batch_files_expired_total") == 1
    # A file past its expiry, not yet swept, starts no batch.
    with db:
        db.execute("UPDATE files SET expires_at = ? WHERE id = ?", (int(time.time()) - 1, kept.id))
    db.close()
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id=kept.id, endpoint=CHAT, completion_window="24h")


def test_uploads_past_a_budget_are_refused_before_anything_is_written(make_frontend, tmp_path):
    data = jsonl([line(f"q{i}") for i in range(9)])
    size = len(data)
    fe = make_frontend(batch_data_dir=tmp_path, api_keys="sk-a,sk-b,sk-c", batch_max_file_bytes=size + 100,
                       batch_max_tenant_disk_bytes=size + size // 2, batch_max_disk_bytes=2 * size + size // 2)
    a, b, c = (fe.client(api_key=k) for k in ("sk-a", "sk-b", "sk-c"))
    first = a.files.create(file=("a.jsonl", data), purpose="batch")
    on_disk = bodies(tmp_path)

    def refused(client: openai.OpenAI, payload: bytes, whose: str) -> None:
        with pytest.raises(openai.RateLimitError) as e:
            client.files.create(file=("x.jsonl", payload), purpose="batch")
        assert e.value.code == "storage_quota_exceeded" and whose in e.value.message, e.value.body
        assert e.value.response.headers["x-should-retry"] == "false"  # the SDKs don't send it again at once
        assert bodies(tmp_path) == on_disk  # nothing written, not even a temporary

    refused(a, data, "your")  # a's own budget
    second = b.files.create(file=("b.jsonl", data), purpose="batch")  # b has its own
    on_disk = bodies(tmp_path)
    refused(c, data, "the server's")  # the total
    with pytest.raises(openai.APIStatusError) as e:
        a.files.create(file=("big.jsonl", data + data), purpose="batch")
    assert e.value.status_code == 413 and e.value.code == "file_too_large"
    assert bodies(tmp_path) == on_disk
    assert file_ids(a) == {first.id} and file_ids(b) == {second.id} and file_ids(c) == set()
    assert metric(fe.base_url + "/metrics", "minicpmv_frontend_batch_storage_refusals_total",
                  reason="storage_quota_exceeded") == 0  # counts stopped batches only; uploads are answered
    a.files.delete(first.id)  # space comes back
    assert c.files.create(file=("c.jsonl", data), purpose="batch").bytes == size


def test_a_batch_out_of_storage_fails_with_its_first_results_kept(make_frontend, tmp_path):
    lines = [line(f"q-{i:02d}") for i in range(12)]
    data = jsonl(lines)
    fe = make_frontend(batch_data_dir=tmp_path, batch_concurrency=1, batch_max_disk_bytes=len(data) + 2500)
    client = fe.client()
    source = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h")
    done = wait_for(client, batch.id, lambda b: b.status in ("completed", "failed"))
    assert done.status == "failed" and done.failed_at, done
    (error,) = done.errors.data
    assert error.code == "storage_quota_exceeded" and "storage is full" in error.message
    counts = done.request_counts
    assert 1 <= counts.completed < 12 and counts.failed == 0 and done.error_file_id is None
    output = results(client, done.output_file_id)
    # The first lines (one at a time: in order), each once, every one counted.
    assert [r["custom_id"] for r in output] == [f"q-{i:02d}" for i in range(counts.completed)]
    assert all(r["response"]["status_code"] == 200 for r in output)
    # Counted once: the results moved into the output file, and the budget holds.
    stored = client.files.list()
    assert sum(f.bytes for f in stored) <= len(data) + 2500
    db = sqlite3.connect(tmp_path / "batches.sqlite3")
    assert db.execute("SELECT COUNT(result), SUM(result_bytes) FROM batch_lines JOIN batches ON id = batch_id "
                      "WHERE id = ?", (batch.id,)).fetchone() == (0, 0)  # fmt: skip
    db.close()
    assert metric(fe.base_url + "/metrics", "minicpmv_frontend_batch_storage_refusals_total",
                  reason="storage_quota_exceeded") == 1  # fmt: skip
    # The server goes on serving, and a batch that fits runs.
    assert client.chat.completions.create(**line("z")["body"]).choices[0].message.content is not None
    client.files.delete(done.output_file_id)
    again = client.batches.create(input_file_id=upload(client, [line("r")]).id, endpoint=CHAT,
                                  completion_window="24h")  # fmt: skip
    assert wait_for(client, again.id, finished).status == "completed"
