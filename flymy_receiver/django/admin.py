"""The journal in Django's admin: list, filters, a delivery's detail, "Replay selected".

Entries and refusals are read-only: the journal is written by deliveries and replays only.
Replaying runs the application's handlers, so it goes through the receiver that
:func:`~flymy_receiver.django.register` or ``settings.FLYMY_RECEIVER`` names; the pages say
so when there is none.
"""

from __future__ import annotations

import json
from typing import Any, cast

from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html, format_html_join

from ..errors import ConfigurationError, EventInFlight, StoreUnavailable
from . import _non_atomic
from .display import pretty_body, printable
from .models import JournalEntry, Refusal
from .registry import SETTING, configured_receiver

__all__ = ["JournalEntryAdmin", "RefusalAdmin"]

#: At most this many entries are replayed by one action (a request must end in time).
MAX_REPLAY = 100
#: A body is shown up to this many characters.
MAX_SHOWN = 200_000

NO_RECEIVER = (
    "No receiver is configured, so entries cannot be replayed: set "
    f'{SETTING} = "myapp.webhooks:receiver" in settings, or call '
    "flymy_receiver.django.register(receiver) where the receiver is built."
)


@admin.register(JournalEntry)
class JournalEntryAdmin(admin.ModelAdmin):
    """Every authentic delivery, newest first, with its body and each handler's outcome."""

    list_display = ("run_id", "event", "agent", "state", "attempts", "received_at", "updated_at")
    list_filter = ("state", "event", "agent_id", "received_at")
    search_fields = ("=run_id", "=key")
    date_hierarchy = "received_at"
    actions = ("replay_selected", "replay_selected_force")
    fields = (
        "key",
        "event",
        "run_id",
        "agent_id",
        "agent_name",
        "state",
        "attempts",
        "received_at",
        "updated_at",
        "outcomes",
        "headers_read",
        "pretty_body",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> Any:
        # Bodies are up to max_body_size each: the list never loads them.
        return super().get_queryset(request).defer("body")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The detail page is read-only; "change" on the list only allows the replay actions.
        return obj is None and super().has_change_permission(request)

    @admin.display(description="agent", ordering="agent_name")
    def agent(self, obj: JournalEntry) -> str:
        return str(obj.agent_name or obj.agent_id or "-")

    @admin.display(description="handlers")
    def outcomes(self, obj: JournalEntry) -> str:
        handlers: dict[str, dict[str, Any]] = obj.handlers or {}
        if not handlers:
            return "none ran yet"
        rows = format_html_join(
            "",
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
            (
                (
                    printable(name),
                    "ok" if outcome.get("ok") else "failed",
                    printable(outcome.get("error") or ""),
                    printable(outcome.get("traceback") or "", newlines=True),
                )
                for name, outcome in handlers.items()
            ),
        )
        return _html(
            "<table><thead><tr><th>handler</th><th>outcome</th><th>error</th>"
            "<th>traceback</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="headers the receiver read")
    def headers_read(self, obj: JournalEntry) -> str:
        return _html("<pre>{}</pre>", json.dumps(obj.headers or {}, indent=2))  # ASCII

    @admin.display(description="body")
    def pretty_body(self, obj: JournalEntry) -> str:
        return _html("<pre>{}</pre>", pretty_body(bytes(obj.body), MAX_SHOWN))

    # The replay actions post to the list: replays and their journal records must commit on
    # their own, as deliveries do, even under ATOMIC_REQUESTS (see flymy_receiver.django.view).
    @_non_atomic
    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        self._warn_without_receiver(request)
        return super().changelist_view(request, extra_context)

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: Any = None,
    ) -> HttpResponse:
        self._warn_without_receiver(request)
        return super().changeform_view(request, object_id, form_url, extra_context)

    @admin.action(description="Replay selected", permissions=["change"])
    def replay_selected(self, request: HttpRequest, queryset: Any) -> None:
        """Run the handlers of each entry that have not succeeded yet."""
        self._replay(request, queryset, force=False)

    @admin.action(description="Replay selected, every handler (force)", permissions=["change"])
    def replay_selected_force(self, request: HttpRequest, queryset: Any) -> None:
        """Run every handler of each entry again, even of a handled one."""
        self._replay(request, queryset, force=True)

    def _replay(self, request: HttpRequest, queryset: Any, force: bool) -> None:
        try:
            receiver = configured_receiver()
        except ConfigurationError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        if receiver is None:
            self.message_user(request, NO_RECEIVER, messages.ERROR)
            return
        journal = receiver.journal
        if journal is None:
            self.message_user(
                request, "The configured receiver keeps no journal (journal=False).", messages.ERROR
            )
            return
        keys = list(queryset.values_list("key", flat=True)[: MAX_REPLAY + 1])
        if len(keys) > MAX_REPLAY:
            self.message_user(
                request, f"Only the first {MAX_REPLAY} selected are replayed.", messages.WARNING
            )
            keys = keys[:MAX_REPLAY]
        states: dict[str, int] = {}
        problems: list[str] = []
        for key in keys:
            try:
                state = journal.replay(key, force=force).state
                states[state] = states.get(state, 0) + 1
            except EventInFlight:
                problems.append(f"{key}: being handled right now, try again later")
            except KeyError:
                problems.append(f"{key}: not in the configured receiver's journal")
            except StoreUnavailable:
                problems.append(f"{key}: the store failed")
        self._report(request, states, problems)

    def _report(self, request: HttpRequest, states: dict[str, int], problems: list[str]) -> None:
        if states:
            summary = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
            level = messages.WARNING if states.get("failed") else messages.SUCCESS
            self.message_user(request, f"Replayed: {summary}.", level)
        for problem in problems[:20]:
            self.message_user(request, f"Not replayed: {problem}", messages.ERROR)

    def _warn_without_receiver(self, request: HttpRequest) -> None:
        if request.method != "GET":
            return
        try:
            receiver = configured_receiver()
        except ConfigurationError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        if receiver is None:
            self.message_user(request, NO_RECEIVER, messages.WARNING)


def _html(template: str, *args: Any) -> str:
    """``format_html``: every argument escaped (a body is text the sender chose)."""
    return cast(str, format_html(template, *args))


@admin.register(Refusal)
class RefusalAdmin(admin.ModelAdmin):
    """Refused deliveries (no bodies): why the platform is getting 4xx answers."""

    list_display = ("at", "status", "reason", "detail")
    list_filter = ("status", "reason", "at")
    search_fields = ("reason", "detail")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
