"""The documentation artifacts say what the code does.

``docs/asyncapi.yaml``: every topic of ``tokvel_common.topics`` is a channel with its partitions
and config, and nothing else is; each service's operations name exactly the topics its code
uses; Kafka payloads are the checked-in JSON Schemas; the WebSocket messages are the broadcaster's
protocol models, field for field. ``deploy/grafana/tokvel-dashboard.json`` and the
PrometheusRule: every metric and label they query is one the services export.

``make validate-deploy`` checks the same files' syntax with the official tools (the AsyncAPI
parser, a PromQL parser); these tests check their meaning against the code, without any tool.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final, cast, get_args

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from api_gateway.metrics import GatewayMetrics
from ingestor.metrics import IngestorMetrics
from tokvel_common import topics
from tokvel_common.events import DeadLetter, MetricsSample, RawQuote, TokenInfo
from tokvel_common.schema_export import EXPORTED, SCHEMA_DIR
from tokvel_common.serialization import encode_key
from velocity.app import APP_ID as VELOCITY_APP_ID
from velocity.metrics import StateSizeCollector, VelocityMetrics
from velocity.tables import StateTable
from writer.metrics import WriterMetrics
from writer.settings import WriterSettings
from ws_broadcaster import auth, connection, protocol
from ws_broadcaster.handler import WS_PATH
from ws_broadcaster.metrics import WsMetrics
from ws_broadcaster.settings import DEFAULT_WS_TIERS, WsSettings

ROOT: Final = Path(__file__).resolve().parents[2]
ASYNCAPI: Final = ROOT / "docs" / "asyncapi.yaml"
DASHBOARD: Final = ROOT / "deploy" / "grafana" / "tokvel-dashboard.json"
K8S: Final = ROOT / "deploy" / "k8s"

Json = Any

# The model of each topic's values (the services decode them with these).
TOPIC_MODELS: Final[dict[str, type[BaseModel]]] = {
    topics.RAW_QUOTES: RawQuote,
    topics.DEAD_LETTERS: DeadLetter,
    topics.METRICS: MetricsSample,
    topics.METRICS_LATEST: MetricsSample,
    topics.TOKEN_INFO: TokenInfo,
}
TOPIC_NAMES: Final = {spec.name for spec in topics.TOPICS}
PREFIX: Final = "{prefix}"


# ------------------------------------------------------------------- JSON Schema and $ref


@functools.cache
def load(path: Path) -> Json:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def pointer(document: Json, fragment: str) -> Json:
    """What a JSON pointer fragment (``/components/schemas/X``, or empty) points at."""
    node = document
    for part in filter(None, fragment.split("/")):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def inline(node: Json, base: Path | None, root: Json) -> Json:
    """``node`` with every ``$ref`` replaced by its target, recursively: local ones against
    ``root``, file ones against that file (relative to ``base``). No schema here is recursive."""
    if isinstance(node, list):
        return [inline(item, base, root) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target_file, _, fragment = node["$ref"].partition("#")
        siblings = {k: inline(v, base, root) for k, v in node.items() if k != "$ref"}
        if target_file:
            assert base is not None, node["$ref"]
            path = (base.parent / target_file).resolve()
            document = load(path)
            return {**inline(pointer(document, fragment), path, document), **siblings}
        return {**inline(pointer(root, fragment), base, root), **siblings}
    return {key: inline(value, base, root) for key, value in node.items()}


_ANNOTATIONS: Final = {"title", "description", "examples", "$defs"}
_SCHEMA_MAPS: Final = {"properties", "patternProperties", "dependentSchemas"}
_SCHEMA_LISTS: Final = {"anyOf", "allOf", "oneOf", "prefixItems"}
_SCHEMA_VALUES: Final = {"additionalProperties", "items", "not", "propertyNames", "contains"}


def normalized(schema: Json) -> Json:
    """An inlined schema without annotations (titles, descriptions, examples) and with
    ``required`` sorted: what validates, not how it reads. Property *names* are kept."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Json] = {}
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key in _SCHEMA_MAPS:
            out[key] = {name: normalized(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS:
            out[key] = [normalized(sub) for sub in value]
        elif key in _SCHEMA_VALUES:
            out[key] = normalized(value)
        elif key == "required":
            out[key] = sorted(value)
        else:
            out[key] = value
    return out


def model_schema(model: type[BaseModel], mode: JsonSchemaMode) -> Json:
    schema = model.model_json_schema(mode=mode)
    return normalized(inline(schema, None, schema))


# ---------------------------------------------------------------------------------- AsyncAPI


def doc() -> Json:
    return load(ASYNCAPI)


def resolve(node: Json) -> Json:
    """One level of a document-local ``$ref``."""
    while isinstance(node, dict) and "$ref" in node and node["$ref"].startswith("#"):
        node = pointer(doc(), node["$ref"][1:])
    return node


def kafka_channels() -> dict[str, Json]:
    """Topic name -> its channel."""
    return {
        channel["address"].removeprefix(PREFIX): channel
        for channel in doc()["channels"].values()
        if channel["address"].startswith(PREFIX)
    }


def ws_channel() -> Json:
    (channel,) = [c for c in doc()["channels"].values() if c["address"] == WS_PATH]
    return channel


def channel_messages(channel: Json) -> list[Json]:
    return [resolve(message) for message in channel["messages"].values()]


def operations_on(channel: Json) -> list[Json]:
    return [op for op in doc()["operations"].values() if resolve(op["channel"]) is channel]


def kafka_key(message: Json) -> Json:
    """The message's Kafka key schema, from its bindings or its traits'."""
    sources = [message, *(resolve(trait) for trait in message.get("traits", []))]
    keys = [s["bindings"]["kafka"]["key"] for s in sources if "kafka" in s.get("bindings", {})]
    assert len(keys) == 1, message["name"]
    return keys[0]


def test_every_topic_is_a_kafka_channel_and_nothing_else() -> None:
    assert set(kafka_channels()) == TOPIC_NAMES
    assert set(TOPIC_MODELS) == TOPIC_NAMES, "a new topic needs its model here and a channel"
    for name, channel in kafka_channels().items():
        assert channel["title"] == name
        assert channel["parameters"]["prefix"] == {"$ref": "#/components/parameters/topicPrefix"}


@pytest.mark.parametrize("spec", topics.TOPICS, ids=lambda spec: spec.name)
def test_kafka_channel_has_the_topics_partitions_and_config(spec: topics.TopicSpec) -> None:
    binding = kafka_channels()[spec.name]["bindings"]["kafka"]
    assert binding["partitions"] == spec.partitions
    documented = {
        key: ",".join(value) if isinstance(value, list) else str(value)
        for key, value in binding["topicConfiguration"].items()
    }
    assert documented == spec.config


@pytest.mark.parametrize("topic", sorted(TOPIC_NAMES))
def test_kafka_payload_is_the_checked_in_schema_of_the_topics_model(topic: str) -> None:
    (message,) = channel_messages(kafka_channels()[topic])
    payload = message["payload"]
    assert set(payload) == {"$ref"}, "reference the checked-in schema, do not copy it"
    path = (ASYNCAPI.parent / payload["$ref"]).resolve()
    assert path.parent == SCHEMA_DIR.resolve()
    assert EXPORTED[path.name] is TOPIC_MODELS[topic]
    assert message["name"] == TOPIC_MODELS[topic].__name__
    assert message["contentType"] == "application/json"


def test_every_exported_schema_is_documented() -> None:
    used = {
        Path(message["payload"]["$ref"]).name
        for channel in kafka_channels().values()
        for message in channel_messages(channel)
    }
    assert used == set(EXPORTED)


@pytest.mark.parametrize("topic", sorted(TOPIC_NAMES - {topics.DEAD_LETTERS}))
def test_kafka_key_is_the_cmc_id_as_the_code_encodes_it(topic: str) -> None:
    (message,) = channel_messages(kafka_channels()[topic])
    key = kafka_key(message)
    assert key["type"] == "string"
    for cmc_id in (1, 1027, 2**31 - 1):
        assert re.fullmatch(key["pattern"], encode_key(cmc_id).decode("ascii"))
    assert not re.fullmatch(key["pattern"], "BTC")


def topics_named_in(service_dir: Path) -> set[str]:
    """The topics whose constants a service's code uses (``from tokvel_common.topics import
    X`` or ``topics.X`` after ``from tokvel_common import topics``)."""
    constants = {
        name: value
        for name, value in vars(topics).items()
        if name.isupper() and isinstance(value, str) and value in TOPIC_NAMES
    }
    found: set[str] = set()
    for path in service_dir.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "tokvel_common.topics":
                found |= {constants[a.name] for a in node.names if a.name in constants}
            elif isinstance(node, ast.ImportFrom) and node.module == "tokvel_common":
                module_names |= {a.asname or a.name for a in node.names if a.name == "topics"}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in module_names
                and node.attr in constants
            ):
                found.add(constants[node.attr])
    return found


def test_each_service_documents_exactly_the_topics_its_code_uses() -> None:
    documented: dict[str, set[str]] = {}
    channel_topics = {id(channel): name for name, channel in kafka_channels().items()}
    for operation in doc()["operations"].values():
        topic = channel_topics.get(id(resolve(operation["channel"])))
        if topic is None:
            continue
        (tag,) = operation["tags"]
        documented.setdefault(tag["name"], set()).add(topic)
    in_code = {
        service.name: used
        for service in sorted((ROOT / "services").iterdir())
        if service.is_dir() and (used := topics_named_in(service))
    }
    assert in_code == documented
    assert set(documented) <= {tag["name"] for tag in doc()["info"]["tags"]}


def test_consumer_groups_are_the_code_defaults() -> None:
    expected = {
        "velocity": VELOCITY_APP_ID,
        "writer": WriterSettings.model_fields["writer_group_id"].default,
    }
    documented = {
        operation["tags"][0]["name"]: operation["bindings"]["kafka"]["groupId"]["default"]
        for operation in doc()["operations"].values()
        if "groupId" in operation.get("bindings", {}).get("kafka", {})
    }
    assert documented == expected


# --------------------------------------------------------------------------------- WebSocket


def op_of(model: type[BaseModel]) -> str:
    (op,) = get_args(model.model_fields["op"].annotation)
    return str(op)


CLIENT_MODELS: Final = {op_of(m): m for m in get_args(protocol.ClientMessage)}
SERVER_MODELS: Final = {op_of(m): m for m in get_args(protocol.ServerMessage)}


def ws_messages_by_direction() -> tuple[set[str], set[str]]:
    """(names the server receives, names it sends) according to the operations."""
    received: set[str] = set()
    sent: set[str] = set()
    for operation in operations_on(ws_channel()):
        names = {resolve(m)["name"] for m in operation["messages"]}
        (received if operation["action"] == "receive" else sent).update(names)
        sent |= {resolve(m)["name"] for m in operation.get("reply", {}).get("messages", [])}
    return received, sent


def test_ws_message_types_are_the_protocols() -> None:
    received, sent = ws_messages_by_direction()
    assert received == set(CLIENT_MODELS)
    assert sent == set(SERVER_MODELS)
    assert {m["name"] for m in channel_messages(ws_channel())} == received | sent


@pytest.mark.parametrize("op", sorted({*CLIENT_MODELS, *SERVER_MODELS}))
def test_ws_payload_equals_the_protocol_model(op: str) -> None:
    (message,) = [m for m in channel_messages(ws_channel()) if m["name"] == op]
    documented = normalized(inline(message["payload"], ASYNCAPI, doc()))
    if op in CLIENT_MODELS:
        expected = model_schema(CLIENT_MODELS[op], "validation")
    else:
        expected = model_schema(SERVER_MODELS[op], "serialization")
    assert documented == expected, (
        f"docs/asyncapi.yaml's {op} differs from ws_broadcaster.protocol; the model's schema:\n"
        + yaml.safe_dump(expected, sort_keys=False)
    )


def test_ws_examples_are_messages_the_code_accepts() -> None:
    examples = 0
    for message in channel_messages(ws_channel()):
        for example in message.get("examples", []):
            payload = example["payload"]
            if message["name"] in CLIENT_MODELS:
                parsed = protocol.parse_client_message(json.dumps(payload))
                assert isinstance(parsed, CLIENT_MODELS[message["name"]])
            else:
                SERVER_MODELS[message["name"]].model_validate(payload)
            assert payload["op"] == message["name"]
            examples += 1
    assert examples >= len(CLIENT_MODELS)


def test_ws_address_auth_and_close_codes_are_the_brokers() -> None:
    schemes = {(s["in"], s["name"]) for s in doc()["components"]["securitySchemes"].values()}
    assert schemes == {("header", auth.API_KEY_HEADER), ("query", auth.API_KEY_QUERY)}
    channel = ws_channel()
    assert channel["bindings"]["ws"]["method"] == "GET"
    assert auth.API_KEY_HEADER in channel["bindings"]["ws"]["headers"]["properties"]
    assert auth.API_KEY_QUERY in channel["bindings"]["ws"]["query"]["properties"]
    codes = {
        value
        for module in (auth, connection)
        for name, value in vars(module).items()
        if name.startswith("CLOSE_")
    }
    assert codes and codes <= {int(code) for code in channel["x-close-codes"]}


def test_ws_limits_in_the_description_are_the_defaults() -> None:
    description = ws_channel()["description"]
    tiers = [DEFAULT_WS_TIERS[t] for t in ("basic", "pro", "enterprise")]
    for limit in ("max_subscriptions", "max_connections", "messages_per_second", "burst"):
        values = " / ".join(f"{getattr(tier, limit):g}" for tier in tiers)
        assert values in description, f"{limit}: {values}"
    heartbeat = WsSettings.model_fields["ws_heartbeat_seconds"].default
    assert f"pings every {heartbeat:g} s" in description


# ------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Series:
    """A sample name as it appears on /metrics, and the labels it can carry."""

    labels: frozenset[str]
    counter: bool  # monotonic: only meaningful under rate()/increase()


# Labels Prometheus adds when it scrapes (the Prometheus Operator's, for a ServiceMonitor).
TARGET_LABELS: Final = frozenset(
    {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
)


@functools.cache
def exported_series() -> Mapping[str, Series]:
    """Every sample name the services expose, from their metrics classes' own registries."""
    registries = [CollectorRegistry() for _ in range(5)]
    gateway, ingestor, velocity, writer, ws = registries
    # The state-size collector reads the table only when scraped: an empty stand-in will do.
    velocity.register(StateSizeCollector(cast(StateTable, SimpleNamespace(data={}))))
    objects = [
        GatewayMetrics(gateway),
        IngestorMetrics(ingestor),
        VelocityMetrics(velocity),
        WriterMetrics(writer),
        WsMetrics(ws),
    ]
    labels: dict[str, frozenset[str]] = {}
    for metrics in objects:
        for attribute in vars(metrics).values():
            if isinstance(attribute, MetricWrapperBase):
                (family,) = attribute.describe()
                # Label names are no public attribute, and a labelled metric has no samples
                # to read them from until it is used.
                labels[family.name] = frozenset(attribute._labelnames)
    series: dict[str, Series] = {}
    suffixes = {
        "counter": (("_total", True), ("_created", False)),
        "gauge": (("", False),),
        "histogram": (("_bucket", True), ("_count", True), ("_sum", True), ("_created", False)),
        "summary": (("", False), ("_count", True), ("_sum", True), ("_created", False)),
    }
    for registry in registries:
        for family in registry.collect():
            base = labels.get(family.name, frozenset())
            for suffix, counter in suffixes[family.type]:
                extra = {"le"} if suffix == "_bucket" else set()
                series[family.name + suffix] = Series(base | extra, counter)
    return series


# ------------------------------------------------------------------------------- PromQL


@dataclass
class Query:
    """What a PromQL expression reads: metric names, the labels each selector matches on,
    the grouping labels, and which names are read over a range (and by which function)."""

    names: set[str] = field(default_factory=set)
    matcher_labels: dict[str, set[str]] = field(default_factory=dict)
    grouping_labels: set[str] = field(default_factory=set)
    ranged: dict[str, set[str]] = field(default_factory=dict)  # name -> enclosing functions


_GRAFANA_VARIABLE: Final = re.compile(r"\$(?:\{\w+\}|\w+)")
_STRING: Final = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME: Final = r"[A-Za-z_:][A-Za-z0-9_:]*"
_SELECTOR: Final = re.compile(
    rf"(?<![\w:.])(?P<name>{_NAME})\s*(?P<matchers>\{{[^{{}}]*\}})?\s*(?P<range>\[[^\]]*\])?"
)
_MATCHER_LABEL: Final = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING: Final = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_CALL_BEFORE: Final = re.compile(r"(\w+)\s*\(\s*$")
_KEYWORDS: Final = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}  # fmt: skip


def read_query(expression: str) -> Query:
    query = Query()
    text = _STRING.sub('""', _GRAFANA_VARIABLE.sub("x", expression))
    for match in _GROUPING.finditer(text):
        query.grouping_labels |= {label.strip() for label in match[1].split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    for match in _SELECTOR.finditer(text):
        name = match["name"]
        followed_by_call = text[match.end("name") :].lstrip().startswith("(")
        if name in _KEYWORDS or (followed_by_call and not match["matchers"]):
            continue
        query.names.add(name)
        labels = query.matcher_labels.setdefault(name, set())
        if match["matchers"]:
            labels |= set(_MATCHER_LABEL.findall(match["matchers"]))
        if match["range"]:
            call = _CALL_BEFORE.search(text[: match.start()])
            query.ranged.setdefault(name, set()).add(call[1] if call else "")
    return query


def test_read_query_finds_names_labels_and_ranges() -> None:
    query = read_query(
        'histogram_quantile(0.99, sum by (le, route) (rate(http_seconds_bucket{namespace=~"$ns", '
        'route!="/{x}"}[$__rate_interval]))) / on (route) group_left max(up offset 5m) > bool 1e3'
    )
    assert query.names == {"http_seconds_bucket", "up"}
    assert query.matcher_labels == {"http_seconds_bucket": {"namespace", "route"}, "up": set()}
    assert query.grouping_labels == {"le", "route"}
    assert query.ranged == {"http_seconds_bucket": {"rate"}}


def check_query(where: str, expression: str, recorded: frozenset[str] = frozenset()) -> set[str]:
    """Problems of one expression: unknown metrics or labels, counters not under a range
    function, gauges under rate(). Returns the names it read."""
    series = exported_series()
    query = read_query(expression)
    assert query.names, f"{where}: no metric in {expression}"
    problems = []
    known_labels = set(TARGET_LABELS) | {"le"}
    for name in query.names - recorded:
        if name not in series:
            problems.append(f"{name} is exported by no service")
            continue
        known_labels |= series[name].labels
        unknown = query.matcher_labels[name] - series[name].labels - TARGET_LABELS
        if unknown:
            problems.append(f"{name} has no label {sorted(unknown)}")
        functions = query.ranged.get(name, set())
        if series[name].counter and not functions:
            problems.append(f"{name} is a counter: read it with rate() or increase()")
        if not series[name].counter and functions & {"rate", "irate", "increase"}:
            problems.append(f"{name} is a gauge: rate()/increase() mean nothing on it")
    if not query.names & recorded:
        unknown_grouping = query.grouping_labels - known_labels
        if unknown_grouping:
            problems.append(f"grouping by labels no metric has: {sorted(unknown_grouping)}")
    assert not problems, f"{where}: {expression}\n" + "\n".join(problems)
    return query.names


# ------------------------------------------------------------------------------ dashboard


def dashboard() -> Json:
    return load(DASHBOARD)


def panels() -> list[Json]:
    """Every panel, those inside collapsed rows included."""
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_queries() -> Iterator[tuple[str, str]]:
    for panel in panels():
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
            assert match, variable["name"]
            yield f"variable {variable['name']}", f"{match[1]}{{{match[2]}!=''}}"


def test_dashboard_is_importable_with_the_datasource_as_a_variable() -> None:
    board = dashboard()
    assert board["id"] is None  # Grafana assigns it on import
    assert board["uid"] and board["title"]
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    by_variable = {"type": "prometheus", "uid": "${datasource}"}
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == by_variable
    for panel in panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == by_variable, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == by_variable, panel["title"]
    # No data source is named by uid anywhere else (it would not exist in another Grafana).
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text(encoding="utf-8")))
    assert uids == {"${datasource}", "-- Grafana --", board["uid"]}


def test_dashboard_panels_have_unique_ids_and_tile_the_grid() -> None:
    all_panels = panels()
    ids = [panel["id"] for panel in all_panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_queries_read_metrics_and_labels_the_services_export() -> None:
    queries = list(dashboard_queries())
    assert len(queries) >= 20
    for where, expression in queries:
        check_query(where, expression)


def test_dashboard_covers_every_area_of_the_pipeline() -> None:
    used = {name for _, expression in dashboard_queries() for name in read_query(expression).names}
    required = {
        # data freshness
        "ingestor_last_successful_poll_timestamp_seconds",
        "tokvel_writer_newest_event_timestamp_seconds",
        "velocity_processing_lag_seconds",
        # ingest rate and CMC credit burn
        "ingestor_quotes_published_total",
        "ingestor_cmc_credits_used_total",
        # velocity throughput and consumer lag
        "velocity_quotes_consumed_total",
        "velocity_samples_emitted_total",
        "velocity_consumer_lag_messages",
        "tokvel_writer_consumer_lag",
        # writer rows/s and errors
        "tokvel_writer_rows_written_total",
        "tokvel_writer_batch_failures_total",
        # gateway req/s, p99 latency, error rate, cache hit rate
        "gateway_http_requests_total",
        "gateway_http_request_duration_seconds_bucket",
        "gateway_cache_lookups_total",
        # WebSocket connections, drops, delivery latency
        "ws_connections",
        "ws_drops_total",
        "ws_delivery_latency_seconds_bucket",
    }
    assert required <= used, sorted(required - used)


def test_dashboard_ships_as_a_configmap_for_grafanas_sidecar() -> None:
    kustomization = load(DASHBOARD.parent / "kustomization.yaml")
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == [DASHBOARD.name]
    assert generator["options"]["labels"] == {"grafana_dashboard": "1"}
    assert generator["options"]["disableNameSuffixHash"] is True
    base = load(K8S / "base" / "kustomization.yaml")
    assert "../../grafana" in base["resources"]


# -------------------------------------------------------------------------- alert rules


def prometheus_rules() -> list[Json]:
    return [
        rule
        for path in sorted(K8S.rglob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if document and document.get("kind") == "PrometheusRule"
        for group in document["spec"]["groups"]
        for rule in group["rules"]
    ]


def test_alert_rules_read_metrics_and_labels_the_services_export() -> None:
    rules = prometheus_rules()
    recorded = frozenset(rule["record"] for rule in rules if "record" in rule)
    read: set[str] = set()
    for rule in rules:
        where = rule.get("alert") or rule["record"]
        if re.fullmatch(r"\s*vector\([\d.e+]+\)\s*", str(rule["expr"])):
            continue  # a constant (the plan's credit budget)
        read |= check_query(where, str(rule["expr"]), recorded)
    assert recorded <= read, f"recorded but never read: {sorted(recorded - read)}"
