"""deploy/kubernetes: rendered as kustomize renders it, every built-in object checked against the Kubernetes JSON
schemas (kubernetes-validate, strict: unknown fields fail), the Prometheus Operator objects against a schema of
the fields we use, the objects' references to each other, and every metric the autoscaler and the Grafana
dashboard use against the metrics our code (and the tritonserver we run) really exports."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from openai_frontend.metrics import Metrics
from openai_frontend.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes"
DASHBOARD = BASE / "grafana" / "minicpmv-dashboard.json"
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())  # autoscaling/v2 and the rest: GA since 1.23
METRIC_NAME = re.compile(r"\b((?:minicpmv|nv)_[a-z0-9_]+)\b")


# --- rendering -------------------------------------------------------------------------------------------


def render(base: Path = BASE) -> list[dict]:
    """What ``kubectl kustomize base`` prints, for the kustomize features the base uses (checked here)."""
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "configMapGenerator"}, (
        "kustomization.yaml uses a feature this renderer does not know: teach render() first"
    )
    objects = [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((base / name).read_text())]
    for generator in kustomization.get("configMapGenerator", []):
        assert set(generator) <= {"name", "files", "options"} and set(generator["options"]) <= {
            "disableNameSuffixHash", "labels"}  # fmt: skip
        assert generator["options"]["disableNameSuffixHash"] is True  # else kustomize appends a content hash
        objects.append({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": generator["name"], "labels": generator["options"].get("labels", {})},
            "data": {Path(f).name: (base / f).read_text() for f in generator["files"]},
        })  # fmt: skip
    return objects


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render()


def test_the_base_renders_the_objects_it_promises(objects):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == sorted([
        ("PersistentVolumeClaim", "minicpmv-hf-cache"), ("Deployment", "minicpmv-triton"),
        ("Service", "minicpmv-triton"), ("HorizontalPodAutoscaler", "minicpmv-triton"),
        ("Deployment", "minicpmv-frontend"), ("Service", "minicpmv-frontend"),
        ("ServiceMonitor", "minicpmv-triton"), ("ServiceMonitor", "minicpmv-frontend"),
        ("ConfigMap", "minicpmv-grafana-dashboard"),
    ])  # fmt: skip


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_our_rendering_is_what_kubectl_kustomize_renders(objects):
    out = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=120, check=True)
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out.stdout)}
    assert theirs == {(o["kind"], o["metadata"]["name"]): o for o in objects}


# --- schemas ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_builtin_object_follows_the_kubernetes_schema(objects, version):
    builtin = [o for o in objects if o["apiVersion"] != "monitoring.coreos.com/v1"]
    assert len(builtin) == 7
    for obj in builtin:
        kubernetes_validate.validate(obj, version, strict=True)  # raises with the path of the first error


def test_the_schema_check_catches_a_mistake(objects):
    broken = json.loads(json.dumps(by_kind(objects, "Deployment")["minicpmv-triton"]))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/v2/health/live"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


# The fields of monitoring.coreos.com/v1 ServiceMonitor that we use, as the Prometheus Operator's API reference
# describes them; anything else is refused, so that a typo does not pass unnoticed.
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "additionalProperties": False,
                     "properties": {"name": {"type": "string"}, "labels": _STRINGS}},
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"], "additionalProperties": False,
                             "properties": {"matchLabels": _STRINGS}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}},
            },
        },
    },
}  # fmt: skip


def test_servicemonitors_follow_their_schema_and_find_a_metrics_port(objects):
    services = by_kind(objects, "Service")
    monitors = by_kind(objects, "ServiceMonitor")
    assert monitors
    for monitor in monitors.values():
        jsonschema.validate(monitor, SERVICE_MONITOR)
        selector = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [s for s in services.values() if selector.items() <= s["metadata"]["labels"].items()]
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**monitor, "spec": {**monitor["spec"], "endpoint": []}}, SERVICE_MONITOR)


# --- references between the objects and to our code ------------------------------------------------------


def containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def test_services_select_their_deployments_and_name_real_ports(objects):
    deployments = by_kind(objects, "Deployment")
    for service in by_kind(objects, "Service").values():
        selected = [d for d in deployments.values()
                    if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in containers(selected[0]) for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    for deployment in deployments.values():
        assert deployment["spec"]["selector"]["matchLabels"].items() <= \
            deployment["spec"]["template"]["metadata"]["labels"].items()  # fmt: skip


def test_triton_runs_on_a_gpu_with_the_cache_volume_and_health_probes(objects):
    deployment = by_kind(objects, "Deployment")["minicpmv-triton"]
    (container,) = containers(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}  # tritonserver's defaults, as launch_triton uses
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["startupProbe"]["path"] == probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert all(probe["port"] == "http" for probe in probes.values())
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["hf-cache"] == env["HF_HOME"]  # the weights land on the volume
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hf-cache"]["persistentVolumeClaim"]["claimName"] in by_kind(objects, "PersistentVolumeClaim")
    assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    for model in env["MINICPMV_MODELS"].split(","):  # docker/triton-entrypoint.sh reads it
        assert (ROOT / "model_repository" / model / "config.pbtxt").is_file()


def test_the_frontend_is_configured_with_real_settings_and_triton_s_service(objects):
    (container,) = containers(by_kind(objects, "Deployment")["minicpmv-frontend"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name in env:
        assert name.removeprefix("MINICPMV_FRONTEND_").lower() in Settings.model_fields, name
    triton = {p["name"]: p["port"] for p in by_kind(objects, "Service")["minicpmv-triton"]["spec"]["ports"]}
    assert env["MINICPMV_FRONTEND_TRITON_GRPC_URL"] == f"minicpmv-triton:{triton['grpc']}"
    assert env["MINICPMV_FRONTEND_TRITON_HTTP_URL"] == f"minicpmv-triton:{triton['http']}"
    routes = (ROOT / "openai_frontend" / "routers" / "health.py").read_text()
    for probe in ("readinessProbe", "livenessProbe"):
        assert f'@router.get("{container[probe]["httpGet"]["path"]}"' in routes


# --- metrics ---------------------------------------------------------------------------------------------


def frontend_metric_names() -> set[str]:
    """What the frontend's /metrics exposes, from its registry (Counter x -> x_total, Histogram -> buckets)."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    return {family.name + s for family in Metrics().registry.collect() for s in suffixes[family.type]}


def backend_metric_names() -> set[str]:
    """The families of ``_Metrics.FAMILIES`` in minicpmv_triton/backend.py (Triton exports them as named)."""
    tree = ast.parse((ROOT / "minicpmv_triton" / "backend.py").read_text())
    (metrics,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "_Metrics"]
    targets = {n: n.targets if isinstance(n, ast.Assign) else [n.target]
               for n in metrics.body if isinstance(n, ast.Assign | ast.AnnAssign)}  # fmt: skip
    (families,) = [n.value for n, names in targets.items() if any(getattr(t, "id", "") == "FAMILIES" for t in names)]
    return {entry.elts[0].value for entry in families.elts}


def triton_exports(name: str) -> bool:
    """Whether the tritonserver library we run (the nvidia-pytriton wheel's) holds the metric name ``name``."""
    libraries = list((ROOT / ".venv").glob("lib/python*/site-packages/nvidia_pytriton.libs/libtritonserver*.so*"))
    if not libraries:
        import site

        libraries = [p for d in site.getsitepackages() for p in Path(d).glob("nvidia_pytriton.libs/libtritonserver*")]
    assert libraries, "libtritonserver not found (requirements-triton.txt installs nvidia-pytriton)"
    return re.search(re.escape(name).encode() + rb"(?![a-z0-9_])", libraries[0].read_bytes()) is not None


@pytest.fixture(scope="module")
def exported() -> set[str]:
    names = frontend_metric_names() | backend_metric_names()
    assert {"minicpmv_frontend_requests_total", "minicpmv_waiting_requests"} <= names  # the readers still work
    return names


def assert_exported(names: set[str], exported: set[str]) -> None:
    ours = {n for n in names if n.startswith("minicpmv_")}
    assert ours <= exported, f"not exported by our code: {sorted(ours - exported)}"
    missing = [n for n in names - ours if not triton_exports(n)]
    assert not missing, f"not a tritonserver metric: {missing}"


def test_the_autoscaler_scales_triton_on_exported_queue_metrics_the_adapter_publishes(objects, exported):
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["minicpmv-triton"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "minicpmv-triton")
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert names == {"minicpmv_waiting_requests", "nv_inference_pending_request_count"}
    assert_exported(names, exported)
    adapter = yaml.safe_load((BASE / "prometheus-adapter-values.yaml").read_text())
    published = {}
    for rule in adapter["rules"]["custom"]:
        (series,) = METRIC_NAME.findall(rule["seriesQuery"])
        assert re.fullmatch(rule["name"]["matches"], series)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # per-pod values for a Pods metric
        published[rule["name"]["as"]] = series
    assert names <= set(published) and all(published[n] == n for n in names)


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return queries


def test_the_dashboard_uses_only_metrics_that_are_exported(objects, exported):
    dashboard = json.loads(DASHBOARD.read_text())
    configmap = by_kind(objects, "ConfigMap")["minicpmv-grafana-dashboard"]
    assert json.loads(configmap["data"][DASHBOARD.name]) == dashboard
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert graphs and all(p["targets"] and p["gridPos"]["w"] <= 24 for p in graphs)
    used = set()
    for query in dashboard_queries(dashboard):
        names = set(METRIC_NAME.findall(query))
        assert names, f"a query without any of our metrics: {query}"
        used |= names
    assert_exported(used, exported)
    # Each of the three sources is on the dashboard.
    assert any(n.startswith("minicpmv_frontend_") for n in used)
    assert used & backend_metric_names()
    assert any(n.startswith("nv_") for n in used)


def test_a_renamed_metric_fails_the_check(exported):
    with pytest.raises(AssertionError, match="minicpmv_frontend_request_total"):
        assert_exported({"minicpmv_frontend_request_total"}, exported)  # _requests_ renamed
    with pytest.raises(AssertionError, match="nv_inference_pending_requests"):
        assert_exported({"nv_inference_pending_requests"}, exported)
