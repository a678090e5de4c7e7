"""deploy/kubernetes/inference-gateway: the overlay for a Gateway API Inference Extension gateway, rendered as
kustomize renders it. The built-in objects are checked against the Kubernetes schemas (kubernetes-validate,
strict), the InferencePool and the HTTPRoute against their CRDs' schemas vendored from the upstream releases
(tests/fixtures/crds/, scripts/vendor_crds.py) made strict, the Endpoint Picker's configuration against the
schema, plugin types and plugin parameters of the EPP release we deploy (llm-d-inference-scheduler v0.8.0, which
runs gateway-api-inference-extension v1.5.0's EPP), and the references between all of them and to our code:
above all, that the EPP reads exactly the model server protocol metrics that openai_frontend/metrics.py exports."""

from __future__ import annotations

import ast
import copy
import json
import re
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from openai_frontend.backend import EngineStats
from openai_frontend.metrics import ProtocolCollector
from openai_frontend.settings import Settings
from tests.unit.test_deploy import BASE, KUBERNETES_VERSIONS, ROOT, by_kind, containers, render

OVERLAY = BASE / "inference-gateway"
CRDS = ROOT / "tests" / "fixtures" / "crds"
METRICS_SOURCE = ROOT / "openai_frontend" / "metrics.py"
POOL_GROUP = "inference.networking.k8s.io"
EPP_IMAGE = "ghcr.io/llm-d/llm-d-inference-scheduler:v0.8.0"

# The model server protocol metrics the frontend exports (the contract with the engineer who implements them in
# openai_frontend/metrics.py), by the engineConfigs field of the EPP's core-metrics-extractor that names each.
PROTOCOL_METRICS = {
    "queuedRequestsSpec": "minicpmv:num_requests_waiting",  # gauge
    "runningRequestsSpec": "minicpmv:num_requests_running",  # gauge
    "kvUsageSpec": "minicpmv:kv_cache_usage_perc",  # gauge, 0..1
    "cacheInfoSpec": "minicpmv:cache_config_info",  # info gauge: labels block_size, num_gpu_blocks
    "loraSpec": "minicpmv:lora_requests_info",  # gauge (timestamp): labels max_lora, running_/waiting_lora_adapters
}
# The labels the EPP reads from the LoRA info metric: fixed names (gateway-api-inference-extension v1.5.0,
# pkg/epp/framework/plugins/datalayer/extractor/metrics/extractor.go, LoraInfo*MetricName).
LORA_LABELS = {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}


# --- rendering -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render(OVERLAY)


def one(objects: list[dict], kind: str) -> dict:
    (obj,) = by_kind(objects, kind).values()
    return obj


@pytest.fixture(scope="module")
def epp_config(objects) -> dict:
    return yaml.safe_load(by_kind(objects, "ConfigMap")["minicpmv-epp-config"]["data"]["epp-config.yaml"])


def test_the_overlay_renders_the_objects_it_promises(objects):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == sorted([
        ("PersistentVolumeClaim", "minicpmv-hf-cache"), ("Deployment", "minicpmv-model-server"),
        ("InferencePool", "minicpmv"), ("ServiceAccount", "minicpmv-epp"), ("Role", "minicpmv-epp"),
        ("RoleBinding", "minicpmv-epp"), ("Deployment", "minicpmv-epp"), ("Service", "minicpmv-epp"),
        ("ConfigMap", "minicpmv-epp-config"), ("HTTPRoute", "minicpmv"),
    ])  # fmt: skip


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_our_rendering_is_what_kubectl_kustomize_renders(objects):
    out = subprocess.run(["kubectl", "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=120,
                         check=True)  # fmt: skip
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out.stdout)}
    assert theirs == {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_the_base_stays_as_it_was():
    """The overlay is a directory of its own: the base renders the same objects as before."""
    assert "inference-gateway" not in yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert len(render(BASE)) == 9


# --- built-in objects: the Kubernetes schemas ------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_builtin_object_follows_the_kubernetes_schema(objects, version):
    builtin = [o for o in objects if o["kind"] not in ("InferencePool", "HTTPRoute")]
    assert len(builtin) == 8
    for obj in builtin:
        kubernetes_validate.validate(obj, version, strict=True)


# --- custom resources: the vendored CRD schemas, strict --------------------------------------------------


def strict(schema: dict) -> dict:
    """A copy of a CRD schema in which every object that lists its ``properties`` refuses any other (as the API
    server does not: it prunes unknown fields silently), unless it says otherwise (``additionalProperties``,
    ``x-kubernetes-preserve-unknown-fields``). Walks the schema structurally, so that a *property* named like a
    keyword is not mistaken for one."""
    schema = copy.deepcopy(schema)

    def walk(node: dict) -> None:
        if "properties" in node:
            if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for child in node["properties"].values():
                walk(child)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key, []):
                walk(child)

    walk(schema)
    return schema


def vendored(name: str) -> dict:
    return json.loads((CRDS / name).read_text())


CRD_FIXTURES = {"InferencePool": ["inferencepool-v1.json"],
                "HTTPRoute": ["httproute-v1.json", "httproute-v1-gateway-api-v1.3.0.json"]}  # fmt: skip


def validator(schema: dict) -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 schemas, as CRDs carry them, follow JSON Schema draft 4's semantics.
    return jsonschema.Draft4Validator(schema)


@pytest.mark.parametrize("kind,fixture", [(k, f) for k, fs in CRD_FIXTURES.items() for f in fs])
def test_custom_resources_follow_their_vendored_crd_schema_strictly(objects, kind, fixture):
    crd = vendored(fixture)
    source = crd["source"]
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]) and re.fullmatch(r"v\d+\.\d+\.\d+", source["tag"])
    obj = one(objects, kind)
    assert (obj["apiVersion"], obj["kind"]) == (f"{source['group']}/{source['version']}", source["kind"])
    validator(strict(crd["schema"])).validate(obj)
    # ObjectMeta is not in a CRD's schema: only what we use.
    assert set(obj["metadata"]) <= {"name", "labels", "annotations"}


def test_the_pool_follows_the_crd_rules_the_schema_cannot_say(objects):
    """The InferencePool CRD's x-kubernetes-validations (CEL, not evaluated by jsonschema)."""
    spec = one(objects, "InferencePool")["spec"]
    numbers = [p["number"] for p in spec["targetPorts"]]
    assert len(numbers) == len(set(numbers))  # "port number must be unique"
    ref = spec["endpointPickerRef"]
    assert ref.get("kind", "Service") != "Service" or "port" in ref  # "port is required when kind is 'Service'"


def test_a_planted_typo_in_the_pool_fails_validation(objects):
    schema = vendored("inferencepool-v1.json")["schema"]
    pool = one(objects, "InferencePool")
    broken = copy.deepcopy(pool)
    broken["spec"]["targetPort"] = broken["spec"].pop("targetPorts")
    with pytest.raises(jsonschema.ValidationError, match="targetPort"):
        validator(strict(schema)).validate(broken)
    # A typo in an optional field: the upstream schema lets it through (the API server would drop the field and
    # default failureMode to FailClose); the strict one does not.
    typo = copy.deepcopy(pool)
    typo["spec"]["endpointPickerRef"]["failuremode"] = typo["spec"]["endpointPickerRef"].pop("failureMode")
    validator(schema).validate(typo)
    with pytest.raises(jsonschema.ValidationError, match="failuremode"):
        validator(strict(schema)).validate(typo)


def test_a_planted_typo_in_the_route_fails_validation(objects):
    route = copy.deepcopy(one(objects, "HTTPRoute"))
    route["spec"]["rules"][0]["backendRef"] = route["spec"]["rules"][0].pop("backendRefs")
    for fixture in CRD_FIXTURES["HTTPRoute"]:
        with pytest.raises(jsonschema.ValidationError, match="backendRef"):
            validator(strict(vendored(fixture)["schema"])).validate(route)


# --- references between the objects ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(objects) -> dict:
    return by_kind(objects, "Deployment")["minicpmv-model-server"]


@pytest.fixture(scope="module")
def epp(objects) -> dict:
    return by_kind(objects, "Deployment")["minicpmv-epp"]


def named(items: list[dict]) -> dict[str, dict]:
    return {item["name"]: item for item in items}


def test_each_pod_runs_triton_and_the_frontend_on_localhost(server):
    pod = server["spec"]["template"]["spec"]
    parts = named(containers(server))
    assert set(parts) == {"tritonserver", "frontend"}
    port_names = [p["name"] for c in pod["containers"] for p in c["ports"]]
    assert len(port_names) == len(set(port_names))  # unique in a pod (the API server refuses duplicates)
    triton = {p["name"]: p["containerPort"] for p in parts["tritonserver"]["ports"]}
    assert triton == {"triton-http": 8000, "triton-grpc": 8001, "triton-metrics": 8002}
    assert parts["tritonserver"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in parts["frontend"]["env"]}
    for name in env:
        assert name.removeprefix("MINICPMV_FRONTEND_").lower() in Settings.model_fields, name
    assert env["MINICPMV_FRONTEND_TRITON_GRPC_URL"] == f"127.0.0.1:{triton['triton-grpc']}"
    assert env["MINICPMV_FRONTEND_TRITON_HTTP_URL"] == f"127.0.0.1:{triton['triton-http']}"
    assert {p["name"]: p["containerPort"] for p in parts["frontend"]["ports"]} == {
        "http": int(env["MINICPMV_FRONTEND_PORT"])}  # fmt: skip
    routes = (ROOT / "openai_frontend" / "routers" / "health.py").read_text()
    for probe in ("readinessProbe", "livenessProbe"):
        assert f'@router.get("{parts["frontend"][probe]["httpGet"]["path"]}"' in routes
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])} <= volumes
    for model in next(e["value"] for e in parts["tritonserver"]["env"] if e["name"] == "MINICPMV_MODELS").split(","):
        assert (ROOT / "model_repository" / model / "config.pbtxt").is_file()


def test_the_containers_are_the_base_s_but_for_ports_and_triton_s_address(objects, server):
    """No drift from the base: the same Triton and frontend, only wired to each other inside the pod."""
    base = render(BASE)
    base_deployments = by_kind(base, "Deployment")
    (triton,) = copy.deepcopy(containers(base_deployments["minicpmv-triton"]))
    for port in triton["ports"]:
        port["name"] = f"triton-{port['name']}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        triton[probe]["httpGet"]["port"] = f"triton-{triton[probe]['httpGet']['port']}"
    (frontend,) = copy.deepcopy(containers(base_deployments["minicpmv-frontend"]))
    for e in frontend["env"]:
        if e["name"] in ("MINICPMV_FRONTEND_TRITON_GRPC_URL", "MINICPMV_FRONTEND_TRITON_HTTP_URL"):
            e["value"] = "127.0.0.1:" + e["value"].rsplit(":", 1)[1]
    assert named(containers(server)) == {"tritonserver": triton, "frontend": frontend}
    base_pod = base_deployments["minicpmv-triton"]["spec"]["template"]["spec"]
    pod = server["spec"]["template"]["spec"]
    assert pod["volumes"] == base_pod["volumes"]
    assert pod["terminationGracePeriodSeconds"] >= base_pod["terminationGracePeriodSeconds"]
    assert yaml.safe_load((OVERLAY / "hf-cache-pvc.yaml").read_text()) == \
        yaml.safe_load((BASE / "hf-cache-pvc.yaml").read_text())  # fmt: skip


def test_the_pool_selects_the_model_server_pods_on_the_frontend_port(objects, server):
    pool = one(objects, "InferencePool")
    selector = pool["spec"]["selector"]["matchLabels"]
    selected = [d["metadata"]["name"] for d in by_kind(objects, "Deployment").values()
                if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]  # fmt: skip
    assert selected == ["minicpmv-model-server"]
    frontend = named(containers(server))["frontend"]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [p["containerPort"] for p in frontend["ports"]]
    assert pool["spec"].get("appProtocol", "http") == "http"
    assert server["spec"]["selector"]["matchLabels"].items() <= server["spec"]["template"]["metadata"]["labels"].items()


def test_the_pool_s_endpoint_picker_is_the_epp_service_and_its_ext_proc_port(objects, epp):
    ref = one(objects, "InferencePool")["spec"]["endpointPickerRef"]
    assert ref.get("group", "") == "" and ref.get("kind", "Service") == "Service"
    service = by_kind(objects, "Service")[ref["name"]]
    assert service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    (container,) = containers(epp)
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports[port["targetPort"]] == int(epp_args(epp)["grpc-port"])
    for p in service["spec"]["ports"]:
        assert p["targetPort"] in container_ports
    assert ref["failureMode"] == "FailOpen"


# Flags of the EPP at gateway-api-inference-extension v1.5.0: pkg/epp/server/options.go (AddFlags), the logging
# options (pkg/common/observability/logging/options.go: -v and controller-runtime's zap flags).
EPP_FLAGS = {
    "grpc-port", "ha-enable-leader-election", "pool-group", "pool-namespace", "pool-name", "endpoint-selector",
    "endpoint-target-ports", "disable-endpoint-subset-filter", "refresh-metrics-interval",
    "refresh-prometheus-metrics-interval", "metrics-staleness-threshold", "tracing", "health-checking",
    "metrics-port", "grpc-health-port", "enable-pprof", "cert-path", "enable-cert-reload", "secure-serving",
    "metrics-endpoint-auth", "config-file", "config-text",
    "v", "zap-devel", "zap-encoder", "zap-log-level", "zap-stacktrace-level", "zap-time-encoding",
}  # fmt: skip
# Marked deprecated there (fs.MarkDeprecated): the metric names now belong in the EndpointPickerConfig.
EPP_DEPRECATED_FLAGS = {
    "model-server-metrics-scheme", "model-server-metrics-path", "model-server-metrics-port",
    "model-server-metrics-https-insecure-skip-verify", "total-queued-requests-metric",
    "total-running-requests-metric", "kv-cache-usage-percentage-metric", "lora-info-metric", "cache-info-metric",
}  # fmt: skip


def epp_args(epp: dict) -> dict[str, str]:
    (container,) = containers(epp)
    args, flags = list(container["args"]), {}
    while args:
        flag = args.pop(0)
        assert flag.startswith("--"), flag
        name, eq, value = flag[2:].partition("=")
        flags[name] = value if eq else args.pop(0)
    return flags


def test_the_epp_serves_the_pool_with_the_configuration_and_the_rights_it_needs(objects, epp):
    flags = epp_args(epp)
    assert set(flags) <= EPP_FLAGS, f"unknown EPP flags: {sorted(set(flags) - EPP_FLAGS)}"
    assert not set(flags) & EPP_DEPRECATED_FLAGS
    assert flags["pool-name"] == one(objects, "InferencePool")["metadata"]["name"]
    assert flags["pool-group"] == POOL_GROUP
    assert flags["tracing"] == "false"
    (container,) = containers(epp)
    assert container["image"] == EPP_IMAGE
    # No --pool-namespace: the EPP takes its own namespace (NAMESPACE) for the pool's.
    assert "pool-namespace" not in flags
    env = named(container["env"])
    assert env["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    probes = [container[p]["grpc"] for p in ("livenessProbe", "readinessProbe")]
    assert all(str(p["port"]) == flags["grpc-health-port"] for p in probes)
    # The configuration file is the ConfigMap's key, mounted where --config-file looks.
    config_dir, config_file = flags["config-file"].rsplit("/", 1)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == config_dir]
    volume = named(epp["spec"]["template"]["spec"]["volumes"])[mount["name"]]
    assert config_file in by_kind(objects, "ConfigMap")[volume["configMap"]["name"]]["data"]
    # RBAC: the ServiceAccount, bound to a Role that reads the pods, the pool and the optional objectives.
    account = epp["spec"]["template"]["spec"]["serviceAccountName"]
    assert account in by_kind(objects, "ServiceAccount")
    (binding,) = by_kind(objects, "RoleBinding").values()
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    role = by_kind(objects, "Role")[binding["roleRef"]["name"]]
    assert binding["roleRef"]["kind"] == "Role"
    granted = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]}  # fmt: skip
    for needed in [("", "pods"), (POOL_GROUP, "inferencepools"), ("inference.networking.x-k8s.io", "inferenceobjectives"),
                   ("inference.networking.x-k8s.io", "inferencemodelrewrites")]:  # fmt: skip
        assert granted[needed] >= {"get", "list", "watch"}, needed


def gateway_duration_seconds(value: str) -> float:
    """A Gateway API Duration (GEP-2257): 1 to 4 number+unit pairs, units h, m, s, ms."""
    pairs = re.findall(r"([0-9]{1,5})(h|ms|m|s)", value)
    assert pairs and "".join(n + u for n, u in pairs) == value and len(pairs) <= 4, value
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in pairs)


def test_the_route_sends_everything_to_the_pool_from_the_operator_s_gateway(objects):
    route = one(objects, "HTTPRoute")
    assert route["spec"]["parentRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "inference-gateway"}]  # fmt: skip
    pool = one(objects, "InferencePool")["metadata"]["name"]
    for rule in route["spec"]["rules"]:
        assert rule["backendRefs"] == [{"group": POOL_GROUP, "kind": "InferencePool", "name": pool}]
        # A generation may take as long as the frontend allows before the gateway gives up on it.
        assert gateway_duration_seconds(rule["timeouts"]["request"]) >= Settings.model_fields["request_timeout"].default


# --- the EPP's configuration -----------------------------------------------------------------------------

# Plugin types the llm-d-inference-scheduler v0.8.0 EPP registers, and what each is. Source: the constants named
# in gateway-api-inference-extension v1.5.0 cmd/epp/runner/runner.go (registerInTreePlugins; paths under
# pkg/epp/framework/plugins/) and llm-d-inference-scheduler v0.8.0 pkg/epp/framework/plugins/register.go
# (RegisterAllPlugins; paths under pkg/epp/framework/plugins/ there).
GIE_V1_5_0_PLUGINS = {
    "prefix-cache-scorer": "scorer",  # scheduling/scorer/prefix/plugin.go
    "max-score-picker": "picker",  # scheduling/picker/max_score_picker.go
    "random-picker": "picker",  # scheduling/picker/random_picker.go
    "weighted-random-picker": "picker",  # scheduling/picker/weighted_random_picker.go
    "single-profile-handler": "profile-handler",  # scheduling/profile/single_profile_handler.go
    "kv-cache-utilization-scorer": "scorer",  # scheduling/scorer/kvcacheutilization/kvcache_utilization.go
    "queue-scorer": "scorer",  # scheduling/scorer/queuedepth/queue.go
    "running-requests-size-scorer": "scorer",  # scheduling/scorer/runningrequests/runningrequest.go
    "lora-affinity-scorer": "scorer",  # scheduling/scorer/loraaffinity/lora_affinity.go
    "token-load-scorer": "scorer",  # scheduling/scorer/tokenload/token_load.go
    "global-strict-fairness-policy": "flow-control",  # flowcontrol/fairness/besthead.go
    "round-robin-fairness-policy": "flow-control",  # flowcontrol/fairness/roundrobin.go
    "fcfs-ordering-policy": "flow-control",  # flowcontrol/ordering/fcfs.go
    "edf-ordering-policy": "flow-control",  # flowcontrol/ordering/edf.go
    "slo-deadline-ordering-policy": "flow-control",  # flowcontrol/ordering/slo_deadline.go
    "static-usage-limit-policy": "flow-control",  # flowcontrol/usagelimits/usagelimitpolicy.go
    "approx-prefix-cache-producer": "request-control",  # requestcontrol/dataproducer/approximateprefix/plugin.go
    "predicted-latency-scorer": "scorer",  # scheduling/scorer/predictedlatency/types.go
    "predicted-latency-producer": "request-control",  # requestcontrol/requestdataproducer/predictedlatency/plugin.go
    "latency-slo-admitter": "request-control",  # requestcontrol/admitter/latencyslo/plugin.go
    "prefix-cache-affinity-filter": "filter",  # scheduling/filter/prefixcacheaffinity/plugin.go
    "slo-headroom-tier-filter": "filter",  # scheduling/filter/sloheadroomtier/plugin.go
    "latency-scorer": "scorer",  # scheduling/scorer/latency/plugin.go
    "inflight-load-producer": "request-control",  # requestcontrol/requestdataproducer/inflightload/producer.go
    "header-based-testing-filter": "filter",  # scheduling/test/filter/request_header_based_filter.go
    "destination-endpoint-served-verifier": "request-control",  # requestcontrol/test/responsereceived/...
    "metrics-data-source": "data-source",  # datalayer/source/metrics/datasource.go
    "core-metrics-extractor": "extractor",  # datalayer/extractor/metrics/factories.go
    "k8s-notification-source": "data-source",  # datalayer/source/notifications/factory.go
    "endpoint-notification-source": "data-source",  # datalayer/source/notifications/endpoint_datasource.go
    "request-attribute-reporter": "request-control",  # requestcontrol/requestattributereporter/plugin.go
    "openai-parser": "parser",  # requesthandling/parsers/openai/openai.go
    "vllmgrpc-parser": "parser",  # requesthandling/parsers/vllmgrpc/vllmgrpc.go
    "passthrough-parser": "parser",  # requesthandling/parsers/passthrough/passthrough.go
    "concurrency-detector": "saturation-detector",  # flowcontrol/saturationdetector/concurrency/detector.go
    "utilization-detector": "saturation-detector",  # flowcontrol/saturationdetector/utilization/detector.go
}
LLMD_V0_8_0_PLUGINS = {
    "by-label": "filter",  # scheduling/filter/bylabel/filter.go
    "by-label-selector": "filter",  # scheduling/filter/bylabel/selector.go
    "encode-filter": "filter",  # scheduling/filter/bylabel/roles.go
    "decode-filter": "filter",
    "prefill-filter": "filter",
    "disagg-headers-handler": "request-control",  # scheduling/profilehandler/disagg/disagg_headers_handler.go
    "prefill-header-handler": "request-control",  # (its deprecated alias)
    "data-parallel-profile-handler": "profile-handler",  # scheduling/profilehandler/dataparallel/dp_profile_handler.go
    "disagg-profile-handler": "profile-handler",  # scheduling/profilehandler/disagg/disagg_profile_handler.go
    "pd-profile-handler": "profile-handler",  # scheduling/profilehandler/disagg/pd_profile_handler.go (deprecated)
    "precise-prefix-cache-scorer": "scorer",  # scheduling/scorer/preciseprefixcache/precise_prefix_cache.go
    "load-aware-scorer": "scorer",  # scheduling/scorer/loadaware/load_aware.go
    "session-affinity-scorer": "scorer",  # scheduling/scorer/sessionaffinity/session_affinity.go
    "active-request-scorer": "scorer",  # scheduling/scorer/activerequest/active_request.go
    "no-hit-lru-scorer": "scorer",  # scheduling/scorer/nohitlru/no_hit_lru.go
    "context-length-aware": "scorer",  # scheduling/scorer/contextlengthaware/context_length_aware.go
    "models-data-source": "data-source",  # datalayer/extractor/models/factories.go
    "model-server-protocol-models": "extractor",  # datalayer/extractor/models/factories.go
    "prefix-based-pd-decider": "decider",  # scheduling/profilehandler/disagg/prefix_based_pd_decider.go
    "always-disagg-pd-decider": "decider",  # scheduling/profilehandler/disagg/always_disagg_pd_decider.go
    "always-disagg-multimodal-decider": "decider",  # scheduling/profilehandler/disagg/always_disagg_mm_decider.go
    "tokenizer": "request-control",  # requestcontrol/dataproducer/tokenizer/tokenizer.go
}
PLUGIN_ROLES = GIE_V1_5_0_PLUGINS | LLMD_V0_8_0_PLUGINS

# EndpointPickerConfig inference.networking.x-k8s.io/v1alpha1 as gateway-api-inference-extension v1.5.0 defines
# it (apix/config/v1alpha1/endpointpickerconfig_types.go); the EPP decodes it strictly
# (pkg/epp/config/loader/configloader.go, serializer.EnableStrict), so no field outside these is accepted.
_STR = {"type": "string", "minLength": 1}
_REF = {"type": "object", "required": ["pluginRef"], "additionalProperties": False, "properties": {"pluginRef": _STR}}
EPP_CONFIG_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "plugins", "schedulingProfiles"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "inference.networking.x-k8s.io/v1alpha1"},
        "kind": {"const": "EndpointPickerConfig"},
        # The gates the v1.5.0 runner registers (cmd/epp/runner/runner.go, parseConfigurationPhaseOne).
        "featureGates": {"type": "array", "items": {"enum": ["dataLayer", "enableLegacyMetrics", "flowControl"]}},
        "plugins": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["type"], "additionalProperties": False,
            "properties": {"name": _STR, "type": {"enum": sorted(PLUGIN_ROLES)}, "parameters": {"type": "object"}}}},
        "schedulingProfiles": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "plugins"], "additionalProperties": False,
            "properties": {"name": _STR, "plugins": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["pluginRef"], "additionalProperties": False,
                "properties": {"pluginRef": _STR, "weight": {"type": "number"}}}}}}},
        "saturationDetector": {"type": "object", "additionalProperties": False, "properties": {"pluginRef": _STR}},
        "dataLayer": {"type": "object", "required": ["sources"], "additionalProperties": False, "properties": {
            "sources": {"type": "array", "items": {
                "type": "object", "required": ["pluginRef", "extractors"], "additionalProperties": False,
                "properties": {"pluginRef": _STR, "extractors": {"type": "array", "items": _REF}}}}}},
        "flowControl": {"type": "object", "additionalProperties": False, "properties": {
            k: {} for k in ("maxBytes", "maxRequests", "defaultRequestTTL", "defaultPriorityBand", "priorityBands",
                            "usageLimitPolicyPluginRef")}},
        "parser": _REF,
    },
}  # fmt: skip

# The parameters of the plugins we configure, from the structs their factories decode them into (json tags).
# The factories use encoding/json, which ignores unknown keys: a misspelt parameter would silently keep its
# default. Hence a strict schema here. A type whose factory ignores its parameters takes none.
_METRIC_SPEC = {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^{}]*\})?$"}  # PromQL selector (spec.go)
_INT = {"type": "integer", "minimum": 1}
PLUGIN_PARAMETERS = {
    "queue-scorer": None,  # QueueScorerFactory(name, _ json.RawMessage, ...)
    "kv-cache-utilization-scorer": None,  # KvCacheUtilizationScorerFactory(name, _ json.RawMessage, ...)
    "single-profile-handler": None,  # SingleProfileHandlerFactory(name, _ json.RawMessage, ...)
    "openai-parser": None,  # OpenAIParserPluginFactory(name, _ json.RawMessage, ...)
    # Passed on to approx-prefix-cache-producer (pkg/epp/config/loader/configloader.go, instantiatePlugins):
    # requestcontrol/dataproducer/approximateprefix/types.go, config ("blockSize", in characters, deprecated).
    "prefix-cache-scorer": {"autoTune": {"type": "boolean"}, "blockSizeTokens": _INT, "maxPrefixBlocksToMatch": _INT,
                            "maxPrefixTokensToMatch": _INT, "lruCapacityPerServer": _INT},
    "max-score-picker": {"maxNumOfEndpoints": _INT},  # scheduling/picker/common.go, pickerParameters
    # datalayer/source/metrics/datasource.go, metricsDatasourceParams
    "metrics-data-source": {"scheme": {"enum": ["http", "https"]}, "path": {"type": "string", "pattern": "^/"},
                            "insecureSkipVerify": {"type": "boolean"}},
    # datalayer/extractor/metrics/factories.go, modelServerExtractorParams and engineConfigParams
    "core-metrics-extractor": {
        "engineLabelKey": _STR, "defaultEngine": _STR,
        "engineConfigs": {"type": "array", "items": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "minLength": 1, "not": {"const": "default"}},  # reserved
                           "queuedRequestsSpec": _METRIC_SPEC, "runningRequestsSpec": _METRIC_SPEC,
                           "kvUsageSpec": _METRIC_SPEC, "loraSpec": _METRIC_SPEC, "cacheInfoSpec": _METRIC_SPEC,
                           "cacheBlockSizeLabelName": _STR, "cacheNumBlocksLabelName": _STR,
                           "cacheBlockSizeSpec": _METRIC_SPEC, "cacheNumBlocksSpec": _METRIC_SPEC}}}},
}  # fmt: skip


def plugins_by_name(config: dict) -> dict[str, dict]:
    """The plugins under the names the EPP gives them (``name``, or the type when it is omitted)."""
    names = [p.get("name", p["type"]) for p in config["plugins"]]
    assert len(names) == len(set(names)), "duplicate plugin names"
    return dict(zip(names, config["plugins"], strict=True))


def check_epp_config(config: dict) -> None:
    """What the v1.5.0 config loader checks (pkg/epp/config/loader/validation.go and configloader.go), plus the
    plugins' parameters."""
    jsonschema.Draft7Validator(EPP_CONFIG_SCHEMA).validate(config)
    plugins = plugins_by_name(config)
    for name, plugin in plugins.items():
        if plugin["type"] not in PLUGIN_PARAMETERS:
            assert "parameters" not in plugin, f"{plugin['type']}: add its parameters' schema from its factory"
            continue
        allowed = PLUGIN_PARAMETERS[plugin["type"]]
        if allowed is None:
            assert "parameters" not in plugin, f"{name} takes no parameters"
        else:
            jsonschema.Draft7Validator({"type": "object", "additionalProperties": False, "properties": allowed}
                                       ).validate(plugin.get("parameters", {}))  # fmt: skip

    def role(ref: str) -> str:
        assert ref in plugins, f"reference to an undefined plugin: {ref}"
        return PLUGIN_ROLES[plugins[ref]["type"]]

    handlers = [n for n, p in plugins.items() if PLUGIN_ROLES[p["type"]] == "profile-handler"]
    assert len(handlers) == 1, "exactly one profile handler"
    profiles = config["schedulingProfiles"]
    assert len({p["name"] for p in profiles}) == len(profiles)
    if plugins[handlers[0]]["type"] == "single-profile-handler":
        assert len(profiles) == 1, "SingleProfileHandler cannot support multiple scheduling profiles"
    for profile in profiles:
        roles = [role(p["pluginRef"]) for p in profile["plugins"]]
        assert set(roles) <= {"filter", "scorer", "picker"}, roles
        assert roles.count("picker") == 1, f"profile {profile['name']}: one picker"
        assert all(p.get("weight", 1) > 0 for p in profile["plugins"] if role(p["pluginRef"]) == "scorer")
    for source in config.get("dataLayer", {}).get("sources", []):
        assert role(source["pluginRef"]) == "data-source"
        assert all(role(e["pluginRef"]) == "extractor" for e in source["extractors"])
    if "parser" in config:
        assert role(config["parser"]["pluginRef"]) == "parser"
    for plugin in plugins.values():
        if plugin["type"] == "core-metrics-extractor":  # factories.go, newCoreMetricsExtractorPlugin
            parameters = plugin.get("parameters", {})
            engines = [e["name"] for e in parameters.get("engineConfigs", [])]
            assert len(engines) == len(set(engines))
            builtin = {"vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm"}  # defaultEngineConfigs
            assert parameters.get("defaultEngine", "vllm") in set(engines) | builtin, "defaultEngine not found"


def test_the_epp_config_is_one_the_v0_8_0_epp_accepts(epp_config):
    check_epp_config(epp_config)


def test_the_epp_scores_on_queue_kv_cache_and_prefix_affinity_from_our_pods_metrics(epp_config, server):
    plugins = plugins_by_name(epp_config)
    (profile,) = epp_config["schedulingProfiles"]
    weights = {plugins[p["pluginRef"]]["type"]: p.get("weight", 1) for p in profile["plugins"]}
    assert weights == {"queue-scorer": 2, "kv-cache-utilization-scorer": 2, "prefix-cache-scorer": 3,
                       "max-score-picker": 1}  # fmt: skip
    (source,) = epp_config["dataLayer"]["sources"]
    assert plugins[source["pluginRef"]]["type"] == "metrics-data-source"
    assert plugins[source["pluginRef"]]["parameters"]["path"] == "/metrics"
    assert '@router.get("/metrics"' in (ROOT / "openai_frontend" / "routers" / "health.py").read_text()
    (extractor,) = [plugins[e["pluginRef"]] for e in source["extractors"]]
    assert extractor["type"] == "core-metrics-extractor"
    parameters = extractor["parameters"]
    (engine,) = parameters["engineConfigs"]
    # Our pods are labelled as this engine, and unlabelled pods fall back to it too.
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert labels[parameters["engineLabelKey"]] == engine["name"] == parameters["defaultEngine"]


def protocol_names_in_source() -> set[str]:
    """Every ``minicpmv:...`` string literal in openai_frontend/metrics.py (read from the source, so that the
    check does not depend on how the module registers them)."""
    tree = ast.parse(METRICS_SOURCE.read_text())
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and re.fullmatch(r"minicpmv:[a-z0-9_]+", n.value)}  # fmt: skip


def label_names_in_source() -> set[str]:
    """The string literals of every ``labels=[...]`` / ``labelnames=[...]`` in openai_frontend/metrics.py."""
    tree = ast.parse(METRICS_SOURCE.read_text())
    return {e.value for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg in ("labels", "labelnames")
            and isinstance(n.value, ast.List | ast.Tuple) for e in n.value.elts if isinstance(e, ast.Constant)}  # fmt: skip


def test_the_epp_reads_exactly_the_metric_names_the_frontend_exports(epp_config):
    (engine,) = next(p for p in epp_config["plugins"] if p["type"] == "core-metrics-extractor")["parameters"][
        "engineConfigs"]  # fmt: skip
    specs = {k: v for k, v in engine.items() if k.endswith("Spec")}
    assert specs == PROTOCOL_METRICS
    exported = protocol_names_in_source()
    assert exported, f"no model server protocol metric (minicpmv:...) in {METRICS_SOURCE} yet"
    assert set(specs.values()) == exported, (
        f"the EPP reads {sorted(set(specs.values()) - exported)} that the frontend does not export; the frontend "
        f"exports {sorted(exported - set(specs.values()))} that the EPP does not read")  # fmt: skip
    labels = label_names_in_source()
    assert {engine["cacheBlockSizeLabelName"], engine["cacheNumBlocksLabelName"]} <= labels
    assert LORA_LABELS <= labels


def test_the_frontend_s_exposition_is_what_the_epp_parses(epp_config):
    """The families the EPP reads, as a scrape of the frontend shows them: gauges, with the labels it reads."""
    (engine,) = next(p for p in epp_config["plugins"] if p["type"] == "core-metrics-extractor")["parameters"][
        "engineConfigs"]  # fmt: skip
    stats = EngineStats(waiting=3, running=2, kv_usage=0.25, kv_blocks=1000, block_size=16, max_lora=2,
                        running_adapters=["a"], waiting_adapters=["b"])  # fmt: skip
    registry = CollectorRegistry()
    registry.register(ProtocolCollector(lambda: stats))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    for name in PROTOCOL_METRICS.values():
        assert families[name].type == "gauge", name
    values = {n: families[n].samples[0].value for n in PROTOCOL_METRICS.values()}
    assert values[engine["queuedRequestsSpec"]] == 3 and values[engine["runningRequestsSpec"]] == 2
    assert 0 <= values[engine["kvUsageSpec"]] <= 1
    (info,) = families[engine["cacheInfoSpec"]].samples
    assert (info.labels[engine["cacheBlockSizeLabelName"]], info.labels[engine["cacheNumBlocksLabelName"]]) == (
        "16", "1000")  # fmt: skip
    (lora,) = families[engine["loraSpec"]].samples
    assert set(lora.labels) >= LORA_LABELS and lora.labels["max_lora"] == "2"


@pytest.mark.parametrize("mistake", [
    lambda c: c["plugins"].append({"type": "queue-scorers"}),  # no such plugin type
    lambda c: c.update(datalayer=c.pop("dataLayer")),  # unknown top-level field (the EPP decodes strictly)
    lambda c: c["schedulingProfiles"][0]["plugins"].append({"pluginRef": "kv-cache-scorer"}),  # undefined plugin
    lambda c: c["schedulingProfiles"][0]["plugins"].append({"pluginRef": "single-profile-handler"}),  # not a scorer
    lambda c: next(p for p in c["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]["engineConfigs"][0]
    .update(queuedRequestSpec="minicpmv:num_requests_waiting"),  # misspelt parameter (Go would ignore it)
    lambda c: next(p for p in c["plugins"] if p["type"] == "core-metrics-extractor")["parameters"].update(
        defaultEngine="minicpm"),  # no such engine
    lambda c: c["plugins"].append({"type": "max-score-picker", "name": "second"})
    or c["schedulingProfiles"][0]["plugins"].append({"pluginRef": "second"}),  # two pickers
    lambda c: c["plugins"].append({"type": "data-parallel-profile-handler"}),  # two profile handlers
])  # fmt: skip
def test_a_mistake_in_the_epp_config_fails_the_check(epp_config, mistake):
    broken = copy.deepcopy(epp_config)
    mistake(broken)
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        check_epp_config(broken)


def test_a_renamed_metric_fails_the_check(epp_config):
    broken = copy.deepcopy(epp_config)
    extractor = next(p for p in broken["plugins"] if p["type"] == "core-metrics-extractor")
    extractor["parameters"]["engineConfigs"][0]["queuedRequestsSpec"] = "minicpmv:num_requests_queued"
    with pytest.raises(AssertionError):
        test_the_epp_reads_exactly_the_metric_names_the_frontend_exports(broken)
