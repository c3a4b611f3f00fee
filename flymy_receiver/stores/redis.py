"""A Redis idempotency store and delivery journal, shared by receivers on many machines.

Each step of a delivery is one Lua script call (:mod:`.redis_scripts`), atomic on the server
and one round trip: the claim writes the event's journal entry and its indexes; the
completion (or release) records the outcomes, the new state and its index, the attempt in
the history, and wakes the run's waiters (``PUBLISH``). A one-handler delivery costs two
round trips. A claim is a ``SET ... PX`` that only succeeds on an absent key and expires by
itself when its worker dies; leases are the server's, so the receivers' clocks do not matter
for them.

Bodies live in keys of their own, apart from the claims and idempotency records, and their
total is bounded (``max_journal_bytes``): past it an entry is kept without its body
(``body_dropped``), so that bodies never cost a claim. Journal entries expire ``retention``
after their last change; each journal write also unindexes a bounded number of expired
entries, and reads repair what they find expired.

A claim that times out on the client may still run on the server once it wakes up (a stalled
Redis, a slow network). The store then gives that claim up in the background: the token it
used is released if the claim ran, or remembered so that the claim, if it runs later, takes
nothing. So a 503 never leaves the event locked for a whole lease.

Redis Cluster: every script touches the journal's indexes, so all of the store's keys must
share one slot: give a prefix with a hash tag (``prefix="{flymy}:"``).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from ..errors import ConfigurationError, StoreUnavailable
from . import redis_scripts as scripts
from .base import Claim, ClaimState
from .records import (
    FAILURE_STATES,
    Attempt,
    HandlerOutcome,
    JournalEntry,
    NewEntry,
    Refusal,
    to_datetime,
)
from .redis_entries import (
    attempt_json,
    digest,
    entry_args,
    entry_from,
    newest_first,
    outcome_pairs,
    text,
)
from .redis_give_up import GiveUps
from .urls import redacted_url

__all__ = ["DEFAULT_MAX_JOURNAL_BYTES", "RedisStore"]

logger = logging.getLogger("flymy_receiver")

#: Short, so that an unreachable Redis is answered 503 in about a second, not a minute.
DEFAULT_SOCKET_TIMEOUT = 1.0
#: The journal's bodies, in bytes, past which new entries are kept without their body.
DEFAULT_MAX_JOURNAL_BYTES = 256 * 1024 * 1024
#: States a waiter resolves on (awaiting.SETTLED_STATES); journal_settled reports these.
_SETTLED = frozenset({"handled", "failed", "ignored", "resolved"})


class RedisStore:
    """Idempotency records and the delivery journal in Redis, for many receivers behind a
    load balancer.

    ``url_or_client`` is a ``redis://`` / ``rediss://`` / ``unix://`` URL or a ready
    ``redis.Redis`` client (then its timeouts are yours to set; if it decodes responses, the
    store talks through a twin that does not, since journal bodies are bytes). Keys are
    ``prefix`` + ``{event key}`` (and ``prefix`` + ``journal...`` for the journal's indexes)
    and expire by themselves: journal entries ``retention`` after their last change. The
    journal's bodies take at most ``max_journal_bytes`` (``None``: no bound); the newest
    ``max_refusals`` refusals are kept.
    """

    blocking = True

    def __init__(
        self,
        url_or_client: Any,
        *,
        prefix: str = "flymy:",
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        max_refusals: int = 1000,
        max_journal_bytes: int | None = DEFAULT_MAX_JOURNAL_BYTES,
    ) -> None:
        if max_journal_bytes is not None and max_journal_bytes < 0:
            raise ValueError("max_journal_bytes must be at least 0 (or None: no bound)")
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
        self._budget = 0 if max_journal_bytes is None else max(1, max_journal_bytes)
        self.max_journal_bytes = max_journal_bytes
        self._claim = client.register_script(scripts.CLAIM)
        self._mark = client.register_script(scripts.MARK)
        self._complete = client.register_script(scripts.COMPLETE)
        self._release = client.register_script(scripts.RELEASE)
        self._ignore = client.register_script(scripts.IGNORE)
        self._resolve = client.register_script(scripts.RESOLVE)
        self._claim_handler = client.register_script(scripts.CLAIM_HANDLER)
        self._finish_handler = client.register_script(scripts.FINISH_HANDLER)
        self._give_up = client.register_script(scripts.GIVE_UP)
        self._forget = client.register_script(scripts.FORGET)
        self._root = f"{prefix}journal"
        self._refusals_key = f"{prefix}journal:refusals"
        #: The channel waiters subscribe to; the scripts publish on it (see notifier()).
        self.channel = f"{prefix}awaiting"
        self._give_ups = GiveUps(
            lambda key, token, lease: self._run(self._give_up, key, [token, _ms(lease)])
        )

    def __repr__(self) -> str:
        # Never the URL: it may carry a password.
        return f"RedisStore(prefix={self.prefix!r})"

    def notifier(self) -> Any:
        """How waiters in other processes hear of ended deliveries: a subscription to
        :attr:`channel`. Publishing is the scripts' job (in the same call that settles the
        entry), so the notifier's own ``publish`` costs nothing."""
        from .redis_notifier import ScriptedRedisNotifier

        return ScriptedRedisNotifier(self.client, self.channel)

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
        state, handlers, pttl = text(reply[0]), reply[1], reply[2]
        prior = text(reply[3]) if len(reply) > 3 and reply[3] else ""
        if state == "done":
            return Claim(ClaimState.DONE, prior_state=prior)
        if state == "busy":
            return Claim(ClaimState.BUSY, retry_after=max(int(pttl), 0) / 1000, prior_state=prior)
        done = frozenset(text(h) for h in handlers)
        return Claim(ClaimState.ACQUIRED, token, done, prior_state=prior)

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
        args: list[Any] = [_now(), self.channel, token, _ms(lease)]
        args += ["1" if force else "", mode]
        if entry is not None:
            args += entry_args(entry, self._budget)
        try:
            return self._claim(keys=self._keys(key), args=args)
        except self._timeouts as exc:
            # The script may still run once the server answers again: see _give_up_later.
            self._give_up_later(key, token, lease)
            raise _unavailable(exc) from None
        except self._errors as exc:
            raise _unavailable(exc) from None

    def mark_handler_done(
        self, key: str, token: str, handler: str, ttl: float, outcome: HandlerOutcome | None = None
    ) -> None:
        """Remember that ``handler`` succeeded for ``key`` for ``ttl`` seconds."""
        args: list[Any] = [_now(), self.channel, handler, _ms(ttl)]
        if outcome is not None:
            args += ["1", orjson.dumps(outcome.to_dict())]
        self._run(self._mark, key, args)

    def complete(
        self,
        key: str,
        token: str,
        ttl: float,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
    ) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now; the
        entry becomes ``handled`` (``queued`` while a deferred handler waits for its run)."""
        journal = outcomes is not None or attempt is not None
        queued = any(o.deferred and o.state == "queued" for o in (outcomes or {}).values())
        args: list[Any] = [_now(), self.channel, token, _ms(ttl)]
        args += ["1" if journal else "", "queued" if queued else "handled"]
        args += [attempt_json(attempt), *outcome_pairs(outcomes or {})]
        if not self._run(self._complete, key, args):
            logger.warning(
                "the claim on %s expired before its handlers finished: another worker may "
                "have run them too; make Receiver(lease=...) longer than the slowest handler",
                key[:200],
            )

    def release(
        self,
        key: str,
        token: str,
        outcomes: Mapping[str, HandlerOutcome] | None = None,
        attempt: Attempt | None = None,
    ) -> None:
        """Drop the claim held with ``token``; keep the per-handler records. The entry
        becomes ``failed`` (only while ``token`` held the claim)."""
        journal = outcomes is not None or attempt is not None
        args: list[Any] = [_now(), self.channel, token, "1" if journal else ""]
        args += [attempt_json(attempt), *outcome_pairs(outcomes or {})]
        self._run(self._release, key, args)

    # -- the journal --------------------------------------------------------------------

    def journal_ignore(self, entry: NewEntry, attempt: Attempt | None = None) -> None:
        """Record an authentic event that no handler wanted; an existing entry keeps its
        state and body."""
        args: list[Any] = [_now(), self.channel, attempt_json(attempt)]
        self._run(self._ignore, entry.key, args + entry_args(entry, self._budget))

    def journal_resolve(self, key: str, note: str) -> bool:
        """Make the entry ``resolved`` with ``note``; False when there is no such entry."""
        args: list[Any] = [_now(), self.channel, note]
        return bool(self._run(self._resolve, key, args))

    def journal_get(self, key_or_run_id: str) -> JournalEntry | None:
        """The entry with this key, else the newest entry for this run id."""
        now = time.time()
        try:
            found = self._full_entries([key_or_run_id], now)[0]
            if found is not None:
                return found
            run_index = f"{self._root}:run:{digest(key_or_run_id)}"
            keys = [text(m) for m in self._redis.zrevrange(run_index, 0, 49)]
            run_id = key_or_run_id.encode("utf-8", "surrogatepass")
            for key, fields in zip(keys, self._hashes(keys), strict=True):
                if fields and fields.get(b"run_id") == run_id:
                    return self._full_entries([key], now)[0]
        except self._errors as exc:
            raise _unavailable(exc) from None
        return None

    def journal_list(
        self,
        *,
        state: str | None = None,
        event: str | None = None,
        agent_id: str | None = None,
        run_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        before: str | None = None,
        limit: int = 100,
    ) -> list[JournalEntry]:
        """Summaries newest first, filtered: the most selective filter picks the index that
        is walked (run id, agent, event, state, else arrival), the others are checked on
        the summaries read; no body is read."""
        if limit < 1:
            return []
        root = self._root
        if run_id is not None:
            indexes = [f"{root}:run:{digest(run_id)}"]
        elif agent_id is not None:
            indexes = [f"{root}:agent:{digest(agent_id)}"]
        elif event is not None:
            indexes = [f"{root}:event:{digest(event)}"]
        elif state == "failed":
            indexes = [f"{root}:state:failed", f"{root}:state:pending"]
        elif state in ("stalled", "pending"):
            indexes = [f"{root}:state:pending"]
        elif state is not None:
            indexes = [f"{root}:state:{state}"]
        else:
            indexes = [root]
        high = f"({until.timestamp()!r}" if until is not None else "+inf"
        low = repr(since.timestamp()) if since is not None else "-inf"
        now = time.time()

        def wanted(entry: JournalEntry) -> bool:
            if state == "failed":
                state_ok = entry.state in FAILURE_STATES
            else:
                state_ok = state is None or entry.state == state
            return (
                state_ok
                and (event is None or entry.event == event)
                and (agent_id is None or entry.agent_id == agent_id)
                and (run_id is None or entry.run_id == run_id)
            )

        found: list[JournalEntry] = []
        try:
            after = self._cursor(before) if before is not None else None
            if before is not None and after is None:
                return []  # the cursor's entry is gone: nothing sorts before it any more
            walk = newest_first(self._redis, indexes, high, low, after)
            while len(found) < limit:
                batch = [key for _, key in _take(walk, max(20, limit - len(found)))]
                if not batch:
                    break
                for entry in self._summaries(batch, now):
                    if entry is not None and wanted(entry) and len(found) < limit:
                        found.append(entry)
        except self._errors as exc:
            raise _unavailable(exc) from None
        return found

    def journal_settled(self, run_ids: Sequence[str]) -> dict[str, JournalEntry]:
        """For each run id, its newest entry whose handlers have finished (not ``pending``,
        ``stalled`` nor ``queued``), with its body; others left out."""
        now = time.time()
        settled: dict[str, JournalEntry] = {}
        try:
            pipe = self._redis.pipeline(transaction=False)
            for run_id in run_ids:
                pipe.zrevrange(f"{self._root}:run:{digest(run_id)}", 0, 9)
            candidates = [[text(m) for m in members] for members in pipe.execute()]
            keys = [key for group in candidates for key in group]
            summaries = dict(zip(keys, self._summaries(keys, now), strict=True))
            chosen: dict[str, str] = {}
            for run_id, group in zip(run_ids, candidates, strict=True):
                for key in group:
                    entry = summaries.get(key)
                    if entry is not None and entry.run_id == run_id and entry.state in _SETTLED:
                        chosen[run_id] = key
                        break
            full = self._full_entries(list(chosen.values()), now)
        except self._errors as exc:
            raise _unavailable(exc) from None
        for (run_id, _), entry in zip(chosen.items(), full, strict=True):
            if entry is not None:
                settled[run_id] = entry
        return settled

    # -- deferred handlers --------------------------------------------------------------

    def claim_handler(self, key: str, handler: str, lease: float) -> Claim:
        """Take one deferred handler's own lease (``Claim.body`` holds the stored body)."""
        token = secrets.token_hex(8)
        args: list[Any] = [_now(), self.channel, handler, token, _ms(lease)]
        reply = self._run(self._claim_handler, key, args)
        state = text(reply[0])
        if state == "missing":
            raise KeyError(key)
        prior = text(reply[2]) if reply[2] else ""
        if state == "done":
            return Claim(ClaimState.DONE, prior_state=prior)
        if state == "busy":
            return Claim(ClaimState.BUSY, retry_after=int(reply[1]) / 1000, prior_state=prior)
        body = bytes(reply[3]) if len(reply) > 3 and reply[3] is not None else None
        return Claim(ClaimState.ACQUIRED, token, body=body, prior_state=prior)

    def finish_handler(
        self,
        key: str,
        handler: str,
        token: str,
        outcome: HandlerOutcome,
        attempt: Attempt,
        final: bool,
        ttl: float,
    ) -> None:
        """Record a deferred handler's run (see the store contract); wakes the run's
        waiters when the entry becomes ``handled`` or ``failed``."""
        args: list[Any] = [_now(), self.channel, handler, token]
        args += [orjson.dumps(outcome.to_dict()), "1" if outcome.ok else ""]
        args += [attempt_json(attempt), "1" if final else "", _ms(ttl)]
        self._run(self._finish_handler, key, args)

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
            raise _unavailable(exc) from None

    def refusals(self, limit: int = 100) -> list[Refusal]:
        """Refused deliveries, newest first."""
        if limit < 1:
            return []
        try:
            records = self._redis.lrange(self._refusals_key, 0, limit - 1)
        except self._errors as exc:
            raise _unavailable(exc) from None
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

    # -- reading entries ----------------------------------------------------------------

    def _hashes(self, keys: list[str]) -> list[Any]:
        if not keys:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self._keys(key)[2])
        return list(pipe.execute())

    def _summaries(self, keys: list[str], now: float) -> list[JournalEntry | None]:
        """Entries without body or history, in one round trip; gone ones are unindexed."""
        hashes = self._hashes(keys)
        self._repair([key for key, fields in zip(keys, hashes, strict=True) if not fields])
        return [
            entry_from(key, fields, now) if fields else None
            for key, fields in zip(keys, hashes, strict=True)
        ]

    def _full_entries(self, keys: list[str], now: float) -> list[JournalEntry | None]:
        """Entries with body and history, in one round trip."""
        if not keys:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            names = self._keys(key)
            pipe.hgetall(names[2])
            pipe.get(names[4])
            pipe.lrange(names[5], 0, -1)
        replies = pipe.execute()
        entries: list[JournalEntry | None] = []
        for i, key in enumerate(keys):
            fields, body, history = replies[3 * i : 3 * i + 3]
            entry = None
            if fields:
                entry = entry_from(key, fields, now, body=body, history=history)
            entries.append(entry)
        return entries

    def _cursor(self, before: str) -> tuple[float, str] | None:
        """The keyset position of the entry ``before``."""
        score = self._redis.zscore(self._root, before)
        if score is None:
            received = self._redis.hget(self._keys(before)[2], "received_at")
            if received is None:
                return None
            score = float(received)
        return (float(score), before)

    def _repair(self, keys: list[str]) -> None:
        """Unindex entries found expired while reading (best effort: the next journal
        write's purge does it too)."""
        if not keys:
            return
        try:
            self._forget(keys=[self._root], args=keys)
        except self._errors as exc:
            logger.debug("could not unindex expired journal entries: %r", exc)

    # -- claims given up after a timeout (see redis_give_up) ----------------------------

    def _give_up_later(self, key: str, token: str, lease: float) -> None:
        self._give_ups.later(key, token, lease)

    def _wait_given_up(self, timeout: float) -> bool:
        """Whether every claim given up so far was sent, waiting up to ``timeout`` (tests)."""
        return self._give_ups.wait(timeout)

    # -- keys and calls -----------------------------------------------------------------

    def _keys(self, key: str) -> list[str]:
        # A shared hash tag keeps every key of an event in one Redis Cluster slot.
        state_key = f"{self.prefix}{{{key}}}"
        return [
            state_key,
            state_key + ":h",
            state_key + ":j",
            state_key + ":x",
            state_key + ":b",
            state_key + ":a",
            self._root,
        ]

    def _run(self, script: Any, key: str, args: list[Any]) -> Any:
        try:
            return script(keys=self._keys(key), args=args)
        except self._errors as exc:
            raise _unavailable(exc) from None


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


def _take(items: Any, count: int) -> list[Any]:
    taken = []
    for item in items:
        taken.append(item)
        if len(taken) >= count:
            break
    return taken


def _unavailable(exc: BaseException) -> StoreUnavailable:
    """The error a failed Redis call becomes; on Redis Cluster, with what to do about it."""
    detail = f"redis: {type(exc).__name__}: {exc}"
    if type(exc).__name__ == "ClusterCrossSlotError" or "CROSSSLOT" in str(exc):
        detail += (
            " (on Redis Cluster every key of the store must share a slot: "
            "give RedisStore a prefix with a hash tag, e.g. prefix='{flymy}:')"
        )
    return StoreUnavailable(detail)


def _now() -> str:
    """The client's clock for the scripts, in whole microseconds: what a datetime keeps, so
    that a time read back from an entry is a cursor that finds that entry again."""
    return repr(round(time.time(), 6))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
