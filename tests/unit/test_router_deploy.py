"""The deployment files: Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, offline),
the compose profile, the Prometheus config and the Grafana dashboard, each checked against the code they
configure: every flag and MME_* variable they use is one the gateway or router parses, every probe is a
health route, every dashboard metric is one the gateway or router exports."""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.config import FIELDS, add_serve_arguments, env_var
from gateway.metrics import Metrics
from gateway.router.metrics import RouterMetrics
from gateway.router.settings import add_router_arguments
from gateway.triton import auth as triton_auth
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


WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


def workloads() -> list[dict[str, Any]]:
    return [d for _, d in manifests() if d["kind"] in WORKLOAD_KINDS]


def pod_problems(template: dict[str, Any], service_accounts: dict[str, dict[str, Any]]) -> list[str]:
    """What a pod template lacks of the hardening every pod here has: no service-account token (neither
    gateway nor router talks to the Kubernetes API; the router's discovery is plain DNS), no service links
    (their variables start with MME_, the settings' prefix), a non-root user with the seccomp default, and
    containers that cannot gain privileges, hold no capabilities and write only to their volumes."""
    spec = template["spec"]
    problems = []
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false")
    account = service_accounts.get(spec.get("serviceAccountName", "default"))
    if account is None or account.get("automountServiceAccountToken") is not False:
        problems.append(f"service account {spec.get('serviceAccountName')!r} is not one here without a token")
    if spec.get("enableServiceLinks") is not False:
        problems.append("enableServiceLinks is not false")
    pod_security = spec.get("securityContext", {})
    if pod_security.get("runAsNonRoot") is not True or not pod_security.get("runAsUser"):
        problems.append("the pod may run as root")
    if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("no RuntimeDefault seccomp profile")
    for container in spec.get("initContainers", []) + spec["containers"]:
        security = container.get("securityContext", {})
        name = container["name"]
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if security.get("capabilities", {}).get("drop") != ["ALL"] or security.get("capabilities", {}).get("add"):
            problems.append(f"{name}: capabilities are not all dropped")
        if security.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: the root file system is writable")
        if security.get("privileged") or security.get("runAsUser") == 0 or security.get("runAsNonRoot") is False:
            problems.append(f"{name}: privileged or root")
    return problems


def service_accounts() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "ServiceAccount"}


@pytest.mark.parametrize("workload", workloads(), ids=lambda d: d["metadata"]["name"])
def test_every_pod_runs_without_a_token_or_privileges(workload: dict[str, Any]) -> None:
    assert pod_problems(workload["spec"]["template"], service_accounts()) == []


def test_the_pod_check_can_fail() -> None:
    pod = copy.deepcopy(by_kind("Deployment", "mme-gateway")["spec"]["template"])
    del pod["spec"]["automountServiceAccountToken"]
    pod["spec"]["securityContext"]["runAsNonRoot"] = False
    (container,) = pod["spec"]["containers"]
    container["securityContext"] = {"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}}
    problems = pod_problems(pod, service_accounts())
    assert len(problems) == 5, problems


def test_the_gateways_write_only_to_their_volumes() -> None:
    """The image's root file system is read-only in the pod: the cache, /tmp (Python's and the stubs' scratch)
    and /dev/shm are emptyDirs, and the cache directory is the one the gateway is told to use."""
    pod = by_kind("Deployment", "mme-gateway")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert set(mounts) == {"/cache", "/tmp", "/dev/shm"}
    assert all("emptyDir" in v for v in mounts.values())
    assert by_kind("ConfigMap", "mme-gateway")["data"]["MME_CACHE_DIR"] == "/cache"


def network_policies() -> list[dict[str, Any]]:
    return [d for _, d in manifests() if d["kind"] == "NetworkPolicy"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def pod_labels(name: str) -> dict[str, str]:
    return by_kind("Deployment", name)["spec"]["template"]["metadata"]["labels"]


def own_policy(name: str) -> dict[str, Any]:
    """The one NetworkPolicy that names Deployment `name`'s pods (the namespace-wide default aside)."""
    (policy,) = [p for p in network_policies()
                 if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], pod_labels(name))]
    return policy


def port_names(name: str) -> set[str]:
    (container,) = by_kind("Deployment", name)["spec"]["template"]["spec"]["containers"]
    return {p["name"] for p in container["ports"]}


def test_ingress_is_denied_unless_a_policy_allows_it() -> None:
    (deny,) = [p for p in network_policies() if p["spec"]["podSelector"] == {}]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and not deny["spec"].get("ingress")
    for workload in workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        allowing = [p for p in network_policies() if p is not deny and selects(p["spec"]["podSelector"], labels)]
        assert allowing, f"no NetworkPolicy selects {workload['metadata']['name']}"


def test_gateways_take_traffic_from_the_routers_and_their_scraper_only() -> None:
    rules = own_policy("mme-gateway")["spec"]["ingress"]
    assert all(rule.get("from") for rule in rules), "a rule without `from` admits every source"
    from_routers = [r for r in rules if any("namespaceSelector" not in peer and "ipBlock" not in peer
                                            and selects(peer["podSelector"], pod_labels("mme-router"))
                                            for peer in r["from"])]
    assert from_routers and {p["port"] for r in from_routers for p in r["ports"]} == port_names("mme-gateway")
    scrape = [r for r in rules if r not in from_routers]
    assert scrape, "the scraper's rule (the operator's selector) is missing"
    pod = by_kind("Deployment", "mme-gateway")["spec"]["template"]
    metrics_port = pod["metadata"]["annotations"]["prometheus.io/port"]
    (container,) = pod["spec"]["containers"]
    scrape_port = next(p["name"] for p in container["ports"] if str(p["containerPort"]) == metrics_port)
    for rule in scrape:
        assert [p["port"] for p in rule["ports"]] == [scrape_port]
        assert all("namespaceSelector" in peer or "podSelector" in peer for peer in rule["from"])


def test_routers_take_client_traffic_and_reach_only_dns_and_the_gateways() -> None:
    policy = own_policy("mme-router")
    assert {p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]} == port_names("mme-router")
    assert "Egress" in policy["spec"]["policyTypes"]
    allowed = set()
    for rule in policy["spec"]["egress"]:
        ports = {(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]}
        if all(port == 53 for _, port in ports):
            allowed.add("dns")
        else:
            assert rule["to"] and all(selects(peer["podSelector"], pod_labels("mme-gateway")) for peer in rule["to"])
            assert {port for _, port in ports} == port_names("mme-gateway")
            allowed.add("gateways")
    assert allowed == {"dns", "gateways"}


def test_the_image_runs_as_the_user_the_pods_name() -> None:
    """Not root (so the gateway's non-dumpable flag keeps its /proc entries from the stubs it starts), the
    uid the pods' securityContext names, and owner of the cache directory."""
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)[-1]
    uid = int(user.split(":")[0])
    assert uid != 0 and re.search(rf"useradd\b.*--uid {uid}\b", dockerfile)
    assert re.search(r"chown\s+\S+\s+.*/cache\b", dockerfile)
    for workload in workloads():
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


# -- compose ----------------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())


def interpolate(text: str) -> str:
    """Compose's interpolation with nothing set: ${VAR:-default} is the default, ${VAR:?message} a stand-in,
    a bare $VAR or ${VAR} nothing, and `$$` a `$` (so a shell variable written with one `$` comes out empty,
    as compose would leave it)."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(4) is not None:
            return ""
        return {"-": m.group(3), "?": "x"}.get(m.group(2) or "", "")
    return re.sub(r"\$\$|\$\{([A-Za-z0-9_]+)(?::([-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", one, text)


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's `environment`, list or mapping, as a mapping (None: passed through from compose's own)."""
    env = service.get("environment", {})
    if isinstance(env, dict):
        return {k: None if v is None else str(v) for k, v in env.items()}
    return {k: v for k, _, v in (item.partition("=") if "=" in item else (item, "", None) for item in env)}


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


def test_compose_publishes_prometheus_and_grafana_on_loopback_and_grafana_asks_for_a_login() -> None:
    doc = compose()
    services = doc["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["ports"] and all(str(p).startswith("127.0.0.1:") for p in services[name]["ports"])
    env = environment(services["grafana"])
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED", "false") == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env  # a password in the file or the environment leaks
    (secret,) = services["grafana"]["secrets"]
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == f"/run/secrets/{secret}" and secret in doc["secrets"]


def restrictions(args: list[str]) -> dict[str, tuple[set[str], str]]:
    """tritonserver's restricted-API flags in `args`: option -> (API groups, `key=value`)."""
    found = {}
    for arg in args:
        option, _, value = arg.partition("=")
        if option in ("--http-restricted-api", "--grpc-restricted-protocol"):
            apis, _, restriction = value.partition(":")
            found[option] = (set(apis.split(",")), restriction)
    return found


def triton_argv(service: dict[str, Any], key_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """What the Triton service's wrapper runs, found by running it with `printf` in place of tritonserver and
    the service's key file replaced by one holding `key_text`."""
    argv = [interpolate(str(a)) for a in service["command"]]
    (secret,) = service["secrets"]
    key_file = tmp_path / "key"
    key_file.write_text(key_text)
    shell, flag, script, zero, binary, *rest = argv
    assert (shell, flag, binary) == ("/bin/sh", "-c", "tritonserver")
    assert f"/run/secrets/{secret}" in script
    script = script.replace(f"/run/secrets/{secret}", str(key_file))
    return subprocess.run(["/bin/sh", "-c", script, zero, "printf", "%s\\n", binary, *rest],
                          capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("name", ["triton", "triton-2"])
def test_compose_triton_answers_only_the_gateway_holding_its_key(name: str, tmp_path: Path) -> None:
    doc = compose()
    services = doc["services"]
    triton = services[name]
    assert "ports" not in triton  # not on the host: the gateways reach it on the compose network
    done = triton_argv(triton, "s3cret-value\n", tmp_path)
    assert done.returncode == 0, done.stderr
    args = done.stdout.splitlines()
    assert args[0] == "tritonserver" and "--model-repository=/cache/repo" in args
    # The restrictions the embedded Triton gets: every API but health, under the header the gateway sends.
    expected = restrictions(triton_auth.triton_args("s3cret-value"))
    assert restrictions(args) == expected and len(expected) == 2
    assert all("health" not in apis for apis, _ in expected.values())
    healthcheck = " ".join(triton["healthcheck"]["test"])
    assert "/v2/health/" in healthcheck  # health stays open, so the healthcheck needs no key
    (secret,) = triton["secrets"]
    gateways = [g for g in services.values() if g.get("command", [None])[0] == "serve"
                and parse_cli([interpolate(str(a)) for a in g["command"]]).triton_http_url == f"{name}:8000"]
    assert len(gateways) == 1
    gateway = parse_cli([interpolate(str(a)) for a in gateways[0]["command"]])
    assert str(gateway.triton_api_key_file) == f"/run/secrets/{secret}" and secret in gateways[0]["secrets"]
    assert gateway.triton_grpc_url == f"{name}:8001"


def test_compose_triton_does_not_start_without_a_key(tmp_path: Path) -> None:
    done = triton_argv(compose()["services"]["triton"], "\n", tmp_path)
    assert done.returncode != 0 and "tritonserver" not in done.stdout


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
