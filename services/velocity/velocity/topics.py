"""The Kafka topics of the velocity processor, under the settings' topic prefix.

Faust topics carry raw bytes: the libs/common models decode and encode them (serialization.py),
so every service reads one schema.
"""

from __future__ import annotations

from dataclasses import dataclass

import faust

from tokvel_common import topics
from tokvel_common.settings import CommonSettings


@dataclass(frozen=True)
class VelocityTopics:
    raw: faust.TopicT  # consumed: cmc.quotes.raw
    metrics: str  # every enriched sample
    metrics_latest: str  # compacted, the newest sample of each token
    dead_letters: str  # rejected input with its reason


def define_topics(app: faust.App, settings: CommonSettings) -> VelocityTopics:
    def name(topic: str) -> str:
        return topics.prefixed(settings.topic_prefix, topic)

    raw = app.topic(
        name(topics.RAW_QUOTES),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    return VelocityTopics(
        raw=raw,
        metrics=name(topics.METRICS),
        metrics_latest=name(topics.METRICS_LATEST),
        dead_letters=name(topics.DEAD_LETTERS),
    )
