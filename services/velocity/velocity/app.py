"""The composition root: one Faust app configured from the settings, with its table and agent."""

from __future__ import annotations

import gc
from typing import Final, cast

import faust
from aiokafka import AIOKafkaProducer
from faust.transport.drivers.aiokafka import Producer as FaustKafkaProducer
from faust.types.transports import TransportT
from mode import CrashingSupervisor
from prometheus_client import CollectorRegistry

from tokvel_common import topics
from velocity.agents import BatchProcessor, register_agents
from velocity.consumer import RebalanceSafeTransport
from velocity.metrics import StateSizeCollector, VelocityMetrics
from velocity.publish import RecordPublisher
from velocity.settings import VelocitySettings
from velocity.tables import STATE_TABLE, StateTable
from velocity.topics import define_topics

APP_ID: Final = "tokvel-velocity"  # also the consumer group and the changelog topics' prefix
_PRODUCER_MAX_BATCH_BYTES: Final = 256 * 1024
_RAW_PARTITIONS: Final = next(s.partitions for s in topics.TOPICS if s.name == topics.RAW_QUOTES)
# Each message allocates a few dozen short-lived objects (Faust's event, futures, tasks; the
# decoded quote): at the default threshold (700) the collector ran about 60 times a second on a
# backlog and took 5 % of the worker's CPU; at 20 000, a tenth of that.
_GC_YOUNG_THRESHOLD: Final = 20_000


class VelocityApp(faust.App):
    """The Faust app plus its state table, batch processor and metrics registry."""

    state_table: StateTable
    processor: BatchProcessor
    registry: CollectorRegistry

    def _new_transport(self) -> TransportT:
        # Faust's aiokafka transport, with a consumer safe across rebalances (consumer.py).
        return RebalanceSafeTransport(self.conf.broker_consumer, self)


def tune_garbage_collector() -> None:
    """The worker process's collector settings; call once the app is built."""
    # What exists now lives as long as the worker: kept out of every collection from here on.
    gc.freeze()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _broker_url(bootstrap_servers: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap_servers.split(","))


def create_app(settings: VelocitySettings) -> VelocityApp:
    app = VelocityApp(
        topics.prefixed(settings.topic_prefix, APP_ID),
        broker=_broker_url(settings.kafka_bootstrap_servers),
        store=settings.velocity_store,
        datadir=str(settings.velocity_data_dir),
        autodiscover=False,
        web_enabled=False,  # our own ops server answers /healthz, /readyz, /metrics
        topic_disable_leader=True,
        topic_partitions=_RAW_PARTITIONS,
        topic_replication_factor=settings.velocity_changelog_replicas,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        # An agent that crashed must not be restarted in place: it could apply later input on
        # top of a batch it dropped. The worker exits; its replacement replays from the commit.
        agent_supervisor=CrashingSupervisor,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        producer_linger=settings.velocity_producer_linger_ms / 1000,
        producer_max_batch_size=_PRODUCER_MAX_BATCH_BYTES,
        broker_session_timeout=settings.velocity_session_timeout_seconds,
        broker_heartbeat_interval=settings.velocity_heartbeat_interval_seconds,
        broker_rebalance_timeout=settings.velocity_rebalance_timeout_seconds,
        broker_commit_interval=settings.velocity_commit_interval_seconds,
    )
    velocity_topics = define_topics(app, settings)
    app.state_table = _state_table(app)
    app.registry = CollectorRegistry()
    app.registry.register(StateSizeCollector(app.state_table))
    app.processor = BatchProcessor(
        app=app,
        publisher=RecordPublisher(lambda: _kafka_producer(app)),
        table=app.state_table,
        topics=velocity_topics,
        settings=settings,
        metrics=VelocityMetrics(app.registry),
    )
    register_agents(app, velocity_topics, app.processor, settings)
    return app


def _kafka_producer(app: faust.App) -> AIOKafkaProducer:
    # The aiokafka producer inside Faust's (which has no batch API): the app's settings apply.
    producer = cast(FaustKafkaProducer, app.producer)
    return producer._ensure_producer()


def _state_table(app: faust.App) -> StateTable:
    table = StateTable(
        app,
        name=STATE_TABLE,
        key_type=bytes,  # bytes keys and values: the raw serializer, no JSON round trip
        value_type=bytes,
        partitions=_RAW_PARTITIONS,  # co-partitioned with cmc.quotes.raw
        help="Per-token velocity windows and the last input applied (velocity.tables).",
        beacon=app.tables.beacon,
    )
    app.tables.add(table)
    return table
