"""Offline validation of the deployment files: ``make validate-deploy``.

Runs with the validators' own Python (``scripts/install-validators.sh`` installs it with
kubernetes-validate, jsonschema and PyYAML), needs no Docker engine, no cluster and no network:

1. ``Dockerfile``: hadolint (warnings fail).
2. ``docker-compose.yml``: ${VAR} interpolation as compose does it, then the compose-spec JSON
   schema (the one ``docker compose`` itself validates with, from compose-go), then what the
   schema cannot see: ``depends_on`` and named volumes point at things that exist.
3. ``deploy/k8s``: ``kustomize build`` of every overlay; every rendered object of a built-in
   kind against the Kubernetes JSON schemas of kubernetes-validate (strict: unknown fields
   fail). Custom resources (Strimzi, CloudNativePG, Barman Cloud, Prometheus Operator, KEDA)
   have no local schema and are skipped by name, and counted; any *other* kind without a
   schema fails, so a typo in an apiVersion cannot slip through as "unknown".
4. kube-score on each rendered overlay (criticals and warnings fail), standing in for
   kube-linter, which no reachable registry serves.
5. tokvel's own rules on the rendered overlays, which no generic linter knows: probes,
   resources and a locked-down security context on every workload; exactly one ingestor; the
   Grafana dashboard shipped as the sidecar's ConfigMap, identical to deploy/grafana's file.
6. ``docs/asyncapi.yaml``: the official AsyncAPI parser (@asyncapi/parser, npm): the document
   against the AsyncAPI schema, bindings included, every $ref resolved (the payloads are the
   checked-in JSON Schemas), and the parser's own rules.
7. PromQL: every expression of the Grafana dashboard (targets and variable queries) and of the
   PrometheusRule parsed with promql-parser (a port of Prometheus' parser). That the metrics
   exist in the services' code is tests/unit/test_docs_contracts.py's job.

Every check runs even after one fails; the exit code is 1 when any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

# jsonschema, promql-parser and kubernetes-validate live in the validators' venv
# (install-validators.sh), not in the project's, where mypy runs.
import jsonschema  # type: ignore[import-untyped]
import promql_parser  # type: ignore[import-not-found]
import yaml
from kubernetes_validate import utils as kv  # type: ignore[import-not-found]

ROOT: Final = Path(__file__).resolve().parents[1]
COMPOSE_FILE: Final = ROOT / "docker-compose.yml"
DOCKERFILE: Final = ROOT / "Dockerfile"
K8S_DIR: Final = ROOT / "deploy" / "k8s"
OVERLAYS: Final = ("dev", "prod", "prod-keda")
ASYNCAPI_DOC: Final = ROOT / "docs" / "asyncapi.yaml"
ASYNCAPI_VALIDATOR: Final = ROOT / "scripts" / "asyncapi" / "validate.cjs"
DASHBOARD: Final = ROOT / "deploy" / "grafana" / "tokvel-dashboard.json"
DASHBOARD_CONFIGMAP: Final = "tokvel-grafana-dashboard"

# The oldest and the newest Kubernetes minor we promise to work on (deploy/k8s/README.md).
KUBERNETES_VERSIONS: Final = ("1.30.0", "1.34.0")

# API groups of the operators' custom resources: no schema ships for them.
CRD_GROUPS: Final = {
    "kafka.strimzi.io": "Strimzi",
    "postgresql.cnpg.io": "CloudNativePG",
    "barmancloud.cnpg.io": "CloudNativePG Barman Cloud plugin",
    "monitoring.coreos.com": "Prometheus Operator",
    "keda.sh": "KEDA",
}

# Variables the compose file requires (${VAR:?}); a placeholder stands in for each, so the
# check never depends on the caller's environment.
COMPOSE_REQUIRED_VARS: Final = {"API_KEY_PEPPER": "validation-placeholder"}

KUBE_SCORE_ARGS: Final = (
    "--kubernetes-version",
    "v1.30",
    "--exit-one-on-warning",
    # CPU limits throttle latency-sensitive Python services for no benefit; requests are set.
    "--ignore-container-cpu-limit",
    # Tags are pinned and immutable (dev runs an image loaded into the cluster, which Always
    # would try, and fail, to pull).
    "--ignore-test",
    "container-image-pull-policy",
    "--enable-optional-test",
    "container-seccomp-profile",
    "--enable-optional-test",
    "container-ports-check",
)


@dataclass
class Tools:
    root: Path

    @property
    def kustomize(self) -> Path:
        return self.root / "bin" / "kustomize"

    @property
    def kube_score(self) -> Path:
        return self.root / "bin" / "kube-score"

    @property
    def hadolint(self) -> Path:
        return self.root / "venv" / "bin" / "hadolint"

    @property
    def compose_schema(self) -> Path:
        return self.root / "schemas" / "compose-spec.json"

    @property
    def asyncapi_modules(self) -> Path:
        return self.root / "asyncapi" / "node_modules"


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.problems.append(message)

    def note(self, message: str) -> None:
        self.notes.append(message)


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    # Fixed argv lists of tools this script installed: no shell, no untrusted input.
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # noqa: S603


# ------------------------------------------------------------------------------- Dockerfile


def check_dockerfile(tools: Tools, report: Report) -> None:
    result = run(
        [str(tools.hadolint), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)]
    )
    if result.returncode != 0:
        report.fail(f"hadolint:\n{result.stdout}{result.stderr}".rstrip())
    else:
        report.note("hadolint: no findings")


# ---------------------------------------------------------------------------------- compose

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME, and $$.
_INTERPOLATION: Final = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    pass


def interpolate(value: Any, env: Mapping[str, str], required: set[str]) -> Any:
    """Compose's variable substitution over every string of the document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, required) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, required) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        op, arg = match["op"], match["arg"] or ""
        current = env.get(name)
        unset_or_empty = not current
        if op in (":?", "?"):
            required.add(name)
            if current is None or (op == ":?" and unset_or_empty):
                raise InterpolationError(f"required variable {name} is missing: {arg}")
            return current
        if op == ":-":
            return arg if unset_or_empty else str(current)
        if op == "-":
            return arg if current is None else current
        return current or ""

    if "$" in value and re.search(r"\$(?!\$|\{|[A-Za-z_])", value.replace("$$", "")):
        raise InterpolationError(f"invalid interpolation in {value!r}")
    return _INTERPOLATION.sub(substitute, value)


# Go's time.ParseDuration, which compose-go registers as the schema's "duration" format.
_GO_DURATION: Final = re.compile(r"^[-+]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+$|^0$")


def check_compose(tools: Tools, report: Report) -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    required: set[str] = set()
    try:
        document = interpolate(raw, COMPOSE_REQUIRED_VARS, required)
    except InterpolationError as exc:
        report.fail(f"compose interpolation: {exc}")
        return
    if required != set(COMPOSE_REQUIRED_VARS):
        report.fail(
            f"compose: required variables are {sorted(required)}, "
            f"expected {sorted(COMPOSE_REQUIRED_VARS)} (update this check and the docs)"
        )

    schema = yaml.safe_load(tools.compose_schema.read_text(encoding="utf-8"))
    checker = jsonschema.FormatChecker()
    checker.checks("duration")(lambda v: not isinstance(v, str) or bool(_GO_DURATION.match(v)))
    validator = jsonschema.Draft202012Validator(schema, format_checker=checker)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    for error in errors:
        where = ".".join(str(p) for p in error.absolute_path) or "(top)"
        report.fail(f"compose schema: {where}: {error.message}")

    services: dict[str, Any] = document.get("services", {})
    volumes = set(document.get("volumes") or {})
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for target in depends if isinstance(depends, list) else depends.keys():
            if target not in services:
                report.fail(f"compose: {name} depends on unknown service {target}")
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount.get("source")
            is_path = source is None or source.startswith((".", "/", "~"))
            if not is_path and source not in volumes:
                report.fail(f"compose: {name} mounts undeclared volume {source}")
        # compose-go parses these with time.ParseDuration after the schema, which leaves them
        # plain strings: "10 s" would pass the schema and fail `docker compose up`.
        durations = {
            f"healthcheck.{key}": service.get("healthcheck", {}).get(key)
            for key in ("interval", "timeout", "start_period", "start_interval")
        }
        durations["stop_grace_period"] = service.get("stop_grace_period")
        for key, value in durations.items():
            if value is not None and not _GO_DURATION.match(str(value)):
                report.fail(f"compose: {name}: {key} {value!r} is not a duration like 10s")
        build = service.get("build")
        if isinstance(build, dict):
            dockerfile = ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                report.fail(f"compose: {name} builds from missing {dockerfile}")
    if not report.problems:
        report.note(
            f"compose-spec schema: {len(services)} services valid "
            f"(required variables: {', '.join(sorted(required))})"
        )


# ------------------------------------------------------------------------------- kubernetes


def render(tools: Tools, overlay: str, report: Report) -> list[dict[str, Any]] | None:
    result = run([str(tools.kustomize), "build", str(K8S_DIR / "overlays" / overlay)])
    if result.returncode != 0:
        report.fail(f"kustomize build overlays/{overlay}:\n{result.stderr}".rstrip())
        return None
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    report.note(f"kustomize build overlays/{overlay}: {len(documents)} objects")
    return documents


def group_of(api_version: str) -> str:
    return api_version.split("/", 1)[0] if "/" in api_version else ""


def check_schemas(overlay: str, documents: list[dict[str, Any]], report: Report) -> None:
    skipped: Counter[str] = Counter()
    validated = 0
    for document in documents:
        kind, api_version = document.get("kind", "?"), document.get("apiVersion", "?")
        name = f"{kind}/{document.get('metadata', {}).get('name', '?')}"
        if group_of(api_version) in CRD_GROUPS:
            skipped[f"{kind} ({CRD_GROUPS[group_of(api_version)]})"] += 1
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kv.validate(document, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                report.fail(
                    f"{overlay}: {name} invalid for Kubernetes {version}: {path}: {exc.message}"
                )
            except kv.SchemaNotFoundError:
                report.fail(
                    f"{overlay}: {name}: no schema for {api_version} {kind} in Kubernetes "
                    f"{version} (a typo, or a CRD missing from CRD_GROUPS)"
                )
        validated += 1
    report.note(
        f"schemas overlays/{overlay}: {validated} objects valid for Kubernetes "
        f"{' and '.join(KUBERNETES_VERSIONS)}; skipped (custom resources, no local schema): "
        + (", ".join(f"{n} {k}" for k, n in sorted(skipped.items())) or "none")
    )


def check_kube_score(
    tools: Tools, overlay: str, documents: list[dict[str, Any]], report: Report
) -> None:
    # dev runs one replica of everything on purpose; elsewhere two is the floor.
    minimum = "1" if overlay == "dev" else "2"
    argv = [
        str(tools.kube_score),
        "score",
        *KUBE_SCORE_ARGS,
        "--min-replicas-deployment",
        minimum,
        "--min-replicas-hpa",
        minimum,
        "--output-format",
        "ci",
        "-",
    ]
    result = run(argv, input=yaml.safe_dump_all(documents, sort_keys=False))
    findings = [
        line for line in result.stdout.splitlines() if line.startswith(("[CRITICAL]", "[WARNING]"))
    ]
    if result.returncode != 0 or findings:
        detail = "\n".join(findings) or result.stderr
        report.fail(f"kube-score overlays/{overlay}:\n{detail}".rstrip())
    else:
        passed = sum(line.startswith("[OK]") for line in result.stdout.splitlines())
        report.note(f"kube-score overlays/{overlay}: {passed} checks passed, no findings")


# Workload kinds whose pods we run (the operators' pods are the operators' business).
WORKLOAD_KINDS: Final = {"Deployment", "StatefulSet", "Job"}
LONG_RUNNING_KINDS: Final = {"Deployment", "StatefulSet"}


def containers_of(workload: Mapping[str, Any]) -> Iterator[tuple[Mapping[str, Any], Any]]:
    pod = workload["spec"]["template"]["spec"]
    for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
        yield pod, container


def check_rules(overlay: str, documents: list[dict[str, Any]], report: Report) -> None:
    def fail(what: str, message: str) -> None:
        report.fail(f"{overlay}: {what}: {message}")

    for document in documents:
        kind = document.get("kind")
        if kind not in WORKLOAD_KINDS:
            continue
        what = f"{kind}/{document['metadata']['name']}"
        for pod, container in containers_of(document):
            c = f"{what} container {container['name']}"
            if kind in LONG_RUNNING_KINDS:
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in container:
                        fail(c, f"no {probe}")
            resources = container.get("resources", {})
            for needed in ("cpu", "memory"):
                if needed not in resources.get("requests", {}):
                    fail(c, f"no {needed} request")
            if "memory" not in resources.get("limits", {}):
                fail(c, "no memory limit")
            pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
            if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
                fail(c, "runAsNonRoot is not true")
            if sc.get("readOnlyRootFilesystem") is not True:
                fail(c, "readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                fail(c, "allowPrivilegeEscalation is not false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                fail(c, "capabilities do not drop ALL")

    # Exactly one active ingestor: one replica, never two during a rollout, nothing scaling it.
    ingestors = [
        d
        for d in documents
        if d.get("kind") == "Deployment" and d["metadata"]["name"] == "tokvel-ingestor"
    ]
    if len(ingestors) != 1:
        fail("ingestor", f"{len(ingestors)} Deployments named tokvel-ingestor, expected 1")
    for ingestor in ingestors:
        if ingestor["spec"].get("replicas") != 1:
            fail("ingestor", "replicas is not 1")
        if ingestor["spec"].get("strategy", {}).get("type") != "Recreate":
            fail("ingestor", "strategy is not Recreate (a rolling update runs two pollers)")
    for document in documents:
        target = document.get("spec", {}).get("scaleTargetRef", {}).get("name")
        if document.get("kind") in ("HorizontalPodAutoscaler", "ScaledObject") and (
            target == "tokvel-ingestor"
        ):
            fail("ingestor", f"{document['kind']} {document['metadata']['name']} scales it")
    # The dashboard ConfigMap for Grafana's sidecar, with the file's dashboard, unchanged.
    dashboards = [
        d
        for d in documents
        if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == DASHBOARD_CONFIGMAP
    ]
    if len(dashboards) != 1:
        fail("grafana", f"{len(dashboards)} ConfigMaps named {DASHBOARD_CONFIGMAP}, expected 1")
    for configmap in dashboards:
        if configmap["metadata"].get("labels", {}).get("grafana_dashboard") != "1":
            fail("grafana", f'{DASHBOARD_CONFIGMAP} lacks the label grafana_dashboard: "1"')
        shipped = configmap.get("data", {}).get(DASHBOARD.name)
        if shipped is None or json.loads(shipped) != json.loads(DASHBOARD.read_text("utf-8")):
            fail("grafana", f"{DASHBOARD_CONFIGMAP} does not hold {DASHBOARD.name} as it is")
    if not any(p.startswith(f"{overlay}:") for p in report.problems):
        report.note(
            f"tokvel rules overlays/{overlay}: probes, resources, security, one ingestor, "
            "the Grafana dashboard ConfigMap"
        )


# ----------------------------------------------------------------------------- AsyncAPI


def check_asyncapi(tools: Tools, report: Report) -> None:
    result = run(
        [
            "node",
            str(ASYNCAPI_VALIDATOR),
            "--modules",
            str(tools.asyncapi_modules),
            str(ASYNCAPI_DOC.relative_to(ROOT)),
        ],
        cwd=ROOT,
    )
    lines = (result.stdout + result.stderr).strip().splitlines()
    if result.returncode != 0:
        report.fail("@asyncapi/parser:\n" + "\n".join(lines))
    else:
        for line in lines:
            report.note(f"@asyncapi/parser: {line}")


# -------------------------------------------------------------------------------- PromQL

# Grafana's variables, replaced by values of the same syntactic kind before parsing.
_GRAFANA_DURATIONS: Final = re.compile(r"\$__(?:rate_interval|interval|range)\b")
_GRAFANA_VARIABLE: Final = re.compile(r"\$(?:\{[A-Za-z_][A-Za-z0-9_:]*\}|[A-Za-z_][A-Za-z0-9_]*)")
# Grafana's Prometheus variable query label_values(SELECTOR, LABEL): only SELECTOR is PromQL.
_LABEL_VALUES: Final = re.compile(r"^\s*label_values\((?P<selector>.*),\s*[A-Za-z_]\w*\s*\)\s*$")


def dashboard_expressions(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel's targets (inside collapsed rows too) and variables."""
    panels = list(dashboard.get("panels", []))
    for panel in list(panels):
        panels.extend(panel.get("panels", []))
    for panel in panels:
        for target in panel.get("targets", []):
            if "expr" in target:
                yield f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query)
        match = _LABEL_VALUES.match(text)
        yield f"variable {variable.get('name')!r}", match["selector"] if match else text


def rule_expressions() -> Iterator[tuple[str, str]]:
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not document or document.get("kind") != "PrometheusRule":
                continue
            for group in document["spec"]["groups"]:
                for rule in group["rules"]:
                    name = rule.get("alert") or rule.get("record")
                    yield f"{path.relative_to(ROOT)} {name}", str(rule["expr"])


def check_promql(report: Report) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    checked = {"dashboard": 0, "rules": 0}
    sources = [("dashboard", dashboard_expressions(dashboard)), ("rules", rule_expressions())]
    for kind, expressions in sources:
        for where, expression in expressions:
            text = _GRAFANA_DURATIONS.sub("5m", expression)
            text = _GRAFANA_VARIABLE.sub("x", text)
            try:
                promql_parser.parse(text)
            except ValueError as exc:
                report.fail(f"PromQL {where}: {exc}: {expression}")
            checked[kind] += 1
    if checked["dashboard"] == 0 or checked["rules"] == 0:
        report.fail(f"PromQL: found {checked}, expected expressions in both")
    report.note(
        f"promql-parser: {checked['dashboard']} dashboard expressions, "
        f"{checked['rules']} PrometheusRule expressions"
    )


# ------------------------------------------------------------------------------------ main


def default_tools_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("TOKVEL_TOOLS_DIR") or Path(cache) / "tokvel" / "tools")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tools", type=Path, default=default_tools_dir(), help="validators dir")
    args = parser.parse_args(list(argv) if argv is not None else None)
    tools = Tools(args.tools)
    missing = [
        str(p)
        for p in (
            tools.kustomize,
            tools.kube_score,
            tools.hadolint,
            tools.compose_schema,
            tools.asyncapi_modules,
        )
        if not p.exists()
    ]
    if missing:
        sys.stderr.write(
            f"validators missing ({', '.join(missing)}): run scripts/install-validators.sh\n"
        )
        return 2

    steps: list[tuple[str, Callable[[Report], None]]] = [
        ("Dockerfile (hadolint)", lambda r: check_dockerfile(tools, r)),
        ("docker-compose.yml (compose-spec)", lambda r: check_compose(tools, r)),
    ]
    for overlay in OVERLAYS:

        def kubernetes(report: Report, overlay: str = overlay) -> None:
            documents = render(tools, overlay, report)
            if documents is None:
                return
            check_schemas(overlay, documents, report)
            check_kube_score(tools, overlay, documents, report)
            check_rules(overlay, documents, report)

        steps.append((f"deploy/k8s/overlays/{overlay}", kubernetes))
    steps.append(("docs/asyncapi.yaml (@asyncapi/parser)", lambda r: check_asyncapi(tools, r)))
    steps.append(("PromQL: deploy/grafana, PrometheusRule (promql-parser)", check_promql))

    failed = 0
    for title, step in steps:
        started = time.monotonic()
        report = Report()
        step(report)
        status = "FAIL" if report.problems else "ok"
        sys.stdout.write(f"==> {title}: {status} ({time.monotonic() - started:.1f}s)\n")
        for line in report.notes:
            sys.stdout.write(f"    {line}\n")
        for problem in report.problems:
            sys.stdout.write("    ERROR " + problem.replace("\n", "\n          ") + "\n")
        failed += bool(report.problems)
    sys.stdout.write(f"validate-deploy: {len(steps) - failed} passed, {failed} failed\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
