"""LoRA adapters through the whole stack with the official ``openai`` SDK: the session's tritonserver serves two
adapters on its full model from start-up and loads more at runtime from its adapter directory (tests/conftest.py,
``lora_setup``). Selected by ``model`` as in vLLM; listed with their ``parent``; loaded and unloaded with vLLM's
routes when the frontend's setting allows it."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import openai
import pytest

from tests.conftest import LORA_MODEL, LORA_MODULES, LORA_RUNTIME
from tests.frontend.helpers import metric
from tests.frontend.test_batches import finished, jsonl, results, wait_for

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the invoice total?"}]
GREEDY = {"temperature": 0, "max_tokens": 6, "logprobs": True, "extra_body": {"ignore_eos": True}}
RUNTIME = "customs-lora"


def answer(client: openai.OpenAI, model: str) -> tuple[str, list[float]]:
    r = client.chat.completions.create(model=model, messages=QUESTION, **GREEDY)
    assert r.model == model and r.usage.completion_tokens == 6
    return r.choices[0].message.content, [e.logprob for e in r.choices[0].logprobs.content]


def same(a: tuple[str, list[float]], b: tuple[str, list[float]]) -> bool:
    """The same answer (the prefix cache may change the last digits of a logprob)."""
    return a[0] == b[0] and a[1] == pytest.approx(b[1], abs=1e-4)


def post(fe, path: str, body: dict) -> httpx.Response:
    return httpx.post(fe.base_url + path, json=body, timeout=120)


def test_each_adapter_and_the_base_model_answer_differently(client):
    base = answer(client, LORA_MODEL)
    by_adapter = {name: answer(client, name) for name in LORA_MODULES}
    logprobs = [base[1]] + [out[1] for out in by_adapter.values()]
    assert all(a != pytest.approx(b, abs=1e-3) for i, a in enumerate(logprobs) for b in logprobs[i + 1:])  # 3 models
    assert same(answer(client, LORA_MODULES[0]), by_adapter[LORA_MODULES[0]])  # and each the same again (greedy)
    assert same(answer(client, "MiniCPM-V-2_6"), base)  # an alias of the base: no adapter


def test_models_lists_the_adapters_with_their_parent(client, lora_setup):
    listed = {m.id: m.model_extra for m in client.models.list().data}
    adapters = {name: extra for name, extra in listed.items() if extra.get("parent")}
    assert adapters == {name: {"root": str(path), "aliases": [], "parent": LORA_MODEL}
                        for name, path in lora_setup.modules.items()}  # fmt: skip
    assert listed[LORA_MODEL]["parent"] is None  # a model has none, as in vLLM
    one = client.models.retrieve(LORA_MODULES[1])
    assert one.id == LORA_MODULES[1] and one.model_extra["parent"] == LORA_MODEL


def test_an_unknown_adapter_is_a_404_in_openais_envelope(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-lora", messages=QUESTION, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert LORA_MODULES[0] in e.value.body["message"]  # what is served, adapters among them


def test_the_responses_api_and_the_batch_api_take_adapter_names(client, make_frontend, tmp_path):
    chat = answer(client, LORA_MODULES[0])[0]
    r = client.responses.create(model=LORA_MODULES[0], input=QUESTION[0]["content"], temperature=0,
                                max_output_tokens=6, extra_body={"ignore_eos": True})  # fmt: skip
    assert r.model == LORA_MODULES[0] and r.output_text == chat

    fe = make_frontend(batch_data_dir=tmp_path)
    batcher = fe.client()
    lines = [{"custom_id": name, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": name, "messages": QUESTION, "max_tokens": 6, "temperature": 0, "ignore_eos": True}}
             for name in (LORA_MODULES[0], LORA_MODEL, "no-such-lora")]  # fmt: skip
    uploaded = batcher.files.create(file=("lora.jsonl", jsonl(lines)), purpose="batch")
    batch = batcher.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = wait_for(batcher, batch.id, finished)
    out = {x["custom_id"]: x["response"] for x in results(batcher, batch.output_file_id)}
    out |= {x["custom_id"]: x["response"] for x in results(batcher, batch.error_file_id)}
    assert out[LORA_MODULES[0]]["body"]["choices"][0]["message"]["content"] == chat
    assert out[LORA_MODULES[0]]["body"]["model"] == LORA_MODULES[0]
    assert out[LORA_MODEL]["body"]["choices"][0]["message"]["content"] == answer(client, LORA_MODEL)[0]
    assert out["no-such-lora"]["status_code"] == 404


def test_the_runtime_routes_are_404_unless_the_setting_is_on(frontend):
    for path, body in (("/v1/load_lora_adapter", {"lora_name": RUNTIME, "lora_path": LORA_RUNTIME}),
                       ("/v1/unload_lora_adapter", {"lora_name": LORA_MODULES[0]})):  # fmt: skip
        response = post(frontend, path, body)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_adapters_load_and_unload_at_runtime(make_frontend, client, server, lora_setup):
    fe = make_frontend(enable_lora_runtime_updates=True)
    sdk = fe.client()
    loads0 = triton_metric(server, "minicpmv_lora_loads_total", adapter=RUNTIME)
    try:
        response = post(fe, "/v1/load_lora_adapter", {"lora_name": RUNTIME, "lora_path": LORA_RUNTIME})
        assert response.status_code == 200, response.text
        assert response.text == f"Success: LoRA adapter '{RUNTIME}' added successfully."
        loaded = answer(sdk, RUNTIME)
        assert not any(same(loaded, answer(sdk, name)) for name in (LORA_MODEL, *LORA_MODULES))
        listed = {m.id: m.model_extra for m in sdk.models.list().data}
        assert listed[RUNTIME]["parent"] == LORA_MODEL
        assert listed[RUNTIME]["root"] == str(lora_setup.lora_dir / LORA_RUNTIME)
        assert same(answer(client, RUNTIME), loaded)  # the session's frontend sees it too (its list is 2 s old at most)

        # Per-adapter metrics: Triton's by adapter (three adapters through two slots: an eviction), the frontend's
        # requests by the name the client used.
        wait_for_metric(server, "minicpmv_lora_requests_total", 1, adapter=RUNTIME)
        assert triton_metric(server, "minicpmv_lora_generated_tokens_total", adapter=RUNTIME) >= 6
        assert triton_metric(server, "minicpmv_lora_loads_total", adapter=RUNTIME) > loads0
        assert triton_metric(server, "minicpmv_lora_evictions_total") >= 1
        assert 1 <= triton_metric(server, "minicpmv_lora_resident_adapters") <= 2
        assert metric(fe.base_url + "/metrics", "minicpmv_frontend_requests_total", model=RUNTIME,
                      status="200") >= 1  # fmt: skip

        again = post(fe, "/v1/load_lora_adapter", {"lora_name": RUNTIME, "lora_path": LORA_RUNTIME})
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
        assert post(fe, "/v1/load_lora_adapter", {"lora_name": RUNTIME, "lora_path": LORA_RUNTIME,
                                                  "load_inplace": True}).status_code == 200  # fmt: skip

        assert post(fe, "/v1/unload_lora_adapter", {"lora_name": RUNTIME}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model=RUNTIME, messages=QUESTION, max_tokens=2)
        gone = post(fe, "/v1/unload_lora_adapter", {"lora_name": RUNTIME})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        assert RUNTIME not in [m.id for m in sdk.models.list().data]
    finally:
        post(fe, "/v1/unload_lora_adapter", {"lora_name": RUNTIME})


def test_bad_runtime_loads_are_400s_saying_what_is_wrong(make_frontend, lora_setup):
    fe = make_frontend(enable_lora_runtime_updates=True)
    dora = lora_setup.lora_dir / "dora"
    shutil.copytree(lora_setup.lora_dir / LORA_RUNTIME, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    empty = lora_setup.lora_dir / "empty"
    empty.mkdir()
    cases = {
        "dora": "DoRA (use_dora: True) is not supported",
        "empty": "no adapter_config.json",
        "missing": "is not a directory",
        "../static/" + LORA_MODULES[0]: "outside the adapter directory",
        str(lora_setup.modules[LORA_MODULES[0]]): "outside the adapter directory",
    }
    try:
        for path, message in cases.items():
            response = post(fe, "/v1/load_lora_adapter", {"lora_name": "bad-lora", "lora_path": path})
            assert response.status_code == 400, (path, response.text)
            error = response.json()["error"]
            assert message in error["message"] and error["type"] == "invalid_request_error", (path, error)
        named = post(fe, "/v1/load_lora_adapter", {"lora_name": "MiniCPM-V-2_6", "lora_path": LORA_RUNTIME})
        assert named.status_code == 400 and "is the name of a model" in named.json()["error"]["message"]
        assert "bad-lora" not in [m["id"] for m in httpx.get(fe.base_url + "/v1/models").json()["data"]]
    finally:
        shutil.rmtree(dora)
        empty.rmdir()


def triton_metric(server, name: str, **labels) -> float:
    return metric(server.metrics_url, name, model=LORA_MODEL, **labels)


def wait_for_metric(server, name: str, at_least: float, **labels) -> None:
    deadline = time.monotonic() + 10  # the backend publishes every 50 ms
    while triton_metric(server, name, **labels) < at_least:
        assert time.monotonic() < deadline, f"{name} {labels} stays below {at_least}"
        time.sleep(0.05)
