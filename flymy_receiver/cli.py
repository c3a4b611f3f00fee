"""The ``flymy-receiver`` command: sign, verify, send, listen, inspect and schema.

Uses the library's own signing code, so what ``sign`` prints is what the receiver expects.
Results go to stdout, errors to stderr as one line. Exit codes: 0 success, 1 a failed
verification or delivery, 2 bad usage (a missing secret, an unreadable file, a bad option).
"""

from __future__ import annotations

import argparse
import functools
import http.client
import importlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NoReturn
from urllib.parse import urlsplit

from . import __version__
from .cli_journal import JournalUsageError, add_journal_command, load_receiver, printable
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
#: Output and error values longer than this are cut in ``listen``'s printout.
_SHOW_LIMIT = 2000
_MAX_COUNT = 100_000
DEFAULT_MAX_AGE_S = timedelta(days=3).total_seconds()


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
        code: int = args.run(args)
        return code
    except (UsageError, JournalUsageError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (say, ``| head``) went away: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


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
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (30)")
    p.set_defaults(run=_send)

    p = commands.add_parser(
        "listen", help="run a development receiver that prints deliveries, with the inspector"
    )
    p.add_argument("--port", type=int, required=True, help="port to listen on (0: any free)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--secret", action="append", help=secret_help + "; repeat it to rotate")
    p.add_argument(
        "--max-age",
        type=float,
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
    if secret is None:
        raise UsageError(f"no secret: pass --secret or set {SECRET_ENV_VAR}")
    if any(not item.strip() for item in ([secret] if isinstance(secret, str) else secret)):
        raise UsageError("webhook secret must not be empty")
    try:
        return normalize_secrets(secret)
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None


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

    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UsageError(f"not an http(s) URL: {args.url[:200]!r}")
    if not 1 <= args.count <= _MAX_COUNT:
        raise UsageError(f"--count must be between 1 and {_MAX_COUNT}")
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    key = _keys(args.secret)[0]
    fields = _event_fields(args)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    failures = 0
    for number in range(1, args.count + 1):
        try:
            event = make_event(args.event, **fields)
        except MalformedEvent as exc:
            raise UsageError(f"--data does not make a valid {args.event} event: {exc}") from None
        body = serialize(event)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(body, key),
            "User-Agent": f"{PROG}/{__version__}",
        }
        label = f"{number}/{args.count} {args.event} {_event_run_id(event)}"
        try:
            status, reason, answer = _post(url, path, body, headers, args.timeout)
        except (OSError, http.client.HTTPException) as exc:
            print(f"{label} -> error: {exc or type(exc).__name__}", flush=True)
            print(f"{PROG}: cannot deliver to {args.url}", file=sys.stderr)
            return 1
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
    try:
        if name == "-":
            text = sys.stdin.buffer.read()
        else:
            with open(name, "rb") as file:
                text = file.read()
    except OSError as exc:
        raise UsageError(f"cannot read --data {name}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"--data {name} is not JSON: {str(exc)[:200]}") from None


def _post(
    url: Any, path: str, body: bytes, headers: dict[str, str], timeout: float
) -> tuple[int, str, bytes]:
    connection_class = (
        http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(url.hostname, url.port, timeout=timeout)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.reason, response.read(64 * 1024)
    finally:
        connection.close()


def _event_run_id(event: Any) -> str:
    data = event.data if isinstance(event.data, dict) else event.data.model_dump()
    return str(data.get("run_id", "-"))


def _one_line(raw: bytes, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace").replace("\r", " ").replace("\n", " ").strip()
    return text if len(text) <= limit else text[:limit] + "..."


# -- listen and inspect -------------------------------------------------------------------


def _listen(args: argparse.Namespace) -> int:
    keys = _keys(args.secret)
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    if args.max_age < 0:
        raise UsageError("--max-age must be 0 (off) or positive")
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
    encoding). Control characters from the request are printed escaped.
    """
    lines = _describe(body, headers, keys) if body is not None else []
    head = f"[{time.strftime('%H:%M:%S')}] {method} {target} -> {status}"
    text = "\n".join([f"{head} {_one_line(answer)}", *lines])
    # Each line on its own: the newlines between lines are ours, any other is escaped.
    safe = "\n".join(printable(line, limit=len(line)) for line in text.split("\n"))
    with _PRINT_LOCK:
        print(safe, flush=True)


def _describe(body: bytes, headers: list[tuple[str, str]], keys: tuple[bytes, ...]) -> list[str]:
    """What a developer wants to see about one delivery: signature, event, run, result."""
    from .events import parse_json

    values = [v for k, v in headers if k.lower() == SIGNATURE_HEADER.lower()]
    try:
        candidates = signature_candidates(values)
        index = match_signature(body, candidates, keys)
    except InvalidSignature as exc:
        reason = exc.detail
        if exc.code == "signature_mismatch":
            reason += f"; likely cause: {explain_mismatch(body, keys, candidates)}"
        return [f"  signature: INVALID ({reason})"]
    lines = [f"  signature: valid (secret #{index + 1})" if len(keys) > 1 else "  signature: valid"]
    try:
        obj = parse_json(body)
    except WebhookError as exc:
        return [*lines, f"  body: {exc.detail}"]
    if not isinstance(obj, dict):
        return [*lines, "  body: not a JSON object"]
    raw_data = obj.get("data")
    data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
    field = _printable_field
    agent = field(data.get("agent_name") or "-")
    if data.get("agent_id") is not None:
        agent += f" ({field(data.get('agent_id'))})"
    lines.append(
        f"  event: {field(obj.get('event'))}  run: {field(data.get('run_id', '-'))}  agent: {agent}"
        f"  status: {field(data.get('status', '-'))}  at: {field(obj.get('timestamp', '-'))}"
    )
    if "output" in data:
        lines.append("  output: " + _show(data["output"]))
    if "error" in data:
        error = data["error"]
        if isinstance(error, dict) and "type" in error:
            lines.append(f"  error: {field(error.get('type'))}: {field(error.get('message', ''))}")
        else:
            lines.append("  error: " + _show(error))
    if obj.get("event") not in ("run.completed", "run.failed"):
        lines.append("  data: " + _show(data))
    return lines


def _printable_field(value: Any) -> str:
    """A payload value for one line of output: control characters, newlines too, escaped."""
    return printable(value, limit=_SHOW_LIMIT)


def _show(value: Any) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    if len(text) > _SHOW_LIMIT:
        text = text[:_SHOW_LIMIT] + f"... ({len(text)} characters)"
    return text.replace("\n", "\n    ")


# -- schema -------------------------------------------------------------------------------


def _schema(args: argparse.Namespace) -> int:
    from .schema import event_schemas, openapi_document

    output = _import_model(args.output) if args.output else None
    document = openapi_document(output) if args.openapi else event_schemas(output)
    print(json.dumps(document, indent=2))
    return 0


def _import_model(spec: str) -> type[Any]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"--output must be MODULE:MODEL, got {spec[:200]!r}")
    sys.path.insert(0, os.getcwd())  # like python -m: the user's own modules are importable
    try:
        model = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot import {spec}: {exc}") from None
    from pydantic import BaseModel

    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise UsageError(f"{spec} is not a pydantic model")
    return model
