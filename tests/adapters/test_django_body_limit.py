"""WebhookBodyLimit in front of Django's real ASGI handler: every webhook URL is guarded.

Django's ASGI handler reads (and spools) a whole body before any view runs; the middleware
must end an oversized body at the limit wherever ``view``/``aview`` are mounted, not only at
its default path. What reaches Django is counted, so a body spooled whole fails the test.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from flymy_receiver import Receiver
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import require

SECRET = "whsec-body-limit"
LIMIT = 64 * 1024
CHUNK = 16 * 1024
HUGE = 800 * CHUNK  # 12.5 MiB offered; at most LIMIT + 1 may reach Django


@pytest.fixture(autouse=True)
def _django() -> None:
    require("django")


@dataclass
class Exchange:
    """One request through the middleware and Django: the answer and what Django read."""

    status: int = 0
    body: bytes = b""
    django_read: int = 0
    offered: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)


def _receiver(limit: int = LIMIT) -> Receiver:
    receiver = Receiver(secret=SECRET, max_body_size=limit, max_age=None)
    receiver.on("run.completed")(lambda event: None)
    return receiver


def _plain(request: Any) -> Any:
    from django.http import HttpResponse

    return HttpResponse(f"read {len(request.body)}")


_plain.csrf_exempt = True  # type: ignore[attr-defined]


def _urls(*patterns: Any) -> type:
    return type("Urls", (), {"urlpatterns": list(patterns)})


def _exchange(
    urls: type,
    path: str,
    body: bytes,
    headers: dict[str, str],
    *,
    root_path: str = "",
    middleware: dict[str, Any] | None = None,
) -> Exchange:
    from django.core.handlers.asgi import ASGIHandler
    from django.test import override_settings

    from flymy_receiver.django import WebhookBodyLimit

    result = Exchange()

    async def run() -> None:
        chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)] or [b""]
        pending: Iterator[bytes] = iter(chunks)

        async def client() -> dict[str, Any]:
            chunk = next(pending, None)
            if chunk is None:  # all sent: wait, as a client that keeps the connection
                await asyncio.Event().wait()
            result.offered += len(chunk or b"")
            return {"type": "http.request", "body": chunk, "more_body": result.offered < len(body)}

        async def django_app(scope: Any, receive: Any, send: Any) -> None:
            async def counted() -> dict[str, Any]:
                message: dict[str, Any] = await receive()
                result.django_read += len(message.get("body", b""))
                return message

            await ASGIHandler()(scope, counted, send)

        async def send(message: dict[str, Any]) -> None:
            result.messages.append(message)
            if message["type"] == "http.response.start":
                result.status = message["status"]
            elif message["type"] == "http.response.body":
                result.body += message.get("body", b"")

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": root_path,
            "query_string": b"",
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 5000),
            "headers": [(b"host", b"127.0.0.1")]
            + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }
        app = WebhookBodyLimit(django_app, _receiver(), **(middleware or {}))
        await asyncio.wait_for(app(scope, client, send), timeout=60)

    with override_settings(ROOT_URLCONF=urls, ALLOWED_HOSTS=["127.0.0.1"]):
        asyncio.run(run())
    return result


def _huge_signed() -> tuple[bytes, dict[str, str]]:
    event = make_event("run.completed").model_dump(mode="json")
    event["data"]["output"] = "x" * HUGE
    req = signed_request(event, SECRET)
    return req.body, req.headers  # chunked: no Content-Length, as a streaming sender does


def _small_signed() -> tuple[bytes, dict[str, str]]:
    req = signed_request(make_event("run.completed"), SECRET)
    return req.body, {**req.headers, "Content-Length": str(len(req.body))}


def _assert_refused_at_the_limit(result: Exchange) -> None:
    assert result.status == 413, result.body
    assert json.loads(result.body) == {"error": "Payload too large"}
    assert result.django_read <= LIMIT + 1  # never the 12.5 MiB on offer


@pytest.mark.parametrize("make_view", ["view", "aview"])
def test_a_webhook_view_at_any_url_is_guarded(make_view: str) -> None:
    from django.urls import path

    from flymy_receiver import django as adapter

    view = getattr(adapter, make_view)(_receiver())
    urls = _urls(path("hooks/another-name", view))
    _assert_refused_at_the_limit(_exchange(urls, "/hooks/another-name", *_huge_signed()))
    ok = _exchange(urls, "/hooks/another-name", *_small_signed())
    assert (ok.status, ok.body) == (200, b'{"received":true}')


def test_urls_with_converters_and_a_script_prefix_are_guarded() -> None:
    from django.urls import path

    from flymy_receiver.django import aview

    urls = _urls(path("tenants/<slug:tenant>/flymy", aview(_receiver())))
    _assert_refused_at_the_limit(_exchange(urls, "/tenants/acme/flymy", *_huge_signed()))
    mounted = _exchange(urls, "/app/tenants/acme/flymy", *_huge_signed(), root_path="/app")
    _assert_refused_at_the_limit(mounted)


def test_a_decorated_view_is_still_recognised() -> None:
    import functools

    from django.urls import path

    from flymy_receiver.django import aview

    inner = aview(_receiver())

    @functools.wraps(inner)
    async def logged(request: Any) -> Any:
        return await inner(request)

    urls = _urls(path("hooks/logged", logged))
    _assert_refused_at_the_limit(_exchange(urls, "/hooks/logged", *_huge_signed()))


def test_each_view_is_guarded_with_its_own_receivers_limit() -> None:
    from django.urls import path

    from flymy_receiver.django import aview

    body, headers = _small_signed()
    small = _receiver(limit=len(body) - 1)
    urls = _urls(path("small", aview(small)), path("large", aview(_receiver())))
    refused = _exchange(urls, "/small", body, headers)
    assert refused.status == 413
    assert refused.django_read == 0  # the declared length was enough
    assert _exchange(urls, "/large", body, headers).status == 200


def test_other_urls_pass_through_untouched() -> None:
    from django.urls import path

    from flymy_receiver.django import aview

    urls = _urls(path("webhooks/flymy", aview(_receiver())), path("upload", _plain))
    body = b"y" * (10 * CHUNK)  # over the webhook's limit: not this URL's business
    result = _exchange(urls, "/upload", body, {"Content-Type": "application/octet-stream"})
    assert (result.status, result.body) == (200, f"read {len(body)}".encode())
    assert result.django_read == len(body)
    missing = _exchange(urls, "/nowhere", b"z", {"Content-Length": "1"})
    assert missing.status == 404


def test_path_guards_a_hand_written_webhook_view() -> None:
    from django.urls import path
    from django.views.decorators.csrf import csrf_exempt

    receiver = _receiver()

    @csrf_exempt
    def mine(request: Any) -> Any:
        from django.http import HttpResponse

        response = receiver.handle(request.read(LIMIT + 1), dict(request.headers))
        return HttpResponse(response.body, status=response.status)

    urls = _urls(path("custom", mine))
    body, headers = _huge_signed()
    assert _exchange(urls, "/custom", body, headers).django_read == len(body)  # all spooled
    guarded = _exchange(urls, "/custom", body, headers, middleware={"path": ["/custom"]})
    _assert_refused_at_the_limit(guarded)
