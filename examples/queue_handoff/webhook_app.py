"""A webhook that answers at once and hands the slow work to an RQ queue.

Several copies of this app (several gunicorn workers, several machines) share one Redis:
for the idempotency store, so that each event is enqueued once whichever copy receives it,
and for the queue that the RQ workers drain.

    REDIS_URL=redis://127.0.0.1:6379/0 FLYMY_WEBHOOK_SECRET=... \\
        gunicorn -w 4 -b 127.0.0.1:8000 webhook_app:app
    REDIS_URL=redis://127.0.0.1:6379/0 rq worker --url redis://127.0.0.1:6379/0 leads
"""

from __future__ import annotations

import os

from flask import Flask
from pydantic import BaseModel
from redis import Redis
from rq import Queue

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.flask import blueprint
from flymy_receiver.stores import RedisStore

from lead_jobs import enrich_lead

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


class LeadProfile(BaseModel):
    """The output of the Sales Lead Profiler agent."""

    background: str
    buying_triggers: list[str]
    outreach_angle: str


receiver = Receiver(store=RedisStore(REDIS_URL))  # secret from FLYMY_WEBHOOK_SECRET
queue = Queue("leads", connection=Redis.from_url(REDIS_URL))


@receiver.on("run.completed", output=LeadProfile)
def lead_profiled(event: RunCompleted[LeadProfile]) -> None:
    # Enqueuing takes a millisecond; the 200 goes back before the slow work starts. If
    # Redis is down this raises, the sender gets a 5xx and delivers the event again.
    queue.enqueue(
        enrich_lead,
        event.data.run_id,
        event.data.output.model_dump(),
        job_id=f"enrich-{event.data.run_id}",
        result_ttl=3600,
        failure_ttl=7 * 24 * 3600,
    )


app = Flask(__name__)
app.register_blueprint(blueprint(receiver, url="/webhooks/flymy"))
