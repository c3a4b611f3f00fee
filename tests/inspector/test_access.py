"""Who may use the inspector: loopback names, the access token, same-origin posts with CSRF."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from starlette.testclient import TestClient

from flymy_receiver import Receiver
from flymy_receiver.inspector import check_bind, inspector_app
from flymy_receiver.inspector.access import (
    TOKEN_COOKIE,
    check_bound,
    host_name,
    is_loopback,
)
from tests.inspector.conftest import ORIGIN, Crm, client_for, csrf_of, deliver

TOKEN = "tok-0123456789abcdef"


@pytest.fixture
def guarded(receiver: Receiver) -> Any:
    with client_for(inspector_app(receiver, token=TOKEN), follow_redirects=False) as client:
        yield client


# -- binding ---------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_token(host: str) -> None:
    assert is_loopback(host)
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.com", ""])
def test_another_address_without_a_token_is_refused(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(ValueError, match="without an access token"):
        check_bind(host, None)
    check_bind(host, TOKEN)


@pytest.mark.parametrize(
    "token", ["short", "x" * 15, "has space in it 123", "semi;colon-0123456789"]
)
def test_weak_or_cookie_unsafe_tokens_are_refused(token: str) -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        check_bind("127.0.0.1", token)


# -- the token -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/api/deliveries", "/api/refusals", "/static/inspector.js"])
def test_every_page_and_api_needs_the_token(guarded: Any, path: str) -> None:
    answer = guarded.get(path)
    assert answer.status_code == 401
    assert TOKEN not in answer.text


def test_the_api_refusal_is_json(guarded: Any) -> None:
    answer = guarded.get("/api/deliveries")
    assert "access token" in answer.json()["error"]


def _session_cookie(answer: Any) -> tuple[str, str, str]:
    """The name, value and attributes of the Set-Cookie header of ``answer``."""
    cookie = answer.headers["set-cookie"]
    pair, _, attributes = cookie.partition(";")
    name, _, value = pair.partition("=")
    return name, value, attributes


def test_token_in_the_url_once_becomes_a_session_cookie(guarded: Any) -> None:
    answer = guarded.get("/", params={"token": TOKEN, "state": "failed"})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/?state=failed"  # the token leaves the address bar
    name, value, attributes = _session_cookie(answer)
    # Per port (cookies reach every port of a host), and never the token itself.
    assert name == f"{TOKEN_COOKIE}_80"
    assert TOKEN not in value
    assert len(value) >= 32
    assert "HttpOnly" in attributes
    assert "SameSite=strict" in attributes or "SameSite=Strict" in attributes
    assert "Secure" not in attributes  # plain http: a Secure cookie would never come back
    guarded.cookies.set(name, value)
    assert guarded.get("/").status_code == 200
    assert guarded.get("/api/deliveries").status_code == 200


def test_the_raw_token_as_a_cookie_is_not_a_session(guarded: Any) -> None:
    guarded.cookies.set(f"{TOKEN_COOKIE}_80", TOKEN)
    assert guarded.get("/").status_code == 401


def test_a_session_belongs_to_one_server(receiver: Receiver) -> None:
    # Two inspectors with the same token (a restart, another port) make different sessions.
    values = []
    for _ in range(2):
        app = inspector_app(receiver, token=TOKEN)
        with client_for(app, follow_redirects=False) as client:
            values.append(_session_cookie(client.get("/", params={"token": TOKEN}))[1])
    assert values[0] != values[1]
    app = inspector_app(receiver, token=TOKEN)
    with client_for(app, follow_redirects=False) as client:
        client.cookies.set(f"{TOKEN_COOKIE}_80", values[0])
        assert client.get("/").status_code == 401


def test_under_https_the_cookie_is_secure_and_host_prefixed(receiver: Receiver) -> None:
    app = inspector_app(receiver, token=TOKEN)
    with TestClient(app, base_url="https://127.0.0.1:8443", follow_redirects=False) as client:
        answer = client.get("/", params={"token": TOKEN})
        name, value, attributes = _session_cookie(answer)
        assert name == f"__Host-{TOKEN_COOKIE}_8443"
        assert "Secure" in attributes
        assert "Path=/" in attributes
        assert "Domain" not in attributes
        client.cookies.set(name, value)
        assert client.get("/").status_code == 200


def test_a_wrong_token_is_refused_everywhere(guarded: Any) -> None:
    assert guarded.get("/", params={"token": "tok-wrong-wrong-wrong"}).status_code == 401
    guarded.cookies.set(f"{TOKEN_COOKIE}_80", "tok-wrong-wrong-wrong")
    assert guarded.get("/").status_code == 401
    assert guarded.get("/", headers={"Authorization": "Bearer nope"}).status_code == 401


@pytest.mark.parametrize(
    "headers", [{"Authorization": f"Bearer {TOKEN}"}, {"X-Inspector-Token": TOKEN}]
)
def test_scripts_send_the_token_as_a_header(guarded: Any, headers: dict[str, str]) -> None:
    answer = guarded.get("/api/deliveries", headers=headers)
    assert answer.status_code == 200
    assert answer.json()["deliveries"] == []


def test_with_a_token_any_host_name_is_served(guarded: Any) -> None:
    headers = {"Host": "inspector.internal:8001", "X-Inspector-Token": TOKEN}
    assert guarded.get("/api/deliveries", headers=headers).status_code == 200


# -- DNS rebinding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8000",
        "10.0.0.5:8000",
        "localhost:80@evil.com",  # userinfo-looking tricks are not a loopback name
        "127.0.0.1:80@evil.com",
        "localhost@evil.com",
        "localhost:80/evil.com",
        "localhost evil.com",
        "[::1]:80@evil.com",
    ],
)
def test_without_a_token_only_loopback_host_names_are_served(client: Any, host: str) -> None:
    answer = client.get("/api/deliveries", headers={"Host": host})
    assert answer.status_code == 403
    assert "loopback" in answer.json()["error"]


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8001", "[::1]:8000", "localhost"])
def test_loopback_host_names_are_served(client: Any, host: str) -> None:
    assert client.get("/api/deliveries", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8001", "localhost"),
        ("[::1]:8000", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("localhost:80@evil.com", ""),
        ("localhost:8000:9000", ""),
        ("[::1", ""),
    ],
)
def test_host_name_parses_only_a_host_and_a_port(header: str, name: str) -> None:
    assert host_name(header) == name


# -- the bound address decides ---------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.1.1", "::1"])
def test_a_loopback_bound_address_needs_no_token(address: str) -> None:
    check_bound(address, None)


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.168.1.20", "fe80::1%eth0", "x"])
def test_a_non_loopback_bound_address_needs_a_token(address: str) -> None:
    with pytest.raises(ValueError, match="not loopback"):
        check_bound(address, None)
    check_bound(address, TOKEN)


# -- cross-site requests ----------------------------------------------------------------


def _replay_form(client: Any, key: str, csrf: str) -> dict[str, str]:
    return {"key": key, "csrf_token": csrf}


def test_replay_with_the_page_token_from_the_page_origin(
    receiver: Receiver, crm: Crm, client: Any
) -> None:
    crm.down = True
    deliver(receiver, run_id="run_csrf")
    crm.down = False
    csrf = csrf_of(client, "/deliveries/run_csrf")
    answer = client.post(
        "/replay",
        data=_replay_form(client, "run_csrf", csrf),
        headers={"Origin": ORIGIN, "Sec-Fetch-Site": "same-origin"},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    assert (
        answer.headers["location"] == "/deliveries/run.completed%3Arun_csrf?notice=replay-handled"
    )
    assert crm.saved == ["run_csrf"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # another port of localhost is the same site
        {"Origin": "http://evil.example"},
        {"Origin": "http://127.0.0.1:9999"},
        {"Origin": "null"},
    ],
)
def test_cross_site_posts_are_refused(
    receiver: Receiver, crm: Crm, client: Any, headers: dict[str, str]
) -> None:
    crm.down = True
    deliver(receiver, run_id="run_xs")
    crm.down = False
    csrf = csrf_of(client)
    for path, form in (
        ("/replay", {"key": "run_xs", "csrf_token": csrf}),
        ("/send", {"event": "run.completed", "csrf_token": csrf}),
    ):
        answer = client.post(path, data=form, headers=headers, follow_redirects=False)
        assert answer.status_code == 403, (path, headers)
        assert "cross-site" in answer.text
    assert crm.saved == []
    assert len(client.get("/api/deliveries").json()["deliveries"]) == 1


@pytest.mark.parametrize("csrf", [None, "", "forged-token-value"])
def test_posts_without_the_page_csrf_token_are_refused(
    receiver: Receiver, crm: Crm, client: Any, csrf: str | None
) -> None:
    crm.down = True
    deliver(receiver, run_id="run_nocsrf")
    crm.down = False
    for path, form in (
        ("/replay", {"key": "run_nocsrf"}),
        ("/send", {"event": "run.completed"}),
    ):
        if csrf is not None:
            form["csrf_token"] = csrf
        answer = client.post(path, data=form, headers={"Origin": ORIGIN}, follow_redirects=False)
        assert answer.status_code == 403
        assert "out of date" in answer.text
    assert crm.saved == []


def test_the_csrf_token_is_accepted_as_a_header_too(receiver: Receiver, client: Any) -> None:
    csrf = csrf_of(client)
    answer = client.post(
        "/send",
        data={"event": "run.completed"},
        headers={"X-CSRF-Token": csrf},
        follow_redirects=False,
    )
    assert answer.status_code == 303


def test_get_cannot_change_anything(receiver: Receiver, crm: Crm, client: Any) -> None:
    crm.down = True
    deliver(receiver, run_id="run_get")
    crm.down = False
    csrf = csrf_of(client)
    for path in ("/replay", "/send"):
        answer = client.get(path, params={"key": "run_get", "csrf_token": csrf})
        assert answer.status_code == 405
    assert crm.saved == []


def test_an_oversized_form_is_refused_before_it_is_read(client: Any) -> None:
    csrf = csrf_of(client)
    answer = client.post(
        "/send",
        content=b"csrf_token=" + csrf.encode() + b"&data=" + b"x" * (2 * 1024 * 1024),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 413


# -- what every answer carries ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/api/deliveries", "/static/inspector.css", "/nowhere"])
def test_a_strict_content_security_policy_on_every_answer(client: Any, path: str) -> None:
    headers = client.get(path).headers
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "same-origin"


def test_a_loopback_looking_name_that_resolves_elsewhere_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    from flymy_receiver import devserver

    real = socket.getaddrinfo

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        # "dev.localhost" reads like loopback, but this resolver says the wildcard address.
        return real("0.0.0.0" if host == "dev.localhost" else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert is_loopback("dev.localhost")  # the name check alone would let it through
    with pytest.raises(ValueError, match="not loopback"):
        devserver.bound_socket("dev.localhost", 0, None)
    with devserver.bound_socket("dev.localhost", 0, TOKEN) as sock:  # a token allows it
        assert sock.getsockname()[0] == "0.0.0.0"
    with devserver.bound_socket("localhost", 0, None) as sock:
        assert ipaddress.ip_address(sock.getsockname()[0]).is_loopback
