"""Flask on PostgreSQL: ``gunicorn benchmarks.apps.postgres_app:app`` (``BENCH_PG_URL``).

Durable endpoints on the same server and database: this library's receiver on
:class:`~flymy_receiver.stores.PostgresStore` (claim + journal entry, the handler, the
completion), the same with ``journal=False`` (``/webhooks/flymy-no-journal``: idempotency
records only), and what a careful user writes by hand: verify, ``INSERT ... ON CONFLICT DO
NOTHING`` on the run id, the handler, an ``UPDATE`` when done (no journal, no leases).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from flask import Flask, jsonify, request
from psycopg_pool import ConnectionPool

from benchmarks.apps.common import authentic, make_receiver
from flymy_receiver.flask import blueprint
from flymy_receiver.stores import PostgresStore

URL = os.environ["BENCH_PG_URL"]
SCHEMA = f"bench_{uuid.uuid4().hex[:12]}"

app = Flask(__name__)
app.register_blueprint(
    blueprint(make_receiver(store=PostgresStore(URL, schema=SCHEMA)), url="/webhooks/flymy")
)
# The same receiver without its journal (idempotency records only): what the journal costs.
app.register_blueprint(
    blueprint(
        make_receiver(store=PostgresStore(URL, schema=SCHEMA + "_nj"), journal=False),
        url="/webhooks/flymy-no-journal",
        name="flymy_no_journal",
    )
)

_pool: ConnectionPool[Any] = ConnectionPool(
    URL, min_size=1, max_size=4, kwargs={"autocommit": True}, open=True
)
with _pool.connection() as _conn:
    _conn.execute(
        "CREATE TABLE IF NOT EXISTS hand_deliveries"
        " (run_id text PRIMARY KEY, done boolean NOT NULL, received_at timestamptz NOT NULL)"
    )


@app.post("/hand")
def hand():  # type: ignore[no-untyped-def]
    body = request.get_data()
    if not authentic(body, request.headers.get("X-FlyMyAI-Signature")):
        return jsonify(error="Invalid signature"), 401
    event = json.loads(body)
    run_id = str(event["data"]["run_id"])
    with _pool.connection() as conn:
        fresh = conn.execute(
            "INSERT INTO hand_deliveries (run_id, done, received_at) VALUES (%s, false, now())"
            " ON CONFLICT (run_id) DO NOTHING RETURNING 1",
            (run_id,),
        ).fetchone()
        if fresh is None:
            return jsonify(received=True)  # a duplicate (or in flight): acknowledged
        if event["event"] == "run.completed":
            pass  # the handler's work would go here
        conn.execute("UPDATE hand_deliveries SET done = true WHERE run_id = %s", (run_id,))
    return jsonify(received=True)
