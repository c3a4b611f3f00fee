"""What a durable delivery costs PostgreSQL's server processes, and what a simpler layout
could save at most: server CPU per delivery (a claim and a completion), measured from
/proc for the one server process that runs them, in interleaved rounds.

    python -m benchmarks.bench_pg_layout

- ``PostgresStore``: the store's own two statements (claim with its journal entry; the
  completion with outcome, history and the waiters' NOTIFY), sent as the store sends them.
- ``two tables, simple SQL``: the claim row and the journal entry in the store's tables
  (same columns, same indexes), written by the plainest statements that could do it: an
  insert of each, then an update of each. No leases taken over, no handler records, no
  history bound, no NOTIFY: a lower bound for the store's layout, not a store.
- ``one table, simple SQL``: the same with the claim's columns on the journal entry itself
  (one insert, one update): a lower bound for merging the two.
- ``hand-written``: ``INSERT ... ON CONFLICT DO NOTHING`` on the run id, then ``UPDATE``
  (the ``bench_e2e --durable`` baseline; no journal).

Linux only (it reads /proc). The figures are CPU time, so a busy machine disturbs them less
than wall time; the spread across rounds is printed.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from flymy_receiver.stores import PostgresStore
from flymy_receiver.stores import postgres_rows as values
from flymy_receiver.stores.postgres_pool import native
from flymy_receiver.stores.records import Attempt, HandlerOutcome, NewEntry
from tests.postgres_server import running_postgres

ROUNDS, PER_ROUND, WARM = 5, 1500, 200
BODY = b"x" * 1000
HEADERS = {"Content-Type": "application/json", "X-FlyMyAI-Signature": "ab" * 32}
NOW = "extract(epoch from clock_timestamp())"
COLUMNS = (
    "key, event, run_id, agent_id, agent_name, state, attempts, received_at, updated_at,"
    " retention, expires, body, headers, handlers, history, body_size, body_dropped, lease_until"
)
VALUES = (
    f"%(key)s, 'run.completed', %(key)s, 'agent', 'name', 'pending', 1, {NOW}, {NOW}, 86400,"
    f" {NOW} + 86400, %(body)s, %(headers)s, '{{}}', '[]', 1000, false, {NOW} + 300"
)
TWO_TABLES = (
    f"""WITH d AS (INSERT INTO bench.d2 (key, token, done, expires)
        VALUES (%(key)s, %(token)s, false, {NOW} + 300) ON CONFLICT (key) DO NOTHING RETURNING 1)
    INSERT INTO bench.j2 ({COLUMNS}) SELECT {VALUES} FROM d RETURNING 1""",  # noqa: S608
    f"""WITH d AS (UPDATE bench.d2 SET done = true, token = '', expires = {NOW} + 86400
        WHERE key = %(key)s RETURNING 1)
    UPDATE bench.j2 j SET state = 'handled', handlers = j.handlers || %(outcomes)s,
        history = j.history || %(attempts)s::jsonb, updated_at = {NOW},
        expires = {NOW} + j.retention, lease_until = 0
    FROM d WHERE j.key = %(key)s RETURNING j.run_id""",  # noqa: S608
)
ONE_TABLE = (
    f"""INSERT INTO bench.m ({COLUMNS}, token, done) VALUES ({VALUES}, %(token)s, false)
    ON CONFLICT (key) DO NOTHING RETURNING 1""",  # noqa: S608
    f"""UPDATE bench.m j SET done = true, token = '', state = 'handled',
        handlers = j.handlers || %(outcomes)s, history = j.history || %(attempts)s::jsonb,
        updated_at = {NOW}, expires = {NOW} + j.retention, lease_until = 0
    WHERE j.key = %(key)s RETURNING j.run_id""",  # noqa: S608
)


def _run(conn: psycopg.Connection[Any], statement: str, params: dict[str, Any]) -> None:
    text, names = native(statement)
    with psycopg.RawCursor(conn) as cur:
        cur.execute(text, tuple(params[name] for name in names))
        cur.fetchall()


def main() -> None:
    with running_postgres() as server:
        url = server.create_database()
        store = PostgresStore(url, schema="bench")
        store.claim("warm-up", 1.0)  # makes the store's tables
        conn = psycopg.connect(url, autocommit=True)
        conn.execute("CREATE TABLE bench.j2 (LIKE bench.flymy_journal INCLUDING ALL)")
        conn.execute("CREATE TABLE bench.d2 (LIKE bench.flymy_deliveries INCLUDING ALL)")
        conn.execute("CREATE TABLE bench.m (LIKE bench.flymy_journal INCLUDING ALL)")
        conn.execute("ALTER TABLE bench.m ADD COLUMN token text, ADD COLUMN done boolean")
        conn.execute(
            "CREATE TABLE bench.hand (run_id text PRIMARY KEY, done boolean NOT NULL,"
            " received_at timestamptz NOT NULL)"
        )
        outcomes = values.outcomes_json({"app.handler": HandlerOutcome(ok=True, at=1.0)})
        attempts = values.attempts_json(Attempt(1.0, "sender", 200, "handled", 0.001))
        completion = {"ttl": 86400.0, "journal": True, "state": "handled"}
        completion.update(outcomes=outcomes, attempts=attempts, channel=store._channel)

        def ours(i: int) -> None:
            entry = NewEntry(f"run.completed:r{i}", "run.completed", f"r{i}", "agent", "name",
                             BODY, HEADERS, 86400.0)  # fmt: skip
            claim = {"key": entry.key, "token": f"t{i}", "lease": 300.0, "force": False}
            claim.update(store._entry_params(entry, entry.key))
            _run(conn, store._q.claim_entry, claim)
            _run(conn, store._q.complete, {**completion, "key": entry.key})

        def simple(claim: str, complete: str) -> Callable[[int], None]:
            def deliver(i: int) -> None:
                params = {"key": f"r{i}", "token": f"t{i}", "body": BODY, "headers": Jsonb(HEADERS)}
                params.update(outcomes=outcomes, attempts=attempts)
                _run(conn, claim, params)
                _run(conn, complete, params)

            return deliver

        def hand(i: int) -> None:
            conn.execute(
                "INSERT INTO bench.hand (run_id, done, received_at) VALUES (%s, false, now())"
                " ON CONFLICT (run_id) DO NOTHING RETURNING 1",
                (f"h{i}",),
            ).fetchone()
            conn.execute("UPDATE bench.hand SET done = true WHERE run_id = %s", (f"h{i}",))

        variants: dict[str, Callable[[int], None]] = {
            "PostgresStore": ours,
            "two tables, simple SQL": simple(*TWO_TABLES),
            "one table, simple SQL": simple(*ONE_TABLE),
            "hand-written": hand,
        }
        backend = conn.info.backend_pid
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            with open(f"/proc/{backend}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        n = 0
        for deliver in variants.values():
            for _ in range(WARM):
                deliver(n)
                n += 1
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(ROUNDS):
            order = list(variants.items())
            for name, deliver in order if r % 2 == 0 else order[::-1]:
                before = cpu()
                for _ in range(PER_ROUND):
                    deliver(n)
                    n += 1
                samples[name].append((cpu() - before) / PER_ROUND * 1e6)
        conn.close()
        store.close()
    hand_median = statistics.median(samples["hand-written"])
    print("| server CPU per delivery | median µs | rounds (min-max) | / hand-written |")
    print("|---|---:|---:|---:|")
    for name, cpu_us in samples.items():
        median = statistics.median(cpu_us)
        print(
            f"| {name} | {median:,.0f} | {min(cpu_us):,.0f}-{max(cpu_us):,.0f}"
            f" | {median / hand_median:.1f}x |"
        )
    print(f"\n({ROUNDS} interleaved rounds x {PER_ROUND} deliveries each, 1 KB bodies)")


if __name__ == "__main__":
    main()
