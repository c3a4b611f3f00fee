"""What :class:`~flymy_receiver.django.DjangoStore` keeps in the project's database.

Times the store compares are epoch seconds (``expires``), read from the store's clock, as in
the other stores; times people read are datetimes. Nothing here is meant to be edited by
hand: the admin shows the journal and refusals read-only.
"""

from __future__ import annotations

from typing import ClassVar

from django.db import models

__all__ = ["DeliveryClaim", "HandlerRecord", "JournalEntry", "Refusal"]

#: Idempotency keys are at most 200 characters (longer ones become a digest). Text the
#: sender chooses (run and agent ids, names) is kept to these lengths.
KEY_LENGTH = 255
TEXT_LENGTH = 200
#: Handler ids are a module path and a qualified name.
HANDLER_LENGTH = 500


class DeliveryClaim(models.Model):
    """One idempotency key: held (``token``) until ``expires``, or done until ``expires``."""

    key = models.CharField(max_length=KEY_LENGTH, primary_key=True)
    token = models.CharField(max_length=64, blank=True, default="")
    done = models.BooleanField(default=False)
    expires = models.FloatField(db_index=True)

    class Meta:
        verbose_name = "delivery claim"

    def __str__(self) -> str:
        return str(self.key)


class HandlerRecord(models.Model):
    """One handler that succeeded for a key (kept across a release, until ``expires``)."""

    key = models.CharField(max_length=KEY_LENGTH)
    handler = models.CharField(max_length=HANDLER_LENGTH)
    expires = models.FloatField(db_index=True)

    class Meta:
        verbose_name = "handler record"
        constraints: ClassVar[list[models.BaseConstraint]] = [
            models.UniqueConstraint(fields=["key", "handler"], name="flymy_handler_unique")
        ]

    def __str__(self) -> str:
        return f"{self.key} {self.handler}"


class JournalEntry(models.Model):
    """One authentic delivery with its exact body, each handler's latest outcome and the
    newest attempts.

    Lists read summaries only (``body`` deferred). Each list filter and the keyset order
    ``(received_at, key)`` have an index: the filter's column first, then the order, so a
    page reads as many index entries as it shows whatever the table's size. Run ids of any
    length are found through ``run_digest`` (SHA-256 of the run id): no index holds text
    the sender chose beyond :data:`TEXT_LENGTH` characters.
    """

    STATES: ClassVar[list[tuple[str, str]]] = [
        ("pending", "pending"),
        ("queued", "queued"),
        ("handled", "handled"),
        ("failed", "failed"),
        ("ignored", "ignored"),
        ("resolved", "resolved"),
    ]

    key = models.CharField(max_length=KEY_LENGTH, unique=True)
    #: The key as given when it is longer than :data:`KEY_LENGTH` (``key`` then holds
    #: ``sha256:`` and its digest, as the claim's and handler records' keys do).
    full_key = models.TextField(null=True, blank=True)
    event = models.CharField(max_length=TEXT_LENGTH)
    run_id = models.TextField(null=True, blank=True)
    #: SHA-256 (hex) of ``run_id``: what lookups by run id use.
    run_digest = models.CharField(max_length=64, null=True, blank=True)
    agent_id = models.CharField(max_length=TEXT_LENGTH, null=True, blank=True)
    agent_name = models.CharField(max_length=TEXT_LENGTH, null=True, blank=True)
    state = models.CharField(max_length=16, choices=STATES)
    attempts = models.PositiveIntegerField(default=1)
    received_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    #: ``None`` when the journal's byte limit dropped it (``body_dropped``).
    body = models.BinaryField(null=True)
    body_size = models.PositiveIntegerField(default=0)
    body_dropped = models.BooleanField(default=False)
    headers = models.JSONField(default=dict)
    #: handler id -> ``HandlerOutcome.to_dict()``
    handlers = models.JSONField(default=dict)
    #: The newest attempts, oldest first: ``Attempt.to_dict()`` each (at most 50).
    history = models.JSONField(default=list)
    #: Deferred handlers' lease tokens: handler id -> token of the worker holding it.
    leases = models.JSONField(default=dict)
    #: When the claim of a ``pending`` entry ends (epoch seconds): past it, ``stalled``.
    lease_until = models.FloatField(default=0.0)
    note = models.TextField(null=True, blank=True)
    retention = models.FloatField()
    expires = models.FloatField(db_index=True)  # the last change plus ``retention``

    class Meta:
        verbose_name = "journal entry"
        verbose_name_plural = "journal entries"
        ordering: ClassVar[list[str]] = ["-received_at", "-key"]
        indexes: ClassVar[list[models.Index]] = [
            models.Index(fields=["received_at", "key"], name="flymy_journal_recent"),
            models.Index(fields=["state", "received_at", "key"], name="flymy_journal_state"),
            models.Index(fields=["event", "received_at", "key"], name="flymy_journal_event"),
            models.Index(fields=["agent_id", "received_at", "key"], name="flymy_journal_agent"),
            models.Index(fields=["run_digest", "received_at", "key"], name="flymy_journal_run"),
        ]

    def __str__(self) -> str:
        return f"{self.event} {(self.run_id or self.key)[:200]}"


class Refusal(models.Model):
    """A refused delivery, without its body: why the platform got a 4xx."""

    at = models.DateTimeField(db_index=True)
    status = models.PositiveSmallIntegerField()
    reason = models.CharField(max_length=100)
    detail = models.CharField(max_length=500, blank=True, default="")

    class Meta:
        verbose_name = "refusal"
        ordering: ClassVar[list[str]] = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"
