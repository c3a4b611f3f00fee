"""Who may use the inspector: loopback by default, an access token otherwise, no cross-site posts.

The inspector shows every delivery's body and can replay handlers, so it is guarded like a
local admin page:

- Without a token it serves only loopback: the decision is made on the address the socket
  is actually bound to (:func:`check_bound`, from ``getsockname()``), never on a name, since
  ``*.localhost`` or an ``/etc/hosts`` entry may resolve elsewhere (:func:`check_bind` only
  refuses an obviously public address early). It also answers only requests whose ``Host``
  is a loopback name, so that a web page using DNS rebinding cannot read it through the
  browser. That Host check protects against browsers only: any other program on the machine
  can send any ``Host`` it likes, which is why the bind decides.
- With a token, every page, asset and API call needs it: ``?token=`` once (answered with a
  session cookie and a redirect that drops it from the address bar), the cookie, or an
  ``Authorization: Bearer`` / ``X-Inspector-Token`` header. The cookie never holds the
  token: it holds a session value derived from the token and this server instance (an HMAC
  with a random per-process key), under a name that includes the port (cookies reach every
  port of a host), ``Secure`` and ``__Host-`` prefixed when served over HTTPS.
- A request that changes something (``POST``) must come from the inspector's own origin
  (``Sec-Fetch-Site``, ``Origin``) and carry the page's CSRF token (checked by the view).
- Every answer carries a strict Content-Security-Policy: scripts and styles only from the
  inspector's own files, nothing inline, no frames, no foreign connections.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "TOKEN_COOKIE",
    "TOKEN_ENV_VAR",
    "AccessGuard",
    "check_bind",
    "check_bound",
    "check_token",
    "is_loopback",
    "new_csrf_token",
    "same_token",
]

#: The environment variable ``listen`` and ``inspect`` read the access token from (a token
#: given as ``--token`` is visible to other users of the machine in the process list).
TOKEN_ENV_VAR = "FLYMY_INSPECTOR_TOKEN"  # noqa: S105 - a variable name, not a secret
#: The session cookie's name; the port follows it (``flymy_inspector_8001``), and under
#: HTTPS it carries the ``__Host-`` prefix.
TOKEN_COOKIE = "flymy_inspector"  # noqa: S105 - a cookie name, not a secret
TOKEN_MIN_LENGTH = 16
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~-]+")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make Origin "null"
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``, brackets allowed) is a loopback one."""
    host = host.strip().lower().removeprefix("[").removesuffix("]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(token: str) -> None:
    """Refuse a token too short to guess at, or one a cookie cannot carry as it is."""
    if len(token) < TOKEN_MIN_LENGTH or not _TOKEN_CHARS.fullmatch(token):
        raise ValueError(
            f"the access token must be at least {TOKEN_MIN_LENGTH} characters of letters, "
            "digits, '-', '_', '.' or '~' (python -c 'import secrets; "
            "print(secrets.token_urlsafe())' makes one)"
        )


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve the inspector on a non-loopback address without an access token."""
    if token is not None:
        check_token(token)
        return
    if not is_loopback(host):
        raise ValueError(
            f"refusing to listen on {host[:100]!r} without an access token: the inspector "
            "shows every delivery's body and can replay handlers; bind 127.0.0.1 (and reach "
            f"it through an SSH tunnel), or pass --token (or set {TOKEN_ENV_VAR})"
        )


def check_bound(address: str, token: str | None) -> None:
    """Refuse a socket bound (``getsockname()[0]``) to a non-loopback address without a token.

    The bind check that counts: a name such as ``dev.localhost`` is checked by what it
    resolved to, not by how it reads.
    """
    if token is not None:
        return
    try:
        loopback = ipaddress.ip_address(address.partition("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"refusing to serve on {address[:100]!r} without an access token: that address "
            "is not loopback (the host name given resolved to it); bind 127.0.0.1, or pass "
            f"--token (or set {TOKEN_ENV_VAR})"
        )


def same_token(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


def new_csrf_token() -> str:
    """A fresh random CSRF token (one per inspector process; pages embed it in their forms)."""
    return secrets.token_urlsafe(32)


class AccessGuard:
    """ASGI middleware applying the rules in the module docstring to the inspector's routes."""

    def __init__(self, app: ASGIApp, *, token: str | None = None) -> None:
        if token is not None:
            check_token(token)
        self.app = app
        self.token = token
        # The session value is derived from the token and this instance, never the token.
        self._session = (
            hmac.new(
                token.encode(), b"flymy-inspector-session:" + secrets.token_bytes(32), "sha256"
            ).hexdigest()
            if token is not None
            else ""
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in _SECURITY_HEADERS if n not in names]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, request: Request) -> Response | None:
        host = request.headers.get("host", "")
        if self.token is None and not is_loopback(host_name(host)):
            return _refuse(
                request,
                403,
                "this inspector answers only to loopback names (127.0.0.1, localhost); "
                "start it with a token to reach it by another name",
            )
        if self.token is not None:
            presented = request.query_params.get("token")
            if presented is not None:
                if not same_token(presented, self.token):
                    return _refuse(request, 401, "wrong access token")
                return self._accept_token(request)
            if not self._authorised(request):
                return _refuse(
                    request,
                    401,
                    "this inspector needs its access token: open it once as /?token=TOKEN "
                    "(or send Authorization: Bearer TOKEN)",
                )
        if request.method not in ("GET", "HEAD") and not _same_origin(request):
            return _refuse(request, 403, "cross-site request refused")
        return None

    def _authorised(self, request: Request) -> bool:
        assert self.token is not None
        bearer = request.headers.get("authorization", "")
        if same_token(request.cookies.get(cookie_name(request)), self._session):
            return True
        candidates = (
            request.headers.get("x-inspector-token"),
            bearer[7:].strip() if bearer[:7].lower() == "bearer " else None,
        )
        return any(same_token(candidate, self.token) for candidate in candidates)

    def _accept_token(self, request: Request) -> Response:
        # A session value goes into an HttpOnly cookie; the token leaves the address bar.
        assert self.token is not None
        target = URL(str(request.url)).remove_query_params("token")
        location = target.path + (f"?{target.query}" if target.query else "")
        response = RedirectResponse(location or "/", status_code=303)
        secure = request.url.scheme == "https"
        response.set_cookie(
            cookie_name(request),
            self._session,
            httponly=True,
            samesite="strict",
            secure=secure,
            # __Host- cookies must have Path=/ (and no Domain, which is never set here).
            path="/" if secure else (request.scope.get("root_path") or "/"),
        )
        return response


def cookie_name(request: Request) -> str:
    """The session cookie's name for this server: per port, ``__Host-`` under HTTPS."""
    server = request.scope.get("server") or (None, None)
    port = server[1] if server[1] is not None else request.url.port
    name = f"{TOKEN_COOKIE}_{port or 0}"
    return f"__Host-{name}" if request.url.scheme == "https" else name


#: A Host header as RFC 9110 allows it: a name or an address, then an optional port.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]*)(:[0-9]{0,5})?")


def host_name(host_header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8000`` -> ``::1``).

    Anything that is not a plain host and port (``localhost:80@evil.com``, a path, a space)
    gives ``""``, which no check takes for loopback.
    """
    match = _HOST.fullmatch(host_header.strip())
    if match is None:
        return ""
    return match.group(1).removeprefix("[").removesuffix("]")


def _same_origin(request: Request) -> bool:
    """A browser says where a request comes from; anything but this origin is refused."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return False
    origin = request.headers.get("origin")
    if origin is not None:
        if origin == "null":
            return False
        return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()
    return True


def _refuse(request: Request, status: int, message: str) -> Response:
    root = request.scope.get("root_path", "")
    if request.url.path.startswith(f"{root}/api/"):
        return JSONResponse({"error": message}, status_code=status)
    return PlainTextResponse(f"{status}: {message}\n", status_code=status)
