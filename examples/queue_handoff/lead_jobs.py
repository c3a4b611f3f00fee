"""The slow part of handling a lead, run by an RQ worker instead of the webhook.

Jobs may run more than once (a worker can die after doing the work and before RQ records
it), so each job is idempotent on its own: one row per run, whatever happens.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any


def enrich_lead(run_id: str, profile: dict[str, Any]) -> str:
    """Pretend to enrich the lead (CRM look-ups, e-mail drafts...), then save it once."""
    time.sleep(float(os.environ.get("ENRICH_SECONDS", "0")))  # the slow work
    db = sqlite3.connect(os.environ.get("LEADS_DB", "leads.sqlite3"), timeout=30)
    try:
        with db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS enriched_leads"
                " (run_id TEXT PRIMARY KEY, outreach_angle TEXT, triggers INTEGER)"
            )
            db.execute(
                "INSERT OR IGNORE INTO enriched_leads VALUES (?, ?, ?)",
                (run_id, profile["outreach_angle"], len(profile["buying_triggers"])),
            )
    finally:
        db.close()
    return run_id
