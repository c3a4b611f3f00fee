"""The project's one receiver, shared by the URLs, the ASGI body limit and the admin.

Claims and the delivery journal live in the project's own database (``DjangoStore``), so
every worker shares them and the admin lists and replays them.
"""

from __future__ import annotations

from flymy_receiver.django import DjangoStore

from leads import make_receiver

receiver = make_receiver(store=DjangoStore())
