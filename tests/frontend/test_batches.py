"""The Batch API (/v1/files, /v1/batches) with the official ``openai`` SDK against the frontend in front of a real
tritonserver (tiny random checkpoints): the whole life of a batch, cancelling, malformed files, a SIGKILL in the
middle of a batch, and 1,000 lines with 2% bad ones. Each test starts its own frontend on its own data directory."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.frontend.helpers import image_part, metric, page

pytestmark = pytest.mark.slow
CHAT = "/v1/chat/completions"


def line(custom_id: str, content="Say hello.", max_tokens: int = 2, **body) -> dict:
    request = {"model": "minicpm_v_2_6", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
               "temperature": 0, **body}  # fmt: skip
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": request}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in lines).encode()


def upload(client: openai.OpenAI, lines: list[dict], name: str = "requests.jsonl"):
    return client.files.create(file=(name, jsonl(lines)), purpose="batch")


def wait_for(client: openai.OpenAI, batch_id: str, done, timeout: float = 240.0):
    """Polls the batch until ``done(batch)``; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert batch.status not in ("failed", "expired"), batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}: {batch.request_counts}"
        time.sleep(0.1)


def finished(batch) -> bool:
    return batch.status in ("completed", "failed", "expired", "cancelled")


def results(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).content.decode().splitlines()]


def long_lines(n: int, prefix: str = "slow") -> list[dict]:
    """Lines that take a while each (fixed-length output), to catch a batch in the middle."""
    return [line(f"{prefix}-{i}", max_tokens=24, ignore_eos=True) for i in range(n)]


def test_sdk_uploads_creates_polls_and_downloads(make_frontend, tmp_path):
    fe = make_frontend(batch_data_dir=tmp_path)
    client = fe.client()
    good = [line(f"text-{i}", f"Question {i}: what is {i} + {i}?") for i in range(5)]
    good.append(line("image-0", [image_part(page()), {"type": "text", "text": "What is the total?"}]))
    bad = [line("bad-model", model="no-such-model"), line("bad-role", [{"type": "text", "text": "hi"}])]
    bad[1]["body"]["messages"][0]["role"] = "narrator"
    lines = good[:3] + bad[:1] + good[3:] + bad[1:]

    uploaded = upload(client, lines)
    assert uploaded.object == "file" and uploaded.purpose == "batch" and uploaded.filename == "requests.jsonl"
    assert uploaded.bytes == len(jsonl(lines)) and uploaded.id.startswith("file-")
    assert client.files.retrieve(uploaded.id).bytes == uploaded.bytes
    assert uploaded.id in [f.id for f in client.files.list(purpose="batch")]
    assert client.files.content(uploaded.id).content == jsonl(lines)

    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h",
                                  metadata={"job": "invoices"})  # fmt: skip
    assert batch.object == "batch" and batch.id.startswith("batch_") and batch.status == "validating"
    assert batch.request_counts.total == len(lines) and batch.metadata == {"job": "invoices"}
    assert batch.expires_at == batch.created_at + 24 * 3600

    done = wait_for(client, batch.id, finished)
    assert done.status == "completed", done
    assert done.request_counts.model_dump() == {"total": 8, "completed": 6, "failed": 2}
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert batch.id in [b.id for b in client.batches.list()]

    output = results(client, done.output_file_id)
    assert sorted(r["custom_id"] for r in output) == sorted(x["custom_id"] for x in good)
    for r in output:
        assert r["id"].startswith("batch_req_") and r["error"] is None
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200 and r["response"]["request_id"] == body["id"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1
    assert done.usage.input_tokens == sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in output)
    # The same path as an interactive request: same answer (greedy) and same prompt (the image counted).
    same = client.chat.completions.create(**good[5]["body"])
    (image_result,) = [r for r in output if r["custom_id"] == "image-0"]
    assert image_result["response"]["body"]["choices"][0]["message"]["content"] == same.choices[0].message.content
    assert image_result["response"]["body"]["usage"]["prompt_tokens"] == same.usage.prompt_tokens

    errors = {r["custom_id"]: r for r in results(client, done.error_file_id)}
    assert set(errors) == {"bad-model", "bad-role"}
    assert errors["bad-model"]["response"]["status_code"] == 404
    assert errors["bad-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors["bad-role"]["response"]["status_code"] == 400
    assert errors["bad-role"]["response"]["body"]["error"]["param"].startswith("messages[0]")
    assert client.files.retrieve(done.error_file_id).purpose == "batch_output"

    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    assert client.batches.retrieve(batch.id).status == "completed"  # the batch and its outputs stay


def test_responses_endpoint_batch(make_frontend, tmp_path):
    fe = make_frontend(batch_data_dir=tmp_path)
    client = fe.client()
    url = "/v1/responses"
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": url,
              "body": {"model": "minicpm_v_2_6", "input": f"Question {i}?", "max_output_tokens": 3,
                       "temperature": 0}} for i in range(2)]  # fmt: skip
    lines.append({"custom_id": "no-input", "method": "POST", "url": url, "body": {"model": "minicpm_v_2_6"}})
    batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint=url, completion_window="24h")
    done = wait_for(client, batch.id, finished)
    assert done.status == "completed" and done.endpoint == url
    assert done.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
    output = results(client, done.output_file_id)
    assert sorted(r["custom_id"] for r in output) == ["r0", "r1"]
    for r in output:
        body = r["response"]["body"]
        assert body["object"] == "response" and r["response"]["request_id"] == body["id"]
        assert body["output"][0]["type"] == "message" and body["usage"]["output_tokens"] >= 1
        same = client.responses.create(**lines[int(r["custom_id"][1])]["body"])  # the same path, same answer
        assert body["output"][0]["content"][0]["text"] == same.output_text
    assert done.usage.output_tokens == sum(r["response"]["body"]["usage"]["output_tokens"] for r in output)
    (error,) = results(client, done.error_file_id)
    assert error["custom_id"] == "no-input" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "input"


def test_sdk_cancels_a_running_batch(make_frontend, tmp_path):
    fe = make_frontend(batch_data_dir=tmp_path, batch_concurrency=2)
    client = fe.client()
    lines = long_lines(80)  # far more than run before the cancel lands
    batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint=CHAT, completion_window="24h")
    running = wait_for(client, batch.id, lambda b: b.request_counts.completed >= 2)
    assert running.status == "in_progress"
    with pytest.raises(openai.ConflictError):  # the input of an unfinished batch cannot be deleted
        client.files.delete(batch.input_file_id)

    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    cancelled = wait_for(client, batch.id, finished)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at >= cancelled.cancelling_at
    assert 2 <= cancelled.request_counts.completed < len(lines) and cancelled.request_counts.failed == 0
    output = results(client, cancelled.output_file_id)
    assert len(output) == cancelled.request_counts.completed  # what finished before the cancel is kept
    assert len({r["custom_id"] for r in output}) == len(output)
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling again changes nothing

    done = client.batches.create(input_file_id=upload(client, [line("one")]).id, endpoint=CHAT,
                                 completion_window="24h")  # fmt: skip
    assert wait_for(client, done.id, finished).status == "completed"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(done.id)
    assert client.files.delete(batch.input_file_id).deleted


def test_malformed_files_and_requests_get_400(make_frontend, tmp_path):
    fe = make_frontend(batch_data_dir=tmp_path, batch_max_lines=5, batch_max_file_bytes=4000,
                       batch_max_open_batches=1, batch_concurrency=1)  # fmt: skip
    client = fe.client()
    ok = [line("a"), line("b")]
    cases = {
        "not JSON": b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\nnot json\n',
        "not an object": b"[1, 2]\n",
        "duplicate custom_id": jsonl([line("a"), line("a")]),
        "method": jsonl([{**line("a"), "method": "GET"}]),
        "no body": jsonl([{k: v for k, v in line("a").items() if k != "body"}]),
        "two urls": jsonl([line("a"), {**line("b"), "url": "/v1/embeddings"}]),
        "too many lines": jsonl([line(str(i)) for i in range(6)]),
        "empty": b"\n\n",
        "binary": b"\xff\xfe\x00garbage",
    }
    for name, data in cases.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.files.create(file=("x.jsonl", data), purpose="batch")
        assert e.value.body["type"] == "invalid_request_error", name
    with pytest.raises(openai.APIStatusError) as e:  # batch_max_file_bytes
        client.files.create(file=("x.jsonl", jsonl([line("a", "x" * 5000)])), purpose="batch")
    assert e.value.status_code == 413 and e.value.body["code"] == "file_too_large"
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("x.jsonl", jsonl(ok)), purpose="assistants")
    assert e.value.body["param"] == "purpose"
    assert [f.id for f in client.files.list()] == []  # nothing refused was stored

    file_id = upload(client, ok).id
    for kwargs, param in (({"endpoint": "/v1/embeddings"}, "endpoint"), ({"endpoint": "/v1/completions"}, "endpoint"),
                          ({"completion_window": "1h"}, "completion_window"), ({"metadata": {"k": "v" * 600}},
                                                                              "metadata")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.create(**{"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **kwargs})
        assert e.value.body["param"].startswith(param)
    with pytest.raises(openai.BadRequestError) as e:  # the file's lines go to chat completions
        client.batches.create(input_file_id=file_id, endpoint="/v1/responses", completion_window="24h")
    assert e.value.body["code"] == "endpoint_mismatch"
    for bad_id in ("file-" + "0" * 24, "../batches.sqlite3", "file-..%2F..%2Fetc%2Fpasswd"):
        with pytest.raises(openai.NotFoundError):
            client.batches.create(input_file_id=bad_id, endpoint=CHAT, completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            client.files.content(bad_id)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_../../x")

    slow = client.batches.create(input_file_id=upload(client, long_lines(5)).id, endpoint=CHAT,
                                 completion_window="24h")  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:  # batch_max_open_batches=1
        client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert e.value.body["code"] == "too_many_open_batches"
    client.batches.cancel(slow.id)
    assert wait_for(client, slow.id, finished).status == "cancelled"
    # The server kept serving throughout.
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert wait_for(client, batch.id, finished).request_counts.completed == 2
    assert client.chat.completions.create(**line("z")["body"]).choices[0].message.content is not None


def test_sigkill_in_the_middle_then_restart_completes_every_line_once(make_frontend, tmp_path):
    lines = long_lines(32, "kill")
    first = make_frontend(batch_data_dir=tmp_path, batch_concurrency=2)
    client = first.client()
    batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint=CHAT, completion_window="24h")
    before = wait_for(client, batch.id, lambda b: b.request_counts.completed >= 4).request_counts.completed
    first.process.kill()  # SIGKILL: no shutdown code runs
    first.process.wait()

    second = make_frontend(batch_data_dir=tmp_path, batch_concurrency=2)
    client = second.client()
    done = wait_for(client, batch.id, finished)
    assert done.status == "completed" and done.request_counts.model_dump() == {"total": 32, "completed": 32,
                                                                               "failed": 0}  # fmt: skip
    output = results(client, done.output_file_id)
    ids = [r["custom_id"] for r in output]
    assert sorted(ids) == sorted(x["custom_id"] for x in lines)  # every line, exactly once
    assert done.error_file_id is None
    # The restarted frontend ran only lines without a stored result: at most total - (stored before the kill).
    ran = metric(second.base_url + "/metrics", "minicpmv_frontend_requests_total", model="minicpm_v_2_6",
                 status="200")  # fmt: skip
    assert 1 <= ran <= len(lines) - before


def test_thousand_lines_with_two_percent_bad_long(make_frontend, tmp_path):
    """The long one (about a minute on 2 CPU cores): 1,000 one-token lines, 20 of them bad in five ways."""
    fe = make_frontend(batch_data_dir=tmp_path, batch_concurrency=16)
    client = fe.client()
    breakers = [lambda b: b.update(messages=[]), lambda b: b.update(model="gpt-nope"),
                lambda b: b.update(stream=True), lambda b: b.update(temperature=7),
                lambda b: b["messages"][0].update(content=[{"type": "image_url", "image_url": {"url": "data:image/png;"
                                                                                               "base64,AAAA"}}])]  # fmt: skip
    lines, bad = [], set()
    for i in range(1000):
        item = line(f"req-{i:04d}", f"Number {i}?", max_tokens=1)
        if i % 50 == 7:
            breakers[len(bad) % len(breakers)](item["body"])
            bad.add(item["custom_id"])
        lines.append(item)
    batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint=CHAT, completion_window="24h")
    done = wait_for(client, batch.id, finished, timeout=600)
    assert done.request_counts.model_dump() == {"total": 1000, "completed": 980, "failed": 20}
    output = results(client, done.output_file_id)
    errors = results(client, done.error_file_id)
    assert len(output) == 980 and len(errors) == 20
    assert {r["custom_id"] for r in errors} == bad
    assert {r["custom_id"] for r in output} == {x["custom_id"] for x in lines} - bad
    assert all(r["response"]["status_code"] in (400, 404) for r in errors)
    assert [r["custom_id"] for r in output] == sorted(r["custom_id"] for r in output)  # input order kept
