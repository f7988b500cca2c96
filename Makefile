# tokvel — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
TOKVEL := $(VENV)/bin/tokvel
UV     := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help setup lint fmt infra-up infra-down infra-status infra-reset migrate \
        test test-unit test-integration test-e2e demo schemas bench bench-velocity bench-ws \
        bench-writer bench-pipeline redis-cluster-up redis-cluster-down up down status logs

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(UV):
	python3 -m pip install --quiet --user uv

setup: $(UV) ## create .venv with every package of the workspace (from uv.lock)
	$(UV) sync --all-packages --frozen

lint: setup ## ruff check, ruff format --check, mypy strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy libs services tests

fmt: setup ## format and auto-fix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

infra-up: setup ## start private Kafka (KRaft), PostgreSQL 15, Redis 7 on loopback (idempotent)
	$(TOKVEL) infra up

infra-down: setup ## stop exactly the processes infra-up started
	$(TOKVEL) infra down

infra-status: setup ## state of each local service and its connection settings
	$(TOKVEL) infra status

infra-reset: setup ## stop the stack and delete its data
	$(TOKVEL) infra reset

migrate: setup ## apply the SQL migrations to DATABASE_URL (idempotent)
	$(TOKVEL) migrate

test: infra-up ## every test (unit, integration, e2e) against the real local stack
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup ## fast tests, no I/O
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: infra-up ## one adapter at a time against the real services
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: infra-up ## the whole stack from outside
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

schemas: setup ## regenerate the checked-in JSON Schemas of the Kafka messages
	$(PY) -m tokvel_common.schema_export

bench: infra-up ## every benchmark with its baseline, one table + bench/results/*.json (BENCH_ARGS=--quick ...)
	$(PY) bench/run.py $(BENCH_ARGS)

bench-velocity: infra-up ## quotes/s of one velocity worker vs a bare Faust agent, 2 workers vs 1, state memory
	$(PY) bench/velocity_throughput.py
	$(PY) bench/velocity_scaleout.py
	$(PY) bench/velocity_state_memory.py

bench-writer: infra-up ## rows/s of one writer vs raw COPY into the same table, same run
	$(PY) bench/writer_throughput.py

bench-ws: infra-up ## WS freshness raw -> client @ 1 000 subscribers; fan-out to 5 000 vs bare aiohttp
	$(PY) bench/ws_fanout.py

bench-pipeline: infra-up ## recorded week raw -> PostgreSQL: whole pipeline vs plain aiokafka + writer code
	$(PY) bench/pipeline.py

redis-cluster-up: setup ## a private 3-master Redis Cluster on 127.0.0.1:27380-27382 (tests start it too)
	$(PY) -m tokvel_common.infra.redis_cluster up

redis-cluster-down: setup ## stop the nodes redis-cluster-up started
	$(PY) -m tokvel_common.infra.redis_cluster down

demo: setup ## infra, migrations, a demo API key, the whole stack on the recorded data; prints URLs
	$(TOKVEL) demo

up: setup ## every service in the background, supervised, settings from the environment
	$(TOKVEL) up

down: setup ## stop the services `make up` / `make demo` started (the infrastructure stays)
	$(TOKVEL) down

status: setup ## each service: pid, state, restarts, last exit, URL
	$(TOKVEL) status

logs: setup ## the services' logs; SERVICE=name for one, FOLLOW=1 to follow
	$(TOKVEL) logs $(SERVICE) $(if $(FOLLOW),-f)

# Deployment files for users with Docker or Kubernetes, validated offline (no engine, no cluster):
# the validators are pinned and cached by scripts/install-validators.sh.
TOKVEL_TOOLS_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tokvel/tools
.PHONY: validate-deploy
validate-deploy: $(UV) ## Dockerfile, docker-compose.yml, deploy/k8s: linters and schemas, offline
	UV=$(UV) TOKVEL_TOOLS_DIR=$(TOKVEL_TOOLS_DIR) bash scripts/install-validators.sh
	$(TOKVEL_TOOLS_DIR)/venv/bin/python scripts/validate_deploy.py --tools $(TOKVEL_TOOLS_DIR)

# Recovery drills: they kill PostgreSQL for real on the stack of TOKVEL_RUN_DIR/TOKVEL_PORT_OFFSET
# (prefer a private one: TOKVEL_PORT_OFFSET=1000 TOKVEL_RUN_DIR=/tmp/drill make backup-drill).
.PHONY: backup-drill failover-drill
DRILL_ARGS ?=  # e.g. --ingest-seconds 120 --json drill.json
backup-drill: setup ## lose PostgreSQL's data, restore from the 2nd pgBackRest repo alone; RTO, RPO, 0 lost
	$(PY) -m tokvel_common.drills.backup $(DRILL_ARGS)

failover-drill: setup ## kill -9 the primary under load; time to promotion and to API healthy, rows lost
	$(PY) -m tokvel_common.drills.failover $(DRILL_ARGS)

# The bad-input and security suite (tests/abuse): a gateway and a broadcaster of its own, attacked;
# a table of figures at the end, non-zero exit on any failure. `make test` runs it small (CI);
# `make abuse` at full scale, on ports of its own (18800/18801), so it can run beside `make test`.
.PHONY: abuse audit
abuse: infra-up ## bad input and security at full scale (schemathesis 1 000+ cases, 10 000 keys...): figures
	TOKVEL_ABUSE_SCALE=full TOKVEL_ABUSE_GATEWAY_PORT=18800 TOKVEL_ABUSE_WS_PORT=18801 \
		$(PY) -m pytest tests/abuse $(PYTEST_ARGS)
	$(PY) scripts/audit_dependencies.py --uv $(UV) $(AUDIT_ARGS)

AUDIT_ARGS ?=  # --strict: a package that could not be audited fails the audit too
audit: setup ## pip-audit of every package uv.lock pins; accepted vulnerabilities in pyproject.toml
	$(PY) scripts/audit_dependencies.py --uv $(UV) $(AUDIT_ARGS)

# The chaos suite (tests/chaos): faults against the whole stack during a replay of the recorded
# week, a table of figures, exit 1 when one misses. It runs on a private stack it starts and stops
# (TOKVEL_PORT_OFFSET, default 2000, in TOKVEL_RUN_DIR, default .run/chaos; services on 19000+),
# never on the default one. `make test` runs the short version (tests/chaos/test_chaos_quick.py).
.PHONY: chaos chaos-quick
CHAOS_ARGS ?=  # e.g. --steps redis,kafka-1 --json chaos.json
chaos: setup ## kill -9 every service, Redis/PostgreSQL/Kafka outages, network faults (~20 min): figures
	$(PY) -m tests.chaos $(CHAOS_ARGS)

chaos-quick: setup ## the short version CI runs: one writer kill -9, one 15 s Redis freeze (~2.5 min)
	$(PY) -m tests.chaos --quick $(CHAOS_ARGS)
