"""docker/: what can be checked without a Docker engine. Pinned base images, COPY sources that exist and are
not excluded by .dockerignore, a compose file wired as documented, and the triton entry point's logic run on
this machine (weights step, then the launcher)."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.frontend"]
COMPOSE = DOCKER / "docker-compose.yml"
ENTRYPOINT = DOCKER / "triton-entrypoint.sh"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for keyword, args in instructions(dockerfile):
        if keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources += words[:-1]
    return sources


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_is_pinned(dockerfile):
    images = [args.split()[0] for keyword, args in instructions(dockerfile) if keyword == "FROM"]
    assert images, "no FROM"
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "$" not in image, f"unpinned base image {image}"
    if dockerfile.name == "Dockerfile":
        assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", images[0])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_are_in_the_build_context(dockerfile):
    sources = copy_sources(dockerfile)
    assert sources
    patterns = dockerignore_patterns()
    for source in sources:
        assert list(ROOT.glob(source)), f"{dockerfile.name} copies {source}, which does not exist"
        for pattern in patterns:
            excluded = fnmatch.fnmatch(source, pattern) or source.startswith(pattern.rstrip("/") + "/")
            assert not excluded, f"{source} is excluded from the build context by .dockerignore ({pattern})"


def test_frontend_image_has_no_engine():
    sources = copy_sources(DOCKER / "Dockerfile.frontend")
    assert "openai_frontend" in sources and "requirements-frontend.txt" in sources
    assert not any(s.startswith(("minicpmv", "model_repository", "requirements.txt")) for s in sources)
    text = (DOCKER / "Dockerfile.frontend").read_text()
    assert "torch" not in text.replace("no torch", "")
    assert '"-m", "openai_frontend"' in text


def test_triton_image_runs_the_entrypoint_it_copies():
    steps = instructions(DOCKER / "Dockerfile")
    entrypoint = [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entrypoint == ['["/opt/minicpmv/docker/triton-entrypoint.sh"]']
    assert "docker/triton-entrypoint.sh" in copy_sources(DOCKER / "Dockerfile")
    assert any(keyword == "WORKDIR" and args == "/opt/minicpmv" for keyword, args in steps)
    assert os.access(ENTRYPOINT, os.X_OK)
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)


# --- compose ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_are_wired(compose):
    triton, frontend = compose["services"]["triton"], compose["services"]["frontend"]
    for service in (triton, frontend):
        assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v.endswith(":/root/.cache/huggingface") for v in triton["volumes"])
    assert "minicpm_v_2_6_int4" in triton["environment"]["MINICPMV_MODELS"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert {"8000:8000", "8001:8001", "8002:8002"} <= set(triton["ports"])

    assert frontend["depends_on"]["triton"]["condition"] == "service_healthy"
    assert frontend["environment"]["MINICPMV_FRONTEND_TRITON_GRPC_URL"] == "triton:8001"
    assert frontend["environment"]["MINICPMV_FRONTEND_TRITON_HTTP_URL"] == "triton:8000"
    assert "9000:9000" in frontend["ports"]
    assert "/health/ready" in " ".join(frontend["healthcheck"]["test"])
    named = {v.split(":")[0] for v in triton["volumes"] if not v.lstrip().startswith(("/", "."))}
    assert named <= set(compose["volumes"])


def test_compose_frontend_settings_exist(compose):
    settings = pytest.importorskip("openai_frontend.settings")
    fields = set(settings.Settings.model_fields)
    for name in compose["services"]["frontend"]["environment"]:
        assert name.startswith(settings.ENV_PREFIX)
        assert name.removeprefix(settings.ENV_PREFIX).lower() in fields, f"{name} is not a frontend setting"


def test_compose_without_yaml_text_checks():
    text = COMPOSE.read_text()
    for needle in ("capabilities: [gpu]", "/root/.cache/huggingface", "condition: service_healthy", "triton:8001"):
        assert needle in text


# --- the entry point, run here ------------------------------------------------------------------------


def run_entrypoint(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MINICPMV_"))}
    base.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # its python3
        MINICPMV_HOME=str(ROOT),
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT="http://127.0.0.1:9",
        **env,
    )
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args], env=base, capture_output=True, text=True, timeout=120, check=False
    )


def test_entrypoint_rejects_unknown_models(tmp_path):
    result = run_entrypoint(tmp_path, MINICPMV_MODELS="llava")
    assert result.returncode == 2 and "unknown model 'llava'" in result.stderr


def test_entrypoint_without_weights_fails_with_advice(tmp_path):
    result = run_entrypoint(tmp_path, MINICPMV_MODELS="minicpm_v_2_6_int4")
    assert result.returncode == 1 and "could not be reached" in result.stderr and "--demo" in result.stderr


def test_entrypoint_checks_a_mounted_checkpoint_then_starts_the_launcher(tmp_path, tiny_int4):
    # A missing model repository makes the launcher stop at once (status 2), after the weights step.
    result = run_entrypoint(
        tmp_path,
        "--model-repository", str(tmp_path / "no-repository"),
        MINICPMV_MODELS="minicpm_v_2_6_int4",
        MINICPMV_CHECKPOINT_MINICPM_V_2_6_INT4=str(tiny_int4),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "model repository not found" in result.stderr
