"""Fixtures of the awaiting tests: the real redis-server."""

from __future__ import annotations

from tests.stores.redis_server import redis_server, redis_url

__all__ = ["redis_server", "redis_url"]
