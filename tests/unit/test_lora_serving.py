"""LoRA adapters through Triton and the OpenAI API, without a server: the tensors (``lora_name``, ``lora_control``),
the model parameters and their environment overrides, the launcher's and serve.sh's ``--lora-modules`` /
``--lora-dir``, and the frontend's pieces on fakes (the registry, the error mapping, the balancer, the routes'
setting). The real stack: tests/frontend/test_lora.py and tests/triton/test_lora.py."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minicpmv.engine.errors import AdapterNotFoundError, InvalidRequestError
from minicpmv_triton.parameters import ModelParameters
from minicpmv_triton.tensors import ControlRequest, control_tensors, parse_control, parse_request, parse_sampling
from openai_frontend.backend import BackendError, GenerateChunk, GenerateRequest, LoRAAdapter, LoRAStatus
from openai_frontend.balancer import BalancedBackend
from openai_frontend.triton_client import build_inputs, classify
from tests.unit.fakes import MODEL, FakeBackend, app_client
from tests.unit.test_serve_script import ports, run_serve

ROOT = Path(__file__).resolve().parents[2]


def text(value: str) -> np.ndarray:
    return np.array([[value.encode()]], dtype=np.object_)


def control(payload, **others) -> ControlRequest | None:
    raw = payload if isinstance(payload, str) else json.dumps(payload)
    return parse_control({"lora_control": text(raw), **{k: text(v) for k, v in others.items()}})


# --- Triton tensors ------------------------------------------------------------------------------------------


def test_lora_name_in_the_sampling_parameters_selects_the_adapter():
    parsed = parse_request("r", {"text_input": text("x"),
                                 "sampling_parameters": text('{"max_tokens": 3, "lora_name": "invoices"}')})  # fmt: skip
    assert parsed.generation.adapter == "invoices" and parsed.generation.sampling.max_tokens == 3
    assert parse_request("r", {"text_input": text("x")}).generation.adapter is None
    assert parse_sampling('{"lora_name": "invoices", "temperature": 0}')[0].temperature == 0


@pytest.mark.parametrize("value", ["", "  ", 7, "x" * 257, ["a"]])
def test_lora_name_must_be_a_non_empty_string(value):
    with pytest.raises(InvalidRequestError, match="lora_name"):
        parse_request("r", {"text_input": text("x"), "sampling_parameters": text(json.dumps({"lora_name": value}))})


@pytest.mark.parametrize(("payload", "expected"), [
    ({"action": "list"}, ControlRequest("list")),
    ({"action": "load", "lora_name": "a", "lora_path": "dir/a"}, ControlRequest("load", "a", "dir/a")),
    ({"action": "unload", "lora_name": "a"}, ControlRequest("unload", "a")),
])  # fmt: skip
def test_control_requests_are_parsed(payload, expected):
    assert control(payload) == expected


@pytest.mark.parametrize(("payload", "error"), [
    ("{not json", "lora_control is not valid JSON"),
    ("[1]", "lora_control must be a JSON object"),
    ({"action": "merge"}, "action must be one of list, load, unload, stats, got 'merge'"),
    ({}, "action must be one of"),
    ({"action": "load", "lora_name": "a"}, "lora_path must be a non-empty string"),
    ({"action": "load", "lora_name": "", "lora_path": "p"}, "lora_name must be a non-empty string"),
    ({"action": "unload"}, "lora_name must be a non-empty string"),
    ({"action": "unload", "lora_name": "a", "lora_path": "p"}, "'unload' takes no lora_path"),
    ({"action": "list", "lora_name": "a"}, "'list' takes no lora_name"),
])  # fmt: skip
def test_bad_control_requests_are_refused_saying_why(payload, error):
    with pytest.raises(InvalidRequestError, match=error):
        control(payload)


def test_a_control_request_takes_no_prompt_and_answers_json():
    assert parse_control({"text_input": text("x")}) is None
    with pytest.raises(InvalidRequestError, match="takes no 'text_input' or 'messages'"):
        control({"action": "list"}, messages="[]")
    out = control_tensors({"adapters": [], "runtime_loading": True})
    assert json.loads(out["text_output"][0][0]) == {"adapters": [], "runtime_loading": True}
    assert out["text_output"].shape == (1, 1) and out["index"].dtype == np.uint32


# --- model parameters ----------------------------------------------------------------------------------------


def params(environ: dict, name: str = "minicpm_v_2_6", **parameters: str) -> ModelParameters:
    config = {"name": name, "parameters": {k: {"string_value": v} for k, v in {"checkpoint": "/c", **parameters}.items()}}
    return ModelParameters.from_model_config(config, {"model_name": name, "model_instance_kind": "CPU"}, environ)


def test_lora_parameters_come_from_the_environment_per_model_first(tmp_path):
    environ = {"MINICPMV_LORA_MODULES": "a=/x", "MINICPMV_LORA_MODULES_MINICPM_V_2_6_INT4": "b=/y",
               "MINICPMV_MAX_LORAS": "2", "MINICPMV_LORA_DIR_MINICPM_V_2_6": str(tmp_path)}  # fmt: skip
    full, int4 = params(environ).engine, params(environ, "minicpm_v_2_6_int4").engine
    assert (full.lora_modules, int4.lora_modules) == ("a=/x", "b=/y")
    assert full.max_loras == int4.max_loras == 2
    assert full.lora_dir == str(tmp_path) and full.enable_lora  # a lora_dir turns LoRA on
    assert int4.lora_dir is None and not int4.enable_lora and int4.lora_enabled  # on by its modules
    assert params({}, max_lora_rank="16").engine.max_lora_rank == 16  # config.pbtxt, as every engine field


def test_a_lora_dir_that_is_not_a_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lora_dir .*nope.* is not a directory"):
        params({"MINICPMV_LORA_DIR": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="parameter 'max_lora_rank' must be an integer, got 'big'"):
        params({"MINICPMV_MAX_LORA_RANK": "big"})


# --- the launcher and serve.sh ---------------------------------------------------------------------------------


def _launch_triton():
    spec = importlib.util.spec_from_file_location("launch_triton", ROOT / "scripts" / "launch_triton.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch_triton = _launch_triton()


def adapter_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


def test_the_launcher_passes_lora_modules_with_absolute_paths(tmp_path, monkeypatch):
    adapter_dir(tmp_path / "a")
    adapter_dir(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    args = launch_triton.parse_args(["--lora-modules", " a=a , b = ./b,", "--lora-dir", "."])
    env = launch_triton.server_env(args, "cpu", ["minicpm_v_2_6"], environ={})
    assert env["MINICPMV_LORA_MODULES"] == f"a={tmp_path / 'a'},b={tmp_path / 'b'}"
    assert env["MINICPMV_LORA_DIR"] == str(tmp_path)


@pytest.mark.parametrize(("modules", "error"), [
    ("a", "'a' is not name=path"),
    ("=x", "'=x' is not name=path"),
    ("a=ok,a=ok", "'a' is given twice"),
    ("minicpm_v_2_6=ok", "is the name of a model"),
    ("a=missing", "a: missing is not a directory"),
    ("a=plain", "has no adapter_config.json"),
    (",", "no name=path given"),
])  # fmt: skip
def test_the_launcher_refuses_bad_lora_modules(tmp_path, monkeypatch, modules, error):
    adapter_dir(tmp_path / "ok")
    (tmp_path / "plain").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=error):
        launch_triton.lora_modules(modules, ["minicpm_v_2_6"])


@pytest.mark.parametrize(("args", "message"), [
    (["--lora-modules", "invoices"], "--lora-modules: 'invoices' is not name=path"),
    (["--lora-modules", "a={ok},b"], "--lora-modules: 'b' is not name=path"),
    (["--lora-modules", "a=/nonexistent/dir"], "--lora-modules: a: /nonexistent/dir is not a directory"),
    (["--lora-modules", "MiniCPM-V-2_6=/tmp"], "'MiniCPM-V-2_6' is the name of a model"),
    (["--lora-modules=a={ok},a={ok}"], "'a' is given twice"),
    (["--lora-modules", "a=/tmp"], "/tmp has no adapter_config.json"),
    (["--lora-dir", "/nonexistent/dir"], "--lora-dir: /nonexistent/dir is not a directory"),
    (["--lora-dir"], "--lora-dir needs a value"),
])  # fmt: skip
def test_serve_sh_refuses_bad_lora_options_before_anything_else(tmp_path, args, message):
    ok = adapter_dir(tmp_path / "ok")
    args = [arg.replace("{ok}", str(ok)) for arg in args]  # an adapter directory
    result = run_serve(*ports(), *args, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "--help" in result.stderr
    assert "checking the Python environment" not in result.stderr


def test_serve_sh_help_names_the_lora_options(tmp_path):
    result = run_serve("--help", tmp_path=tmp_path)
    assert "--lora-modules NAME=PATH" in result.stdout and "MINICPMV_LORA_DIR" in result.stdout


_RECORDER = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("launch_triton", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
class Recorder:  # in place of TritonServer: note the environment it would get, start nothing
    def __init__(self, repository, models=None, extra_env=None, **kwargs):
        json.dump(extra_env, open(os.environ["RECORD_LAUNCH"], "w"))
    def start(self):
        raise FileNotFoundError("recorded, not started")
module.TritonServer = Recorder
sys.exit(module.main(sys.argv[2:]))
"""


def test_serve_sh_passes_the_adapters_to_the_models(tiny_full, tmp_path):
    """serve.sh --lora-modules (relative paths) and MINICPMV_LORA_DIR, up to the launcher (a recorder in place of
    tritonserver): the models' lora_modules and lora_dir, with absolute paths."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (tmp_path / "record.py").write_text(_RECORDER)
    python = bin_dir / "python"
    python.write_text("#!/usr/bin/env bash\n"
                      f'if [[ "${{1:-}}" == */scripts/launch_triton.py ]]; then exec {sys.executable} {tmp_path}/record.py'
                      ' "$@"; fi\n'
                      f'exec {sys.executable} "$@"\n')  # fmt: skip
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    adapter_dir(tmp_path / "adapters" / "invoices")
    record = tmp_path / "launch.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MINICPMV_"))}
    env.update(MINICPMV_SKIP_SETUP="1", MINICPMV_VENV=str(tmp_path / "venv"), MINICPMV_SERVE_LOG_DIR=str(tmp_path / "l"),
               HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", RECORD_LAUNCH=str(record),
               MINICPMV_LORA_DIR=str(tmp_path / "adapters"))  # fmt: skip
    result = subprocess.run(["bash", str(ROOT / "scripts" / "serve.sh"), "--model", "full", "--device", "cpu",
                             "--host", "127.0.0.1", "--checkpoint-full", str(tiny_full), *ports(),
                             "--lora-modules", "invoices=adapters/invoices"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    assert record.is_file(), result.stderr
    launched = json.loads(record.read_text())
    assert launched["MINICPMV_LORA_MODULES"] == f"invoices={tmp_path / 'adapters' / 'invoices'}"
    assert launched["MINICPMV_LORA_DIR"] == str(tmp_path / "adapters")


# --- the frontend on fakes -------------------------------------------------------------------------------------


class LoRABackend(FakeBackend):
    """One model with the adapter ``invoices`` (and whatever is loaded), answering "ok"."""

    def __init__(self, runtime: bool = True):
        super().__init__([GenerateChunk(0, "ok", "stop", 3, 1)])
        self.loaded = {"invoices": LoRAAdapter("invoices", "/a/invoices", {"rank": 4})}
        self.runtime = runtime
        self.calls: list[tuple] = []

    async def lora_status(self, model):
        return LoRAStatus(list(self.loaded.values()), self.runtime)

    async def load_lora(self, model, name, path):
        self.calls.append(("load", model, name, path))
        if path.startswith(".."):
            raise BackendError(BackendError.INVALID, f"adapter {name!r}: {path!r} is outside the adapter directory")
        self.loaded[name] = LoRAAdapter(name, "/a/" + path)
        return self.loaded[name]

    async def unload_lora(self, model, name):
        self.calls.append(("unload", model, name))
        if self.loaded.pop(name, None) is None:
            raise BackendError(BackendError.NOT_FOUND, f"no LoRA adapter {name!r}", code="model_not_found")


def chat(client, model: str):
    return client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def test_an_adapter_name_selects_its_base_model_and_the_adapter():
    backend = LoRABackend()
    with app_client(backend) as client:
        assert chat(client, "invoices").json()["model"] == "invoices"
        assert chat(client, MODEL).status_code == 200
        missing = chat(client, "receipts")
        listed = client.get("/v1/models").json()["data"]
        one = client.get("/v1/models/invoices").json()
        metrics = client.get("/metrics").text
    (model, adapter), (_, base) = ((m, r.adapter) for m, r in backend.requests)
    assert (model, adapter, base) == (MODEL, "invoices", None)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert "invoices" in missing.json()["error"]["message"]  # the names served, adapters among them
    assert [(m["id"], m["parent"], m["root"]) for m in listed] == [(MODEL, None, MODEL),
                                                                   ("invoices", MODEL, "/a/invoices")]  # fmt: skip
    assert one["parent"] == MODEL and one["root"] == "/a/invoices"
    assert 'minicpmv_frontend_requests_total{model="invoices",status="200"} 1.0' in metrics


def sampling_sent(request: GenerateRequest) -> dict:
    (tensor,) = [t for t in build_inputs(request) if t.name() == "sampling_parameters"]
    return json.loads(tensor._raw_content[4:])  # one BYTES element: its 4-byte length, then the bytes


def test_the_adapter_goes_to_triton_as_lora_name():
    request = GenerateRequest("r", [{"role": "user", "content": "hi"}], sampling={"max_tokens": 2},
                              adapter="invoices")  # fmt: skip
    assert sampling_sent(request) == {"max_tokens": 2, "lora_name": "invoices"}
    assert request.sampling == {"max_tokens": 2}  # the request itself is left as it is
    assert sampling_sent(GenerateRequest("r", [], sampling={"n": 1})) == {"n": 1}


def test_an_unknown_adapter_from_the_engine_is_a_404_model_not_found():
    error = classify("[request id: x] " + AdapterNotFoundError("no LoRA adapter 'gone' on this model",
                                                                 param="model").wire())  # fmt: skip
    assert (error.kind, error.code, error.param) == (BackendError.NOT_FOUND, "model_not_found", "model")
    backend = LoRABackend()
    backend.error, backend.chunks = error, []
    with app_client(backend) as client:
        response = chat(client, "invoices")  # listed, then unloaded on the server before the request got there
    assert response.status_code == 404
    assert response.json()["error"] == {"message": "no LoRA adapter 'gone' on this model", "type": "not_found_error",
                                        "param": "model", "code": "model_not_found"}  # fmt: skip


def test_the_runtime_routes_are_absent_unless_enabled():
    with app_client(LoRABackend()) as client:
        response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"})
        assert response.status_code == 404 and "no such endpoint" in response.json()["error"]["message"]
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "invoices"}).status_code == 404
    with app_client(LoRABackend(), enable_lora_runtime_updates=True, api_keys="k") as client:
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"}).status_code == 401


def test_with_admin_keys_only_they_load_and_unload_adapters():
    with app_client(LoRABackend(), enable_lora_runtime_updates=True, api_keys="tenant-key:team-a",
                    admin_api_keys="root-key") as client:  # fmt: skip
        load = {"lora_name": "receipts", "lora_path": "receipts"}
        tenant, root = ({"Authorization": f"Bearer {k}"} for k in ("tenant-key", "root-key"))
        refused = client.post("/v1/load_lora_adapter", json=load, headers=tenant)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "invoices"}, headers=tenant).status_code \
            == 403  # fmt: skip
        assert client.post("/v1/load_lora_adapter", json=load, headers=root).status_code == 200
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "receipts"}, headers=root).status_code == 200


def test_runtime_load_and_unload_through_the_routes():
    backend = LoRABackend()
    load = {"lora_name": "receipts", "lora_path": "receipts"}
    with app_client(backend, enable_lora_runtime_updates=True) as client:
        assert client.post("/v1/load_lora_adapter", json=load).text == \
            "Success: LoRA adapter 'receipts' added successfully."  # fmt: skip
        assert chat(client, "receipts").status_code == 200  # usable at once: the list is asked again
        again = client.post("/v1/load_lora_adapter", json=load)
        named = client.post("/v1/load_lora_adapter", json={"lora_name": "MiniCPM-V-2_6", "lora_path": "x"})
        outside = client.post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": "../y"})
        missing = client.post("/v1/load_lora_adapter", json={"lora_name": "y"})
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "receipts"}).status_code == 200
        gone = client.post("/v1/unload_lora_adapter", json={"lora_name": "receipts"})
        after = chat(client, "receipts")
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert named.status_code == 400 and "is the name of a model" in named.json()["error"]["message"]
    assert outside.status_code == 400 and "outside the adapter directory" in outside.json()["error"]["message"]
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "lora_path"
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert after.status_code == 404
    assert backend.calls == [("load", MODEL, "receipts", "receipts"), ("load", MODEL, "y", "../y"),
                             ("unload", MODEL, "receipts")]  # fmt: skip


def test_without_runtime_loading_on_a_model_a_load_is_refused():
    with app_client(LoRABackend(runtime=False), enable_lora_runtime_updates=True) as client:
        response = client.post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": "y"})
    assert response.status_code == 400 and "lora_dir" in response.json()["error"]["message"]


def test_the_balancer_loads_on_every_server_or_on_none():
    async def main():
        a, b = LoRABackend(), LoRABackend()
        balancer = BalancedBackend({"a": a, "b": b})
        await balancer.load_lora(MODEL, "receipts", "receipts")
        assert "receipts" in a.loaded and "receipts" in b.loaded
        b.load_lora = _refuse
        with pytest.raises(BackendError, match="bad adapter"):
            await balancer.load_lora(MODEL, "customs", "customs")
        assert "customs" not in a.loaded  # undone where it had succeeded
        del b.loaded["receipts"]  # b restarted since, say
        await balancer.unload_lora(MODEL, "receipts")  # one had it: done
        with pytest.raises(BackendError) as e:
            await balancer.unload_lora(MODEL, "receipts")
        assert e.value.kind == BackendError.NOT_FOUND
        assert [x.name for x in (await balancer.lora_status(MODEL)).adapters] == ["invoices"]

    asyncio.run(main())


async def _refuse(model, name, path):
    raise BackendError(BackendError.INVALID, f"adapter {name!r}: bad adapter")


def test_the_balancer_sends_a_request_for_an_adapter_to_a_server_that_has_it():
    async def main():
        lacking, having = LoRABackend(), LoRABackend()
        lacking.error = BackendError(BackendError.NOT_FOUND, "no LoRA adapter 'x'", code="model_not_found")
        lacking.chunks = []
        balancer = BalancedBackend({"lacking": lacking, "having": having})
        request = GenerateRequest("r", [{"role": "user", "content": "hi"}], adapter="x")
        assert [c.text async for c in balancer.generate(MODEL, request)] == ["ok"]
        assert balancer.endpoints[0].up  # not marked down for it

    asyncio.run(main())
