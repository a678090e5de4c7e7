"""resolve_checkpoint: local directories as they are, Hub ids through the real snapshot_download, no network.

huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT into ``huggingface_hub.constants`` when it is
imported, so the tests set both the environment variables and the constants. The Hub endpoint is
always a closed port on the loopback interface: nothing here can reach the internet.
"""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from minicpmv.weights import KNOWN_REPOS, WeightsUnavailableError, resolve_checkpoint

REPO_ID = KNOWN_REPOS["full"]  # openbmb/MiniCPM-V-2_6
CLOSED_ENDPOINT = "http://127.0.0.1:9"  # discard port, nothing listens: connections are refused at once
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HINT = "Pass a local checkpoint directory instead"  # the "what to do" part of every Hub failure
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def no_hub(monkeypatch):
    """Local paths must never reach huggingface_hub."""

    def fail(*args, **kwargs):
        raise AssertionError(f"snapshot_download called for a local path: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)


def _closed_endpoint(monkeypatch, offline: bool) -> None:
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_ENDPOINT)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_ENDPOINT)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def offline(monkeypatch):
    _closed_endpoint(monkeypatch, offline=True)


@pytest.fixture
def unreachable(monkeypatch):
    """Online mode, but the Hub endpoint refuses connections."""
    _closed_endpoint(monkeypatch, offline=False)


@pytest.fixture
def listening_hub(monkeypatch):
    """A loopback socket standing in for the Hub endpoint (it never answers): accept() shows whether anyone
    tried to connect."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        yield server


def cached_snapshot(cache_dir: Path, repo_id: str = REPO_ID) -> Path:
    """The huggingface_hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "minicpmv"}')
    return snapshot


# --- local paths -----------------------------------------------------------------------------------


def test_checkpoint_directory_is_returned_unchanged(no_hub, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_checkpoint(tmp_path) == tmp_path
    assert resolve_checkpoint(str(tmp_path)) == tmp_path


def test_directory_without_config_is_not_a_checkpoint(no_hub, tmp_path):
    with pytest.raises(WeightsUnavailableError, match="holds no config.json"):
        resolve_checkpoint(tmp_path)


@pytest.mark.parametrize("path", ["./nope/ckpt", "/tmp/does/not/exist", "nope"])
def test_missing_local_path_does_not_exist(no_hub, path):
    with pytest.raises(WeightsUnavailableError, match="does not exist") as info:
        resolve_checkpoint(path)
    assert path in str(info.value)


# --- Hub ids, no network ---------------------------------------------------------------------------


@pytest.mark.timeout(60)  # "fails fast": a hang on the network would run into this
def test_offline_with_empty_cache_fails_without_the_network_and_says_what_to_do(offline, listening_hub, tmp_path):
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_checkpoint(REPO_ID, cache_dir=tmp_path)
    with pytest.raises(BlockingIOError):  # offline means no connection was even tried
        listening_hub.accept()
    message = str(info.value)
    assert REPO_ID in message and "not in the local cache" in message
    assert "HF_HUB_OFFLINE" in message and HINT in message


def test_offline_finds_the_cached_snapshot(offline, tmp_path):
    snapshot = cached_snapshot(tmp_path)
    assert resolve_checkpoint(REPO_ID, cache_dir=tmp_path) == snapshot


def test_offline_cached_snapshot_without_config_is_rejected(offline, tmp_path):
    (cached_snapshot(tmp_path) / "config.json").unlink()
    with pytest.raises(WeightsUnavailableError, match="holds no config.json"):
        resolve_checkpoint(REPO_ID, cache_dir=tmp_path)


def test_offline_other_repository_is_not_taken_from_the_cache(offline, tmp_path):
    cached_snapshot(tmp_path)
    with pytest.raises(WeightsUnavailableError, match="not in the local cache"):
        resolve_checkpoint(KNOWN_REPOS["int4"], cache_dir=tmp_path)


def test_local_files_only_with_empty_cache(unreachable, tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not in the local cache") as info:
        resolve_checkpoint(REPO_ID, cache_dir=tmp_path, local_files_only=True)
    assert HINT in str(info.value)


def test_local_files_only_finds_the_cached_snapshot(unreachable, tmp_path):
    snapshot = cached_snapshot(tmp_path)
    assert resolve_checkpoint(REPO_ID, cache_dir=tmp_path, local_files_only=True) == snapshot


def test_local_files_only_message_does_not_blame_hf_hub_offline(unreachable, tmp_path):
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_checkpoint(REPO_ID, cache_dir=tmp_path, local_files_only=True)
    assert "HF_HUB_OFFLINE is set" not in str(info.value)


@pytest.mark.timeout(60)  # "fails fast": endless retries would run into this
def test_unreachable_hub_fails_fast_and_says_what_to_do(unreachable, tmp_path):
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_checkpoint(REPO_ID, cache_dir=tmp_path)
    message = str(info.value)
    assert REPO_ID in message and "the Hub could not be reached" in message and HINT in message


def test_unreachable_hub_falls_back_to_the_cached_snapshot(unreachable, tmp_path):
    snapshot = cached_snapshot(tmp_path)
    assert resolve_checkpoint(REPO_ID, cache_dir=tmp_path) == snapshot
