"""``aview`` follows Django's connection lifecycle: the database connections its deliveries
open are closed as Django closes a request's, never left idle in worker threads."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted
from tests.conftest import SECRET, require
from tests.django.conftest import insert_lead, leads, request_for

URL = "/webhooks/flymy"
DELIVERIES = 60
#: Idle connections allowed after the deliveries: a leak keeps one per worker thread
#: (the default executor's CPUs + 4), the lifecycle none.
BOUND = 1


def _idle_connections(server: Any, alias: str) -> int:
    from django.db import connections

    name = connections[alias].settings_dict["NAME"]
    query = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
    out = server.psql(f"{query} AND datname = '{name}'")
    return int(out.strip())


@pytest.fixture
def postgres(postgres_server: Any) -> Any:
    require("django")
    require("psycopg")
    from django.db import connections

    from flymy_receiver.django import registry
    from tests.django_db import empty, postgres_alias

    alias = postgres_alias(postgres_server)
    empty(alias)
    registry.unregister()
    connections[alias].close()
    yield alias
    connections[alias].close()


@pytest.mark.parametrize("handler_kind", ["sync", "async"])
def test_concurrent_deliveries_through_aview_leave_no_idle_connections(
    postgres_server: Any, postgres: str, handler_kind: str
) -> None:
    from django.db import connections
    from django.test import AsyncClient, override_settings
    from django.urls import path

    from flymy_receiver.django import DjangoStore, aview
    from tests.django.conftest import _empty_leads

    _empty_leads(postgres)
    connections[postgres].close()
    receiver = Receiver(SECRET, store=DjangoStore(using=postgres))
    if handler_kind == "sync":

        @receiver.on("run.completed")
        def save(event: RunCompleted) -> None:  # the ORM in a sync handler, as apps do
            insert_lead(postgres, event.data.run_id)

    else:

        @receiver.on("run.completed")
        async def asave(event: RunCompleted) -> None:
            await asyncio.sleep(0)

    urls = type("Urls", (), {"urlpatterns": [path(URL.lstrip("/"), aview(receiver))]})
    requests = [request_for(f"run_conn_{handler_kind}_{n}") for n in range(DELIVERIES)]

    async def deliver_all() -> list[int]:
        client = AsyncClient()

        async def one(body: bytes, headers: dict[str, str]) -> int:
            response = await client.post(
                URL, body, content_type="application/json", headers=headers
            )
            return int(response.status_code)

        return await asyncio.gather(*(one(body, headers) for body, headers in requests))

    with override_settings(ROOT_URLCONF=urls):
        statuses = asyncio.run(deliver_all())
    assert statuses == [200] * DELIVERIES
    if handler_kind == "sync":
        assert len(leads(postgres)) == DELIVERIES
    connections[postgres].close()  # this thread's own, opened by the checks above
    assert _idle_connections(postgres_server, postgres) <= BOUND
