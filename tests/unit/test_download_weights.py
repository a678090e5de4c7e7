"""scripts/download_weights.py: the checkpoint check on tiny checkpoints and broken copies of them, and the
command line without Hub access (the endpoint is a closed loopback port; nothing reaches the internet)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "download_weights.py"
CLOSED_ENDPOINT = "http://127.0.0.1:9"  # discard port, nothing listens: connections are refused at once
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def _load_script():
    spec = importlib.util.spec_from_file_location("download_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


dw = _load_script()


def linked_copy(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    """``target`` with symlinks to the files of ``source`` (except ``skip``): a cheap copy to break."""
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.name not in skip:
            (target / file.name).symlink_to(file)
    return target


def with_config(source: Path, target: Path, **changes) -> Path:
    """A linked copy of ``source`` whose config.json has ``changes`` applied (None deletes a key)."""
    linked_copy(source, target, skip=("config.json",))
    config = json.loads((source / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


def run_script(*args: str, hf_home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES and not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=CLOSED_ENDPOINT, HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("TRANSFORMERS_OFFLINE", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# --- the check ----------------------------------------------------------------------------------------


def test_tiny_full_checkpoint_passes(tiny_full):
    summary = dw.check_checkpoint(tiny_full, "full")
    assert (summary.kind, summary.path) == ("full", tiny_full)
    assert summary.num_tensors > 50 and summary.num_bytes > 0


def test_tiny_int4_checkpoint_passes(tiny_int4):
    assert dw.check_checkpoint(tiny_int4, "int4").kind == "int4"
    assert dw.check_checkpoint(tiny_int4).kind == "int4"  # no expectation: whichever it is


def test_full_checkpoint_is_not_taken_for_int4(tiny_full):
    with pytest.raises(dw.CheckpointCheckError, match="is a full checkpoint.*expected int4"):
        dw.check_checkpoint(tiny_full, "int4")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "qwen2"}, "model_type is 'qwen2', expected 'minicpmv'"),
        ({"version": 2.5}, "version is 2.5, expected 2.6"),
        ({"vision_config": None}, "no vision_config"),
        ({"query_num": 96}, "query_num is 96; MiniCPM-V 2.6 uses 64"),
        ({"num_hidden_layers": 3}, "missing from the weights, e.g. llm.model.layers.2"),
        (
            {"hidden_size": 384},
            r"llm.model.embed_tokens.weight has shape \[151666, 256\], config.json implies \[151666, 384\]",
        ),
    ],
)
def test_not_minicpm_v_2_6_is_rejected(tiny_full, tmp_path, changes, message):
    directory = with_config(tiny_full, tmp_path / "ckpt", **changes)
    with pytest.raises(dw.CheckpointCheckError, match=message):
        dw.check_checkpoint(directory)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(dw.CheckpointCheckError, match="no config.json"):
        dw.check_checkpoint(tmp_path)


def test_missing_path_is_rejected(tmp_path):
    with pytest.raises(dw.CheckpointCheckError, match="is not a directory"):
        dw.check_checkpoint(tmp_path / "nope")


def test_checkpoint_without_weights_is_rejected(tiny_full, tmp_path):
    weights = [f.name for f in tiny_full.iterdir() if f.name.startswith("model")]
    directory = linked_copy(tiny_full, tmp_path / "ckpt", skip=tuple(weights))
    with pytest.raises(dw.CheckpointCheckError, match=r"no \*.safetensors weight files"):
        dw.check_checkpoint(directory)


def test_missing_shard_is_rejected(tiny_int4, tmp_path):
    directory = linked_copy(tiny_int4, tmp_path / "ckpt", skip=("model-00002-of-00002.safetensors",))
    with pytest.raises(dw.CheckpointCheckError, match="missing: model-00002-of-00002.safetensors"):
        dw.check_checkpoint(directory)


def test_int4_config_over_full_weights_is_rejected(tiny_full, tiny_int4, tmp_path):
    directory = linked_copy(tiny_full, tmp_path / "ckpt", skip=("config.json",))
    (directory / "config.json").symlink_to(tiny_int4 / "config.json")
    with pytest.raises(dw.CheckpointCheckError, match="hold no bitsandbytes nf4 state"):
        dw.check_checkpoint(directory)


def test_missing_tokenizer_is_rejected(tiny_full, tmp_path):
    skip = ("tokenizer.json", "vocab.json", "merges.txt")
    directory = linked_copy(tiny_full, tmp_path / "ckpt", skip=skip)
    with pytest.raises(dw.CheckpointCheckError, match="tokenizer files are missing"):
        dw.check_checkpoint(directory)


def test_truncated_shard_is_detected(tmp_path):
    shard = tmp_path / "model.safetensors"
    save_file({"a": np.arange(1000, dtype=np.float32)}, str(shard))
    assert list(dw.read_safetensors_header(shard)["a"]["shape"]) == [1000]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(dw.CheckpointCheckError, match="download is incomplete"):
        dw.read_safetensors_header(shard)
    shard.write_bytes(b"\x00" * 4)
    with pytest.raises(dw.CheckpointCheckError, match="too short"):
        dw.read_safetensors_header(shard)


# --- the command line ---------------------------------------------------------------------------------


def test_help(tmp_path):
    result = run_script("--help", hf_home=tmp_path)
    assert result.returncode == 0
    assert "--model" in result.stdout and "--check-only" in result.stdout and "--local-dir" in result.stdout


@pytest.mark.parametrize("args", [["--model", "big"], ["--check-only", "x", "--model", "both"], ["--repo-id", "a/b"]])
def test_usage_errors_exit_2(tmp_path, args):
    assert run_script(*args, hf_home=tmp_path).returncode == 2


def test_check_only_prints_the_path(tiny_int4, tmp_path):
    result = run_script("--check-only", str(tiny_int4), hf_home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tiny_int4.resolve())
    assert "int4 checkpoint" in result.stderr


def test_check_only_fails_on_another_model(tiny_full, tmp_path):
    directory = with_config(tiny_full, tmp_path / "ckpt", model_type="llama")
    result = run_script("--check-only", str(directory), hf_home=tmp_path / "hf")
    assert result.returncode == 1 and result.stdout == ""
    assert "not a MiniCPM-V 2.6 checkpoint" in result.stderr


def test_without_hub_access_fails_fast_and_says_what_to_do(tmp_path):
    result = run_script("--model", "both", hf_home=tmp_path, timeout=60)  # "fast": endless retries time out
    assert result.returncode == 1 and result.stdout == ""
    assert "could not be reached" in result.stderr and "openbmb/MiniCPM-V-2_6" in result.stderr
    # The full model comes first and fails first; the advice names its own flag and variable.
    for advice in ("--demo", "--checkpoint-full", "MINICPMV_CHECKPOINT_MINICPM_V_2_6=", "HF_ENDPOINT"):
        assert advice in result.stderr
    assert "Traceback" not in result.stderr


def test_without_hub_access_a_cached_copy_is_used_and_checked(tiny_int4, tmp_path):
    # The huggingface_hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/<files>}.
    repo = tmp_path / "hub" / "models--openbmb--MiniCPM-V-2_6-int4"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = linked_copy(tiny_int4, repo / "snapshots" / COMMIT)
    result = run_script("--model", "int4", hf_home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(snapshot.resolve())
    assert "could not be reached" in result.stderr and "int4 checkpoint" in result.stderr
