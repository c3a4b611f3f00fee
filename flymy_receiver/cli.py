"""The ``flymy-receiver`` command: sign, verify, send, listen, inspect and schema.

Uses the library's own signing code, so what ``sign`` prints is what the receiver expects.
Results go to stdout, errors to stderr as one line, never a traceback. Exit codes: 0
success, 1 a failed verification or delivery, 2 bad usage (a missing secret, an unreadable
file, a bad option), 70 an internal error (a bug: the line names where it happened).
"""

from __future__ import annotations

import argparse
import functools
import http.client
import importlib
import json
import logging
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NamedTuple, NoReturn
from urllib.parse import urlsplit

from . import __version__
from .cli_journal import JournalUsageError, add_journal_command, load_receiver
from .describe import describe, escape_controls
from .errors import ConfigurationError, InvalidSignature, MalformedEvent, WebhookError
from .signature import (
    SECRET_ENV_VAR,
    SIGNATURE_HEADER,
    explain_mismatch,
    match_signature,
    normalize_secrets,
    sign,
    signature_candidates,
)

__all__ = ["main"]

PROG = "flymy-receiver"
_MAX_COUNT = 100_000
DEFAULT_MAX_AGE_S = timedelta(days=3).total_seconds()
_MAX_AGE_LIMIT_S = timedelta(days=3650).total_seconds()
_MAX_TIMEOUT_S = timedelta(days=1).total_seconds()
#: Exit code of an internal error (sysexits.h's EX_SOFTWARE).
_INTERNAL_ERROR = 70


class UsageError(Exception):
    """Bad usage: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage block.
        raise UsageError(f"{message} (see {self.prog} --help)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _build_parser()
    # The library's warnings (a secret with a pasted newline, say) as one line each.
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError(
                "choose a command: sign, verify, send, listen, inspect, journal or schema"
            )
        _require_utf8(args)
        code: int = args.run(args)
        return code
    except (UsageError, JournalUsageError) as exc:
        print(f"{PROG}: error: {escape_controls(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (say, ``| head``) went away: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        # A bug, not bad usage. One line that says where, never the exception's message:
        # it could hold a secret or a payload.
        print(f"{PROG}: internal error: {_where(exc)} (please report it)", file=sys.stderr)
        return _INTERNAL_ERROR


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} at {os.path.basename(last.filename)}:{last.lineno}"


def _require_utf8(args: argparse.Namespace) -> None:
    # A command line that is not valid UTF-8 arrives as surrogate escapes, which no encoder
    # accepts later: refuse it here, naming the option but never showing its value.
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not _is_utf8(item):
                option = "the URL" if name == "url" else "--" + name.replace("_", "-")
                raise UsageError(f"{option} is not valid UTF-8")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _seconds(*, low: float, high: float, zero: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds in [low, high] (0 allowed if ``zero``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text[:40]!r}") from None
        if not math.isfinite(value) or not (low <= value <= high or (zero and value == 0)):
            lowest = "0 (off)" if zero else f"{low:g}"
            raise argparse.ArgumentTypeError(f"must be between {lowest} and {high:.0f} seconds")
        return value

    return parse


def _build_parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Tools for FlyMy.AI webhooks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    secret_help = f"webhook secret (default: ${SECRET_ENV_VAR})"
    access_help = (
        "access token the inspector then requires; needed to bind a non-loopback address "
        "(default: $FLYMY_INSPECTOR_TOKEN)"
    )

    p = commands.add_parser("sign", help="print the signature header value for a body on stdin")
    p.add_argument("--secret", help=secret_help)
    p.set_defaults(run=_sign)

    p = commands.add_parser("verify", help="check a signature over a body on stdin")
    p.add_argument(
        "--secret", action="append", help=secret_help + "; repeat it for rotated secrets"
    )
    p.add_argument("--signature", required=True, help="the X-FlyMyAI-Signature header value")
    p.set_defaults(run=_verify)

    p = commands.add_parser("send", help="post realistic signed events to a URL")
    p.add_argument("url", help="the receiver's URL, http:// or https://")
    p.add_argument("--secret", help=secret_help)
    p.add_argument("--event", default="run.completed", help="event name (run.completed)")
    p.add_argument(
        "--data",
        metavar="FILE",
        help="JSON file ('-' for stdin): the output of run.completed, the error of "
        "run.failed, or the data fields of another event",
    )
    p.add_argument("--count", type=int, default=1, help="how many events to send (1)")
    p.add_argument("--run-id", help="use this run id for every event (to send duplicates)")
    p.add_argument("--agent-id", help="agent id of the events")
    p.add_argument("--agent-name", help="agent name of the events")
    p.add_argument(
        "--timeout",
        type=_seconds(low=0.001, high=_MAX_TIMEOUT_S, zero=False),
        default=30.0,
        help="seconds per request (30)",
    )
    p.set_defaults(run=_send)

    p = commands.add_parser(
        "listen", help="run a development receiver that prints deliveries, with the inspector"
    )
    p.add_argument("--port", type=int, required=True, help="port to listen on (0: any free)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--secret", action="append", help=secret_help + "; repeat it to rotate")
    p.add_argument(
        "--max-age",
        type=_seconds(low=0, high=_MAX_AGE_LIMIT_S, zero=True),
        default=DEFAULT_MAX_AGE_S,
        metavar="SECONDS",
        help="replay window on the event timestamp; 0 turns it off (3 days)",
    )
    p.add_argument("--store", help="idempotency store URL (memory://, sqlite:///file, redis://)")
    p.add_argument(
        "--path", default="/webhooks/flymy", help="the receiver's path (/webhooks/flymy)"
    )
    p.add_argument("--token", help=access_help)
    p.set_defaults(run=_listen)

    p = commands.add_parser("inspect", help="serve the inspector over an existing journal")
    p.add_argument("--store", help="the store URL (sqlite:///file, redis://...)")
    p.add_argument("--app", metavar="MODULE:RECEIVER", help="the app's receiver, to replay")
    p.add_argument("--port", type=int, default=8001, help="port to listen on (8001)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--token", help=access_help)
    p.set_defaults(run=_inspect)

    p = commands.add_parser("schema", help="print the JSON Schema of every event")
    p.add_argument("--openapi", action="store_true", help="an OpenAPI 3.1 webhooks document")
    p.add_argument(
        "--output", metavar="MODULE:MODEL", help="a pydantic model typing run.completed output"
    )
    p.set_defaults(run=_schema)

    add_journal_command(commands, "store URL (sqlite:///file, redis://...)")
    return parser


def _keys(secret: str | list[str] | None) -> tuple[bytes, ...]:
    if not secret:
        secret = os.environ.get(SECRET_ENV_VAR)
        if secret is not None and not _is_utf8(secret):
            raise UsageError(f"${SECRET_ENV_VAR} is not valid UTF-8")
    if secret is None:
        raise UsageError(f"no secret: pass --secret or set {SECRET_ENV_VAR}")
    if any(not item.strip() for item in ([secret] if isinstance(secret, str) else secret)):
        raise UsageError("webhook secret must not be empty")
    try:
        return normalize_secrets(secret)
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    except UnicodeError:  # its message would show a character of the secret
        raise UsageError("webhook secret is not valid UTF-8") from None


def _stdin_bytes() -> bytes:
    return sys.stdin.buffer.read()


# -- sign / verify ------------------------------------------------------------------------


def _sign(args: argparse.Namespace) -> int:
    key = _keys(args.secret)[0]
    print(sign(_stdin_bytes(), key))
    return 0


def _verify(args: argparse.Namespace) -> int:
    keys = _keys(args.secret)
    body = _stdin_bytes()
    try:
        candidates = signature_candidates([args.signature])
    except InvalidSignature as exc:
        print(f"invalid: {exc.detail}; the header must be 64 hex characters")
        return 1
    try:
        index = match_signature(body, candidates, keys)
    except InvalidSignature:
        # The hint names a likely cause; it never shows the expected signature.
        print(
            f"invalid: the signature does not match; likely cause: {_hint(body, keys, candidates)}"
        )
        return 1
    which = "the secret" if len(keys) == 1 else f"secret #{index + 1} of {len(keys)}"
    print(f"valid: signed with {which} ({len(body)} bytes)")
    return 0


def _hint(body: bytes, keys: Sequence[bytes], candidates: Sequence[bytes]) -> str:
    # A shell adds or drops a final newline easily (echo, $(...)); say so when that is it.
    for variant, cause in (
        (body + b"\n", "the signature is over this body plus a final newline"),
        (body.rstrip(b"\r\n"), "the signature is over this body without its final newline"),
    ):
        if variant != body and _matches(variant, candidates, keys):
            return cause + " (echo adds one: use printf '%s' or a file)"
    return explain_mismatch(body, keys, candidates)


def _matches(body: bytes, candidates: Sequence[bytes], keys: Sequence[bytes]) -> bool:
    try:
        match_signature(body, candidates, keys)
    except InvalidSignature:
        return False
    return True


# -- send ---------------------------------------------------------------------------------


def _send(args: argparse.Namespace) -> int:
    from .testing import make_event, serialize

    target = _target(args.url)
    if not 1 <= args.count <= _MAX_COUNT:
        raise UsageError(f"--count must be between 1 and {_MAX_COUNT}")
    key = _keys(args.secret)[0]
    fields = _event_fields(args)
    failures = 0
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
            status, reason, answer = _post(target, body, headers, args.timeout)
        except (OSError, http.client.HTTPException) as exc:
            print(f"{label} -> error: {exc or type(exc).__name__}", flush=True)
            print(f"{PROG}: cannot deliver to {args.url}", file=sys.stderr)
            return 1
        reason = escape_controls(reason[:100])
        print(f"{label} -> {status} {reason} {_one_line(answer)}", flush=True)
        if not 200 <= status < 300:
            failures += 1
    if failures:
        print(
            f"{PROG}: {failures} of {args.count} deliveries were not acknowledged", file=sys.stderr
        )
        return 1
    return 0


def _event_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if args.data is not None:
        data = _read_json(args.data)
        if args.event == "run.completed":
            fields["output"] = data
        elif args.event == "run.failed":
            fields["error"] = data
        elif isinstance(data, dict):
            fields.update(data)
        else:
            raise UsageError(f"--data must hold a JSON object for {args.event}")
    for option in ("run_id", "agent_id", "agent_name"):
        value = getattr(args, option)
        if value is not None:
            fields[option] = value
    return fields


def _read_json(name: str) -> Any:
    from .events import parse_json

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
) -> tuple[int, str, bytes]:
    connection_class = (
        http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(target.host, target.port, timeout=timeout)
    try:
        connection.request("POST", target.path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.reason, response.read(64 * 1024)
    finally:
        connection.close()


def _event_run_id(event: Any) -> str:
    data = event.data if isinstance(event.data, dict) else event.data.model_dump()
    return str(data.get("run_id", "-"))


def _one_line(raw: bytes, limit: int = 200) -> str:
    text = raw[: limit * 4].decode("utf-8", "replace").replace("\r", " ").replace("\n", " ")
    text = escape_controls(text.strip())  # an answer comes from elsewhere: show it inert
    return text if len(text) <= limit else text[:limit] + "..."


# -- listen and inspect -------------------------------------------------------------------


def _listen(args: argparse.Namespace) -> int:
    keys = _keys(args.secret)
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    devserver = _devserver()
    token = _token(args)
    store = _store(args.store) if args.store else None
    receiver = devserver.development_receiver(
        list(keys),
        store=store,
        max_age=timedelta(seconds=args.max_age) if args.max_age else None,
    )
    # Each delivery is printed by _print_delivery; the receiver's own refusal log lines
    # would repeat it.
    logging.getLogger("flymy_receiver").setLevel(logging.ERROR)
    try:
        app = devserver.development_app(
            receiver, path=args.path, report=functools.partial(_print_delivery, keys), token=token
        )
    except ValueError as exc:
        raise UsageError(f"--path: {exc}") from None

    def ready(host: str, port: int) -> None:
        root = f"http://{_url_host(host)}:{port}"
        print(
            f"listening on {root}{args.path} (the inspector at {root}/), "
            f"{len(keys)} secret(s), Ctrl-C stops",
            flush=True,
        )

    return _serve(devserver, app, args, token, ready)


def _inspect(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    if not args.store and not args.app:
        raise UsageError("give --store URL, --app MODULE:RECEIVER, or both")
    devserver = _devserver()
    from .inspector import inspector_app, receiver_over
    from .inspector.sources import redact_url
    from .stores.base import journals

    token = _token(args)
    store = _store(args.store) if args.store else None
    receiver = None
    try:
        if args.app:
            receiver = load_receiver(args.app)
            if store is not None:
                receiver = receiver_over(receiver, store)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if receiver is not None and receiver.journal is None:
        raise UsageError(f"the receiver {args.app} keeps no journal (journal=False, or its store)")
    if receiver is None and store is not None and not journals(store):
        raise UsageError(f"a {type(store).__name__} keeps no delivery journal")
    label = f"store {redact_url(args.store)}" if args.store else f"app {args.app}"
    if args.store and args.app:
        label += f" with the handlers of {args.app}"
    app = inspector_app(receiver, store=store, token=token, label=label)

    def ready(host: str, port: int) -> None:
        print(f"inspecting {label} at http://{_url_host(host)}:{port}/, Ctrl-C stops", flush=True)

    return _serve(devserver, app, args, token, ready)


def _devserver() -> Any:
    try:
        from . import devserver
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    return devserver


def _token(args: argparse.Namespace) -> str | None:
    from .inspector.access import TOKEN_ENV_VAR, check_bind

    token: str | None = args.token or os.environ.get(TOKEN_ENV_VAR) or None
    try:
        check_bind(args.host, token)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return token


def _store(url: str) -> Any:
    from .inspector.sources import scrub
    from .stores import store_from_url

    try:
        return store_from_url(url)
    except (ValueError, ImportError) as exc:
        raise UsageError(f"--store: {scrub(str(exc), url)}") from None


def _serve(
    devserver: Any, app: Any, args: argparse.Namespace, token: str | None, ready: Any
) -> int:
    try:
        devserver.serve(app, args.host, args.port, token=token, ready=ready)
    except OSError as exc:
        print(
            f"{PROG}: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


_PRINT_LOCK = threading.Lock()


def _print_delivery(
    keys: tuple[bytes, ...],
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes | None,
    status: int,
    answer: bytes,
) -> None:
    """Print one request to ``listen``: what arrived, and what the receiver answered.

    ``body`` is ``None`` when the receiver refused before reading it (method, size,
    encoding). Everything from the request is printed with its control characters escaped.
    """
    lines = describe(body, headers, keys, status=status) if body is not None else []
    request = escape_controls(f"{method} {target[:500]}")
    head = f"[{time.strftime('%H:%M:%S')}] {request} -> {status}"
    with _PRINT_LOCK:
        print("\n".join([f"{head} {_one_line(answer)}", *lines]), flush=True)


# -- schema -------------------------------------------------------------------------------


def _schema(args: argparse.Namespace) -> int:
    from .schema import event_schemas, openapi_document

    output = _import_model(args.output) if args.output else None
    try:
        document = openapi_document(output) if args.openapi else event_schemas(output)
    except Exception as exc:  # pydantic cannot build a JSON Schema for that model
        raise UsageError(f"no JSON Schema for {args.output}: {_first_line(exc)}") from None
    print(json.dumps(document, indent=2))
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    kind = type(exc).__name__
    return f"{kind}: {text.splitlines()[0][:200]}" if text else kind


def _import_model(spec: str) -> type[Any]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"--output must be MODULE:MODEL, got {spec[:200]!r}")
    sys.path.insert(0, os.getcwd())  # like python -m: the user's own modules are importable
    try:
        model = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot import {spec}: {_first_line(exc)}") from None
    except (Exception, SystemExit) as exc:  # the module itself failed while importing
        raise UsageError(f"cannot import {spec}: {_first_line(exc)}") from None
    from pydantic import BaseModel

    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise UsageError(f"{spec} is not a pydantic model")
    return model
