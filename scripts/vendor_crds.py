#!/usr/bin/env python3
"""Vendor the OpenAPI schemas of the CRDs that deploy/kubernetes/inference-gateway/ uses, for the test suite.

For each CRD below: read the CRD manifest from a local git clone of its repository at a pinned release tag,
take the ``openAPIV3Schema`` of the named version (which must be served), drop the ``description`` strings
(documentation only; they are most of the bytes) and write it as JSON under tests/fixtures/crds/, with a
``source`` header naming the repository, the tag, the commit the tag points at, the file and the CRD. The
generated JSON is committed: tests/unit/test_deploy_gateway.py validates the InferencePool and the HTTPRoute
against it without network access or the clones.

  python scripts/vendor_crds.py                  # rewrite the fixtures
  python scripts/vendor_crds.py --check          # exit 1 if a committed fixture differs from its source

The clones are looked up as <mirror root>/<owner>+<name>/repo (--mirror-root, default $MIRROR_ROOT or
/work/.mirror), or given one by one: --repo kubernetes-sigs/gateway-api=/path/to/clone. Any clone with the
pinned tags will do (git clone --filter=blob:none https://github.com/OWNER/NAME). To move a pin, edit CRDS and
run the script again; the tests read the pins from the fixtures' headers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "crds"

# (fixture file, repository, tag, path of the CRD in the repository, version of the CRD whose schema we take)
CRDS = [
    ("inferencepool-v1.json", "kubernetes-sigs/gateway-api-inference-extension", "v1.6.0",
     "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml", "v1"),
    # The newest Gateway API release in the snapshot, and an older one still common in clusters (the HTTPRoute
    # must be accepted by both).
    ("httproute-v1.json", "kubernetes-sigs/gateway-api", "v1.6.1",
     "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml", "v1"),
    ("httproute-v1-gateway-api-v1.3.0.json", "kubernetes-sigs/gateway-api", "v1.3.0",
     "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml", "v1"),
]  # fmt: skip


def git(clone: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(clone), *args], capture_output=True, text=True, check=True).stdout


def without_descriptions(node: Any) -> Any:
    """The schema without its documentation strings. A *property* called "description" is a schema (a dict),
    never a string, so it stays."""
    if isinstance(node, dict):
        return {k: without_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def vendored(clone: Path, repo: str, tag: str, path: str, version: str) -> dict:
    commit = git(clone, "rev-parse", f"{tag}^{{commit}}").strip()
    crd = yaml.safe_load(git(clone, "show", f"{commit}:{path}"))
    assert crd["kind"] == "CustomResourceDefinition", path
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served["served"], f"{crd['metadata']['name']} {version} is not served at {repo} {tag}"
    annotations = crd["metadata"].get("annotations", {})
    return {
        "source": {
            "repo": f"https://github.com/{repo}", "tag": tag, "commit": commit, "path": path,
            "crd": crd["metadata"]["name"], "group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"],
            "version": version, "storage": served.get("storage", False),
            "bundle_version": next((v for k, v in annotations.items() if k.endswith("/bundle-version")), None),
            "channel": next((v for k, v in annotations.items() if k.endswith("/channel")), None),
            "generated_by": "scripts/vendor_crds.py (descriptions removed)",
        },
        "schema": without_descriptions(served["schema"]["openAPIV3Schema"]),
    }  # fmt: skip


def dump(doc: dict) -> str:
    return json.dumps(doc, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror-root", type=Path, default=Path(os.environ.get("MIRROR_ROOT", "/work/.mirror")))
    parser.add_argument("--repo", action="append", default=[], metavar="OWNER/NAME=PATH", help="a clone to use")
    parser.add_argument("--check", action="store_true", help="compare with the committed fixtures, write nothing")
    args = parser.parse_args(argv)
    clones = dict(item.split("=", 1) for item in args.repo)
    stale = []
    for name, repo, tag, path, version in CRDS:
        clone = Path(clones.get(repo) or args.mirror_root / repo.replace("/", "+") / "repo")
        text = dump(vendored(clone, repo, tag, path, version))
        target = OUT / name
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(name)
            continue
        OUT.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"{target.relative_to(ROOT)}: {repo} {tag}", file=sys.stderr)
    if stale:
        print(f"out of date: {', '.join(stale)} (run scripts/vendor_crds.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
