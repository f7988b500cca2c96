"""Typed keys of what the app and each request carry (one place, imported by app and handlers)."""

from __future__ import annotations

from typing import Final

import asyncpg
from aiohttp import web

from api_gateway.access import AccessCounter
from api_gateway.auth import Authenticator, Principal
from api_gateway.cache_aside import TokenReader
from api_gateway.local_cache import LocalCache
from api_gateway.metrics import GatewayMetrics
from api_gateway.quota import QuotaTracker
from api_gateway.ratelimit import Decision, RateLimiter
from api_gateway.redis_gate import RedisGate
from api_gateway.repository import GatewayRepository
from api_gateway.settings import GatewaySettings
from tokvel_common.redis_client import RedisClient

SETTINGS: Final = web.AppKey("settings", GatewaySettings)
METRICS: Final = web.AppKey("metrics", GatewayMetrics)
QUOTA: Final = web.AppKey("quota", QuotaTracker)
OPENAPI: Final = web.AppKey("openapi", bytes)
POOL: Final = web.AppKey("pool", asyncpg.Pool)
REDIS: Final = web.AppKey[RedisClient]("redis")
REDIS_GATE: Final = web.AppKey("redis_gate", RedisGate)
ACCESS: Final = web.AppKey("access", AccessCounter)
REPOSITORY: Final = web.AppKey("repository", GatewayRepository)
READER: Final = web.AppKey("reader", TokenReader)
LOCAL_CACHE: Final = web.AppKey("local_cache", LocalCache)
AUTHENTICATOR: Final = web.AppKey("authenticator", Authenticator)
LIMITER: Final = web.AppKey("limiter", RateLimiter)

REQUEST_ID: Final = web.RequestKey("request_id", str)
PRINCIPAL: Final = web.RequestKey("principal", Principal)
DECISION: Final = web.RequestKey("decision", Decision)
