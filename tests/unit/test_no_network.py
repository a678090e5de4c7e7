"""The engine makes no network request once its weights are in place (issue 22), bitsandbytes included.

bitsandbytes 0.50 fetches a CPU kernel from the Hugging Face Hub while it is imported (on CPUs with
AVX512-BF16); minicpmv/offline.py imports it without that. Each check runs in a fresh interpreter that refuses
every name lookup and every network connection before anything else is imported (bitsandbytes and
huggingface_hub keep module-level state, and the tests' own process has imported them long ago), then records
what was attempted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from minicpmv.offline import BNB_HUB_KERNEL, _module_hidden, hub_kernel_allowed

GUARD = textwrap.dedent("""
    import json, socket, sys

    attempts = []

    def _refusing(what, original=None):
        def refuse(*args, **kwargs):
            if original is not None and args[0].family == socket.AF_UNIX:
                return original(*args, **kwargs)  # local sockets are no network
            attempts.append(f"{what} {args[1:2] if original is not None else args[:1]!r}")
            raise OSError(f"no network in this test: {what}")
        return refuse

    for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_connection"):
        setattr(socket, _name, _refusing(_name))
    socket.socket.connect = _refusing("connect", socket.socket.connect)
    socket.socket.connect_ex = _refusing("connect_ex", socket.socket.connect_ex)

    def report(**extra):
        print("RESULT " + json.dumps(dict(attempts=attempts, **extra)))
""")

ENGINE = GUARD + textwrap.dedent("""
    from minicpmv.engine.engine import Engine, EngineConfig
    from minicpmv.engine.request import GenerationRequest
    from minicpmv.engine.sampling_params import SamplingParams

    engine = Engine.from_pretrained(sys.argv[1], config=EngineConfig(num_kv_blocks=8, max_num_seqs=1))
    try:
        request = GenerationRequest(request_id="r", messages=[{"role": "user", "content": "Hello"}],
                                    sampling=SamplingParams(temperature=0, max_tokens=1))
        tokens = engine.generate(request).choices[0].token_ids
    finally:
        engine.shutdown()
    import bitsandbytes
    four_bit = sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in engine.model.modules())
    report(tokens=tokens, four_bit=four_bit)
""")

PLAIN_IMPORT = GUARD + textwrap.dedent("""
    import bitsandbytes.functional

    report(avx512bf16=bool(bitsandbytes.functional.has_avx512bf16()))
""")

OFFLINE_IMPORT = GUARD + textwrap.dedent("""
    import huggingface_hub.constants, kernels  # as transformers has them imported before bitsandbytes

    from minicpmv.offline import import_bitsandbytes

    import_bitsandbytes()
    report(kernels_back=sys.modules.get("kernels") is kernels, offline_after=huggingface_hub.constants.HF_HUB_OFFLINE)
""")


def run_guarded(script: str, *args: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LOCAL_KERNELS"))}
    environ.update(env)
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600,
                            env=environ, check=False)  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_a_4bit_engine_loads_and_generates_without_the_network(tiny_int4):
    result = run_guarded(ENGINE, str(tiny_int4))
    assert result["four_bit"] > 0 and len(result["tokens"]) == 1
    assert result["attempts"] == []


def test_plain_bitsandbytes_asks_the_hub_which_the_guard_catches():
    """What the engine avoids, shown with the same guard: a plain ``import bitsandbytes`` looks the Hub up."""
    result = run_guarded(PLAIN_IMPORT)
    if not result["avx512bf16"]:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not look for its Hub kernel here")
    if not result["attempts"]:
        pytest.skip("this bitsandbytes no longer asks the Hub when imported: nothing to show")
    assert any("huggingface.co" in attempt for attempt in result["attempts"]), result["attempts"]


def test_local_kernels_naming_the_hub_kernel_still_makes_no_request(tmp_path):
    """The operator's own build (LOCAL_KERNELS) may be loaded, but nothing is looked up (here the build is
    missing, so bitsandbytes falls back to its own kernels); huggingface_hub's offline flag is restored."""
    result = run_guarded(OFFLINE_IMPORT, LOCAL_KERNELS=f"{BNB_HUB_KERNEL}={tmp_path / 'missing'}")
    assert result == {"attempts": [], "kernels_back": True, "offline_after": False}


def test_without_local_kernels_kernels_is_hidden_during_the_import_only():
    result = run_guarded(OFFLINE_IMPORT)
    assert result == {"attempts": [], "kernels_back": True, "offline_after": False}


def test_hub_kernel_allowed_only_for_its_own_entry():
    assert hub_kernel_allowed({"LOCAL_KERNELS": f"{BNB_HUB_KERNEL}=/opt/k"})
    assert hub_kernel_allowed({"LOCAL_KERNELS": f"kernels-community/relu=/a:{BNB_HUB_KERNEL}=/opt/k"})
    assert not hub_kernel_allowed({"LOCAL_KERNELS": "kernels-community/relu=/a"})
    assert not hub_kernel_allowed({})


def test_a_hidden_module_comes_back():
    saved = sys.modules.get("json")
    with _module_hidden("json"), pytest.raises(ImportError):
        import json as _  # noqa: F401
    assert sys.modules["json"] is saved
    with _module_hidden("minicpmv_no_such_module"):
        pass
    assert "minicpmv_no_such_module" not in sys.modules
