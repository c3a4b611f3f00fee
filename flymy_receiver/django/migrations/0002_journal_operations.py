"""The journal's operations (DESIGN section 12) and deferred handlers (section 10): attempt
history, resolution notes, per-handler leases, the stalled state's lease time, bodies that the
byte limit may drop, run ids of any length (found by digest), and one index per list filter
in the keyset order."""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

from django.db import migrations, models
from django.db.models.functions import Length

#: Rows filled per statement: a large journal is migrated in bounded steps.
BATCH = 1000


def fill_new_columns(apps: Any, schema_editor: Any) -> None:
    """Entries made before this migration: their run ids' digests and body sizes."""
    entries = apps.get_model("flymy_receiver", "JournalEntry").objects.using(
        schema_editor.connection.alias
    )
    entries.filter(body_size=0).update(body_size=Length("body"))
    last = 0
    while True:
        rows = list(
            entries.filter(pk__gt=last, run_id__isnull=False, run_digest__isnull=True)
            .order_by("pk")
            .values_list("pk", "run_id")[:BATCH]
        )
        if not rows:
            return
        for pk, run_id in rows:
            digest = hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).hexdigest()
            entries.filter(pk=pk).update(run_digest=digest)
        last = rows[-1][0]


class Migration(migrations.Migration):
    dependencies: ClassVar[list[tuple[str, str]]] = [("flymy_receiver", "0001_initial")]

    operations: ClassVar[list[Any]] = [
        migrations.AlterModelOptions(
            name="journalentry",
            options={
                "ordering": ["-received_at", "-key"],
                "verbose_name": "journal entry",
                "verbose_name_plural": "journal entries",
            },
        ),
        migrations.AddField(
            model_name="journalentry",
            name="body_dropped",
            field=models.BooleanField(default=False),
        ),
        migrations.AddField(
            model_name="journalentry",
            name="body_size",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name="journalentry",
            name="full_key",
            field=models.TextField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="journalentry",
            name="history",
            field=models.JSONField(default=list),
        ),
        migrations.AddField(
            model_name="journalentry",
            name="lease_until",
            field=models.FloatField(default=0.0),
        ),
        migrations.AddField(
            model_name="journalentry",
            name="leases",
            field=models.JSONField(default=dict),
        ),
        migrations.AddField(
            model_name="journalentry",
            name="note",
            field=models.TextField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="journalentry",
            name="run_digest",
            field=models.CharField(blank=True, max_length=64, null=True),
        ),
        migrations.AlterField(
            model_name="journalentry",
            name="agent_id",
            field=models.CharField(blank=True, max_length=200, null=True),
        ),
        migrations.AlterField(
            model_name="journalentry",
            name="body",
            field=models.BinaryField(null=True),
        ),
        migrations.AlterField(
            model_name="journalentry",
            name="event",
            field=models.CharField(max_length=200),
        ),
        migrations.AlterField(
            model_name="journalentry",
            name="received_at",
            field=models.DateTimeField(),
        ),
        migrations.AlterField(
            model_name="journalentry",
            name="run_id",
            field=models.TextField(blank=True, null=True),
        ),
        migrations.AlterField(
            model_name="journalentry",
            name="state",
            field=models.CharField(
                choices=[
                    ("pending", "pending"),
                    ("queued", "queued"),
                    ("handled", "handled"),
                    ("failed", "failed"),
                    ("ignored", "ignored"),
                    ("resolved", "resolved"),
                ],
                max_length=16,
            ),
        ),
        migrations.AddIndex(
            model_name="journalentry",
            index=models.Index(fields=["received_at", "key"], name="flymy_journal_recent"),
        ),
        migrations.AddIndex(
            model_name="journalentry",
            index=models.Index(fields=["state", "received_at", "key"], name="flymy_journal_state"),
        ),
        migrations.AddIndex(
            model_name="journalentry",
            index=models.Index(fields=["event", "received_at", "key"], name="flymy_journal_event"),
        ),
        migrations.AddIndex(
            model_name="journalentry",
            index=models.Index(
                fields=["agent_id", "received_at", "key"], name="flymy_journal_agent"
            ),
        ),
        migrations.AddIndex(
            model_name="journalentry",
            index=models.Index(
                fields=["run_digest", "received_at", "key"], name="flymy_journal_run"
            ),
        ),
        migrations.RunPython(fill_new_columns, migrations.RunPython.noop, elidable=True),
    ]
