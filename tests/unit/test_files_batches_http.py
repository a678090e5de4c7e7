"""The Files and Batch API's HTTP surface as schema-driven clients (schemathesis) read it (issue 26): 405s name
every method of the path, the OpenAPI document lists the values taken, an empty form field is called empty."""

from __future__ import annotations

import errno
import json

import pytest
from fastapi.testclient import TestClient

from openai_frontend.app import create_app
from openai_frontend.settings import Settings
from tests.unit.fakes import FakeBackend


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = create_app(Settings(batch_data_dir=str(tmp_path_factory.mktemp("batches"))),
                     backend_factory=lambda settings: FakeBackend())  # fmt: skip
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize("method, path, allowed", [
    ("DELETE", "/v1/files", "GET, HEAD, POST"),
    ("PUT", "/v1/files/file-123", "DELETE, GET, HEAD"),
    ("PUT", "/v1/batches", "GET, HEAD, POST"),
    ("GET", "/v1/chat/completions", "POST"),
])  # fmt: skip
def test_a_405_allows_every_method_of_its_path(client, method, path, allowed):
    response = client.request(method, path)
    assert response.status_code == 405 and response.headers["allow"] == allowed
    assert response.headers.get_list("allow") == [allowed]  # one header, not Starlette's beside ours
    assert response.json()["error"]["message"] == f"method {method} is not allowed on {path}"


def test_the_openapi_document_lists_the_values_taken(client):
    spec = client.get("/openapi.json").json()
    create = spec["components"]["schemas"]["BatchCreate"]["properties"]
    assert create["endpoint"]["enum"] == ["/v1/chat/completions", "/v1/responses"]
    assert create["completion_window"]["enum"] == ["24h"]
    upload = spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    form = spec["components"]["schemas"][upload.rsplit("/", 1)[1]]
    assert form["properties"]["purpose"]["enum"] == ["batch"] and "purpose" in form["required"]


def test_an_empty_purpose_is_empty_and_a_missing_one_missing(client):
    empty = client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": ""})
    assert empty.status_code == 400 and empty.json()["error"]["message"] == "purpose is empty"
    missing = client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")})
    assert missing.status_code == 400 and "required" in missing.json()["error"]["message"]
    other = client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "fine-tune"})
    assert other.status_code == 400 and other.json()["error"]["code"] == "unsupported_purpose"


def test_the_openapi_document_gives_the_bounds_of_expiry(client):
    spec = client.get("/openapi.json").json()
    upload = spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    form = spec["components"]["schemas"][upload.rsplit("/", 1)[1]]["properties"]
    # Optional, and without "or null": a multipart form has no null (schemathesis sent the string "null").
    assert form["expires_after[seconds]"].items() >= {"type": "integer", "minimum": 3600, "maximum": 2592000}.items()
    assert form["expires_after[anchor]"].items() >= {"type": "string", "enum": ["created_at"]}.items()
    assert "anyOf" not in form["expires_after[seconds]"] and "anyOf" not in form["expires_after[anchor]"]
    assert "expires_after[anchor]" not in spec["components"]["schemas"][upload.rsplit("/", 1)[1]].get("required", [])
    batch = spec["components"]["schemas"]["OutputExpiresAfter"]["properties"]
    assert (batch["seconds"]["minimum"], batch["seconds"]["maximum"]) == (3600, 2592000)
    metadata = next(s for s in spec["components"]["schemas"]["BatchCreate"]["properties"]["metadata"]["anyOf"]
                    if s.get("type") == "object")  # OpenAI's rule, published: schema-valid metadata is taken
    assert metadata == {"type": "object", "maxProperties": 16, "propertyNames": {"maxLength": 64},
                        "additionalProperties": {"type": "string", "maxLength": 512}}


def test_a_full_disk_during_an_upload_is_a_507_and_leaves_nothing(client, monkeypatch):
    files_dir = client.app.state.batch_store.sync.files_dir
    before = sorted(files_dir.iterdir())
    real_open = open

    def full(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        f.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return f

    monkeypatch.setattr("openai_frontend.routers.files.open", full, raising=False)
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    response = client.post("/v1/files", files={"file": ("a.jsonl", json.dumps(line).encode())},
                           data={"purpose": "batch"})  # fmt: skip
    assert response.status_code == 507 and response.json()["error"]["code"] == "insufficient_storage"
    assert response.headers["x-should-retry"] == "false"
    assert sorted(files_dir.iterdir()) == before
    monkeypatch.undo()
    assert client.post("/v1/files", files={"file": ("a.jsonl", json.dumps(line).encode())},
                       data={"purpose": "batch"}).status_code == 200  # fmt: skip


def test_a_tenant_past_its_open_batches_is_refused_and_another_is_not(tmp_path):
    app = create_app(Settings(batch_data_dir=str(tmp_path), api_keys=["ka:team-a", "kb:team-b"],
                              batch_max_open_batches_per_tenant=1), backend_factory=lambda s: FakeBackend())
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}).encode()
    with TestClient(app) as client:
        def create(key: str):
            auth = {"Authorization": f"Bearer {key}"}
            file_id = client.post("/v1/files", files={"file": ("a.jsonl", line)}, data={"purpose": "batch"},
                                  headers=auth).json()["id"]  # fmt: skip
            return client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                    "completion_window": "24h"}, headers=auth)  # fmt: skip

        app.state.batch_runner._task.cancel()  # the batches stay open: nothing runs them here
        assert create("ka").status_code == 200
        refused = create("ka")
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "too_many_open_batches"
        assert "per tenant" in refused.json()["error"]["message"]
        assert create("kb").status_code == 200
