"""The SQL of :class:`~flymy_receiver.stores.postgres.PostgresStore`: its tables and statements.

Each store call is ONE statement, run in autocommit: a round trip to the server and no
``BEGIN``/``COMMIT`` of its own. Data-modifying CTEs put what used to be a transaction into
one statement (the claim, the handlers already done and the journal entry; the completion,
its outcomes, its history, the journal state and the ``NOTIFY`` of waiters). Every statement
that changes an event touches its rows in one order (deliveries, then handlers, then the
journal): a CTE that must run after another reads its result, which orders them.

Lists read summaries (never the body) through an index for each filter and for the keyset
``(received_at, key)``, newest first. Sender-chosen text (run id, event, agent id) is indexed
through a bounded prefix, so a run id of any length can be journaled (a btree entry holds at
most about 2.7 KB).
"""

from __future__ import annotations

from dataclasses import dataclass

from .postgres_schema import HISTORY, PREFIX, quote

__all__ = ["LIST_COLUMNS", "Queries"]


def _trim(history: str) -> str:
    """``history`` (a jsonb array) cut to its newest :data:`HISTORY` attempts."""
    return (
        f"CASE WHEN jsonb_array_length({history}) <= {HISTORY} THEN {history} ELSE"  # noqa: S608 - our own SQL text
        f" (SELECT jsonb_agg(t.e ORDER BY t.n) FROM jsonb_array_elements({history})"
        f" WITH ORDINALITY AS t(e, n) WHERE t.n > jsonb_array_length({history}) - {HISTORY})"
        " END"
    )


def _notify(source: str, where: str) -> str:
    """A CTE body that NOTIFYs the waiters of each row of ``source`` matching ``where``
    (the payload is the run id; too long for NOTIFY, it is empty: listeners then look up
    every run they wait for)."""
    return (
        "SELECT pg_notify(%(channel)s, CASE WHEN octet_length(x.run_id) <= 7900"  # noqa: S608 - our own SQL text
        f" THEN x.run_id ELSE '' END) FROM {source} x WHERE x.run_id IS NOT NULL AND {where}"
    )


# The state a reader sees: a pending entry whose claim's lease has ended is "stalled".
_STATE = "CASE WHEN j.state = 'pending' AND j.lease_until <= {now} THEN 'stalled' ELSE j.state END"
_SIZE = "COALESCE(j.body_size, octet_length(j.body))"
#: What a summary holds (no body, no history, no headers): the columns of entry_from_row.
LIST_COLUMNS = (
    "COALESCE(j.full_key, j.key), j.event, j.run_id, j.agent_id, j.agent_name, " + _STATE + ","
    " j.attempts, j.received_at, j.updated_at, NULL::bytea, NULL::jsonb, j.handlers, NULL::jsonb,"
    " j.note, " + _SIZE + ", j.body_dropped"
)
_FULL_COLUMNS = (
    "COALESCE(j.full_key, j.key), j.event, j.run_id, j.agent_id, j.agent_name, " + _STATE + ","
    " j.attempts, j.received_at, j.updated_at, j.body, j.headers, j.handlers, j.history,"
    " j.note, " + _SIZE + ", j.body_dropped"
)

# The columns a new journal entry is written with (a delivery's claim, an ignored event).
_ENTRY_COLUMNS = (
    "key, event, run_id, agent_id, agent_name, state, attempts, received_at, updated_at,"
    " retention, expires, body, headers, handlers, history, note, body_size, body_dropped,"
    " lease_until, full_key"
)

# A claim: the deliveries row is always written back, so that RETURNING reports the row as
# it is now (a claim that waited on another's lock sees that one's outcome, not its
# snapshot's). A retry with the same token (the first try's answer was lost) finds its own
# claim. Then the handlers already done, the entry's prior state (locked, so current), and
# the entry itself.
_CLAIMED = """
claimed AS (
    INSERT INTO {s}.flymy_deliveries AS d (key, token, done, expires)
    VALUES (%(key)s, %(token)s, false, {now} + %(lease)s)
    ON CONFLICT (key) DO UPDATE SET
        token = CASE WHEN {free} THEN EXCLUDED.token ELSE d.token END,
        done = CASE WHEN {free} THEN false ELSE d.done END,
        expires = CASE WHEN {free} THEN EXCLUDED.expires ELSE d.expires END
    RETURNING d.token = %(token)s AS acquired, d.done, d.expires
),
forgot AS (
    DELETE FROM {s}.flymy_handlers h USING claimed c
    WHERE h.key = %(key)s AND %(force)s AND c.acquired
    RETURNING 1
),
done_handlers AS (
    SELECT COALESCE(array_agg(h.handler), '{{}}') AS names FROM {s}.flymy_handlers h
    WHERE h.key = %(key)s AND h.expires > {now} AND NOT %(force)s
),
old AS (
    SELECT {state} AS state, j.expires > {now} AS alive,
        CASE WHEN j.body IS NULL THEN 0 ELSE {size} END AS kept
    FROM {s}.flymy_journal j, claimed c, (SELECT count(*) FROM forgot) f
    WHERE j.key = %(key)s
    FOR UPDATE OF j
)"""
_FREE = "(d.expires <= {now} OR (%(force)s AND d.done) OR d.token = %(token)s)"

_CLAIM_PLAIN = (
    "WITH"
    + _CLAIMED
    + """
SELECT c.acquired, c.done, c.expires - {now}, dh.names, NULL::text
FROM claimed c CROSS JOIN done_handlers dh
"""
)

# A delivery's entry: created, or one more attempt. An acquired claim makes it pending with
# the new body; a duplicate or a busy claim appends its attempt and changes nothing else. An
# entry past its retention that was not purged yet starts afresh, as if it had been.
_CLAIM_ENTRY = (
    "WITH"  # noqa: S608 - our own SQL text; every value is a parameter
    + _CLAIMED
    + """,
fits AS (
    SELECT {fits} AS ok
),
entry AS (
    INSERT INTO {s}.flymy_journal AS j ("""
    + _ENTRY_COLUMNS
    + """)
    SELECT %(key)s, %(event)s, %(run_id)s, %(agent_id)s, %(agent_name)s,
        CASE WHEN c.done AND NOT c.acquired THEN 'handled' ELSE 'pending' END,
        1, {now}, {now}, %(retention)s, {now} + %(retention)s,
        CASE WHEN f.ok THEN %(body)s::bytea END, %(headers)s, '{{}}',
        CASE WHEN c.acquired THEN '[]'::jsonb
            WHEN c.done THEN jsonb_build_array(jsonb_build_object('at', {now}, 'source', 'sender',
                'status', 200, 'outcome', 'duplicate', 'duration', 0))
            ELSE jsonb_build_array(jsonb_build_object('at', {now}, 'source', 'sender',
                'status', 409, 'outcome', 'in_flight', 'duration', 0)) END,
        NULL, %(size)s, NOT f.ok,
        CASE WHEN c.done AND NOT c.acquired THEN 0 ELSE c.expires END, %(full_key)s
    FROM claimed c LEFT JOIN old o ON true CROSS JOIN fits f
    ON CONFLICT (key) DO UPDATE SET
        attempts = CASE WHEN j.expires <= {now} THEN 1 ELSE j.attempts + 1 END,
        state = CASE WHEN j.expires <= {now} THEN EXCLUDED.state
            WHEN (SELECT acquired FROM claimed) THEN 'pending' ELSE j.state END,
        received_at = CASE WHEN j.expires <= {now} THEN EXCLUDED.received_at
            ELSE j.received_at END,
        event = CASE WHEN {renew} THEN EXCLUDED.event ELSE j.event END,
        run_id = CASE WHEN {renew} THEN EXCLUDED.run_id ELSE j.run_id END,
        agent_id = CASE WHEN {renew} THEN EXCLUDED.agent_id ELSE j.agent_id END,
        agent_name = CASE WHEN {renew} THEN EXCLUDED.agent_name ELSE j.agent_name END,
        body = CASE WHEN {renew} THEN EXCLUDED.body ELSE j.body END,
        headers = CASE WHEN {renew} THEN EXCLUDED.headers ELSE j.headers END,
        body_size = CASE WHEN {renew} THEN EXCLUDED.body_size ELSE j.body_size END,
        body_dropped = CASE WHEN {renew} THEN EXCLUDED.body_dropped ELSE j.body_dropped END,
        lease_until = CASE WHEN {renew} THEN EXCLUDED.lease_until ELSE j.lease_until END,
        handlers = CASE WHEN j.expires <= {now} THEN EXCLUDED.handlers ELSE j.handlers END,
        note = CASE WHEN j.expires <= {now} THEN NULL ELSE j.note END,
        history = CASE WHEN j.expires <= {now} THEN EXCLUDED.history
            ELSE {appended} END,
        updated_at = EXCLUDED.updated_at,
        retention = EXCLUDED.retention,
        expires = EXCLUDED.expires
    RETURNING j.run_id, j.state, j.attempts, j.body IS NOT NULL AS kept
),
counted AS ({count_bytes}),
notified AS ({notify})
SELECT c.acquired, c.done, c.expires - {now}, dh.names, CASE WHEN o.alive THEN o.state END,
    (SELECT count(*) FROM entry), (SELECT count(*) FROM counted), (SELECT count(*) FROM notified)
FROM claimed c LEFT JOIN old o ON true CROSS JOIN done_handlers dh
"""
)
_RENEW = "(j.expires <= {now} OR (SELECT acquired FROM claimed))"

# A replay's claim: no attempt counted; an acquired one makes the entry pending (its lease
# set), a busy one appends a replay that found the event in flight.
_CLAIM_REPLAY = (
    "WITH"  # noqa: S608 - our own SQL text; every value is a parameter
    + _CLAIMED
    + """,
entry AS (
    UPDATE {s}.flymy_journal j SET
        state = CASE WHEN c.acquired THEN 'pending' ELSE j.state END,
        lease_until = CASE WHEN c.acquired THEN c.expires ELSE j.lease_until END,
        history = CASE WHEN c.acquired OR c.done THEN j.history ELSE {appended_busy} END,
        updated_at = {now}, expires = {now} + j.retention
    FROM claimed c, (SELECT count(*) FROM old) o
    WHERE j.key = %(key)s AND j.expires > {now} AND (c.acquired OR NOT c.done)
    RETURNING 1
)
SELECT c.acquired, c.done, c.expires - {now}, dh.names, CASE WHEN o.alive THEN o.state END,
    (SELECT count(*) FROM entry)
FROM claimed c LEFT JOIN old o ON true CROSS JOIN done_handlers dh
"""
)
_BUSY_REPLAY = (
    "jsonb_build_array(jsonb_build_object('at', {now}, 'source', 'replay', 'status', 409,"
    " 'outcome', 'in_flight', 'duration', 0))"
)

_MARK = """
WITH marked AS (
    INSERT INTO {s}.flymy_handlers AS h (key, handler, expires)
    SELECT %(key)s, %(handler)s, {now} + %(ttl)s
    WHERE NOT EXISTS (
        SELECT 1 FROM {s}.flymy_deliveries WHERE key = %(key)s AND done AND expires > {now}
    )
    ON CONFLICT (key, handler) DO UPDATE SET expires = GREATEST(h.expires, EXCLUDED.expires)
    RETURNING 1
),
entry AS (
    UPDATE {s}.flymy_journal j
    SET handlers = j.handlers || %(outcomes)s, updated_at = {now}, expires = {now} + j.retention
    FROM (SELECT count(*) FROM marked) m
    WHERE j.key = %(key)s AND j.expires > {now} AND %(journal)s
    RETURNING 1
)
SELECT (SELECT count(*) FROM entry)
"""

# The completion: done for ttl, the claim dropped, the per-handler records forgotten, the
# entry handled (or queued while deferred handlers wait) with its outcomes and attempt, and
# the run's waiters woken.
_COMPLETE = """
WITH old AS (SELECT token, done FROM {s}.flymy_deliveries WHERE key = %(key)s),
done AS (
    INSERT INTO {s}.flymy_deliveries AS d (key, token, done, expires)
    VALUES (%(key)s, '', true, {now} + %(ttl)s)
    ON CONFLICT (key) DO UPDATE SET token = '', done = true, expires = EXCLUDED.expires
    RETURNING 1
),
forgot AS (
    DELETE FROM {s}.flymy_handlers h USING (SELECT count(*) FROM done) d
    WHERE h.key = %(key)s
    RETURNING 1
),
entry AS (
    UPDATE {s}.flymy_journal j SET
        state = %(state)s,
        handlers = j.handlers || %(outcomes)s,
        history = {appended},
        updated_at = {now}, expires = {now} + j.retention, lease_until = 0
    FROM (SELECT count(*) FROM forgot) f
    WHERE j.key = %(key)s AND j.expires > {now} AND %(journal)s
    RETURNING j.run_id, j.state
),
notified AS ({notify})
SELECT (SELECT token FROM old), (SELECT done FROM old), (SELECT count(*) FROM entry),
    (SELECT count(*) FROM notified)
"""

# A failure: the claim given up while ``token`` holds it, the entry failed with its outcomes
# and attempt, the run's waiters woken.
_RELEASE = """
WITH released AS (
    DELETE FROM {s}.flymy_deliveries
    WHERE key = %(key)s AND token = %(token)s AND NOT done
    RETURNING 1
),
entry AS (
    UPDATE {s}.flymy_journal j SET
        state = 'failed',
        handlers = j.handlers || %(outcomes)s,
        history = {appended},
        updated_at = {now}, expires = {now} + j.retention, lease_until = 0
    WHERE j.key = %(key)s AND j.expires > {now} AND %(journal)s
        AND EXISTS (SELECT 1 FROM released)
    RETURNING j.run_id, j.state
),
notified AS ({notify})
SELECT (SELECT count(*) FROM released), (SELECT count(*) FROM entry),
    (SELECT count(*) FROM notified)
"""

# A claim whose answer never came (the server stalled after it was sent): given up by its
# token once the server process that had it is gone (before, it may still commit it). Its
# entry, still pending, shows as stalled at once. The first column says whether it is over.
_GIVE_UP = """
WITH settled AS (
    SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity WHERE pid = %(pid)s) AS ok
),
released AS (
    DELETE FROM {s}.flymy_deliveries
    WHERE key = %(key)s AND token = %(token)s AND NOT done AND (SELECT ok FROM settled)
    RETURNING 1
),
entry AS (
    UPDATE {s}.flymy_journal j SET
        lease_until = {now}, updated_at = {now}, history = {appended}
    WHERE j.key = %(key)s AND j.state = 'pending' AND EXISTS (SELECT 1 FROM released)
    RETURNING 1
)
SELECT (SELECT ok FROM settled), (SELECT count(*) FROM entry)
"""

# An event no handler wanted: a new entry is ignored; an existing one counts an attempt and
# keeps its state and its body (a later delivery never hides a failed entry).
_IGNORE = (
    "WITH"  # noqa: S608 - our own SQL text; every value is a parameter
    + """
fits AS (
    SELECT {fits} AS ok
),
entry AS (
    INSERT INTO {s}.flymy_journal AS j ("""
    + _ENTRY_COLUMNS
    + """)
    SELECT %(key)s, %(event)s, %(run_id)s, %(agent_id)s, %(agent_name)s, 'ignored', 1,
        {now}, {now}, %(retention)s, {now} + %(retention)s,
        CASE WHEN f.ok THEN %(body)s::bytea END, %(headers)s, '{{}}', %(attempts)s, NULL,
        %(size)s, NOT f.ok, 0, %(full_key)s
    FROM fits f
    ON CONFLICT (key) DO UPDATE SET
        attempts = CASE WHEN j.expires <= {now} THEN 1 ELSE j.attempts + 1 END,
        state = CASE WHEN j.expires <= {now} THEN 'ignored' ELSE j.state END,
        received_at = CASE WHEN j.expires <= {now} THEN EXCLUDED.received_at
            ELSE j.received_at END,
        event = CASE WHEN j.expires <= {now} THEN EXCLUDED.event ELSE j.event END,
        run_id = CASE WHEN j.expires <= {now} THEN EXCLUDED.run_id ELSE j.run_id END,
        agent_id = CASE WHEN j.expires <= {now} THEN EXCLUDED.agent_id ELSE j.agent_id END,
        agent_name = CASE WHEN j.expires <= {now} THEN EXCLUDED.agent_name
            ELSE j.agent_name END,
        body = CASE WHEN j.expires <= {now} THEN EXCLUDED.body ELSE j.body END,
        headers = CASE WHEN j.expires <= {now} THEN EXCLUDED.headers ELSE j.headers END,
        body_size = CASE WHEN j.expires <= {now} THEN EXCLUDED.body_size ELSE j.body_size END,
        body_dropped = CASE WHEN j.expires <= {now} THEN EXCLUDED.body_dropped
            ELSE j.body_dropped END,
        handlers = CASE WHEN j.expires <= {now} THEN EXCLUDED.handlers ELSE j.handlers END,
        note = CASE WHEN j.expires <= {now} THEN NULL ELSE j.note END,
        lease_until = CASE WHEN j.expires <= {now} THEN 0 ELSE j.lease_until END,
        history = CASE WHEN j.expires <= {now} THEN EXCLUDED.history ELSE {appended} END,
        updated_at = EXCLUDED.updated_at,
        retention = EXCLUDED.retention,
        expires = EXCLUDED.expires
    RETURNING j.run_id, j.state, j.attempts, j.body IS NOT NULL AS kept
),
counted AS ({count_bytes_ignore}),
notified AS ({notify})
SELECT (SELECT count(*) FROM entry), (SELECT count(*) FROM counted),
    (SELECT count(*) FROM notified)
"""
)

_RESOLVE = """
UPDATE {s}.flymy_journal SET state = 'resolved', note = %(note)s, lease_until = 0,
    updated_at = {now}, expires = {now} + retention
WHERE key = %(key)s AND expires > {now}
RETURNING 1
"""

# A deferred handler's own lease: taken unless it is ok or another worker's lease is live.
# Read again after, for the answer when it was not taken.
_CLAIM_HANDLER = """
WITH taken AS (
    UPDATE {s}.flymy_journal j SET
        handlers = j.handlers || jsonb_build_object(%(handler)s::text,
            COALESCE(j.handlers -> %(handler)s::text, '{{}}') || jsonb_build_object(
                'ok', false, 'state', 'running', 'deferred', true, 'token', %(token)s::text,
                'attempts', COALESCE((j.handlers -> %(handler)s::text ->> 'attempts')::int, 0) + 1,
                'lease_until', {now} + %(lease)s)),
        updated_at = {now}, expires = {now} + j.retention
    WHERE j.key = %(key)s AND j.expires > {now}
        AND NOT COALESCE((j.handlers -> %(handler)s::text ->> 'ok')::boolean, false)
        AND NOT (COALESCE(j.handlers -> %(handler)s::text ->> 'state', '') = 'running'
            AND COALESCE((j.handlers -> %(handler)s::text ->> 'lease_until')::float8, 0) > {now})
    RETURNING j.body, {state} AS state
)
SELECT t.body, t.state, false, 0::float8, true FROM taken t
UNION ALL
SELECT NULL, {state}, COALESCE((j.handlers -> %(handler)s::text ->> 'ok')::boolean, false),
    GREATEST(COALESCE((j.handlers -> %(handler)s::text ->> 'lease_until')::float8, 0) - {now},
        0.001), false
FROM {s}.flymy_journal j
WHERE j.key = %(key)s AND j.expires > {now} AND NOT EXISTS (SELECT 1 FROM taken)
"""

# A deferred handler's run recorded: ok always, a failure only while the token holds the
# handler's lease. The entry is handled once every handler is ok, failed when a failure is
# final (then the done record goes, and the handlers that are ok are recorded as done, so
# that a replay or the sender's retry runs only the others).
_FINISH_HANDLER = """
WITH claim AS (
    SELECT 1 FROM {s}.flymy_deliveries WHERE key = %(key)s AND %(final)s AND NOT %(ok)s
    FOR UPDATE
),
entry AS (
    UPDATE {s}.flymy_journal j SET
        handlers = j.handlers || jsonb_build_object(%(handler)s::text,
            (COALESCE(j.handlers -> %(handler)s::text, '{{}}') - 'token' - 'lease_until')
                || %(outcome)s::jsonb),
        history = {appended},
        state = CASE
            WHEN NOT EXISTS (
                SELECT 1 FROM jsonb_each(j.handlers || jsonb_build_object(%(handler)s::text,
                    %(outcome)s::jsonb)) e
                WHERE NOT COALESCE((e.value ->> 'ok')::boolean, false)) THEN 'handled'
            WHEN %(final)s AND NOT %(ok)s THEN 'failed'
            ELSE j.state END,
        updated_at = {now}, expires = {now} + j.retention
    FROM (SELECT count(*) FROM claim) c
    WHERE j.key = %(key)s AND j.expires > {now} AND (%(ok)s OR (
        j.handlers -> %(handler)s::text ->> 'token' = %(token)s
        AND j.handlers -> %(handler)s::text ->> 'state' = 'running'))
    RETURNING j.run_id, j.state, j.handlers
),
undone AS (
    DELETE FROM {s}.flymy_deliveries d USING entry e
    WHERE d.key = %(key)s AND d.done AND e.state = 'failed'
    RETURNING 1
),
kept AS (
    INSERT INTO {s}.flymy_handlers AS h (key, handler, expires)
    SELECT %(key)s, x.key, {now} + %(ttl)s
    FROM entry e, jsonb_each(e.handlers) x, (SELECT count(*) FROM undone) u
    WHERE e.state = 'failed' AND COALESCE((x.value ->> 'ok')::boolean, false)
    ON CONFLICT (key, handler) DO UPDATE SET expires = GREATEST(h.expires, EXCLUDED.expires)
    RETURNING 1
),
notified AS ({notify})
SELECT (SELECT count(*) FROM entry), (SELECT count(*) FROM kept), (SELECT count(*) FROM notified)
"""

_JOURNAL_GET = """
(SELECT {full} FROM {s}.flymy_journal j WHERE j.key = %(key)s AND j.expires > {now})
UNION ALL
(SELECT {full} FROM {s}.flymy_journal j
 WHERE left(j.run_id, {prefix}) = left(%(run)s::text, {prefix}) AND j.run_id = %(run)s
     AND j.expires > {now}
 ORDER BY j.received_at DESC, j.key DESC LIMIT 1)
LIMIT 1
"""
_JOURNAL_LIST = "SELECT {summary} FROM {s}.flymy_journal j WHERE j.expires > {now}"
# The keyset: entries strictly before the given one in (received_at, key) order. The first
# bound is an index condition; the second only drops the ties.
_BEFORE = (
    " AND j.received_at <= (SELECT b.received_at FROM {s}.flymy_journal b WHERE b.key = %(before)s)"
    " AND (j.received_at < (SELECT b.received_at FROM {s}.flymy_journal b"
    " WHERE b.key = %(before)s) OR j.key < %(before)s)"
)
_JOURNAL_SETTLED = """
SELECT {full} FROM {s}.flymy_journal j
WHERE left(j.run_id, {prefix}) = ANY(%(prefixes)s) AND j.run_id = ANY(%(runs)s)
    AND j.state NOT IN ('pending', 'queued') AND j.expires > {now}
ORDER BY j.received_at
"""
_REFUSAL = """
WITH added AS (
    INSERT INTO {s}.flymy_refusals (at, status, reason, detail)
    VALUES (%(at)s, %(status)s, %(reason)s, %(detail)s)
    RETURNING id
)
DELETE FROM {s}.flymy_refusals WHERE id <= (SELECT id FROM added) - %(keep)s
"""
_REFUSALS = """
SELECT at, status, reason, detail FROM {s}.flymy_refusals ORDER BY id DESC LIMIT %(limit)s
"""
# At most a batch of expired rows of each table, in one statement, skipping rows another
# transaction holds (so a purge never waits nor deadlocks); re-checked on delete, so a row
# claimed again meanwhile stays. The byte count gives back what the bodies held.
_PURGE = """
WITH deliveries AS (
    DELETE FROM {s}.flymy_deliveries WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {s}.flymy_deliveries WHERE expires <= {now}
        LIMIT %(batch)s FOR UPDATE SKIP LOCKED
    )) AND expires <= {now}
    RETURNING 1
),
handlers AS (
    DELETE FROM {s}.flymy_handlers WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {s}.flymy_handlers WHERE expires <= {now}
        LIMIT %(batch)s FOR UPDATE SKIP LOCKED
    )) AND expires <= {now}
    RETURNING 1
),
journal AS (
    DELETE FROM {s}.flymy_journal j WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {s}.flymy_journal WHERE expires <= {now}
        LIMIT %(batch)s FOR UPDATE SKIP LOCKED
    )) AND expires <= {now}
    RETURNING CASE WHEN j.body IS NULL THEN 0 ELSE {size} END AS kept
),
counted AS ({count_bytes_purge})
SELECT (SELECT count(*) FROM deliveries), (SELECT count(*) FROM handlers),
    (SELECT count(*) FROM journal), (SELECT count(*) FROM counted)
"""

# With max_journal_bytes: whether the new body fits, and the shards' count kept up to date.
_FITS_LIMIT = (
    "(SELECT COALESCE(sum(b.bytes), 0) FROM {s}.flymy_journal_bytes b) + %(size)s <= %(max_bytes)s"
)
_COUNT_CLAIM = """
    INSERT INTO {s}.flymy_journal_bytes AS b (shard, bytes)
    SELECT %(shard)s, (CASE WHEN e.kept THEN %(size)s ELSE 0 END) - COALESCE(o.kept, 0)
    FROM entry e LEFT JOIN old o ON true
    WHERE (SELECT acquired FROM claimed) OR o.alive IS NULL OR NOT o.alive
    ON CONFLICT (shard) DO UPDATE SET bytes = b.bytes + EXCLUDED.bytes
    RETURNING 1"""
_COUNT_IGNORE = """
    INSERT INTO {s}.flymy_journal_bytes AS b (shard, bytes)
    SELECT %(shard)s, %(size)s FROM entry e WHERE e.attempts = 1 AND e.kept
    ON CONFLICT (shard) DO UPDATE SET bytes = b.bytes + EXCLUDED.bytes
    RETURNING 1"""
_COUNT_PURGE = """
    INSERT INTO {s}.flymy_journal_bytes AS b (shard, bytes)
    SELECT %(shard)s, -sum(kept) FROM journal HAVING sum(kept) > 0
    ON CONFLICT (shard) DO UPDATE SET bytes = b.bytes + EXCLUDED.bytes
    RETURNING 1"""
_NO_COUNT = "SELECT 1 WHERE false"


@dataclass(frozen=True, slots=True)
class Queries:
    """Every statement, with the schema, the clock and the byte limit filled in."""

    claim_plain: str
    claim_entry: str
    claim_replay: str
    mark: str
    complete: str
    release: str
    give_up: str
    ignore: str
    resolve: str
    claim_handler: str
    finish_handler: str
    journal_get: str
    journal_list: str
    before: str
    journal_settled: str
    refusal: str
    refusals: str
    purge: str

    @classmethod
    def build(cls, schema: str, now: str, limit_bytes: bool) -> Queries:
        """``now`` is the SQL of the current time in epoch seconds; ``limit_bytes`` whether
        journal bodies are counted against ``max_journal_bytes``."""
        # The schema goes through psycopg's placeholder parser with the rest: a % in its
        # name must be doubled (L10).
        s = quote(schema).replace("%", "%%")
        state = _STATE.format(now=now)
        common = {
            "s": s,
            "now": now,
            "prefix": str(PREFIX),
            "state": state,
            "size": _SIZE,
            "full": _FULL_COLUMNS.format(now=now),
            "summary": LIST_COLUMNS.format(now=now),
        }

        def q(text: str, **more: str) -> str:
            # Pieces first (they hold {s} and {now} themselves), then the statement.
            pieces = {name: value.format(**common) for name, value in more.items()}
            return text.format(**common, **pieces)

        appended = _trim("(j.history || %(attempts)s::jsonb)")
        fits = _FITS_LIMIT if limit_bytes else "true"
        counts = limit_bytes
        # {free} sits inside _CLAIMED, formatted with the statement: fill it first.
        claim_entry = _CLAIM_ENTRY.replace("{free}", _FREE).replace("{renew}", _RENEW)
        return cls(
            claim_plain=q(_CLAIM_PLAIN.replace("{free}", _FREE)),
            claim_entry=q(
                claim_entry,
                appended=_trim("(j.history || EXCLUDED.history)"),
                fits=fits,
                count_bytes=_COUNT_CLAIM if counts else _NO_COUNT,
                notify=_notify("entry", "x.attempts = 1 AND x.state = 'handled'"),
            ),
            claim_replay=q(
                _CLAIM_REPLAY.replace("{free}", _FREE),
                appended_busy=_trim("(j.history || " + _BUSY_REPLAY + ")"),
            ),
            mark=q(_MARK),
            complete=q(
                _COMPLETE, appended=appended, notify=_notify("entry", "x.state = 'handled'")
            ),
            release=q(_RELEASE, appended=appended, notify=_notify("entry", "true")),
            give_up=q(_GIVE_UP, appended=appended),
            ignore=q(
                _IGNORE,
                appended=_trim("(j.history || EXCLUDED.history)"),
                fits=fits,
                count_bytes_ignore=_COUNT_IGNORE if counts else _NO_COUNT,
                notify=_notify("entry", "x.attempts = 1"),
            ),
            resolve=q(_RESOLVE),
            claim_handler=q(_CLAIM_HANDLER),
            finish_handler=q(
                _FINISH_HANDLER,
                appended=appended,
                notify=_notify("entry", "x.state IN ('handled', 'failed')"),
            ),
            journal_get=q(_JOURNAL_GET),
            journal_list=q(_JOURNAL_LIST),
            before=q(_BEFORE),
            journal_settled=q(_JOURNAL_SETTLED),
            refusal=q(_REFUSAL),
            refusals=q(_REFUSALS),
            purge=q(_PURGE, count_bytes_purge=_COUNT_PURGE if counts else _NO_COUNT),
        )
