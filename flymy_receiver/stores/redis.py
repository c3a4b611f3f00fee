"""A Redis idempotency store, shared by receivers on many machines.

Each operation is one Lua script, so it is atomic on the server: a claim is a ``SET ... PX``
that only succeeds on an absent key, and expires by itself when its worker dies. Expiry is
the server's, so the receivers' clocks do not matter. The two keys of an event share a hash
tag, so the store also works on Redis Cluster.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from ..errors import ConfigurationError, StoreUnavailable
from .base import Claim, ClaimState
from .urls import redacted_url

__all__ = ["RedisStore"]

logger = logging.getLogger("flymy_receiver")

# KEYS[1]: the event's state ("done" or "claim:<token>"), KEYS[2]: its set of done handlers.
_CLAIM = """
local state = redis.call('GET', KEYS[1])
if state == 'done' then return {'done', {}, 0} end
if state then return {'busy', {}, redis.call('PTTL', KEYS[1])} end
redis.call('SET', KEYS[1], 'claim:' .. ARGV[1], 'PX', ARGV[2])
return {'acquired', redis.call('SMEMBERS', KEYS[2]), 0}
"""
_MARK = """
if redis.call('GET', KEYS[1]) == 'done' then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""
_COMPLETE = """
local state = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
if state == 'claim:' .. ARGV[1] or state == 'done' then return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == 'claim:' .. ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: Short, so that an unreachable Redis is answered 503 in about a second, not a minute.
DEFAULT_SOCKET_TIMEOUT = 1.0


class RedisStore:
    """Idempotency records in Redis, for many receivers behind a load balancer.

    ``url_or_client`` is a ``redis://`` / ``rediss://`` / ``unix://`` URL or a ready
    ``redis.Redis`` client (then its timeouts are yours to set). Keys are ``prefix`` +
    ``{event key}`` and expire by themselves; nothing needs cleaning up.
    """

    blocking = True

    def __init__(
        self,
        url_or_client: Any,
        *,
        prefix: str = "flymy:",
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    ) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError(
                "RedisStore needs redis-py: pip install 'flymy-receiver[redis]'"
            ) from None
        if isinstance(url_or_client, str):
            # One quick retry covers a pooled connection that a Redis restart has closed;
            # more would only delay the 503 the sender needs to retry later.
            try:
                client = redis.Redis.from_url(
                    url_or_client,
                    socket_timeout=socket_timeout,
                    socket_connect_timeout=socket_timeout,
                    retry=Retry(NoBackoff(), 1),
                )
            except (ValueError, TypeError) as exc:
                # redis-py's and urllib's messages quote parts of the URL, password included
                # ("Port could not be cast to integer value as 'hunter2'"): say what is wrong
                # with the URL shown redacted, and chain nothing.
                raise ConfigurationError(
                    f"not a usable Redis URL: {redacted_url(url_or_client)!r} "
                    f"({type(exc).__name__}; expected redis://[[user]:password@]host[:port][/db])"
                ) from None
        else:
            client = url_or_client
        self.client = client
        self.prefix = prefix
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._claim = client.register_script(_CLAIM)
        self._mark = client.register_script(_MARK)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)

    def __repr__(self) -> str:
        # Never the URL: it may carry a password.
        return f"RedisStore(prefix={self.prefix!r})"

    def claim(self, key: str, lease: float) -> Claim:
        """Take ``key`` for ``lease`` seconds unless it is done or held by a live claim."""
        token = secrets.token_hex(8)
        state, handlers, pttl = self._run(self._claim, key, token, _ms(lease))
        state = _text(state)
        if state == "done":
            return Claim(ClaimState.DONE)
        if state == "busy":
            return Claim(ClaimState.BUSY, retry_after=max(int(pttl), 0) / 1000)
        return Claim(ClaimState.ACQUIRED, token, frozenset(_text(h) for h in handlers))

    def mark_handler_done(self, key: str, token: str, handler: str, ttl: float) -> None:
        """Remember that ``handler`` succeeded for ``key`` for ``ttl`` seconds."""
        self._run(self._mark, key, handler, _ms(ttl))

    def complete(self, key: str, token: str, ttl: float) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now."""
        if not self._run(self._complete, key, token, _ms(ttl)):
            logger.warning(
                "the claim on %s expired before its handlers finished: another worker may "
                "have run them too; make Receiver(lease=...) longer than the slowest handler",
                key[:200],
            )

    def release(self, key: str, token: str) -> None:
        """Drop the claim held with ``token``; keep the per-handler records."""
        self._run(self._release, key, token)

    def _run(self, script: Any, key: str, *args: Any) -> Any:
        # A shared hash tag keeps both keys of an event in one Redis Cluster slot.
        state_key = f"{self.prefix}{{{key}}}"
        try:
            return script(keys=[state_key, state_key + ":h"], args=list(args))
        except self._errors as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from None


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
