"""Which receiver the admin and ``manage.py flymy_journal`` replay through.

Replaying runs the application's handlers, so these tools need the application's receiver:
either ``flymy_receiver.django.register(receiver)`` (say, next to where it is built) or the
setting ``FLYMY_RECEIVER = "myapp.webhooks:receiver"``. ``register`` wins over the setting.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from ..receiver import Receiver

__all__ = ["SETTING", "configured_receiver", "register"]

#: The setting naming the receiver, as ``"module.path:attribute"``.
SETTING = "FLYMY_RECEIVER"

_registered: list[Receiver] = []


def register(receiver: Receiver) -> Receiver:
    """Make ``receiver`` the one the admin and the management command replay through."""
    from ..receiver import Receiver

    if not isinstance(receiver, Receiver):
        raise TypeError("register() takes a flymy_receiver.Receiver")
    _registered[:] = [receiver]
    return receiver


def configured_receiver() -> Receiver | None:
    """The registered receiver, else the one ``settings.FLYMY_RECEIVER`` names, else None.

    Raises :class:`~flymy_receiver.errors.ConfigurationError` when the setting names
    something that cannot be imported or is not a receiver.
    """
    if _registered:
        return _registered[0]
    from django.conf import settings

    from ..receiver import Receiver

    target = getattr(settings, SETTING, None)
    if not target:
        return None
    module_name, sep, attribute = str(target).partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f'{SETTING} must look like "myapp.webhooks:receiver"')
    try:
        found: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"{SETTING} = {target!r} cannot be imported: {exc}") from exc
    if not isinstance(found, Receiver):
        raise ConfigurationError(f"{SETTING} = {target!r} is not a flymy_receiver.Receiver")
    return found


def unregister() -> None:
    """Forget the receiver given to :func:`register` (tests)."""
    _registered.clear()
