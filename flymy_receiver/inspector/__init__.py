"""The delivery journal in a browser: ``flymy-receiver listen`` and ``flymy-receiver inspect``.

``inspector_app(receiver)`` (or ``inspector_app(store=...)``, read-only) is an ASGI app:
the deliveries live, filters, a delivery's detail with each handler's outcome and traceback,
Replay, the refusals with their hints, and a form that sends a signed test event. The same
data is JSON at ``/api/deliveries``, ``/api/deliveries/{key}`` and ``/api/refusals``.
Mount it behind your own authentication, or serve it on loopback (see :mod:`.access`).
Needs the ``inspector`` extra: ``pip install 'flymy-receiver[inspector]'``.
"""

from __future__ import annotations

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the inspector needs {exc.name or 'its dependencies'}: "
        "pip install 'flymy-receiver[inspector]'"
    ) from exc

from .access import AccessGuard, check_bind
from .app import inspector_app
from .sources import receiver_over

__all__ = [
    "AccessGuard",
    "check_bind",
    "inspector_app",
    "receiver_over",
]
