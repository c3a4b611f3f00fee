"""The webhook under WSGI (gunicorn): a sync view."""

from __future__ import annotations

from django.urls import path
from leads import make_receiver

from flymy_receiver.django import view

receiver = make_receiver()

urlpatterns = [path("webhooks/flymy", view(receiver))]
