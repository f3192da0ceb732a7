"""examples/kubernetes holds together: every manifest is valid against the Kubernetes
schemas, the manifests agree with the image the Dockerfile builds (ports, user, the
command and the paths it reads, the health check's path) and with the routes.yaml their
ConfigMap carries (listener and admin ports, the drain's grace period), that routes.yaml
passes the gateway's own validation, and a real gateway running it answers the probes'
paths with 200."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from proxy.config.load import parse_config
from proxy.config.model import Config
from proxy.process.supervisor import KILL_AFTER_GRACE_S
from tests.support.gateway_process import free_port, run_gateway, wait_until

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "kubernetes"
MANIFESTS = sorted([*EXAMPLE.glob("*.yaml"), *EXAMPLE.glob("etcd/*.yaml")])
# The oldest Kubernetes release still in its makers' support when this was written, and
# the first with everything used here (autoscaling/v2, policy/v1, seccompProfile).
KUBERNETES_VERSION = "1.30.0"
ENV = {"GATEHOUSE_ADMIN_TOKEN": "k" * 64}
CLIENT_TIMEOUT_S = 10.0

Manifest = dict[str, Any]


def documents(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest(kind: str, path: Path) -> Manifest:
    """The one object of `kind` in the file at `path`."""
    (found,) = [doc for doc in documents(path) if doc["kind"] == kind]
    return found


FILE_DEPLOYMENT = manifest("Deployment", EXAMPLE / "deployment.yaml")
ETCD_DEPLOYMENT = manifest("Deployment", EXAMPLE / "etcd" / "deployment.yaml")
DEPLOYMENTS = pytest.mark.parametrize(
    "deployment", [FILE_DEPLOYMENT, ETCD_DEPLOYMENT], ids=["file", "etcd"]
)
ROUTES_YAML = manifest("ConfigMap", EXAMPLE / "configmap.yaml")["data"]["routes.yaml"]


# -- the image, as the Dockerfile builds it ------------------------------------------
def final_stage() -> dict[str, str]:
    """The Dockerfile's final stage: each instruction's arguments, by instruction (the
    last one wins, as for Docker), with continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    stages = [n for n, line in enumerate(lines) if line.upper().startswith("FROM ")]
    instructions: dict[str, str] = {}
    for line in lines[stages[-1] :]:
        word, _, rest = line.partition(" ")
        instructions[word.upper()] = rest.strip()
    return instructions


IMAGE = final_stage()


def image_ports() -> set[int]:
    return {int(port.split("/")[0]) for port in IMAGE["EXPOSE"].split()}


def image_user() -> tuple[int, int]:
    user, _, group = IMAGE["USER"].partition(":")
    return int(user), int(group or user)


def image_health_path() -> str:
    """The path the image's HEALTHCHECK asks the admin listener for."""
    match = re.search(r"http://127\.0\.0\.1:\{port\}(/\w+)", IMAGE["HEALTHCHECK"])
    assert match is not None, IMAGE["HEALTHCHECK"]
    return match.group(1)


def command_of(container: Manifest) -> list[str]:
    """What the container runs: Kubernetes' `command` replaces the image's ENTRYPOINT and
    `args` its CMD; a `command` without `args` drops the CMD."""
    entrypoint = json.loads(IMAGE["ENTRYPOINT"])
    cmd = json.loads(IMAGE["CMD"])
    command = container.get("command", entrypoint)
    args = container.get("args", cmd if "command" not in container else [])
    return [*command, *args]


# -- the manifests -------------------------------------------------------------------
def the_container(deployment: Manifest) -> Manifest:
    containers: list[Manifest] = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = containers
    return container


def container_ports(deployment: Manifest) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in the_container(deployment)["ports"]}


def mounts(deployment: Manifest) -> dict[str, Manifest]:
    """Mount path -> the volume mounted there (with the mount's subPath, if any)."""
    pod = deployment["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    return {
        mount["mountPath"]: {**volumes[mount["name"]], "subPath": mount.get("subPath")}
        for mount in the_container(deployment)["volumeMounts"]
    }


def pod_labels(deployment: Manifest) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def routes_config() -> Config:
    return parse_config(ROUTES_YAML, source="configmap.yaml:routes.yaml", env=ENV)


# -- validation ----------------------------------------------------------------------
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: str(path.relative_to(EXAMPLE)))
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_example_has_every_kind_the_fleet_needs() -> None:
    kinds = {doc["kind"] for path in MANIFESTS for doc in documents(path)}
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    }


def test_the_configmaps_routes_yaml_passes_the_gateways_validation() -> None:
    config = routes_config()
    assert config.admin is not None
    assert config.admin.token == ENV["GATEHOUSE_ADMIN_TOKEN"]  # the admin port needs it
    assert config.reload.watch  # a ConfigMap update is picked up


# -- agreement with the image --------------------------------------------------------
@DEPLOYMENTS
def test_the_container_ports_are_the_ports_the_image_exposes(deployment: Manifest) -> None:
    assert set(container_ports(deployment).values()) == image_ports()


@DEPLOYMENTS
def test_the_pod_runs_as_the_images_user_non_root_on_a_read_only_root(
    deployment: Manifest,
) -> None:
    pod = deployment["spec"]["template"]["spec"]
    context = {**pod["securityContext"], **the_container(deployment)["securityContext"]}
    assert (context["runAsUser"], context["runAsGroup"]) == image_user()
    assert context["runAsUser"] != 0
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    # Where the gateway may write with a read-only root: its shared tables' fallback.
    assert "emptyDir" in mounts(deployment)["/tmp"]
    resources = the_container(deployment)["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}


def test_the_command_reads_routes_yaml_from_the_configmap_mounted_as_a_directory() -> None:
    command = command_of(the_container(FILE_DEPLOYMENT))
    assert command[:2] == ["gatehouse", "run"]
    path = Path(command[2])
    volume = mounts(FILE_DEPLOYMENT)[str(path.parent)]
    assert (
        volume["configMap"]["name"]
        == manifest("ConfigMap", EXAMPLE / "configmap.yaml")["metadata"]["name"]
    )
    assert volume["subPath"] is None  # a subPath mount never sees an update
    assert path.name == "routes.yaml"


def test_the_etcd_variant_reads_etcd_and_caches_on_a_writable_volume() -> None:
    command = command_of(the_container(ETCD_DEPLOYMENT))
    assert command[:2] == ["gatehouse", "run"]
    assert command[2].startswith("etcd://")
    cache = Path(command[command.index("--config-cache") + 1])
    assert "emptyDir" in mounts(ETCD_DEPLOYMENT)[str(cache.parent)]
    assert not any("configMap" in volume for volume in mounts(ETCD_DEPLOYMENT).values())


@DEPLOYMENTS
def test_the_probes_ask_the_admin_listener_and_liveness_what_the_healthcheck_asks(
    deployment: Manifest,
) -> None:
    container = the_container(deployment)
    liveness, readiness = container["livenessProbe"], container["readinessProbe"]
    assert liveness["httpGet"]["path"] == image_health_path()
    assert readiness["httpGet"]["path"] == "/readyz"
    config = routes_config()
    assert config.admin is not None
    for probe in (liveness, readiness):
        assert container_ports(deployment)[probe["httpGet"]["port"]] == config.admin.port


@DEPLOYMENTS
def test_the_traffic_port_is_the_listeners(deployment: Manifest) -> None:
    (listener,) = routes_config().listeners
    assert container_ports(deployment)["http"] == listener.port


@DEPLOYMENTS
def test_the_kubelet_waits_out_the_prestop_sleep_and_the_drain(deployment: Manifest) -> None:
    pod = deployment["spec"]["template"]["spec"]
    command = the_container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    sleep_s = float(command[1])
    drain_s = routes_config().grace_period + KILL_AFTER_GRACE_S
    assert pod["terminationGracePeriodSeconds"] > sleep_s + drain_s


# -- the other objects select the gateways -------------------------------------------
def test_the_service_sends_its_port_to_the_traffic_port_and_not_the_admin_port() -> None:
    service = manifest("Service", EXAMPLE / "service.yaml")
    assert selects(service["spec"]["selector"], pod_labels(FILE_DEPLOYMENT))
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]


def test_the_disruption_budget_and_the_autoscaler_cover_the_deployment() -> None:
    budget = manifest("PodDisruptionBudget", EXAMPLE / "pdb.yaml")
    assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels(FILE_DEPLOYMENT))
    autoscaler = manifest("HorizontalPodAutoscaler", EXAMPLE / "hpa.yaml")
    target = autoscaler["spec"]["scaleTargetRef"]
    for deployment in (FILE_DEPLOYMENT, ETCD_DEPLOYMENT):
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # One pod may be disrupted and the autoscaler's floor still leaves two.
    assert autoscaler["spec"]["minReplicas"] - budget["spec"]["maxUnavailable"] >= 2


def test_the_network_policy_opens_the_traffic_port_and_keeps_the_admin_port_private() -> None:
    policy = manifest("NetworkPolicy", EXAMPLE / "networkpolicy.yaml")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(FILE_DEPLOYMENT))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}
    assert set(rules) == {"http", "admin"}
    assert "from" not in rules["http"]  # anyone
    (source,) = rules["admin"]["from"]
    assert source["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert source["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


# -- a real gateway on the ConfigMap's routes.yaml -----------------------------------
@pytest.mark.socket
def test_a_gateway_running_the_configmaps_config_answers_the_probes(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    listener = routes_config().listeners[0]
    config = routes_config().admin
    assert config is not None
    text = ROUTES_YAML
    for bound, local in ((listener, port), (config, admin)):
        written = f"bind: {bound.host}:{bound.port}"
        assert text.count(written) == 1, written
        text = text.replace(written, f"bind: 127.0.0.1:{local}")
    container = the_container(FILE_DEPLOYMENT)
    # The kubelet asks by the pod's IP and the container port, without a token.
    headers = {"Host": f"10.1.2.3:{config.port}"}

    def probe(kind: str) -> httpx.Response:
        path = container[kind]["httpGet"]["path"]
        url = f"http://127.0.0.1:{admin}{path}"
        return httpx.get(url, headers=headers, timeout=CLIENT_TIMEOUT_S)

    with run_gateway(text, tmp_path, port=port, env=ENV):
        assert probe("livenessProbe").status_code == 200
        # Ready once a worker serves (the kubelet too asks again until then).
        wait_until(lambda: probe("readinessProbe").status_code == 200, 10.0, "/readyz")
        metrics = f"http://127.0.0.1:{admin}/metrics"
        # Everything else needs the token.
        assert httpx.get(metrics, headers=headers, timeout=CLIENT_TIMEOUT_S).status_code == 401
        bearer = {**headers, "Authorization": f"Bearer {ENV['GATEHOUSE_ADMIN_TOKEN']}"}
        assert httpx.get(metrics, headers=bearer, timeout=CLIENT_TIMEOUT_S).status_code == 200


def test_the_readme_names_every_manifest() -> None:
    readme = (EXAMPLE / "README.md").read_text()
    for path in MANIFESTS:
        assert f"`{path.relative_to(EXAMPLE)}`" in readme, path.name
