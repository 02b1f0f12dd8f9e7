"""Accelerator memory of the model workers: each worker publishes it to Redis, /metrics reads it.

The API process never imports torch, so it cannot ask a GPU; the model process (rank 0, which also
hears from the other ranks) writes one short-lived key per worker with allocated, peak and total
bytes per device. A worker that stops publishing disappears from /metrics when its key expires.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

from core.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "nexusgen:device-memory:"
TTL_S = 60
FIELDS = ("allocated_bytes", "peak_bytes", "total_bytes")


def _client(settings: Settings) -> redis.Redis | None:
    url = settings.broker_url or ""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None  # another broker (RabbitMQ): no device memory in /metrics
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def publish_device_memory(settings: Settings, worker: str, devices: list[dict[str, Any]]) -> bool:
    """Store `devices` ([{device, rank, allocated_bytes, peak_bytes, total_bytes}]) for `worker`."""
    client = _client(settings)
    if client is None or not devices:
        return False
    try:
        client.set(KEY_PREFIX + worker, json.dumps(devices), ex=TTL_S)
    except redis.RedisError as exc:  # advisory: the next report tries again
        log.warning("device memory not published (%s)", exc)
        return False
    finally:
        client.close()
    return True


def read_device_memory(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """Every live worker's devices, by worker id (empty without a Redis broker or on a broker error)."""
    client = _client(settings)
    if client is None:
        return {}
    try:
        keys = sorted(client.scan_iter(match=KEY_PREFIX + "*", count=100))
        values = client.mget(keys) if keys else []
    except redis.RedisError:
        return {}
    finally:
        client.close()
    out = {}
    for key, value in zip(keys, values, strict=True):
        if value is not None:
            out[key.decode().removeprefix(KEY_PREFIX)] = json.loads(value)
    return out
