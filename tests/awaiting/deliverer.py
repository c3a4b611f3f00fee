"""Another process that receives webhooks: ``python -m tests.awaiting.deliverer STORE FILE``.

``STORE`` is a store URL; a Redis one may end in ``#prefix`` (see :func:`open_store`).

``FILE`` holds one signed request per line (``{"body": base64, "headers": {...}}``); each is
handled by a receiver of this process on the store at ``STORE``, whose ``run.completed``
handler succeeds and whose ``run.failed`` handler raises. Prints each answer's status.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

from flymy_receiver import Receiver
from flymy_receiver.stores import Store, store_from_url
from tests.conftest import SECRET


def main(store_url: str, requests_file: str) -> None:
    receiver = Receiver(SECRET, store=open_store(store_url))

    @receiver.on("run.completed")
    def handled(event: Any) -> None:
        pass

    @receiver.on("run.failed")
    def broken(event: Any) -> None:
        raise RuntimeError("the CRM is down")

    with open(requests_file, encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            response = receiver.handle(base64.b64decode(request["body"]), request["headers"])
            print(response.status, flush=True)


def open_store(url: str) -> Store:
    """``store_from_url``, plus a key prefix after ``#`` for Redis, so that each test has a
    channel of its own on the session's server."""
    url, _, prefix = url.partition("#")
    if prefix:
        from flymy_receiver.stores import RedisStore

        return RedisStore(url, prefix=prefix)
    return store_from_url(url)


def write_requests(path: str, requests: list[tuple[bytes, dict[str, str]]]) -> None:
    """The file ``main`` reads."""
    with open(path, "w", encoding="utf-8") as out:
        for body, headers in requests:
            out.write(json.dumps({"body": base64.b64encode(body).decode(), "headers": headers}))
            out.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
