"""The journal in Django's admin: list, filters, an entry's page, Replay and Resolve.

Entries cannot be added, edited nor deleted here: deliveries, replays and workers write
them, and retention removes them (``Receiver(journal_retention=...)``). An entry that will
never succeed is *resolved* with a note instead: kept, out of the failure lists, never
replayed in bulk. An entry's page shows each handler (a deferred one as queued, running, ok
or failed, with its attempts) and the history of its attempts, with Replay and Resolve
buttons; the list has "Replay selected". Replaying runs the application's handlers, so it
goes through the receiver that :func:`~flymy_receiver.django.register` or
``settings.FLYMY_RECEIVER`` names; the pages say so when there is none. The buttons post to
CSRF-protected views that need the staff user's "change journal entry" permission.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join

from ..stores.records import ENTRY_STATES, to_datetime
from ..stores.records import JournalEntry as Entry
from . import _non_atomic
from .display import pretty_body, printable
from .models import JournalEntry, Refusal
from .operations import (
    NO_RECEIVER,
    NOTE_LENGTH,
    Refused,
    Told,
    journal_for_replay,
    journal_for_resolve,
    replay,
    resolve,
)

__all__ = ["JournalEntryAdmin", "RefusalAdmin"]

#: At most this many entries are replayed by one action (a request must end in time).
MAX_REPLAY = 100
#: A body is shown up to this many characters.
MAX_SHOWN = 200_000

_LEVELS = {"success": messages.SUCCESS, "warning": messages.WARNING, "error": messages.ERROR}


class StateFilter(admin.SimpleListFilter):
    """The states as the journal reports them: ``stalled`` is a ``pending`` entry whose
    claim's lease has ended (its worker died), and "failed" includes it, as in
    ``journal.list(state="failed")``."""

    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(state, state) for state in ENTRY_STATES]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        from django.db.models import Q

        wanted, now = self.value(), time.time()
        stalled = Q(state="pending", lease_until__lte=now)
        if wanted == "failed":
            return queryset.filter(Q(state="failed") | stalled)
        if wanted == "stalled":
            return queryset.filter(stalled)
        if wanted == "pending":
            return queryset.filter(state="pending", lease_until__gt=now)
        return queryset.filter(state=wanted) if wanted in ENTRY_STATES else queryset


@admin.register(JournalEntry)
class JournalEntryAdmin(admin.ModelAdmin):
    """Every authentic delivery, newest first, with its body, each handler's outcome and
    the history of its attempts."""

    change_form_template = "flymy_receiver/admin/journal_entry.html"
    list_display = (
        "run_id",
        "event",
        "agent",
        "shown_state",
        "attempts",
        "received_at",
        "updated_at",
    )
    list_filter = (StateFilter, "event", "agent_id", "received_at")
    search_fields = ("=key",)  # and run ids, through their digest: see get_search_results
    date_hierarchy = "received_at"
    actions = ("replay_selected", "replay_selected_force")
    fields = (
        "key",
        "event",
        "run_id",
        "agent_id",
        "agent_name",
        "state",
        "resolution",
        "attempts",
        "received_at",
        "updated_at",
        "outcomes",
        "history_table",
        "headers_read",
        "pretty_body",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> Any:
        # Bodies are up to max_body_size each, histories up to 50 attempts: the list never
        # loads them (the entry's page reads its one entry through the store).
        return super().get_queryset(request).defer("body", "history", "headers")

    def get_search_results(self, request: HttpRequest, queryset: Any, search_term: str) -> Any:
        # A run id of any length is found through its digest (the indexed column), so the
        # search never compares the sender's text in full.
        from .reading import run_digest

        found, duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        if term:
            found = found | queryset.filter(run_digest=run_digest(term))
        return found, duplicates

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The entry's page is read-only; "change" allows the replay actions and buttons.
        return obj is None and self.may_operate(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A journal entry may be the only copy of a paid run's result, and a failed one is
        # work still owed: nobody deletes one here. Resolve it; retention removes it.
        return False

    def may_operate(self, request: HttpRequest) -> bool:
        """Whether the user may replay and resolve (the model's "change" permission)."""
        return bool(super().has_change_permission(request))

    # -- the entry's page --------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        info = self.opts.app_label, self.opts.model_name
        wrap = self.admin_site.admin_view  # staff only, CSRF-protected, never cached
        return [
            path(
                "<path:object_id>/replay/",
                wrap(self.replay_view),
                name="{}_{}_replay".format(*info),
            ),
            path(
                "<path:object_id>/resolve/",
                wrap(self.resolve_view),
                name="{}_{}_resolve".format(*info),
            ),
            *super().get_urls(),
        ]

    @_non_atomic
    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: Any = None,
    ) -> HttpResponse:
        self._warn_without_receiver(request)
        context = {
            **(extra_context or {}),
            "may_operate": self.may_operate(request),
            "note_length": NOTE_LENGTH,
        }
        return super().changeform_view(request, object_id, form_url, context)

    @_non_atomic
    def replay_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST: replay this entry (``force``: every handler again); back to its page."""
        row = self._operated(request, object_id)
        try:
            journal = journal_for_replay()
        except Refused as exc:
            self.message_user(request, str(exc), messages.ERROR)
        else:
            self._tell(request, replay(journal, row.key, force=bool(request.POST.get("force"))))
        return self._back_to(row)

    @_non_atomic
    def resolve_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST: mark this entry resolved with the posted ``note``; back to its page."""
        row = self._operated(request, object_id)
        journal = journal_for_resolve(row._state.db or "default")
        self._tell(request, resolve(journal, row.key, str(request.POST.get("note", ""))))
        return self._back_to(row)

    def _operated(self, request: HttpRequest, object_id: str) -> Any:
        if request.method != "POST":
            raise PermissionDenied  # a link or a prefetch never replays anything
        if not self.may_operate(request):
            raise PermissionDenied
        return get_object_or_404(self.get_queryset(request), pk=object_id)

    def _back_to(self, row: Any) -> HttpResponse:
        info = self.opts.app_label, self.opts.model_name
        return HttpResponseRedirect(
            reverse(
                "admin:{}_{}_change".format(*info), args=[row.pk], current_app=self.admin_site.name
            )
        )

    # -- what the page shows -------------------------------------------------------------

    def _record(self, obj: JournalEntry) -> Entry | None:
        """The entry as the store reads it (body, outcomes, history), once per page."""
        cached: Entry | None = getattr(obj, "_flymy_record", None)
        if cached is None:
            from .store import DjangoStore

            cached = DjangoStore(using=obj._state.db or "default").journal_get(obj.key)
            obj._flymy_record = cached
        return cached

    @admin.display(description="state", ordering="state")
    def shown_state(self, obj: JournalEntry) -> str:
        return _state(obj, time.time())

    @admin.display(description="agent", ordering="agent_name")
    def agent(self, obj: JournalEntry) -> str:
        return str(obj.agent_name or obj.agent_id or "-")

    @admin.display(description="resolution note")
    def resolution(self, obj: JournalEntry) -> str:
        record = self._record(obj)
        note = record.note if record is not None else None
        return _html("<pre>{}</pre>", printable(note, newlines=True)) if note else "-"

    @admin.display(description="handlers")
    def outcomes(self, obj: JournalEntry) -> str:
        record = self._record(obj)
        if record is None or not record.handlers:
            return "none ran yet"
        rows = format_html_join(
            "",
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td><pre>{}</pre></td></tr>",
            (
                (
                    printable(name),
                    ("deferred, " if outcome.deferred else "") + outcome.state,
                    str(outcome.attempts) if outcome.deferred else "-",
                    _at(outcome.at),
                    printable(outcome.error or ""),
                    printable(outcome.traceback or "", newlines=True),
                )
                for name, outcome in record.handlers.items()
            ),
        )
        return _html(
            '<table class="flymy-handlers"><thead><tr><th>handler</th><th>state</th>'
            "<th>worker attempts</th><th>at (UTC)</th><th>error</th><th>traceback</th></tr>"
            "</thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="history")
    def history_table(self, obj: JournalEntry) -> str:
        record = self._record(obj)
        if record is None or not record.history:
            return "no attempts recorded"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code>"
            "</td></tr>",
            (
                (
                    _at(attempt.at),
                    attempt.source,
                    "-" if attempt.status is None else str(attempt.status),
                    attempt.outcome,
                    f"{attempt.duration * 1000:.0f} ms",
                    printable(attempt.handler or "-"),
                )
                for attempt in reversed(record.history)  # newest first, as the list
            ),
        )
        return _html(
            '<table class="flymy-history"><thead><tr><th>at (UTC)</th><th>source</th>'
            "<th>status</th><th>outcome</th><th>duration</th><th>handler</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="headers the receiver read")
    def headers_read(self, obj: JournalEntry) -> str:
        record = self._record(obj)
        headers = dict(record.headers) if record is not None else {}
        return _html("<pre>{}</pre>", json.dumps(headers, indent=2))  # ASCII

    @admin.display(description="body")
    def pretty_body(self, obj: JournalEntry) -> str:
        record = self._record(obj)
        if record is None or record.body is None:
            size = record.body_size if record is not None else 0
            return f"not kept: dropped by the journal's byte limit ({size} bytes)"
        return _html("<pre>{}</pre>", pretty_body(record.body, MAX_SHOWN))

    # -- the list and its actions ----------------------------------------------------------

    # The replay actions post to the list: replays and their journal records must commit on
    # their own, as deliveries do, even under ATOMIC_REQUESTS (see flymy_receiver.django.view).
    @_non_atomic
    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        self._warn_without_receiver(request)
        return super().changelist_view(request, extra_context)

    def get_actions(self, request: HttpRequest) -> Any:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # see has_delete_permission
        return actions

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
            journal = journal_for_replay()
        except Refused as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        keys = list(queryset.values_list("key", flat=True)[: MAX_REPLAY + 1])
        if len(keys) > MAX_REPLAY:
            self.message_user(
                request, f"Only the first {MAX_REPLAY} selected are replayed.", messages.WARNING
            )
            keys = keys[:MAX_REPLAY]
        told = [replay(journal, key, force=force) for key in keys]
        states: dict[str, int] = {}
        for result in told:
            if result.state:
                states[result.state] = states.get(result.state, 0) + 1
        if states:
            summary = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
            bad = any(result.level != "success" for result in told if result.state)
            self.message_user(
                request, f"Replayed: {summary}.", messages.WARNING if bad else messages.SUCCESS
            )
        # Each entry that did not end well, in its own words (bounded: a page, not a log).
        for result in [r for r in told if r.level != "success"][:20]:
            self._tell(request, result)

    def _tell(self, request: HttpRequest, told: Told) -> None:
        self.message_user(request, told.text, _LEVELS[told.level])

    def _warn_without_receiver(self, request: HttpRequest) -> None:
        if request.method != "GET":
            return
        try:
            journal_for_replay()
        except Refused as exc:
            level = messages.WARNING if str(exc) == NO_RECEIVER else messages.ERROR
            self.message_user(request, str(exc), level)


def _html(template: str, *args: Any) -> str:
    """``format_html``: every argument escaped (a body is text the sender chose)."""
    return cast(str, format_html(template, *args))


def _state(row: JournalEntry, now: float) -> str:
    """The state the journal reports for a row (see :class:`StateFilter`)."""
    state = str(row.state)
    return "stalled" if state == "pending" and row.lease_until <= now else state


def _at(seconds: float) -> str:
    return to_datetime(seconds).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"


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
