"""The Django app: ``INSTALLED_APPS += ["flymy_receiver.django"]``, then ``manage.py migrate``."""

from __future__ import annotations

from django.apps import AppConfig

__all__ = ["FlymyReceiverConfig"]


class FlymyReceiverConfig(AppConfig):
    """Claims, the delivery journal and refusals in the project's own database."""

    name = "flymy_receiver.django"
    label = "flymy_receiver"
    verbose_name = "FlyMy.AI webhooks"
    default_auto_field = "django.db.models.BigAutoField"
