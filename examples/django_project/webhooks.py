"""The project's one receiver, shared by the URLs and the ASGI body limit."""

from __future__ import annotations

from leads import make_receiver

receiver = make_receiver()
