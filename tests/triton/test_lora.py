"""LoRA adapters at Triton's tensor interface (the session's tritonserver, tests/conftest.py ``lora_setup``): a request
selects one with ``lora_name`` in ``sampling_parameters`` (as vLLM's backend); ``lora_control`` lists, loads and
unloads them with one JSON response; errors carry the engine's codes."""

from __future__ import annotations

import json

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import LORA_MODEL, LORA_MODULES, LORA_RUNTIME
from tests.triton.test_server import build_inputs, run_stream, tensor, text_of

pytestmark = pytest.mark.slow
PROMPT = "<|im_start|>user\nWhat is the total?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def control(client, payload: dict | str, model: str = LORA_MODEL):
    raw = payload if isinstance(payload, str) else json.dumps(payload)
    (response,) = run_stream(client, model, [tensor("lora_control", [[raw.encode()]], "BYTES")])
    return json.loads(response.as_numpy("text_output")[0][0])


def generate(client, adapter: str | None) -> str:
    sampling = {"max_tokens": 6, "temperature": 0, "ignore_eos": True} | ({"lora_name": adapter} if adapter else {})
    return text_of(run_stream(client, LORA_MODEL, build_inputs(text=PROMPT, sampling=sampling)))


def coded_error(excinfo) -> dict:
    message = str(excinfo.value.message())
    return json.loads(message[message.index("{"):])["minicpmv_error"]


def test_lora_name_selects_the_adapter_and_control_lists_loads_unloads(client, lora_setup):
    listed = control(client, {"action": "list"})
    assert listed["runtime_loading"] is True
    assert {a["name"]: (a["path"], a["rank"]) for a in listed["adapters"]} == {
        name: (str(path), 4) for name, path in lora_setup.modules.items()}  # fmt: skip
    assert control(client, {"action": "list"}, model="minicpm_v_2_6_int4") == {"adapters": [],
                                                                             "runtime_loading": False}  # fmt: skip
    base, first = generate(client, None), generate(client, LORA_MODULES[0])
    assert first != base or generate(client, LORA_MODULES[1]) != base

    info = control(client, {"action": "load", "lora_name": "t-lora", "lora_path": LORA_RUNTIME})
    try:
        assert info["name"] == "t-lora" and info["path"] == str(lora_setup.lora_dir / LORA_RUNTIME)
        assert generate(client, "t-lora")
    finally:
        assert control(client, {"action": "unload", "lora_name": "t-lora"}) == {"unloaded": "t-lora"}
    with pytest.raises(InferenceServerException) as e:
        generate(client, "t-lora")
    assert coded_error(e)["code"] == "adapter_not_found"


@pytest.mark.parametrize(("payload", "code", "message"), [
    ('{"action": "merge"}', "invalid_request", "action must be one of list, load, unload"),
    ("not json", "invalid_request", "lora_control is not valid JSON"),
    ({"action": "unload", "lora_name": "no-such"}, "adapter_not_found", "no LoRA adapter 'no-such'"),
    ({"action": "load", "lora_name": "x", "lora_path": "../x"}, "invalid_request", "outside the adapter directory"),
])  # fmt: skip
def test_bad_control_requests_answer_coded_errors(client, payload, code, message):
    with pytest.raises(InferenceServerException) as e:
        control(client, payload)
    error = coded_error(e)
    assert error["code"] == code and message in error["message"]


def test_a_model_without_lora_refuses_loads_and_adapters(client):
    with pytest.raises(InferenceServerException) as e:
        control(client, {"action": "load", "lora_name": "x", "lora_path": "x"}, model="minicpm_v_2_6_int4")
    assert "LoRA is off" in coded_error(e)["message"]
    inputs = build_inputs(text=PROMPT, sampling={"max_tokens": 2, "lora_name": LORA_MODULES[0]})
    with pytest.raises(InferenceServerException) as e:
        run_stream(client, "minicpm_v_2_6_int4", inputs)
    assert coded_error(e)["code"] == "adapter_not_found"
    assert run_stream(client, "minicpm_v_2_6_int4", build_inputs(text=PROMPT, sampling={"max_tokens": 2}))
