"""Starlette: ``uvicorn benchmarks.apps.starlette_app:app``."""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks.apps.common import authentic, make_receiver
from flymy_receiver.starlette import route


async def hand(request: Request) -> JSONResponse:
    body = await request.body()
    if not authentic(body, request.headers.get("x-flymyai-signature")):
        return JSONResponse({"error": "Invalid signature"}, status_code=401)
    event = json.loads(body)
    if event["event"] == "run.completed":
        pass  # the handler's work would go here
    return JSONResponse({"received": True})


def _sync_handler(event: dict[str, object]) -> None:
    if event["event"] == "run.completed":
        pass  # the handler's work would go here


async def hand_sync(request: Request) -> JSONResponse:
    """The same, with the handler a plain function run in Starlette's thread pool (as a
    careful user does with blocking work, and as Starlette runs a sync endpoint)."""
    body = await request.body()
    if not authentic(body, request.headers.get("x-flymyai-signature")):
        return JSONResponse({"error": "Invalid signature"}, status_code=401)
    await run_in_threadpool(_sync_handler, json.loads(body))
    return JSONResponse({"received": True})


app = Starlette(
    routes=[
        # An async handler, like the hand-written one that runs on the event loop; a sync
        # handler runs in a worker thread (BENCH_HANDLER=sync measures that).
        route(make_receiver(async_handler=True), "/webhooks/flymy"),
        Route("/hand", hand, methods=["POST"]),
        Route("/hand-sync", hand_sync, methods=["POST"]),
    ]
)
