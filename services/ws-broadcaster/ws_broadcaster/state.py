"""Typed keys of what the app carries (one place, imported by the app and the handler)."""

from __future__ import annotations

from typing import Final

import asyncpg
from aiohttp import web

from tokvel_common.redis_client import RedisClient
from ws_broadcaster.auth import KeyResolver
from ws_broadcaster.broadcaster import Broadcaster
from ws_broadcaster.consumer import MetricsConsumer
from ws_broadcaster.metrics import WsMetrics
from ws_broadcaster.registry import Registry
from ws_broadcaster.repository import WsRepository
from ws_broadcaster.resume import ResumeBuffer
from ws_broadcaster.settings import WsSettings

SETTINGS: Final = web.AppKey("settings", WsSettings)
METRICS: Final = web.AppKey("metrics", WsMetrics)
BUFFER: Final = web.AppKey("buffer", ResumeBuffer)
POOL: Final = web.AppKey("pool", asyncpg.Pool)
REDIS: Final = web.AppKey[RedisClient]("redis")
REPOSITORY: Final = web.AppKey("repository", WsRepository)
RESOLVER: Final = web.AppKey("resolver", KeyResolver)
REGISTRY: Final = web.AppKey("registry", Registry)
BROADCASTER: Final = web.AppKey("broadcaster", Broadcaster)
CONSUMER: Final = web.AppKey("consumer", MetricsConsumer)
