"""Operating the journal through the receiver (DESIGN section 12): each attempt in the
history, resolve, filtered bulk replay with a dry run, keyset pages, replays that find no
handler, ``on_failure``. Runs against every store that keeps a journal."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.journal import Journal, JournalEntry
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET
from tests.stores.backends import JOURNAL_BACKENDS, Backend, make_backend


@pytest.fixture(params=JOURNAL_BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from make_backend(request.param, request, tmp_path)


def _post(receiver: Receiver, name: str = "run.completed", **fields: Any) -> int:
    req = signed_request(make_event(name, **fields), SECRET)
    return receiver.handle(req.body, req.headers).status


def _journal(receiver: Receiver) -> Journal:
    assert receiver.journal is not None
    return receiver.journal


def _entry(receiver: Receiver, run_id: str) -> JournalEntry:
    entry = _journal(receiver).get(run_id)
    assert entry is not None
    return entry


def _failing(backend: Backend, broken: list[bool], **options: Any) -> Receiver:
    receiver = Receiver(SECRET, store=backend.store, **options)

    @receiver.on("run.completed")
    def crm(event: RunCompleted) -> None:
        if broken[0]:
            raise RuntimeError("crm is down")

    return receiver


def test_every_attempt_is_in_the_history_with_its_source_status_and_outcome(
    backend: Backend,
) -> None:
    broken = [True]
    receiver = _failing(backend, broken)
    assert _post(receiver, run_id="run_hist") == 500
    assert _post(receiver, run_id="run_hist") == 500
    broken[0] = False
    replayed = _journal(receiver).replay("run_hist")
    assert replayed.state == "handled"
    assert _post(receiver, run_id="run_hist") == 200  # a late retry: a duplicate
    history = _entry(receiver, "run_hist").history
    seen = [(a.source, a.status, a.outcome) for a in history]
    assert seen == [
        ("sender", 500, "failed"),
        ("sender", 500, "failed"),
        ("replay", 200, "handled"),
        ("sender", 200, "duplicate"),
    ]
    assert all(a.duration >= 0 for a in history)
    assert history[0].started_at.tzinfo is not None


def test_an_ignored_event_records_its_attempt(backend: Backend) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    receiver.on("run.failed")(lambda event: None)
    assert _post(receiver, run_id="run_nobody") == 200
    entry = _entry(receiver, "run_nobody")
    assert entry.state == "ignored"
    assert [(a.source, a.status, a.outcome) for a in entry.history] == [("sender", 200, "ignored")]


def test_resolve_dismisses_a_failed_entry_from_failure_lists_and_bulk_replay(
    backend: Backend,
) -> None:
    broken = [True]
    receiver = _failing(backend, broken)
    journal = _journal(receiver)
    for run_id in ("run_refunded", "run_other"):
        assert _post(receiver, run_id=run_id) == 500
    resolved = journal.resolve("run_refunded", note="refunded by hand")
    assert (resolved.state, resolved.note) == ("resolved", "refunded by hand")
    assert [e.run_id for e in journal.list(state="failed")] == ["run_other"]
    broken[0] = False
    report = journal.replay_all()
    assert report.matched == [journal.get("run_other").key]  # type: ignore[union-attr]
    assert _entry(receiver, "run_refunded").state == "resolved"  # never replayed
    assert journal.replay_failed() == []
    with pytest.raises(KeyError):
        journal.resolve("run_unknown")


def test_replay_all_dry_run_runs_nothing_then_the_filters_pick_the_set(
    backend: Backend,
) -> None:
    broken = [True]
    receiver = Receiver(SECRET, store=backend.store)
    ran: list[str] = []

    @receiver.on("*")
    def work(event: Any) -> None:
        if broken[0]:
            raise RuntimeError("down")
        ran.append(event.data.run_id)

    assert _post(receiver, run_id="run_a1", agent_id="agent_a") == 500
    backend.advance(1.0)
    assert _post(receiver, "run.failed", run_id="run_f1", agent_id="agent_a") == 500
    backend.advance(1.0)
    assert _post(receiver, run_id="run_b1", agent_id="agent_b") == 500
    journal = _journal(receiver)
    keys = {run: _entry(receiver, run).key for run in ("run_a1", "run_f1", "run_b1")}
    broken[0] = False

    dry = journal.replay_all(dry_run=True)
    assert dry.matched == [keys["run_b1"], keys["run_f1"], keys["run_a1"]]  # newest first
    assert (dry.handled, dry.failed, ran) == ([], [], [])
    assert _entry(receiver, "run_a1").state == "failed"

    by_event = journal.replay_all(event="run.completed", agent_id="agent_a", dry_run=True)
    assert by_event.matched == [keys["run_a1"]]

    report = journal.replay_all(event="run.completed")
    assert report.matched == [keys["run_b1"], keys["run_a1"]]
    assert sorted(report.handled) == sorted([keys["run_b1"], keys["run_a1"]])
    assert report.failed == []
    assert sorted(ran) == ["run_a1", "run_b1"]
    assert _entry(receiver, "run_f1").state == "failed"


def test_replay_all_since_and_until_bound_when_entries_were_received(backend: Backend) -> None:
    broken = [True]
    receiver = _failing(backend, broken)
    journal = _journal(receiver)
    for run_id in ("run_old", "run_mid", "run_new"):
        assert _post(receiver, run_id=run_id) == 500
        backend.advance(10.0)
    mid = _entry(receiver, "run_mid")
    new = _entry(receiver, "run_new")
    report = journal.replay_all(since=mid.received_at, until=new.received_at, dry_run=True)
    assert report.matched == [mid.key]


def test_replay_all_paces_itself_with_per_second(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = [True]
    receiver = _failing(backend, broken)
    for number in range(3):
        assert _post(receiver, run_id=f"run_paced_{number}") == 500
    broken[0] = False
    now = [1000.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    import flymy_receiver.journal as journal_module

    monkeypatch.setattr(journal_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(journal_module.time, "sleep", sleep)
    report = _journal(receiver).replay_all(per_second=2.0)
    assert len(report.handled) == 3
    assert slept == [0.5, 0.5]  # the first at once, then one every half second
    with pytest.raises(ValueError, match="per_second"):
        _journal(receiver).replay_all(per_second=0)


def test_list_pages_with_a_keyset_and_finds_a_run(backend: Backend) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    receiver.on("run.completed")(lambda event: None)
    for number in range(5):
        assert _post(receiver, run_id=f"run_page_{number}") == 200
        backend.advance(1.0)
    journal = _journal(receiver)
    first = journal.list(limit=2)
    assert [e.run_id for e in first] == ["run_page_4", "run_page_3"]
    second = journal.list(limit=2, before=first[-1])
    assert [e.run_id for e in second] == ["run_page_2", "run_page_1"]
    third = journal.list(limit=2, before=second[-1].key)
    assert [e.run_id for e in third] == ["run_page_0"]
    assert [e.run_id for e in journal.list(run_id="run_page_2")] == ["run_page_2"]


def test_a_replay_that_finds_no_handler_says_so_and_stays_failed(backend: Backend) -> None:
    broken = [True]
    receiver = _failing(backend, broken)
    assert _post(receiver, run_id="run_orphan") == 500
    # The app is fixed by removing the failing handler: a receiver with none for the event.
    fixed = Receiver(SECRET, store=backend.store)
    fixed.on("run.failed")(lambda event: None)
    entry = _journal(fixed).replay("run_orphan")
    assert entry.state == "failed"  # never "handled" over a failed outcome
    assert not entry.handlers[next(iter(entry.handlers))].ok
    assert (entry.history[-1].source, entry.history[-1].outcome) == ("replay", "no_handler")
    report = _journal(fixed).replay_all()
    assert report.failed == [entry.key]
    assert not report.ok


def test_on_failure_is_called_when_an_entry_first_fails_not_for_each_retry(
    backend: Backend,
) -> None:
    broken = [True]
    alerts: list[tuple[str | None, str]] = []
    receiver = _failing(backend, broken, on_failure=lambda e: alerts.append((e.run_id, e.state)))
    for _ in range(3):
        assert _post(receiver, run_id="run_alert") == 500
    assert alerts == [("run_alert", "failed")]
    _journal(receiver).replay("run_alert")  # fails again: not news
    assert alerts == [("run_alert", "failed")]
    _journal(receiver).resolve("run_alert", note="looked at it")
    _journal(receiver).replay("run_alert")  # resolved, then failing anew: news again
    assert alerts == [("run_alert", "failed"), ("run_alert", "failed")]
    broken[0] = False
    assert _journal(receiver).replay("run_alert").state == "handled"
    assert len(alerts) == 2


def test_an_on_failure_that_raises_is_logged_never_raised(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    def alert(entry: JournalEntry) -> None:
        raise RuntimeError("pager is down")

    receiver = _failing(backend, [True], on_failure=alert)
    assert _post(receiver, run_id="run_pager") == 500
    [record] = [r for r in caplog.records if "on_failure" in r.getMessage()]
    assert record.exc_info is not None


def test_on_failure_needs_the_journal() -> None:
    from flymy_receiver.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="on_failure needs the delivery journal"):
        Receiver(SECRET, journal=False, on_failure=lambda entry: None)


def test_since_until_are_aware_datetimes_in_the_report_order(backend: Backend) -> None:
    receiver = _failing(backend, [True])
    assert _post(receiver, run_id="run_window") == 500
    later = datetime.now(timezone.utc) + timedelta(days=400)
    report = _journal(receiver).replay_all(since=later, dry_run=True)
    assert report.matched == []
    assert report.ok
