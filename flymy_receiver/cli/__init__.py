"""The ``flymy-receiver`` command: sign, verify, send, listen, inspect, journal and schema.

Uses the library's own signing code, so what ``sign`` prints is what the receiver expects.
Results go to stdout, errors to stderr as one line, never a traceback. Exit codes: 0
success, 1 a failed verification or delivery, 2 bad usage (a missing secret, an unreadable
file, a bad option), 70 an internal error (a bug: the line names where it happened).

The parser below shows every command and option in one place; each command group lives in
its own module (``signing``, ``send``, ``serve``, ``journal``, ``schema``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from datetime import timedelta

from .. import __version__
from ..describe import escape_controls
from ..signature import SECRET_ENV_VAR
from .journal_commands import add_journal_command
from .options import PROG, Parser, UsageError, is_utf8, seconds
from .schema import run_schema
from .send import run_send
from .serve import run_inspect, run_listen
from .signing import run_sign, run_verify

__all__ = ["UsageError", "main"]

DEFAULT_MAX_AGE_S = timedelta(days=3).total_seconds()
_MAX_AGE_LIMIT_S = timedelta(days=3650).total_seconds()
_MAX_TIMEOUT_S = timedelta(days=1).total_seconds()
#: Exit code of an internal error (sysexits.h's EX_SOFTWARE).
_INTERNAL_ERROR = 70


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
            if isinstance(item, str) and not is_utf8(item):
                option = "the URL" if name == "url" else "--" + name.replace("_", "-")
                raise UsageError(f"{option} is not valid UTF-8")


def _build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Tools for FlyMy.AI webhooks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    secret_help = f"webhook secret (default: ${SECRET_ENV_VAR})"
    access_help = (
        "access token the inspector then requires; needed to bind a non-loopback address "
        "(default: $FLYMY_INSPECTOR_TOKEN)"
    )

    p = commands.add_parser("sign", help="print the signature header value for a body on stdin")
    p.add_argument("--secret", help=secret_help)
    p.set_defaults(run=run_sign)

    p = commands.add_parser("verify", help="check a signature over a body on stdin")
    p.add_argument(
        "--secret", action="append", help=secret_help + "; repeat it for rotated secrets"
    )
    p.add_argument("--signature", required=True, help="the X-FlyMyAI-Signature header value")
    p.set_defaults(run=run_verify)

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
        type=seconds(low=0.001, high=_MAX_TIMEOUT_S, zero=False),
        default=30.0,
        help="seconds per request (30)",
    )
    p.set_defaults(run=run_send)

    p = commands.add_parser(
        "listen", help="run a development receiver that prints deliveries, with the inspector"
    )
    p.add_argument("--port", type=int, required=True, help="port to listen on (0: any free)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--secret", action="append", help=secret_help + "; repeat it to rotate")
    p.add_argument(
        "--max-age",
        type=seconds(low=0, high=_MAX_AGE_LIMIT_S, zero=True),
        default=DEFAULT_MAX_AGE_S,
        metavar="SECONDS",
        help="replay window on the event timestamp; 0 turns it off (3 days)",
    )
    p.add_argument(
        "--store", help="store URL: memory://, sqlite:///file, redis://..., postgresql://..."
    )
    p.add_argument(
        "--path", default="/webhooks/flymy", help="the receiver's path (/webhooks/flymy)"
    )
    p.add_argument("--token", help=access_help)
    p.set_defaults(run=run_listen)

    p = commands.add_parser("inspect", help="serve the inspector over an existing journal")
    p.add_argument("--store", help="the store URL (sqlite:///file, redis://..., postgresql://...)")
    p.add_argument("--app", metavar="MODULE:RECEIVER", help="the app's receiver, to replay")
    p.add_argument("--port", type=int, default=8001, help="port to listen on (8001)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--token", help=access_help)
    p.set_defaults(run=run_inspect)

    p = commands.add_parser("schema", help="print the JSON Schema of every event")
    p.add_argument("--openapi", action="store_true", help="an OpenAPI 3.1 webhooks document")
    p.add_argument(
        "--output", metavar="MODULE:MODEL", help="a pydantic model typing run.completed output"
    )
    p.set_defaults(run=run_schema)

    add_journal_command(commands, "store URL (sqlite:///file, redis://..., postgresql://...)")
    return parser
