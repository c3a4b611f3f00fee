"""``flymy-receiver listen`` and ``inspect``: the development server and the inspector."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Any

from ..describe import describe, escape_controls
from .journal import load_receiver
from .options import PROG, UsageError, one_line, secret_keys

__all__ = ["run_inspect", "run_listen"]


def run_listen(args: argparse.Namespace) -> int:
    keys = secret_keys(args.secret)
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


def run_inspect(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    if not args.store and not args.app:
        raise UsageError("give --store URL, --app MODULE:RECEIVER, or both")
    devserver = _devserver()
    from ..inspector import inspector_app
    from ..stores.base import journals
    from ..stores.urls import redacted_url

    token = _token(args)
    # Inspecting reads an existing journal: a missing SQLite file is refused, not created.
    store = _store(args.store, create=False) if args.store else None
    receiver = None
    try:
        if args.app:
            receiver = load_receiver(args.app)
            if store is not None:
                receiver = receiver.with_store(store)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if receiver is not None and receiver.journal is None:
        raise UsageError(f"the receiver {args.app} keeps no journal (journal=False, or its store)")
    if receiver is None and store is not None and not journals(store):
        raise UsageError(f"a {type(store).__name__} keeps no delivery journal")
    label = f"store {redacted_url(args.store)}" if args.store else f"app {args.app}"
    if args.store and args.app:
        label += f" with the handlers of {args.app}"
    app = inspector_app(receiver, store=store, token=token, label=label)

    def ready(host: str, port: int) -> None:
        print(f"inspecting {label} at http://{_url_host(host)}:{port}/, Ctrl-C stops", flush=True)

    return _serve(devserver, app, args, token, ready)


def _devserver() -> Any:
    try:
        from .. import devserver
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    return devserver


def _token(args: argparse.Namespace) -> str | None:
    from ..inspector.access import TOKEN_ENV_VAR, check_bind

    token: str | None = args.token or os.environ.get(TOKEN_ENV_VAR) or None
    try:
        check_bind(args.host, token)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return token


def _store(url: str, *, create: bool = True) -> Any:
    from ..stores import store_from_url
    from ..stores.urls import without_credentials

    try:
        return store_from_url(url, create=create)
    except (ValueError, ImportError) as exc:
        raise UsageError(f"--store: {without_credentials(str(exc), url)}") from None


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
        print("\n".join([f"{head} {one_line(answer)}", *lines]), flush=True)
