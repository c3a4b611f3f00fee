"""The inspector's ASGI app: the delivery journal as pages, and the same data as JSON.

Pages are rendered on the server (:mod:`.pages`; Jinja2, autoescaped: a payload is always
text) and a small script refreshes the list from ``GET /api/deliveries`` (:mod:`.api`;
summaries only, never bodies) every second, building rows with ``textContent`` only.
Replay, bulk replay, Resolve, Resend and "send a test event" (:mod:`.actions`) are form POSTs
guarded by :class:`~flymy_receiver.inspector.access.AccessGuard` and a CSRF token; all but
Resolve need the app's receiver (its handlers and its secret): over a bare store the page is
read-only and says so.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..journal import Journal
from ..receiver import Receiver
from ..stores.base import JournalStore, Store, journals
from .access import AccessGuard
from .actions import Actions
from .api import Api
from .pages import Pages
from .site import BODY_SHOWN, HERE, Deliver, Site

__all__ = ["BODY_SHOWN", "Deliver", "inspector_app"]


def inspector_app(
    receiver: Receiver | None = None,
    *,
    store: Store | None = None,
    token: str | None = None,
    label: str | None = None,
    webhook_path: str | None = None,
    deliver: Deliver | None = None,
) -> Starlette:
    """The inspector over ``receiver``'s journal, or read-only over a journaling ``store``.

    With a receiver, Replay runs its handlers, Resend and the test-event form sign with its
    first secret, and the test event goes to ``deliver`` (default :meth:`Receiver.handle`).
    ``token`` makes every request need it (see :mod:`.access`). ``webhook_path`` is where
    the same server receives deliveries, shown on the page. Mount it anywhere; it builds its
    links from the mount path.
    """
    if receiver is None and store is None:
        raise ValueError("give the inspector a receiver or a store")
    journal: Journal | None
    if receiver is not None:
        journal = receiver.journal
        store = receiver.store
    elif store is not None and journals(store):
        journal_store: JournalStore = store  # type: ignore[assignment]  # checked just above
        journal = Journal(journal_store)
    else:
        journal = None
    site = Site(
        journal=journal,
        receiver=receiver,
        label=label or type(store).__name__,
        webhook_path=webhook_path,
        deliver=deliver or (receiver.handle if receiver is not None else None),
    )
    pages, api = Pages(site), Api(site)
    actions = Actions(site, pages)
    routes: list[BaseRoute] = [
        Route("/", pages.index, name="index"),
        Route("/deliveries/{key:path}", pages.delivery, name="delivery"),
        Route("/replay", actions.replay, methods=["POST"], name="replay"),
        Route("/replay-all", actions.replay_all, methods=["POST"], name="replay_all"),
        Route("/resolve", actions.resolve, methods=["POST"], name="resolve"),
        Route("/resend", actions.resend, methods=["POST"], name="resend"),
        Route("/send", actions.send, methods=["POST"], name="send"),
        Route("/api/deliveries", api.deliveries, name="api_deliveries"),
        Route("/api/deliveries/{key:path}", api.delivery, name="api_delivery"),
        Route("/api/bodies/{key:path}", api.body, name="api_body"),
        Route("/api/curl/{key:path}", api.curl, name="api_curl"),
        Route("/api/refusals", api.refusals, name="api_refusals"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(AccessGuard, token=token)])
