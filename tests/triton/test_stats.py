"""The ``stats`` control request at Triton's tensor interface (the session's tritonserver): the engine's load and
limits in one JSON answer, which the frontend polls for the model server protocol metrics and for admission."""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import LORA_MODEL
from tests.triton.test_lora import PROMPT, control
from tests.triton.test_server import build_inputs, run_stream

pytestmark = pytest.mark.slow


@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def test_stats_says_the_engines_load_and_limits(client):
    before = control(client, {"action": "stats"})
    assert set(before) == {"waiting", "running", "kv_usage", "kv_blocks", "block_size", "max_num_seqs", "max_waiting",
                           "finished", "max_lora", "running_adapters", "waiting_adapters"}  # fmt: skip
    # configs/cpu.pbtxt and the session's LoRA settings (tests/conftest.py).
    assert (before["max_num_seqs"], before["max_waiting"], before["block_size"], before["max_lora"]) == (16, 256, 16, 2)
    assert before["kv_blocks"] > 0 and 0 <= before["kv_usage"] <= 1
    sampling = {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
    for _ in range(2):
        run_stream(client, LORA_MODEL, build_inputs(text=PROMPT, sampling=sampling))
    after = control(client, {"action": "stats"})
    assert after["finished"] >= before["finished"] + 2  # the drain rate's count (other tests may run requests too)
    assert control(client, {"action": "stats"}, model="minicpm_v_2_6_int4")["max_lora"] == 0  # no LoRA there
