"""The deployment files: Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, offline),
the compose profile, the Prometheus config and the Grafana dashboard, each checked against the code they
configure: every flag and MME_* variable they use is one the gateway or router parses, every probe is a
health route, every dashboard metric is one the gateway or router exports."""

from __future__ import annotations

import argparse
import copy
import json
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.config import FIELDS, add_serve_arguments, env_var
from gateway.metrics import Metrics
from gateway.router.metrics import RouterMetrics
from gateway.router.settings import add_router_arguments
from tests.helpers import REPO_ROOT

K8S = REPO_ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests promise to apply to
HEALTH_ROUTES = {"/v2/health/live", "/v2/health/ready", "/ping"}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def by_kind(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """`serve ...` or `router ...` through the flags `mme-gateway` declares for that command."""
    command, *rest = argv
    parser = argparse.ArgumentParser(prog=f"mme-gateway {command}", exit_on_error=False)
    {"serve": add_serve_arguments, "router": add_router_arguments}[command](parser)
    args, unknown = parser.parse_known_args(rest)
    assert not unknown, f"mme-gateway {command} has no {unknown}"
    return args


# -- Kubernetes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "doc"), manifests(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_manifest_is_valid_against_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_schema_check_can_fail() -> None:
    broken = copy.deepcopy(by_kind("Deployment", "mme-gateway"))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == by_kind("Namespace", "mme")["metadata"]["name"]


def test_one_gateway_pod_per_gpu_with_its_cache_shm_probes_and_scrape_annotations() -> None:
    pod = by_kind("Deployment", "mme-gateway")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/cache"]] or "persistentVolumeClaim" in volumes[mounts["/cache"]]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in HEALTH_ROUTES
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the image's user


def test_gateway_flags_and_variables_are_the_gateways() -> None:
    pod = by_kind("Deployment", "mme-gateway")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = parse_cli(container["args"])
    assert args.host == "0.0.0.0" and args.port == 8080 and args.grpc_port == 8081
    config = by_kind("ConfigMap", "mme-gateway")["data"]
    known = {env_var(name) for name in FIELDS}
    assert set(config) <= known, set(config) - known
    assert "MME_API_KEYS_FILE" in config  # on all interfaces the gateway serves only with keys
    keys_mount = next(m for m in container["volumeMounts"] if m["name"] == "keys")["mountPath"]
    assert config["MME_API_KEYS_FILE"].startswith(keys_mount + "/")


def test_the_router_finds_the_gateways_through_the_headless_service() -> None:
    service = by_kind("Service", "mme-gateway-headless")
    gateway_pod = by_kind("Deployment", "mme-gateway")["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= gateway_pod["metadata"]["labels"].items()
    router = by_kind("Deployment", "mme-router")["spec"]["template"]
    (container,) = router["spec"]["containers"]
    args = parse_cli(container["args"])
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    assert args.dns_name == f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert (args.instance_http_port, args.instance_grpc_port) == (ports["http"], ports["grpc"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    secret = by_kind("Secret", "mme-api-keys")["stringData"]
    item = next(v for v in router["spec"]["volumes"] if v["name"] == "keys")["secret"]["items"][0]
    assert item["key"] in secret and str(args.upstream_api_key_file).endswith(item["path"])
    front = by_kind("Service", "mme-router")
    assert front["spec"]["selector"].items() <= router["metadata"]["labels"].items()


def test_the_autoscaler_scales_the_gateways_on_an_invocation_metric() -> None:
    hpa = by_kind("HorizontalPodAutoscaler", "mme-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == by_kind("Deployment", "mme-gateway")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert "invocations" in metric["pods"]["metric"]["name"]
    assert "mme_requests_total" in (K8S / "gateway-hpa.yaml").read_text()  # the adapter rule's source series


# -- compose ----------------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())


def interpolate(text: str) -> str:
    """Compose's ${VAR:-default} and ${VAR:?message} with nothing set: the default, or a stand-in."""
    return re.sub(r"\$\{([A-Z0-9_]+)(?::([-?])([^}]*))?\}", lambda m: m.group(3) if m.group(2) == "-" else "x", text)


def test_compose_keeps_the_default_services_and_adds_the_fleet_profile() -> None:
    services = compose()["services"]
    defaults = {name for name, s in services.items() if "profiles" not in s}
    fleet = {name for name, s in services.items() if "fleet" in s.get("profiles", [])}
    assert defaults == {"triton", "gateway"}
    assert fleet == {"triton-2", "gateway-2", "router", "prometheus", "grafana"}
    for name in ("gateway", "gateway-2", "router"):
        argv = [interpolate(str(a)) for a in services[name]["command"]]
        parse_cli(argv)  # every flag is one mme-gateway parses


def test_compose_router_points_at_the_fleets_gateways_and_keys_come_from_secrets() -> None:
    doc = compose()
    services = doc["services"]
    router = parse_cli([interpolate(str(a)) for a in services["router"]["command"]])
    for entry in router.instances.split(","):
        host, http_port, grpc_port = entry.split(":")
        gateway = parse_cli([interpolate(str(a)) for a in services[host]["command"]])
        assert (int(http_port), int(grpc_port)) == (gateway.port, gateway.grpc_port)
        assert str(gateway.api_keys_file) == f"/run/secrets/{services[host]['secrets'][0]}"
    assert str(router.upstream_api_key_file) == f"/run/secrets/{services['router']['secrets'][0]}"
    for service in services.values():
        for secret in service.get("secrets", []):
            assert secret in doc["secrets"]


def test_compose_mounts_files_that_exist_and_prometheus_scrapes_the_fleet() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (REPO_ROOT / source).exists(), source
    scrape = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t.split(":")[0] for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {"router", "gateway", "gateway-2"}


# -- Grafana ----------------------------------------------------------------------------------------------


def exported() -> set[str]:
    """Every sample name the gateway and the router can export (with _total, _bucket, ... suffixes)."""
    names: set[str] = set()
    registries: list[CollectorRegistry] = [Metrics().registry, RouterMetrics("random").registry]
    for registry in registries:
        for family in registry.collect():
            names.add(family.name)
            names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count", "_created"))
    return names


def test_every_dashboard_query_uses_metrics_that_exist() -> None:
    dashboard = json.loads((REPO_ROOT / "deploy/grafana/dashboards/mme-fleet.json").read_text())
    used = {name for panel in dashboard["panels"] for t in panel["targets"]
            for name in re.findall(r"\bmme_[a-z_]+", t["expr"])}
    assert used and used <= exported(), used - exported()
    for wanted in ("mme_model_cache_requests_total", "mme_model_evictions_total", "mme_memory_budget_bytes",
                   "mme_router_routing_decisions_total", "mme_router_request_duration_seconds_bucket"):
        assert wanted in used
    datasources = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} <= uids
