"""Deferred handlers on Celery: the webhook answers once the event is journaled, a Celery
worker does the slow work. This module builds the Celery app and the receiver, so both the
web app (``web.py``) and the worker (``celery -A webhooks worker``) import it.

Configured by environment:

- ``FLYMY_WEBHOOK_SECRET`` the webhook secret (required);
- ``CELERY_BROKER_URL`` the broker (default ``redis://127.0.0.1:6379/0``);
- ``FLYMY_STORE`` the journal every process shares (default
  ``sqlite:///deliveries.sqlite3``; ``postgresql://...`` across machines);
- ``LEADS_DB`` the SQLite file the handlers write to (default ``leads.sqlite3``);
- ``CRM_SECONDS`` how long the pretend CRM write takes (default 2).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from datetime import timedelta

from celery import Celery
from pydantic import BaseModel

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.queues.celery import CeleryQueue
from flymy_receiver.stores import store_from_url

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
log = logging.getLogger("deferred-example")

celery_app = Celery(
    "webhooks", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
)
celery_app.conf.update(
    worker_prefetch_multiplier=1,  # a lost worker holds one job, not a batch
    # Above the receiver's lease: Redis hands an unacknowledged job to another worker only
    # after this, and the lease already keeps a second copy from running meanwhile.
    broker_transport_options={"visibility_timeout": 3600},
)

# "Never lose, run once": acknowledge a job after it ran, redeliver a lost worker's job,
# retry a failing handler three times with backoff, then the entry is failed (replay it).
queue = CeleryQueue(
    celery_app,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(Exception,),
    max_retries=3,
    retry_backoff=True,
)
queue.schedule_sweep(every=timedelta(minutes=5))  # `celery -A webhooks beat` runs it
receiver = Receiver(
    store=store_from_url(os.environ.get("FLYMY_STORE", "sqlite:///deliveries.sqlite3")),
    queue=queue,
    lease=timedelta(minutes=2),  # longer than the slowest handler
)


class Lead(BaseModel):
    background: str
    buying_triggers: list[str]
    outreach_angle: str


def leads_db() -> sqlite3.Connection:
    db = sqlite3.connect(os.environ.get("LEADS_DB", "leads.sqlite3"), timeout=30)
    db.execute(
        "CREATE TABLE IF NOT EXISTS crm (run_id TEXT PRIMARY KEY, outreach_angle TEXT, pid INT)"
    )
    return db


@receiver.on("run.completed")
def note(event: RunCompleted[Lead]) -> None:
    """Inline: runs in the request, before the answer (keep it quick)."""
    log.info("lead profiled: run %s", event.data.run_id)


@receiver.on("run.completed", defer=True)
def push_to_crm(event: RunCompleted[Lead]) -> None:
    """Deferred: runs on a Celery worker, after the answer; as slow as it needs."""
    time.sleep(float(os.environ.get("CRM_SECONDS", "2")))
    db = leads_db()
    with db:
        db.execute(
            "INSERT INTO crm VALUES (?, ?, ?)",
            (event.data.run_id, event.data.output.outreach_angle, os.getpid()),
        )
    db.close()
    log.info("lead %s pushed to the CRM", event.data.run_id)
