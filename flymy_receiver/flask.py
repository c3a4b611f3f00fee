"""Flask adapter: ``app.register_blueprint(blueprint(receiver, url="/webhooks/flymy"))``.

Translation only: the raw body is read (bounded) and handed with the headers to
:meth:`Receiver.handle`, whose :class:`Response` becomes Flask's. Async handlers run in a
fresh event loop per delivery. If Flask-WTF's ``CSRFProtect`` is on the app (set up before
or after this blueprint), the blueprint exempts itself: a webhook carries a signature, not a
CSRF token.
"""

from __future__ import annotations

try:
    import flask
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "flymy_receiver.flask needs Flask: pip install 'flymy-receiver[flask]'"
    ) from exc

from .bodies import read_limited
from .receiver import READ_HEADERS, Receiver

__all__ = ["blueprint"]

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def blueprint(
    receiver: Receiver, url: str = "/webhooks/flymy", *, name: str = "flymy_receiver"
) -> flask.Blueprint:
    """A blueprint with one endpoint at ``url`` answering every method via ``receiver``."""
    bp = flask.Blueprint(name, __name__)

    # Every method reaches the receiver, so a GET gets the same 405 as on every framework.
    @bp.route(url, methods=_METHODS, provide_automatic_options=False)
    def webhook() -> flask.Response:
        request = flask.request
        # Each attribute of the request proxy costs a context lookup: read them once.
        request_headers, method = request.headers, request.method
        # Only the headers the receiver reads, looked up directly (case-insensitive; WSGI
        # joins repeated lines): walking every header of the environ, which iterating or
        # getlist() does, cost more than the signature check.
        found = ((name, request_headers.get(name)) for name in READ_HEADERS)
        headers = [(name, value) for name, value in found if value is not None]
        response = receiver.precheck(headers, method)
        if response is None:
            # The raw stream, never get_json()/form: the signature covers these exact bytes.
            body = read_limited(request.stream.read, receiver.max_body_size)
            response = receiver.handle(body, headers, method)
        return flask.Response(response.body, response.status, dict(response.headers))

    @bp.record_once
    def exempt_from_csrf(state: flask.blueprints.BlueprintSetupState) -> None:
        app = state.app

        def exempt() -> None:
            csrf = app.extensions.get("csrf")
            if csrf is not None and hasattr(csrf, "exempt"):
                csrf.exempt(bp)

        exempt()
        # CSRFProtect may be set up after this blueprint: exempt it again first thing on each
        # request, ahead of the CSRF check (an app's before_request hooks run in order).
        app.before_request_funcs.setdefault(None, []).insert(0, exempt)

    return bp
