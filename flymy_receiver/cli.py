"""The ``flymy-receiver`` command: sign, verify, send, listen and schema.

Uses the library's own signing code, so what ``sign`` prints is what the receiver expects.
Results go to stdout, errors to stderr as one line. Exit codes: 0 success, 1 a failed
verification or delivery, 2 bad usage (a missing secret, an unreadable file, a bad option).
"""

from __future__ import annotations

import argparse
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn, Protocol
from urllib.parse import urlsplit

from . import __version__
from .cli_journal import JournalUsageError, add_journal_command
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


class BinaryReader(Protocol):
    """What a chunked body is read from (a socket file)."""

    def read(self, size: int = ..., /) -> bytes: ...
    def readline(self, size: int = ..., /) -> bytes: ...


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
            raise UsageError("choose a command: sign, verify, send, listen, journal or schema")
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

    p = commands.add_parser("listen", help="run a development receiver that prints deliveries")
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
    p.set_defaults(run=_listen)

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


# -- listen -------------------------------------------------------------------------------


def _listen(args: argparse.Namespace) -> int:
    from .receiver import Receiver
    from .stores import MemoryStore, store_from_url

    keys = _keys(args.secret)
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    if args.max_age < 0:
        raise UsageError("--max-age must be 0 (off) or positive")
    try:
        store = store_from_url(args.store) if args.store else MemoryStore()
    except (ValueError, ImportError) as exc:
        raise UsageError(f"--store: {exc}") from None
    receiver = Receiver(
        list(keys),
        store=store,
        max_age=timedelta(seconds=args.max_age) if args.max_age else None,
    )

    # A catch-all handler, so that claims are recorded and duplicates answered as such.
    @receiver.on("*")
    def acknowledge(event: Any) -> None:
        return None

    # Each delivery is printed by the server below; the receiver's own refusal log lines
    # would repeat it.
    logging.getLogger("flymy_receiver").setLevel(logging.ERROR)
    handler = type("Handler", (_ListenHandler,), {"receiver": receiver, "keys": keys})
    try:
        server = ThreadingHTTPServer((args.host, args.port), handler)
    except OSError as exc:
        print(
            f"{PROG}: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    server.daemon_threads = True
    port = server.server_address[1]
    print(
        f"listening on http://{args.host}:{port}/ (any path), {len(keys)} secret(s), Ctrl-C stops",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


_PRINT_LOCK = threading.Lock()


class _ListenHandler(BaseHTTPRequestHandler):
    """Hands each request to the receiver and prints what arrived and what it answered."""

    receiver: Any
    keys: tuple[bytes, ...]
    server_version = f"{PROG}/{__version__}"

    def do_POST(self) -> None:
        self._deliver()

    do_GET = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        return None  # each delivery is printed by _deliver instead

    def _deliver(self) -> None:
        headers = list(self.headers.items())
        receiver = self.receiver
        lines: list[str] = []
        response = receiver.precheck(headers, self.command)
        if response is None:
            body = self._read_body(receiver.max_body_size)
            lines = _describe(body, headers, self.keys)
            try:
                response = receiver.handle(body, headers, self.command)
            except Exception as exc:  # pragma: no cover - the receiver never raises
                lines.append(f"  receiver error: {type(exc).__name__}")
                response = _internal_error()
        self._answer(response)
        head = f"[{time.strftime('%H:%M:%S')}] {self.command} {self.path} -> {response.status}"
        with _PRINT_LOCK:
            print("\n".join([f"{head} {_one_line(response.body)}", *lines]), flush=True)

    def _read_body(self, limit: int) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return _read_chunked(self.rfile, limit)
        length = self.headers.get("Content-Length", "").strip()
        if not (length.isdigit() and length.isascii()):
            return b""
        # precheck refused a declared length over the limit; read at most limit + 1.
        return self.rfile.read(min(int(length[:20]), limit + 1))

    def _answer(self, response: Any) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)


def _internal_error() -> Any:  # pragma: no cover - see above
    from .receiver import Response

    return Response(500, b'{"error":"Internal error"}')


def _read_chunked(rfile: BinaryReader, limit: int) -> bytes:
    """A chunked body, read until its end or one byte past ``limit``."""
    chunks: list[bytes] = []
    size = 0
    for _ in range(1_000_000):  # bounded: a malicious sender cannot loop us forever
        line = rfile.readline(1024)
        try:
            chunk_size = int(line.split(b";", 1)[0].strip() or b"x", 16)
        except ValueError:
            break
        if chunk_size < 0:
            break
        if chunk_size == 0:
            for _ in range(100):  # trailers, up to the blank line
                if rfile.readline(1024) in (b"\r\n", b"\n", b""):
                    break
            break
        wanted = min(chunk_size, limit + 1 - size)
        chunks.append(rfile.read(wanted))
        size += wanted
        if size > limit:
            break
        rfile.readline(1024)  # the CRLF after the chunk
    return b"".join(chunks)


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
    agent = data.get("agent_name") or "-"
    if data.get("agent_id") is not None:
        agent += f" ({data.get('agent_id')})"
    lines.append(
        f"  event: {obj.get('event')}  run: {data.get('run_id', '-')}  agent: {agent}"
        f"  status: {data.get('status', '-')}  at: {obj.get('timestamp', '-')}"
    )
    if "output" in data:
        lines.append("  output: " + _show(data["output"]))
    if "error" in data:
        error = data["error"]
        if isinstance(error, dict) and "type" in error:
            lines.append(f"  error: {error.get('type')}: {error.get('message', '')}")
        else:
            lines.append("  error: " + _show(error))
    if obj.get("event") not in ("run.completed", "run.failed"):
        lines.append("  data: " + _show(data))
    return lines


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
