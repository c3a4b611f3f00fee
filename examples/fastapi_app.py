"""The lead profiler webhook on FastAPI, beside an ordinary FastAPI route.

FLYMY_WEBHOOK_SECRET=... uvicorn --host 127.0.0.1 --port 8000 fastapi_app:app
"""

from __future__ import annotations

from fastapi import FastAPI

from flymy_receiver.starlette import route

from leads import make_receiver

app = FastAPI()
# The webhook is a plain Starlette route: FastAPI must not parse or validate its body.
app.router.routes.append(route(make_receiver(), "/webhooks/flymy"))


@app.get("/health")
def health() -> dict[str, bool]:
    """An ordinary FastAPI endpoint, unaffected by the webhook route."""
    return {"ok": True}
