"""A sync handler never blocks the event loop; an async one works under sync frameworks.

The blocking handler below waits for an event that only the event loop can set. Run on the
loop's own thread, it would wait out its timeout and the test would fail.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from flymy_receiver import Receiver
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET, require

URL = "/webhooks/flymy"


class Blocking:
    """A receiver whose sync handler blocks until the loop releases it."""

    def __init__(self) -> None:
        self.receiver = Receiver(secret=SECRET)
        self.released = threading.Event()
        self.seen: dict[str, Any] = {}

        @self.receiver.on("run.completed")
        def blocking(event: Any) -> None:
            self.seen["thread"] = threading.get_ident()
            self.seen["released"] = self.released.wait(timeout=10)

    async def release_soon(self) -> int:
        """Set the event from the loop, as soon as the loop is free to run us."""
        await asyncio.sleep(0.05)
        self.released.set()
        return threading.get_ident()


def test_ahandle_runs_a_sync_handler_off_the_event_loop() -> None:
    blocking = Blocking()
    request = signed_request(make_event(), SECRET)

    async def main() -> tuple[int, int]:
        delivery = asyncio.create_task(blocking.receiver.ahandle(request.body, request.headers))
        loop_thread = await blocking.release_soon()
        return (await delivery).status, loop_thread

    status, loop_thread = asyncio.run(main())
    assert status == 200
    assert blocking.seen["released"] is True
    assert blocking.seen["thread"] != loop_thread


def test_the_starlette_route_keeps_the_loop_free_during_a_sync_handler() -> None:
    require("starlette")
    require("httpx")
    import httpx
    from starlette.applications import Starlette

    from flymy_receiver.starlette import route

    blocking = Blocking()
    app = Starlette(routes=[route(blocking.receiver, URL)])
    request = signed_request(make_event(), SECRET)

    async def main() -> tuple[int, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            post = client.post(URL, content=request.body, headers=request.headers)
            delivery = asyncio.create_task(post)
            loop_thread = await blocking.release_soon()
            return (await delivery).status_code, loop_thread

    status, loop_thread = asyncio.run(main())
    assert status == 200
    assert blocking.seen["released"] is True
    assert blocking.seen["thread"] != loop_thread


@pytest.mark.parametrize("inside_a_loop", [False, True])
def test_handle_runs_an_async_handler_to_completion(inside_a_loop: bool) -> None:
    # Flask and Django's sync view call handle(); an async handler must still run, also when
    # the calling thread happens to run an event loop already.
    receiver = Receiver(secret=SECRET)
    ran: list[str] = []

    @receiver.on("run.completed")
    async def profiled(event: Any) -> None:
        await asyncio.sleep(0)
        ran.append(event.data.run_id)

    event = make_event()
    request = signed_request(event, SECRET)
    if inside_a_loop:

        async def main() -> int:
            return receiver.handle(request.body, request.headers).status

        status = asyncio.run(main())
    else:
        status = receiver.handle(request.body, request.headers).status
    assert status == 200
    assert ran == [event.data.run_id]
