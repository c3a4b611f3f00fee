"""The app's tables: claims, per-handler records, journal entries and refusals."""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies: ClassVar[list[tuple[str, str]]] = []

    operations: ClassVar[list[Any]] = [
        migrations.CreateModel(
            name="DeliveryClaim",
            fields=[
                ("key", models.CharField(max_length=255, primary_key=True, serialize=False)),
                ("token", models.CharField(blank=True, default="", max_length=64)),
                ("done", models.BooleanField(default=False)),
                ("expires", models.FloatField(db_index=True)),
            ],
            options={
                "verbose_name": "delivery claim",
            },
        ),
        migrations.CreateModel(
            name="JournalEntry",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("key", models.CharField(max_length=255, unique=True)),
                ("event", models.CharField(db_index=True, max_length=200)),
                ("run_id", models.CharField(blank=True, db_index=True, max_length=255, null=True)),
                (
                    "agent_id",
                    models.CharField(blank=True, db_index=True, max_length=200, null=True),
                ),
                ("agent_name", models.CharField(blank=True, max_length=200, null=True)),
                (
                    "state",
                    models.CharField(
                        choices=[
                            ("pending", "pending"),
                            ("handled", "handled"),
                            ("failed", "failed"),
                            ("ignored", "ignored"),
                        ],
                        db_index=True,
                        max_length=16,
                    ),
                ),
                ("attempts", models.PositiveIntegerField(default=1)),
                ("received_at", models.DateTimeField(db_index=True)),
                ("updated_at", models.DateTimeField()),
                ("body", models.BinaryField()),
                ("headers", models.JSONField(default=dict)),
                ("handlers", models.JSONField(default=dict)),
                ("retention", models.FloatField()),
                ("expires", models.FloatField(db_index=True)),
            ],
            options={
                "verbose_name": "journal entry",
                "verbose_name_plural": "journal entries",
                "ordering": ["-received_at", "-id"],
            },
        ),
        migrations.CreateModel(
            name="Refusal",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("at", models.DateTimeField(db_index=True)),
                ("status", models.PositiveSmallIntegerField()),
                ("reason", models.CharField(max_length=100)),
                ("detail", models.CharField(blank=True, default="", max_length=500)),
            ],
            options={
                "verbose_name": "refusal",
                "ordering": ["-at", "-id"],
            },
        ),
        migrations.CreateModel(
            name="HandlerRecord",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("key", models.CharField(max_length=255)),
                ("handler", models.CharField(max_length=500)),
                ("expires", models.FloatField(db_index=True)),
            ],
            options={
                "verbose_name": "handler record",
                "constraints": [
                    models.UniqueConstraint(fields=("key", "handler"), name="flymy_handler_unique")
                ],
            },
        ),
    ]
