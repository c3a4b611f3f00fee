"""The lead profiler webhook on Starlette.

FLYMY_WEBHOOK_SECRET=... uvicorn --host 127.0.0.1 --port 8000 starlette_app:app
"""

from __future__ import annotations

from starlette.applications import Starlette

from flymy_receiver.starlette import route

from leads import make_receiver

app = Starlette(routes=[route(make_receiver(), "/webhooks/flymy")])
