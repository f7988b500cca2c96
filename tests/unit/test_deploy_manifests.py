"""What must hold in docker-compose.yml, the Dockerfile and deploy/k8s, read from the files.

`make validate-deploy` runs the real tools (kustomize, schemas, kube-score, hadolint) on the
rendered output; these tests pin down tokvel's own rules on the sources, in milliseconds and
without any tool: the properties a reviewer would otherwise have to re-check by eye, and the
places where the manifests must agree with the code (ports, topics, metric names).
"""

from __future__ import annotations

import importlib
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from tokvel_common import topics

ROOT: Final = Path(__file__).resolve().parents[2]
K8S: Final = ROOT / "deploy" / "k8s"
COMPOSE: Final = ROOT / "docker-compose.yml"
DOCKERFILE: Final = ROOT / "Dockerfile"

Doc = dict[str, Any]

# service -> (settings module, settings class, host field, port field): where each service
# reads the address it listens on, so the manifests can be checked against the code.
SERVICE_SETTINGS: Final = {
    "ingestor": ("ingestor.settings", "IngestorSettings", "ingestor_ops_host", "ingestor_ops_port"),
    "velocity": ("velocity.settings", "VelocitySettings", "velocity_ops_host", "velocity_ops_port"),
    "writer": ("writer.settings", "WriterSettings", "writer_ops_host", "writer_ops_port"),
    "gateway": ("api_gateway.settings", "GatewaySettings", "host", "port"),
    "ws": ("ws_broadcaster.settings", "WsSettings", "ws_host", "ws_port"),
    "cmc-replay": ("ingestor.settings", "ReplaySettings", "replay_host", "replay_port"),
}


def load_documents(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def kustomization_files(directory: Path) -> Iterator[Doc]:
    """The objects of the files a kustomization lists (bases it includes are listed apart)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text("utf-8"))
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_file():
            yield from load_documents(path)


def all_objects() -> list[Doc]:
    objects = list(kustomization_files(K8S / "base"))
    for overlay in sorted((K8S / "overlays").iterdir()):
        objects.extend(kustomization_files(overlay))
    for component in sorted((K8S / "components").iterdir()):
        objects.extend(kustomization_files(component))
    return objects


def workloads(kinds: tuple[str, ...] = ("Deployment", "StatefulSet")) -> list[Doc]:
    return [o for o in all_objects() if o["kind"] in kinds]


def named(kind: str, name: str) -> Doc:
    matches = [o for o in all_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def compose() -> Doc:
    document: Doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return document


def env_of(container: Doc) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def listen_address(service: str, env: dict[str, str]) -> tuple[str, int]:
    """Host and port the service binds, given the environment a manifest gives it."""
    module, class_name, host_field, port_field = SERVICE_SETTINGS[service]
    fields = getattr(importlib.import_module(module), class_name).model_fields
    host = env.get(host_field.upper(), fields[host_field].default)
    port = int(env.get(port_field.upper(), fields[port_field].default))
    return str(host), port


# ------------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize(
    "workload", workloads(), ids=lambda w: f"{w['kind']}/{w['metadata']['name']}"
)
def test_every_workload_has_probes_resources_and_a_locked_down_security_context(
    workload: Doc,
) -> None:
    pod = workload["spec"]["template"]["spec"]
    assert pod.get("automountServiceAccountToken") is False
    for container in pod["containers"]:
        assert "livenessProbe" in container and "readinessProbe" in container
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"])
        assert "memory" in resources["limits"]
        security = container["securityContext"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]


def test_exactly_one_ingestor_is_active() -> None:
    ingestor = named("Deployment", "tokvel-ingestor")
    assert ingestor["spec"]["replicas"] == 1
    # A rolling update would run the new pod beside the old one: Recreate stops it first.
    assert ingestor["spec"]["strategy"]["type"] == "Recreate"
    # Nothing scales it, in any overlay or component...
    for obj in all_objects():
        if obj["kind"] in ("HorizontalPodAutoscaler", "ScaledObject"):
            assert obj["spec"]["scaleTargetRef"]["name"] != "tokvel-ingestor"
    # ...and no overlay patches it (replicas and strategy stay the base's).
    for kustomization in K8S.glob("*/*/kustomization.yaml"):
        text = yaml.safe_load(kustomization.read_text("utf-8"))
        assert "tokvel-ingestor" not in str(text.get("patches", "")), kustomization
        assert "tokvel-ingestor" not in str(text.get("replicas", "")), kustomization
    # The second guard is the ingestor's own Redis lease; a lease owner named after the pod
    # makes it visible which replica polls.
    container = ingestor["spec"]["template"]["spec"]["containers"][0]
    instance = next(e for e in container["env"] if e["name"] == "INGESTOR_INSTANCE_ID")
    assert instance["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize("service", sorted(SERVICE_SETTINGS))
def test_kubernetes_probes_the_port_the_service_listens_on(service: str) -> None:
    deployment = named("Deployment", f"tokvel-{service}")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["run", service]
    host, port = listen_address(service, env_of(container))
    assert host == "0.0.0.0"  # probes and Prometheus come from outside the pod
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    for probe in ("livenessProbe", "readinessProbe"):
        handler = container[probe].get("httpGet") or container[probe]["tcpSocket"]
        assert handler["port"] == "http"


def test_hpas_cover_gateway_ws_and_velocity_with_pdbs() -> None:
    scaled = {o["spec"]["scaleTargetRef"]["name"] for o in workloads(("HorizontalPodAutoscaler",))}
    assert scaled == {"tokvel-gateway", "tokvel-ws", "tokvel-velocity"}
    budgets = {
        o["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for o in workloads(("PodDisruptionBudget",))
    }
    assert budgets == {"tokvel-gateway", "tokvel-ws", "tokvel-velocity", "tokvel-writer"}
    # A KEDA ScaledObject replaces the velocity HPA where used (never both on one target).
    scaled_object = named("ScaledObject", "tokvel-velocity")
    assert scaled_object["spec"]["maxReplicaCount"] == topics.DEFAULT_PARTITIONS


def test_kafka_topics_match_the_code() -> None:
    declared = {
        o["spec"]["topicName"]: o["spec"] for o in all_objects() if o["kind"] == "KafkaTopic"
    }
    assert set(declared) == {spec.name for spec in topics.TOPICS}
    for spec in topics.TOPICS:
        topic = declared[spec.name]
        assert topic["partitions"] == spec.partitions
        assert {k: str(v) for k, v in topic["config"].items()} == spec.config
    assert declared[topics.METRICS_LATEST]["config"]["cleanup.policy"] == "compact"


def test_postgres_is_backed_up_in_production() -> None:
    cluster = named("Cluster", "tokvel-pg")
    assert cluster["spec"]["bootstrap"]["initdb"] == {"database": "tokvel", "owner": "tokvel"}
    prod = list(kustomization_files(K8S / "overlays" / "prod"))
    backups = [o for o in prod if o["kind"] == "ScheduledBackup"]
    assert [b["spec"]["cluster"]["name"] for b in backups] == ["tokvel-pg"]


def test_redis_persists_with_aof_every_second() -> None:
    redis = named("StatefulSet", "tokvel-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    options = dict(zip(args[1::2], args[2::2], strict=False))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "volatile-lru"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_alerts_use_metrics_the_services_export() -> None:
    exported = "\n".join(p.read_text("utf-8") for p in ROOT.glob("services/*/*/metrics.py"))
    rules = named("PrometheusRule", "tokvel")
    expressions = " ".join(
        str(rule["expr"]) for group in rules["spec"]["groups"] for rule in group["rules"]
    )
    service_metric = r"\b((?:ingestor|velocity|gateway|tokvel_writer|ws)_[a-z0-9_]+)"
    used = set(re.findall(service_metric, expressions))
    assert used, "no service metric found in the rules"
    for metric in used:
        # Counters gain _total on the wire, histograms _bucket/_count/_sum.
        base = re.sub(r"_(total|bucket|count|sum)$", "", metric)
        assert f'"{base}' in exported, f"{metric} is not exported by any service"
    groups = {group["name"] for group in rules["spec"]["groups"]}
    assert {"tokvel.freshness", "tokvel.consumer-lag", "tokvel.errors"} <= groups
    assert "tokvel.cmc-credits" in groups


# ---------------------------------------------------------------------------------- compose


def test_every_compose_service_has_a_healthcheck() -> None:
    services = compose()["services"]
    waited_for_completion = {
        target
        for service in services.values()
        for target, condition in service.get("depends_on", {}).items()
        if condition["condition"] == "service_completed_successfully"
    }
    for name, service in services.items():
        check = service["healthcheck"]
        if check.get("disable"):
            # Only one-shot jobs, which others wait for to *complete*, go without one.
            assert name in waited_for_completion, name
            assert service["restart"] == "no", name
        else:
            assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_compose_services_use_the_dockerfile() -> None:
    services = compose()["services"]
    tokvel = {n: s for n, s in services.items() if "build" in s}
    assert set(tokvel) == {"migrate", *SERVICE_SETTINGS}
    for name, service in tokvel.items():
        assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}, name
        assert service["read_only"] is True, name


@pytest.mark.parametrize("service", sorted(SERVICE_SETTINGS))
def test_compose_checks_the_port_the_service_listens_on(service: str) -> None:
    spec = compose()["services"][service]
    assert spec["command"] == ["run", service]
    host, port = listen_address(service, {k: str(v) for k, v in spec["environment"].items()})
    assert host == "0.0.0.0"  # other containers connect, not only the healthcheck
    assert f"http://127.0.0.1:{port}/" in spec["healthcheck"]["test"][-1]


def test_compose_starts_services_after_migrations_and_topics() -> None:
    services = compose()["services"]
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("writer", "gateway", "ws"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
    for name in ("ingestor", "velocity", "writer", "ws"):
        assert services[name]["depends_on"]["topics"] == {
            "condition": "service_completed_successfully"
        }
    assert services["ingestor"]["depends_on"]["cmc-replay"] == {"condition": "service_healthy"}
    replay = services["cmc-replay"]
    # The recording is mounted read-only from outside the repository, never copied into it.
    assert any(v.endswith(":/data:ro") for v in replay["volumes"])
    assert replay["environment"]["TOKVEL_REPLAY_DATA"].startswith("/data/")


def test_compose_topics_job_matches_the_code() -> None:
    script = compose()["services"]["topics"]["command"][0]
    created = {
        name: (int(partitions), dict(kv.split("=", 1) for kv in configs.split(",")))
        for name, partitions, configs in re.findall(r"^topic (\S+) (\d+) (\S+)$", script, re.M)
    }
    assert created == {spec.name: (spec.partitions, spec.config) for spec in topics.TOPICS}


def test_compose_secrets_are_required_not_defaulted() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    assert "API_KEY_PEPPER: ${API_KEY_PEPPER:?" in text
    assert "API_KEY_PEPPER: ${API_KEY_PEPPER:-" not in text


# ------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_every_workspace_member_and_runs_unprivileged() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    members = [
        path.relative_to(ROOT).as_posix()
        for pattern in pyproject["tool"]["uv"]["workspace"]["members"]
        for path in sorted(ROOT.glob(pattern))
        if (path / "pyproject.toml").is_file()
    ]
    assert members
    for member in members:
        # The dependency layer is built from these alone: a member missing here would fail
        # `uv sync --frozen` in the image.
        assert f"COPY {member}/pyproject.toml {member}/" in text, member
    final_stage = text[text.rindex("\nFROM ") :]
    assert "USER 10001:10001" in final_stage
    assert 'ENTRYPOINT ["tokvel"]' in final_stage
    assert "HEALTHCHECK" in final_stage
    assert "uv sync --frozen --no-dev" in text
