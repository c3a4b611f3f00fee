"""The adapter contract run against the sans-I/O core itself: ``handle`` and ``ahandle``.

The streaming variants read the body the way an adapter does with the core's API:
:meth:`Receiver.precheck` first, then a bounded read, then ``handle``.
"""

from __future__ import annotations

import asyncio

from flymy_receiver import Receiver, Response
from flymy_receiver.bodies import aread_limited, read_limited
from tests.contract import Headers, ReceiverContract, Reply, Tripwire


def as_reply(response: Response) -> Reply:
    return Reply(
        response.status, response.body, {k.lower(): v for k, v in response.headers.items()}
    )


class TestHandle(ReceiverContract):
    def deliver(self, receiver: Receiver, body: bytes, headers: Headers, method: str) -> Reply:
        return as_reply(receiver.handle(body, headers, method))

    def deliver_stream(self, receiver: Receiver, body: Tripwire, headers: Headers) -> Reply:
        response = receiver.precheck(headers) or receiver.handle(
            read_limited(body.read, receiver.max_body_size), headers
        )
        return as_reply(response)


class TestAhandle(ReceiverContract):
    def deliver(self, receiver: Receiver, body: bytes, headers: Headers, method: str) -> Reply:
        return as_reply(asyncio.run(receiver.ahandle(body, headers, method)))

    def deliver_stream(self, receiver: Receiver, body: Tripwire, headers: Headers) -> Reply:
        async def run() -> Response:
            early = receiver.precheck(headers)
            if early is not None:
                return early
            data = await aread_limited(body.aiter_chunks(), receiver.max_body_size)
            return await receiver.ahandle(data, headers)

        return as_reply(asyncio.run(run()))
