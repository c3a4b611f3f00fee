"""FastAPI: ``api_router(receiver)`` puts the webhook in ``/openapi.json`` (the events'
schemas, the signature header, the statuses) and answers like every adapter."""

from __future__ import annotations

from typing import Any

from tests.conftest import SECRET, require

require("fastapi")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from flymy_receiver import Receiver, RunCompleted  # noqa: E402
from flymy_receiver.starlette import api_router, route  # noqa: E402
from flymy_receiver.testing import make_event, signed_request  # noqa: E402


def _app(receiver: Receiver) -> Any:
    app = FastAPI()
    app.include_router(api_router(receiver, "/webhooks/flymy"))
    return app


def test_the_webhook_is_documented_in_openapi() -> None:
    client = TestClient(_app(Receiver(SECRET)))
    document = client.get("/openapi.json").json()
    operations = document["paths"]["/webhooks/flymy"]
    assert list(operations) == ["post"]  # the other methods answer 405, undocumented
    post = operations["post"]
    assert [p["name"] for p in post["parameters"]] == ["X-FlyMyAI-Signature"]
    schemas = post["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    events = [s["properties"]["event"] for s in schemas]
    assert [e.get("const", e.get("enum", [None])[0]) for e in events] == [
        "run.completed",
        "run.failed",
    ]
    assert {"200", "401", "409", "500", "503"} <= set(post["responses"])


def test_a_plain_route_is_not_in_the_schema() -> None:
    app = FastAPI()
    app.router.routes.append(route(Receiver(SECRET), "/webhooks/flymy"))
    assert "/webhooks/flymy" not in TestClient(app).get("/openapi.json").json()["paths"]


def test_the_documented_route_answers_like_every_adapter() -> None:
    receiver = Receiver(SECRET)
    seen: list[str] = []

    @receiver.on("run.completed")
    def handled(event: RunCompleted) -> None:
        seen.append(event.data.run_id)

    client = TestClient(_app(receiver))
    req = signed_request(make_event("run.completed", run_id="run_api"), SECRET)
    assert client.post("/webhooks/flymy", content=req.body, headers=req.headers).status_code == 200
    assert seen == ["run_api"]
    assert client.post("/webhooks/flymy", content=req.body, headers={}).status_code == 401
    response = client.get("/webhooks/flymy")
    assert (response.status_code, response.headers["allow"]) == (405, "POST")
