"""A Redis idempotency store and delivery journal, shared by receivers on many machines.

Each operation on an event is one Lua script, so it is atomic on the server: a claim is a
``SET ... PX`` that only succeeds on an absent key and expires by itself when its worker
dies, and the claim's script also writes the event's journal entry (a hash that expires
``retention`` after its last change). Leases are the server's, so the receivers' clocks do not
matter for them. All keys of one event share a hash tag, so the store also works on Redis
Cluster.

The journal's global indexes (a sorted set by arrival for listing, one by expiry for purging,
one small sorted set per run id) cannot share a slot with every event, so they are updated by
a second command right after the script. If a receiver dies between the two, the entry is
still found by its key, and listed again with its event's next delivery.

A claim that times out on the client may still run on the server once it wakes up (a stalled
Redis, a slow network). The store then gives that claim up in the background: the token it
used is released if the claim ran, or remembered so that the claim, if it runs later, takes
nothing. So a 503 never leaves the event locked for a whole lease.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson

from ..errors import ConfigurationError, StoreUnavailable
from .base import Claim, ClaimState
from .records import (
    HandlerOutcome,
    JournalEntry,
    NewEntry,
    Refusal,
    to_datetime,
)
from .urls import redacted_url

__all__ = ["RedisStore"]

logger = logging.getLogger("flymy_receiver")

# Every script gets the same four keys of one event:
# KEYS[1] its state ("done" or "claim:<token>"), KEYS[2] the set of its handlers that
# succeeded, KEYS[3] its journal entry (a hash; outcomes in "h:<handler>" fields), KEYS[4] the
# tokens whose claim their client gave up on before it ran.
_JOURNAL_LUA = """
local function entry_written()
  return redis.call('HMGET', KEYS[3], 'received_at', 'run_id', 'retention')
end
-- A delivery: create the entry from ARGV[first..] (name, value, ...) or count an attempt.
local function journal_delivery(state, now, retention, first)
  if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('HINCRBY', KEYS[3], 'attempts', 1)
    redis.call('HSET', KEYS[3], 'updated_at', now, 'retention', retention)
    if state then redis.call('HSET', KEYS[3], 'state', state) end
  else
    redis.call('HSET', KEYS[3], 'state', state or 'pending', 'attempts', 1,
      'received_at', now, 'updated_at', now, 'retention', retention, unpack(ARGV, first))
  end
  redis.call('PEXPIRE', KEYS[3], retention)
  return entry_written()
end
-- A later step: set the state, record outcomes ARGV[first..] (handler, outcome, ...).
local function journal_update(state, now, first)
  if redis.call('EXISTS', KEYS[3]) == 0 then return false end
  if state then redis.call('HSET', KEYS[3], 'state', state) end
  redis.call('HSET', KEYS[3], 'updated_at', now)
  for i = first, #ARGV, 2 do redis.call('HSET', KEYS[3], 'h:' .. ARGV[i], ARGV[i + 1]) end
  redis.call('PEXPIRE', KEYS[3], redis.call('HGET', KEYS[3], 'retention'))
  return entry_written()
end
"""

# ARGV: token, lease ms, force ('1' or ''), journal ('entry', 'replay' or ''), now,
# retention ms, then the new entry's fields.
_CLAIM = (
    _JOURNAL_LUA
    + """
local result
local again = false
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then
  redis.call('SREM', KEYS[4], ARGV[1])  -- its client gave up on it: take nothing
  result = {'busy', {}, 0}
else
  local state = redis.call('GET', KEYS[1])
  if state == 'claim:' .. ARGV[1] then again = true end  -- the same call, sent twice
  if state == 'done' and ARGV[3] ~= '1' then
    result = {'done', {}, 0}
  elseif state and state ~= 'done' and not again then
    result = {'busy', {}, redis.call('PTTL', KEYS[1])}
  else
    redis.call('SET', KEYS[1], 'claim:' .. ARGV[1], 'PX', ARGV[2])
    if ARGV[3] == '1' then
      redis.call('DEL', KEYS[2])
      result = {'acquired', {}, 0}
    else
      result = {'acquired', redis.call('SMEMBERS', KEYS[2]), 0}
    end
  end
end
local acquired = result[1] == 'acquired'
if ARGV[4] == 'entry' and not again then
  result[4] = journal_delivery(acquired and 'pending', ARGV[5], ARGV[6], 7)
elseif ARGV[4] == 'replay' and acquired then
  result[4] = journal_update('pending', ARGV[5], 7)
end
return result
"""
)
# ARGV: handler, ttl ms, journal ('1' or ''), now, handler, outcome.
_MARK = (
    _JOURNAL_LUA
    + """
if ARGV[3] == '1' then journal_update(false, ARGV[4], 5) end
if redis.call('GET', KEYS[1]) == 'done' then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""
)
# ARGV: token, ttl ms, journal ('1' or ''), now, then handler, outcome pairs.
_COMPLETE = (
    _JOURNAL_LUA
    + """
if ARGV[3] == '1' then journal_update('handled', ARGV[4], 5) end
local state = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
if state == 'claim:' .. ARGV[1] or state == 'done' then return 1 end
return 0
"""
)
# ARGV: token, journal ('1' or ''), now, then handler, outcome pairs.
_RELEASE = (
    _JOURNAL_LUA
    + """
if redis.call('GET', KEYS[1]) ~= 'claim:' .. ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] == '1' then journal_update('failed', ARGV[3], 4) end
return 1
"""
)
# ARGV: now, retention ms, then the new entry's fields.
_IGNORE = (
    _JOURNAL_LUA
    + """
return journal_delivery('ignored', ARGV[1], ARGV[2], 3)
"""
)
# A claim whose client timed out: release it if it ran, else make sure it takes nothing
# when it runs. ARGV: token, how long to remember it (ms).
_GIVE_UP = """
if redis.call('GET', KEYS[1]) == 'claim:' .. ARGV[1] then return redis.call('DEL', KEYS[1]) end
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('PEXPIRE', KEYS[4], ARGV[2])
return 0
"""

#: Short, so that an unreachable Redis is answered 503 in about a second, not a minute.
DEFAULT_SOCKET_TIMEOUT = 1.0
#: Expired entries dropped from the global indexes per journal write, at most.
_PURGE_LIMIT = 20
#: Claims given up after a timeout waiting to be sent (beyond that, their lease ends them).
_GIVE_UP_QUEUE = 1000


class RedisStore:
    """Idempotency records and the delivery journal in Redis, for many receivers behind a
    load balancer.

    ``url_or_client`` is a ``redis://`` / ``rediss://`` / ``unix://`` URL or a ready
    ``redis.Redis`` client (then its timeouts are yours to set; if it decodes responses, the
    store talks through a twin that does not, since journal bodies are bytes). Keys are
    ``prefix`` + ``{event key}`` (and ``prefix`` + ``journal...`` for the journal's indexes)
    and expire by themselves: journal entries ``retention`` after their last change. The
    newest ``max_refusals`` refusals are kept.
    """

    blocking = True

    def __init__(
        self,
        url_or_client: Any,
        *,
        prefix: str = "flymy:",
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        max_refusals: int = 1000,
    ) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError(
                "RedisStore needs redis-py: pip install 'flymy-receiver[redis]'"
            ) from None
        if max_refusals < 1:
            raise ValueError("max_refusals must be at least 1")
        if isinstance(url_or_client, str):
            # One quick retry covers a pooled connection that a Redis restart has closed;
            # more would only delay the 503 the sender needs to retry later. A timeout is not
            # retried: the command may be running on the server (see the module docstring).
            try:
                client = redis.Redis.from_url(
                    url_or_client,
                    socket_timeout=socket_timeout,
                    socket_connect_timeout=socket_timeout,
                    retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
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
        # Journal bodies are bytes: every call goes through a client that never decodes.
        client = _binary_client(client, redis)
        self._redis = client
        self.prefix = prefix
        self.max_refusals = max_refusals
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._timeouts: tuple[type[BaseException], ...] = (redis.TimeoutError, TimeoutError)
        self._claim = client.register_script(_CLAIM)
        self._mark = client.register_script(_MARK)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)
        self._ignore = client.register_script(_IGNORE)
        self._give_up = client.register_script(_GIVE_UP)
        self._list_key = f"{prefix}journal"
        self._expiry_key = f"{prefix}journal:expiry"
        self._refusals_key = f"{prefix}journal:refusals"
        self._given_up: queue.Queue[tuple[str, str, float, float]] | None = None
        self._given_up_pid = 0
        self._given_up_lock = threading.Lock()

    def __repr__(self) -> str:
        # Never the URL: it may carry a password.
        return f"RedisStore(prefix={self.prefix!r})"

    # -- the store contract -------------------------------------------------------------

    def claim(
        self,
        key: str,
        lease: float,
        entry: NewEntry | None = None,
        *,
        replay: bool = False,
        force: bool = False,
    ) -> Claim:
        """Take ``key`` for ``lease`` seconds unless it is done or held by a live claim;
        journal ``entry`` in the same script."""
        token = secrets.token_hex(8)
        reply = self._claim_with(key, lease, token, entry, replay=replay, force=force)
        state, handlers, pttl = _text(reply[0]), reply[1], reply[2]
        if len(reply) > 3 and reply[3]:  # the journal entry was written: index it
            self._index(key, reply[3], lease)
        if state == "done":
            return Claim(ClaimState.DONE)
        if state == "busy":
            return Claim(ClaimState.BUSY, retry_after=max(int(pttl), 0) / 1000)
        return Claim(ClaimState.ACQUIRED, token, frozenset(_text(h) for h in handlers))

    def _claim_with(
        self,
        key: str,
        lease: float,
        token: str,
        entry: NewEntry | None,
        *,
        replay: bool = False,
        force: bool = False,
    ) -> Any:
        """Run the claim script with ``token``; on a timeout, give the claim up."""
        mode = "entry" if entry is not None else "replay" if replay else ""
        args: list[Any] = [token, _ms(lease), "1" if force else "", mode, repr(time.time())]
        if entry is not None:
            args += [_ms(entry.retention), *_entry_fields(entry)]
        else:
            args.append(0)
        try:
            return self._claim(keys=self._keys(key), args=args)
        except self._timeouts as exc:
            # The script may still run once the server answers again: see _give_up_later.
            self._give_up_later(key, token, lease)
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from None
        except self._errors as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from None

    def mark_handler_done(
        self, key: str, token: str, handler: str, ttl: float, outcome: HandlerOutcome | None = None
    ) -> None:
        """Remember that ``handler`` succeeded for ``key`` for ``ttl`` seconds."""
        args: list[Any] = [handler, _ms(ttl)]
        if outcome is not None:
            args += ["1", repr(time.time()), handler, _outcome_json(outcome)]
        self._run(self._mark, key, args)

    def complete(
        self, key: str, token: str, ttl: float, outcomes: Mapping[str, HandlerOutcome] | None = None
    ) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now."""
        args: list[Any] = [token, _ms(ttl)]
        if outcomes is not None:
            args += ["1", repr(time.time()), *_outcome_pairs(outcomes)]
        if not self._run(self._complete, key, args):
            logger.warning(
                "the claim on %s expired before its handlers finished: another worker may "
                "have run them too; make Receiver(lease=...) longer than the slowest handler",
                key[:200],
            )

    def release(
        self, key: str, token: str, outcomes: Mapping[str, HandlerOutcome] | None = None
    ) -> None:
        """Drop the claim held with ``token``; keep the per-handler records."""
        args: list[Any] = [token]
        if outcomes is not None:
            args += ["1", repr(time.time()), *_outcome_pairs(outcomes)]
        self._run(self._release, key, args)

    # -- the journal --------------------------------------------------------------------

    def journal_ignore(self, entry: NewEntry) -> None:
        """Record an authentic event that no handler wanted."""
        args = [repr(time.time()), _ms(entry.retention), *_entry_fields(entry)]
        written = self._run(self._ignore, entry.key, args)
        if written:
            self._index(entry.key, written, 0.0)

    def journal_get(self, key_or_run_id: str) -> JournalEntry | None:
        """The entry with this key, else the newest entry for this run id."""
        try:
            fields: Any = self._redis.hgetall(self._keys(key_or_run_id)[2])
            if fields:
                return _entry(key_or_run_id, fields)
            run_key = self._run_key(key_or_run_id)
            keys = [_text(m) for m in self._redis.zrevrange(run_key, 0, 49)]
            found = self._entries(keys)
        except self._errors as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from None
        gone = [key for key, entry in zip(keys, found, strict=True) if entry is None]
        if gone:
            self._forget(run_key, gone)
        return next((entry for entry in found if entry is not None), None)

    def journal_list(
        self,
        *,
        state: str | None = None,
        event: str | None = None,
        agent_id: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[JournalEntry]:
        """Entries newest first, filtered (the filters are applied while paging through the
        index by arrival)."""
        low: Any = since.timestamp() if since is not None else "-inf"
        page = max(100, min(limit, 1000))
        found: list[JournalEntry] = []
        seen: set[str] = set()
        offset = 0
        while len(found) < limit:
            try:
                members = self._redis.zrevrangebyscore(
                    self._list_key, "+inf", low, start=offset, num=page
                )
                keys = [_text(m) for m in members]
                entries = self._entries(keys)
            except self._errors as exc:
                raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from None
            gone = [key for key, entry in zip(keys, entries, strict=True) if entry is None]
            for entry in entries:
                if entry is None or entry.key in seen:
                    continue
                seen.add(entry.key)
                if (
                    (state is None or entry.state == state)
                    and (event is None or entry.event == event)
                    and (agent_id is None or entry.agent_id == agent_id)
                ):
                    found.append(entry)
            if gone:
                self._forget(None, gone)
            offset += len(keys) - len(gone)
            if len(keys) < page:
                break
        return found[:limit]

    def record_refusal(self, refusal: Refusal) -> None:
        """Keep one refused delivery; only the newest ``max_refusals`` are kept."""
        record = orjson.dumps(
            {
                "at": refusal.at.timestamp(),
                "status": refusal.status,
                "reason": refusal.reason,
                "detail": refusal.detail,
            }
        )
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.lpush(self._refusals_key, record)
            pipe.ltrim(self._refusals_key, 0, self.max_refusals - 1)
            pipe.execute()
        except self._errors as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from None

    def refusals(self, limit: int = 100) -> list[Refusal]:
        """Refused deliveries, newest first."""
        if limit < 1:
            return []
        try:
            records = self._redis.lrange(self._refusals_key, 0, limit - 1)
        except self._errors as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from None
        refusals = []
        for record in records:
            data = orjson.loads(record)
            refusals.append(
                Refusal(
                    to_datetime(float(data["at"])),
                    int(data["status"]),
                    str(data["reason"]),
                    str(data.get("detail") or ""),
                )
            )
        return refusals

    # -- the journal's indexes ----------------------------------------------------------

    def _index(self, key: str, written: Any, lease: float) -> None:
        """List the entry (second command, see the module docstring) and drop from the
        indexes a bounded number of entries that have expired. Never raises: the entry is
        written, and is listed again with its next delivery.

        ``written`` is the entry's arrival, run id and retention (ms); it is indexed for
        its retention plus ``lease``, the time its claim may take to be completed or
        released (the step that changes it last, unless it is replayed, which indexes it
        again)."""
        received_at = float(written[0])
        run_id = _text(written[1]) if written[1] is not None else None
        life = int(written[2]) / 1000 + lease
        now = time.time()
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zadd(self._list_key, {key: received_at})
            pipe.zadd(self._expiry_key, {key: now + life})
            if run_id is not None:
                run_key = self._run_key(run_id)
                pipe.zadd(run_key, {key: received_at})
                pipe.pexpire(run_key, _ms(life))
            pipe.zrangebyscore(self._expiry_key, "-inf", now, start=0, num=_PURGE_LIMIT)
            expired = pipe.execute()[-1]
            if expired:
                self._purge([_text(m) for m in expired], now)
        except self._errors as exc:
            logger.warning("could not index journal entry %s: %r", key[:200], exc)

    def _purge(self, keys: list[str], now: float) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(self._keys(key)[2])
        ttls = pipe.execute()
        gone = [key for key, ttl in zip(keys, ttls, strict=True) if int(ttl) < 0]
        alive = {
            key: now + int(ttl) / 1000 for key, ttl in zip(keys, ttls, strict=True) if int(ttl) >= 0
        }
        pipe = self._redis.pipeline(transaction=False)
        if gone:
            pipe.zrem(self._list_key, *gone)
            pipe.zrem(self._expiry_key, *gone)
        if alive:  # changed since it was indexed: look again when it ends
            pipe.zadd(self._expiry_key, alive)
        pipe.execute()

    def _forget(self, run_key: str | None, keys: list[str]) -> None:
        """Drop entries found expired while reading (best effort)."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrem(self._list_key, *keys)
            pipe.zrem(self._expiry_key, *keys)
            if run_key is not None:
                pipe.zrem(run_key, *keys)
            pipe.execute()
        except self._errors as exc:
            logger.debug("could not drop expired journal entries: %r", exc)

    def _entries(self, keys: list[str]) -> list[JournalEntry | None]:
        if not keys:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self._keys(key)[2])
        return [
            _entry(key, fields) if fields else None
            for key, fields in zip(keys, pipe.execute(), strict=True)
        ]

    # -- claims given up after a timeout -------------------------------------------------

    def _give_up_later(self, key: str, token: str, lease: float) -> None:
        """Queue the release of a claim whose reply never came (sent from one thread)."""
        with self._given_up_lock:
            if self._given_up is None or self._given_up_pid != os.getpid():
                self._given_up = queue.Queue(_GIVE_UP_QUEUE)
                self._given_up_pid = os.getpid()
                threading.Thread(
                    target=self._give_up_loop,
                    args=(self._given_up,),
                    name="flymy-redis-give-up",
                    daemon=True,
                ).start()
            pending = self._given_up
        try:
            pending.put_nowait((key, token, lease, time.monotonic() + lease))
        except queue.Full:  # the lease will end it
            logger.debug("too many claims to give up; %s waits for its lease", key[:200])

    def _give_up_loop(self, pending: queue.Queue[tuple[str, str, float, float]]) -> None:
        while True:
            key, token, lease, deadline = pending.get()
            while True:
                try:
                    self._run(self._give_up, key, [token, _ms(lease)])
                    break
                except StoreUnavailable as exc:
                    if time.monotonic() > deadline:
                        logger.debug("could not give up the claim on %s: %r", key[:200], exc)
                        break
                    time.sleep(0.1)

    def _wait_given_up(self, timeout: float) -> bool:
        """Whether every claim given up so far was sent, waiting up to ``timeout`` (tests)."""
        deadline = time.monotonic() + timeout
        while self._given_up is not None and self._given_up.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # -- keys and calls -----------------------------------------------------------------

    def _keys(self, key: str) -> list[str]:
        # A shared hash tag keeps every key of an event in one Redis Cluster slot.
        state_key = f"{self.prefix}{{{key}}}"
        return [state_key, state_key + ":h", state_key + ":j", state_key + ":x"]

    def _run_key(self, run_id: str) -> str:
        return f"{self.prefix}journal:run:{run_id}"

    def _run(self, script: Any, key: str, args: list[Any]) -> Any:
        try:
            return script(keys=self._keys(key), args=args)
        except self._errors as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from None


def _binary_client(client: Any, redis: Any) -> Any:
    """``client`` itself, or a twin on the same server that returns bytes when ``client``
    decodes responses (a body need not be valid UTF-8)."""
    kwargs_of = getattr(client, "get_connection_kwargs", None)
    if not callable(kwargs_of) or not kwargs_of().get("decode_responses"):
        return client
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        raise ValueError("RedisStore needs a client made with decode_responses=False")
    kwargs = {**pool.connection_kwargs, "decode_responses": False}
    return redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class,
            max_connections=pool.max_connections,
            **kwargs,
        )
    )


def _entry_fields(entry: NewEntry) -> list[Any]:
    fields: list[Any] = ["event", entry.event, "body", entry.body]
    fields += ["headers", orjson.dumps(dict(entry.headers))]
    for name in ("run_id", "agent_id", "agent_name"):
        value = getattr(entry, name)
        if value is not None:
            fields += [name, value]
    return fields


def _outcome_json(outcome: HandlerOutcome) -> bytes:
    return orjson.dumps(outcome.to_dict())


def _outcome_pairs(outcomes: Mapping[str, HandlerOutcome]) -> list[Any]:
    pairs: list[Any] = []
    for name, outcome in outcomes.items():
        pairs += [name, _outcome_json(outcome)]
    return pairs


def _entry(key: str, fields: Mapping[bytes, bytes]) -> JournalEntry:
    def text(name: bytes) -> str | None:
        value = fields.get(name)
        return value.decode() if value is not None else None

    handlers = {
        name[2:].decode(): HandlerOutcome.from_dict(orjson.loads(value))
        for name, value in fields.items()
        if name.startswith(b"h:")
    }
    headers = fields.get(b"headers")
    return JournalEntry(
        key=key,
        event=text(b"event") or "",
        run_id=text(b"run_id"),
        agent_id=text(b"agent_id"),
        agent_name=text(b"agent_name"),
        state=text(b"state") or "pending",
        attempts=int(fields.get(b"attempts") or 0),
        received_at=to_datetime(float(fields.get(b"received_at") or 0)),
        updated_at=to_datetime(float(fields.get(b"updated_at") or 0)),
        body=bytes(fields.get(b"body") or b""),
        headers=orjson.loads(headers) if headers else {},
        handlers=handlers,
    )


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
