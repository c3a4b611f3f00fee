"""``flymy-receiver send``: post realistic signed events to a receiver, as the platform would."""

from __future__ import annotations

import argparse
import http.client
import sys
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from .. import __version__
from ..describe import escape_controls
from ..errors import MalformedEvent, WebhookError
from ..signature import SIGNATURE_HEADER, sign
from .options import PROG, UsageError, one_line, secret_keys

__all__ = ["MAX_COUNT", "run_send", "wrong_path_hint"]

MAX_COUNT = 100_000


def run_send(args: argparse.Namespace) -> int:
    from ..testing import make_event, serialize

    target = _target(args.url)
    if not 1 <= args.count <= MAX_COUNT:
        raise UsageError(f"--count must be between 1 and {MAX_COUNT}")
    key = secret_keys(args.secret)[0]
    fields = _event_fields(args)
    failures = 0
    hinted: set[str] = set()
    for number in range(1, args.count + 1):
        try:
            event = make_event(args.event, **fields)
            body = serialize(event)
        except MalformedEvent as exc:
            raise UsageError(f"--data does not make a valid {args.event} event: {exc}") from None
        except (ValueError, RecursionError) as exc:  # nested too deep to serialise
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise UsageError(f"cannot serialise the {args.event} event: {reason}") from None
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(body, key),
            "User-Agent": f"{PROG}/{__version__}",
        }
        label = escape_controls(f"{number}/{args.count} {args.event} {_event_run_id(event)}")
        try:
            status, reason, answer, location = _post(target, body, headers, args.timeout)
        except (OSError, http.client.HTTPException) as exc:
            print(f"{label} -> error: {exc or type(exc).__name__}", flush=True)
            print(f"{PROG}: cannot deliver to {args.url}", file=sys.stderr)
            return 1
        reason = escape_controls(reason[:100])
        print(f"{label} -> {status} {reason} {one_line(answer)}", flush=True)
        if not 200 <= status < 300:
            failures += 1
            hint = wrong_path_hint(status, answer, location, target.path)
            if hint and hint not in hinted:
                hinted.add(hint)
                print(f"{PROG}: hint: {hint}", file=sys.stderr)
    if failures:
        print(
            f"{PROG}: {failures} of {args.count} deliveries were not acknowledged", file=sys.stderr
        )
        return 1
    return 0


def _event_fields(args: argparse.Namespace) -> dict[str, Any]:
    from ..testing import data_fields

    fields: dict[str, Any] = {}
    if args.data is not None:
        try:
            fields = data_fields(args.event, _read_json(args.data))
        except ValueError:
            raise UsageError(f"--data must hold a JSON object for {args.event}") from None
    for option in ("run_id", "agent_id", "agent_name"):
        value = getattr(args, option)
        if value is not None:
            fields[option] = value
    return fields


def _read_json(name: str) -> Any:
    from ..events import parse_json

    try:
        if name == "-":
            text = sys.stdin.buffer.read()
        else:
            with open(name, "rb") as file:
                text = file.read()
    except OSError as exc:
        raise UsageError(f"cannot read --data {name}: {exc.strerror or exc}") from None
    try:
        # The receiver's own strict parser: what it would refuse is not sent.
        return parse_json(text)
    except WebhookError as exc:
        raise UsageError(f"--data {name} is not JSON: {exc.detail[:200]}") from None


class _Target(NamedTuple):
    """Where ``send`` posts: checked once, before anything is sent."""

    scheme: str
    host: str
    port: int | None
    path: str


def _target(text: str) -> _Target:
    shown = repr(text[:200])
    if any(char.isspace() or not char.isprintable() for char in text):
        raise UsageError(f"the URL must not hold spaces or control characters: {shown}")
    try:
        url = urlsplit(text)
        port = url.port  # raises on a port that is not a number in 0..65535
    except ValueError as exc:
        raise UsageError(f"not a valid URL ({exc}): {shown}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UsageError(f"not an http(s) URL: {shown}")
    if port == 0:
        raise UsageError(f"the URL's port must be between 1 and 65535: {shown}")
    try:
        url.hostname.encode("idna")  # what the resolver will do; a 64-letter label fails
    except UnicodeError:
        raise UsageError(f"not a valid host name: {shown}") from None
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    return _Target(url.scheme, url.hostname, port, path)


def _post(
    target: _Target, body: bytes, headers: dict[str, str], timeout: float
) -> tuple[int, str, bytes, str]:
    connection_class = (
        http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(target.host, target.port, timeout=timeout)
    try:
        connection.request("POST", target.path, body=body, headers=headers)
        response = connection.getresponse()
        location = response.getheader("Location") or ""
        return response.status, response.reason, response.read(64 * 1024), location
    finally:
        connection.close()


#: The receiver's own answers start like this: a status it chose, not a wrong address.
_RECEIVER_ANSWER = b'{"error":'


def wrong_path_hint(status: int, answer: bytes, location: str, path: str) -> str:
    """What a non-2xx answer likely means about the URL given to ``send`` ("" if nothing).

    The receiver's own refusals are JSON it chose; a 404, a redirect, a 405 or an HTML 500
    usually mean the request never reached it: a wrong path, a missing trailing slash
    (Django's ``APPEND_SLASH`` redirects, or fails on a POST in DEBUG).
    """
    if answer.lstrip().startswith(_RECEIVER_ANSWER):
        return ""
    shown = escape_controls(path[:200])
    if status == 404:
        return (
            f"nothing answers at {shown}: check the path your app mounts the receiver on "
            "(listen serves /webhooks/flymy), and whether it ends with a slash"
        )
    if status in (301, 302, 303, 307, 308):
        where = escape_controls(location[:200]) or "elsewhere"
        slash = location.split("?")[0].endswith("/") and not path.split("?")[0].endswith("/")
        why = (
            "the URL likely needs its trailing slash (Django's APPEND_SLASH redirects there)"
            if slash
            else "the server redirects (http to https, or another path)"
        )
        return f"{status} to {where}: {why}; send to the URL it points to"
    if status == 405:
        return f"{shown} does not take POST: is it the receiver's path?"
    if status == 500:
        return (
            "the server failed before the receiver answered; with Django, a RuntimeError "
            "about APPEND_SLASH in its log means the URL lacks its trailing slash"
        )
    return ""


def _event_run_id(event: Any) -> str:
    data = event.data if isinstance(event.data, dict) else event.data.model_dump()
    return str(data.get("run_id", "-"))
