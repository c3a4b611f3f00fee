"""The ``flymy-receiver`` command: sign, verify, send, listen and schema.

Uses the library's own signing code, so what ``sign`` prints is what the receiver expects.
Results go to stdout, errors to stderr as one line, never a traceback. Exit codes: 0
success, 1 a failed verification or delivery, 2 bad usage (a missing secret, an unreadable
file, a bad option), 70 an internal error (a bug: the line names where it happened).
"""

from __future__ import annotations

import argparse
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple, NoReturn, Protocol
from urllib.parse import urlsplit

from . import __version__
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
            raise UsageError("choose a command: sign, verify, send, listen or schema")
        _require_utf8(args)
        code: int = args.run(args)
        return code
    except UsageError as exc:
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

    p = commands.add_parser("listen", help="run a development receiver that prints deliveries")
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
    p.set_defaults(run=_listen)

    p = commands.add_parser("schema", help="print the JSON Schema of every event")
    p.add_argument("--openapi", action="store_true", help="an OpenAPI 3.1 webhooks document")
    p.add_argument(
        "--output", metavar="MODULE:MODEL", help="a pydantic model typing run.completed output"
    )
    p.set_defaults(run=_schema)
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


# -- listen -------------------------------------------------------------------------------


def _listen(args: argparse.Namespace) -> int:
    from .receiver import Receiver
    from .stores import MemoryStore, store_from_url

    keys = _keys(args.secret)
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    try:
        store = store_from_url(args.store) if args.store else MemoryStore()
    except Exception as exc:  # whatever the store raises: a bad URL, a missing extra, ...
        raise UsageError(f"--store: {_without_credentials(str(exc), args.store)}") from None
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
        body: bytes | None = None
        error = ""
        response = receiver.precheck(headers, self.command)
        if response is None:
            body = self._read_body(receiver.max_body_size)
            try:
                response = receiver.handle(body, headers, self.command)
            except Exception as exc:  # pragma: no cover - the receiver never raises
                error = f"  receiver error: {type(exc).__name__}"
                response = _internal_error()
        self._answer(response)
        lines: list[str] = []
        if body is not None:
            # Says only what the receiver checked (a 413 is not a bad signature).
            lines = describe(body, headers, self.keys, status=response.status)
        lines += [error] if error else []
        request = escape_controls(f"{self.command} {self.path[:500]}")
        head = f"[{time.strftime('%H:%M:%S')}] {request} -> {response.status}"
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


def _without_credentials(message: str, url: str) -> str:
    """``message`` with the user:password part of ``url`` (if any) replaced by ``***``."""
    scheme, separator, rest = url.partition("://")
    rest = rest if separator else scheme
    userinfo = rest.rpartition("@")[0]  # a password may hold "/" when pasted unencoded
    for secret in (userinfo, userinfo.partition(":")[2]):
        if secret:
            message = message.replace(secret, "***")
    return message.splitlines()[0][:200] if message else "cannot build the store"


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
