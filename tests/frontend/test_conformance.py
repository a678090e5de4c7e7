"""What the official clients send and expect, through the real stack (issue 15): every response and every stream
chunk valid under OpenAI's published schemas (tests/frontend/openapi_schemas.py), one ``created`` per stream,
nulls as defaults, current request fields, a system message alone, and the HTTP details (x-request-id, 405's
Allow, CORS, /docs offline, /metrics' content type)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.frontend.openapi_schemas import assert_valid, schema
from tests.frontend.openapi_schemas import errors as schema_errors

pytestmark = pytest.mark.slow

MODEL = "minicpm_v_2_6"
HI = [{"role": "user", "content": "Read the page."}]
SHORT = {"model": MODEL, "messages": HI, "max_tokens": 6, "temperature": 0}


def post(frontend, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(frontend.base_url + "/v1/chat/completions", json=body, timeout=120, **kwargs)


def stream_chunks(frontend, body: dict) -> list[dict]:
    """The chunks of a stream, as sent (the ``[DONE]`` line checked and left out)."""
    with httpx.stream("POST", frontend.base_url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def assert_one_stream(chunks: list[dict]) -> None:
    for chunk in chunks:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
    for key in ("id", "created", "model", "system_fingerprint", "object"):  # D6: one value per stream
        assert len({chunk[key] for chunk in chunks}) == 1, (key, [chunk[key] for chunk in chunks])


# ---------------------------------------------------------------- responses and chunks against the schemas

BODIES = {
    "plain": {},
    "logprobs": {"logprobs": True, "top_logprobs": 3},
    "n_2": {"n": 2, "temperature": 0.8, "seed": 3},
    "json_object": {"response_format": {"type": "json_object"}, "max_tokens": 24},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "total", "strict": True,
                    "schema": {"type": "object", "properties": {"total": {"type": "string", "maxLength": 8}},
                               "required": ["total"], "additionalProperties": False}}}, "max_tokens": 24},
}  # fmt: skip


@pytest.mark.parametrize("name", BODIES)
def test_completion_is_valid_under_openais_schema(frontend, name):
    r = post(frontend, {**SHORT, **BODIES[name]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid(body, "CreateChatCompletionResponse")
    assert len(body["choices"]) == BODIES[name].get("n", 1)
    if name == "logprobs":
        assert body["choices"][0]["logprobs"]["content"]  # the check looked at real logprobs


@pytest.mark.parametrize("name", BODIES)
def test_every_stream_chunk_is_valid_under_openais_schema(frontend, name):
    chunks = stream_chunks(frontend, {**SHORT, **BODIES[name], "stream_options": {"include_usage": True}})
    assert_one_stream(chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    finished = [c for chunk in chunks for c in chunk["choices"] if c["finish_reason"] is not None]
    assert len(finished) == BODIES[name].get("n", 1)


def test_stream_created_is_one_value_even_across_seconds(frontend):
    # Long enough to cross a second boundary on the CPU test models; created must not follow the clock.
    chunks = stream_chunks(frontend, {**SHORT, "max_tokens": 400, "ignore_eos": True})
    assert len(chunks) > 100
    assert_one_stream(chunks)


def test_errors_and_models_are_valid_under_openais_schema(frontend):
    bad = post(frontend, {**SHORT, "temperature": 9})
    assert bad.status_code == 400
    assert_valid(bad.json(), "ErrorResponse")
    assert bad.json()["error"]["param"] == "temperature"
    models = httpx.get(frontend.base_url + "/v1/models", timeout=30).json()
    assert_valid(models, "ListModelsResponse", strict=False)  # our "root" and "aliases" are extensions
    assert {e.split(":")[0] for m in models["data"] for e in schema_errors(m, "Model")} == {"(root)"}


# ---------------------------------------------------------------- D4, D7, D8: what current clients send


def _nullable_request_fields() -> list[str]:
    """Every field of CreateChatCompletionRequest that OpenAI's spec lets be null."""
    properties: dict = {}

    def collect(node: dict) -> None:
        if "$ref" in node:
            collect(schema(node["$ref"].rsplit("/", 1)[1], strict=False))
        for part in node.get("allOf", []):
            collect(part)
        properties.update(node.get("properties", {}))

    collect(schema("CreateChatCompletionRequest", strict=False))
    base = {"model": MODEL, "messages": HI}
    return sorted(name for name in properties
                  if not schema_errors({**base, name: None}, "CreateChatCompletionRequest", strict=False))


def test_explicit_null_means_the_default_for_every_nullable_field(frontend):
    nullable = _nullable_request_fields()
    assert {"n", "stream", "logprobs", "stop", "seed", "audio", "modalities", "reasoning_effort"} <= set(nullable)
    body = {**SHORT, **{name: None for name in nullable if name not in SHORT}}
    r = post(frontend, body)
    assert r.status_code == 200, r.text
    assert_valid(r.json(), "CreateChatCompletionResponse")
    assert len(r.json()["choices"]) == 1  # n: null is n = 1; stream: null is not streaming


def test_current_request_fields_are_accepted(frontend):
    fields = {"reasoning_effort": "low", "modalities": ["text"], "verbosity": "medium",
              "prediction": {"type": "content", "content": "The total is"}, "prompt_cache_key": "invoices",
              "safety_identifier": "user-1234", "web_search_options": {}, "audio": None,
              "prompt_cache_retention": "in_memory", "store": False, "metadata": {"k": "v"}}  # fmt: skip
    r = post(frontend, {**SHORT, **fields})
    assert r.status_code == 200, r.text
    chunks = stream_chunks(frontend, {**SHORT, **fields, "stream_options": {"include_usage": True,
                                                                             "include_obfuscation": False}})
    assert_one_stream(chunks)


@pytest.mark.parametrize(("extra", "param"), [({"modalities": ["text", "audio"]}, "modalities"),
                                              ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
                                              ({"reasoning_effort": "extreme"}, "reasoning_effort")])  # fmt: skip
def test_what_cannot_be_honoured_is_a_clear_400(frontend, extra, param):
    r = post(frontend, {**SHORT, **extra})
    assert r.status_code == 400
    assert_valid(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("role", ["system", "developer"])
def test_a_system_message_alone_is_answered(frontend, role):
    r = post(frontend, {**SHORT, "messages": [{"role": role, "content": "Say hello."}]})
    assert r.status_code == 200, r.text
    assert_valid(r.json(), "CreateChatCompletionResponse")
    assert r.json()["usage"]["prompt_tokens"] > 3


# ---------------------------------------------------------------- D9: HTTP


def test_every_response_carries_a_request_id(frontend):
    ok = post(frontend, SHORT)
    bad = post(frontend, {**SHORT, "n": 0})
    missing = httpx.get(frontend.base_url + "/no/such/path", timeout=30)
    ids = [r.headers.get("x-request-id") for r in (ok, bad, missing)]
    assert all(i and i.startswith("req_") for i in ids) and len(set(ids)) == 3
    echoed = post(frontend, SHORT, headers={"x-request-id": "client-chosen-7"})
    assert echoed.headers["x-request-id"] == "client-chosen-7"
    with httpx.stream("POST", frontend.base_url + "/v1/chat/completions", json={**SHORT, "stream": True},
                      headers={"X-Request-ID": "stream-8"}, timeout=120) as r:  # fmt: skip
        assert r.headers["x-request-id"] == "stream-8"
        r.read()


def test_405_names_the_allowed_methods(frontend):
    r = httpx.get(frontend.base_url + "/v1/chat/completions", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert_valid(r.json(), "ErrorResponse")
    r = httpx.delete(frontend.base_url + "/v1/models", timeout=30)
    assert r.status_code == 405 and "GET" in r.headers["allow"]


def test_docs_work_without_internet(frontend):
    page = httpx.get(frontend.base_url + "/docs", timeout=30)
    assert page.status_code == 200
    sources = [part.split('"')[1] for part in page.text.split("src=")[1:]] + \
              [part.split('"')[1] for part in page.text.split("href=")[1:]]  # fmt: skip
    assert any(s.endswith("swagger-ui-bundle.js") for s in sources)
    for source in sources:  # every script and style comes from this server, and is there
        assert source.startswith("/"), source
        asset = httpx.get(frontend.base_url + source, timeout=30)
        assert asset.status_code == 200 and len(asset.content) > 100, source
    bundle = httpx.get(frontend.base_url + next(s for s in sources if s.endswith("swagger-ui-bundle.js")))
    assert b"SwaggerUIBundle" in bundle.content


def test_metrics_content_type_is_documented(frontend):
    spec = httpx.get(frontend.base_url + "/openapi.json", timeout=30).json()
    content = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    served = httpx.get(frontend.base_url + "/metrics", timeout=30).headers["content-type"]
    assert list(content) == [served] and served.startswith("text/plain")


def test_cors_is_off_by_default_and_on_for_configured_origins(frontend, make_frontend):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,authorization"}  # fmt: skip
    r = httpx.options(frontend.base_url + "/v1/chat/completions", headers=preflight, timeout=30)
    assert "access-control-allow-origin" not in r.headers
    fe = make_frontend(cors_allow_origins="https://app.example")
    r = httpx.options(fe.base_url + "/v1/chat/completions", headers=preflight, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    r = post(fe, SHORT, headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = httpx.options(fe.base_url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"},
                      timeout=30)  # fmt: skip
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"
