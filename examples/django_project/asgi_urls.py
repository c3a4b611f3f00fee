"""The webhook under ASGI (uvicorn): the async view keeps the event loop free."""

from __future__ import annotations

from django.urls import path
from leads import make_receiver

from flymy_receiver.django import aview

receiver = make_receiver()

urlpatterns = [path("webhooks/flymy", aview(receiver))]
