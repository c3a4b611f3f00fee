"""The "Sales Lead Profiler" example: what every example app in this folder shares.

An agent profiles a sales lead; FlyMy.AI posts ``run.completed`` with the profile (or
``run.failed``) to our webhook. The handlers store each event in SQLite and print one line.

Configured by environment only, so every web server runs it the same way:

- ``FLYMY_WEBHOOK_SECRET`` the webhook secret (required).
- ``FLYMY_STORE`` where handled events are remembered: ``memory://`` (default, one process),
  ``sqlite:///deliveries.sqlite3`` (all workers of one machine), ``redis://...`` or
  ``postgresql://user:password@host:5432/dbname`` (many machines; the tables are created on
  first use; ``pip install 'flymy-receiver[postgres]'``).
- ``LEADS_DB`` the SQLite file the handlers write to (default ``leads.sqlite3``).
- ``FLYMY_MAX_BODY_SIZE`` the largest body accepted, in bytes (default 5 MiB).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from datetime import datetime, timezone

from pydantic import BaseModel

from flymy_receiver import Receiver, Router, RunCompleted, RunFailed
from flymy_receiver.receiver import DEFAULT_MAX_BODY_SIZE
from flymy_receiver.stores import Store, store_from_url

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
log = logging.getLogger("leads")


class LeadProfile(BaseModel):
    """The output of the Sales Lead Profiler agent."""

    background: str
    buying_triggers: list[str]
    outreach_angle: str


router = Router()


@router.on("run.completed")
def lead_profiled(event: RunCompleted[LeadProfile]) -> None:
    """Save the profile: ``event.data.output`` is already a validated ``LeadProfile``."""
    profile = event.data.output
    save(
        "INSERT INTO leads (run_id, agent_id, background, outreach_angle, received_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (
            event.data.run_id,
            event.data.agent_id,
            profile.background,
            profile.outreach_angle,
            datetime.now(timezone.utc).isoformat(),
        ),
    )
    log.info("lead profiled: run %s -> %s", event.data.run_id, profile.outreach_angle[:60])


@router.on("run.failed")
def lead_failed(event: RunFailed) -> None:
    """Keep the failure, so someone can rerun the agent."""
    error = event.data.error
    save(
        "INSERT INTO failures (run_id, error_type, message) VALUES (?, ?, ?)",
        (event.data.run_id, error.type, error.message),
    )
    log.info("run failed: run %s (%s: %s)", event.data.run_id, error.type, error.message[:60])


def save(sql: str, params: tuple[object, ...]) -> None:
    """Run one INSERT in its own transaction; an error propagates, so the sender retries."""
    db = connect()
    try:
        with db:  # commits, or rolls back on an error
            db.execute(sql, params)
    finally:
        db.close()


def connect() -> sqlite3.Connection:
    """A fresh connection per call: several server workers write to the same file."""
    db = sqlite3.connect(os.environ.get("LEADS_DB", "leads.sqlite3"), timeout=30)
    db.execute("PRAGMA busy_timeout = 30000")  # wait for another worker's write, don't fail
    db.execute("PRAGMA journal_mode = WAL")  # readers never block the writer
    db.execute(
        "CREATE TABLE IF NOT EXISTS leads (run_id TEXT, agent_id TEXT, background TEXT,"
        " outreach_angle TEXT, received_at TEXT)"
    )
    db.execute("CREATE TABLE IF NOT EXISTS failures (run_id TEXT, error_type TEXT, message TEXT)")
    return db


def make_receiver(store: Store | None = None) -> Receiver:
    """The receiver every example app mounts; the secret comes from FLYMY_WEBHOOK_SECRET.

    ``store`` defaults to the one ``FLYMY_STORE`` names (the Django example passes its own).
    """
    receiver = Receiver(
        store=store
        if store is not None
        else store_from_url(os.environ.get("FLYMY_STORE", "memory://")),
        max_body_size=int(os.environ.get("FLYMY_MAX_BODY_SIZE", DEFAULT_MAX_BODY_SIZE)),
    )
    receiver.include(router)
    return receiver
