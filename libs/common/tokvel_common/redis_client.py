"""Redis client factory: one code path for a standalone Redis and a Redis Cluster."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster

RedisClient = Redis | RedisCluster  # both typed as returning bytes (no decode_responses)
RedisPipeline = Pipeline | ClusterPipeline

# A slow Redis must never stall a request: callers fall back to PostgreSQL after this.
DEFAULT_SOCKET_TIMEOUT_SECONDS = 0.5


def create_redis(
    url: str, *, cluster: bool = False, socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_SECONDS
) -> RedisClient:
    """A client for ``url``; with ``cluster`` it discovers the cluster from that node.

    Responses stay ``bytes``: values may be compressed, so decoding is the caller's business.
    """
    if cluster:
        return RedisCluster.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
    return Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        health_check_interval=30,
    )
