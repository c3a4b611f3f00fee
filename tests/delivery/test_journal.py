"""The delivery journal through the receiver: nothing authentic is lost, replay after the
sender gave up, refusals rationed. Runs against every store that keeps a journal."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import EventInFlight, Receiver, RunCompleted, RunFailed
from flymy_receiver.journal import Journal
from flymy_receiver.stores import MemoryStore
from flymy_receiver.testing import make_event, signed_request, wrong_secret_request
from tests.conftest import SECRET
from tests.stores.backends import JOURNAL_BACKENDS, Backend, make_backend


@pytest.fixture(params=JOURNAL_BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from make_backend(request.param, request, tmp_path)


def _request(name: str = "run.completed", **fields: Any) -> tuple[bytes, dict[str, str]]:
    req = signed_request(make_event(name, **fields), SECRET)
    return req.body, req.headers


def _journal(receiver: Receiver) -> Journal:
    assert receiver.journal is not None
    return receiver.journal


def test_the_sender_gives_up_then_a_replay_after_the_fix_then_a_late_retry(
    backend: Backend,
) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    saved: list[str] = []
    notified: list[str] = []
    broken = [True]

    @receiver.on("run.completed")
    def save(event: RunCompleted) -> None:
        saved.append(event.data.run_id)

    @receiver.on("run.completed")
    def notify(event: RunCompleted) -> None:
        if broken[0]:
            raise RuntimeError("crm is down")
        notified.append(event.data.run_id)

    body, headers = _request(run_id="run_paid_work")
    for _ in range(3):  # the sender retries, then gives up
        response = receiver.handle(body, headers)
        assert response.status == 500
        assert b"crm is down" not in response.body
    journal = _journal(receiver)
    entry = journal.get("run_paid_work")
    assert entry is not None
    assert entry.state == "failed"
    assert entry.attempts == 3
    assert entry.body == body
    save_id = next(h for h in entry.handlers if h.endswith("save"))
    notify_id = next(h for h in entry.handlers if h.endswith("notify"))
    assert entry.handlers[save_id].ok
    assert entry.handlers[notify_id].error == "RuntimeError: crm is down"
    assert "Traceback" in (entry.handlers[notify_id].traceback or "")
    assert [e.key for e in journal.list(state="failed")] == [entry.key]

    broken[0] = False  # the fix is deployed
    replayed = journal.replay("run_paid_work")
    assert replayed.state == "handled"
    assert replayed.attempts == 3  # a replay is not a delivery
    assert replayed.handlers[notify_id].ok
    assert replayed.handlers[notify_id].error is None
    assert saved == ["run_paid_work"]  # the handler that had succeeded ran once in all
    assert notified == ["run_paid_work"]

    late = receiver.handle(body, headers)  # the sender's late retry
    assert late.status == 200
    assert json.loads(late.body).get("duplicate") is True
    assert saved == ["run_paid_work"]
    assert notified == ["run_paid_work"]
    final = journal.get("run_paid_work")
    assert final is not None
    assert final.attempts == 4
    assert final.state == "handled"


def test_a_handled_entry_parses_back_to_the_typed_event(backend: Backend) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    receiver.on("run.failed")(lambda event: None)
    body, headers = _request("run.failed", run_id="run_typed")
    assert receiver.handle(body, headers).status == 200
    entry = _journal(receiver).get("run_typed")
    assert entry is not None
    assert entry.state == "handled"
    assert entry.event == "run.failed"
    assert entry.agent_id == "agent_abc123"
    assert entry.agent_name == "Sales Lead Profiler"
    event = entry.parse()
    assert isinstance(event, RunFailed)
    assert event.data.run_id == "run_typed"
    # The headers the receiver read, never the signature (the expected one, for a valid body).
    assert headers["X-FlyMyAI-Signature"] not in json.dumps(dict(entry.headers))


def test_an_event_no_handler_wants_is_journaled_ignored(backend: Backend) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    receiver.on("run.completed")(lambda event: None)
    body, headers = _request("run.cancelled", run_id="run_nobody")
    assert receiver.handle(body, headers).status == 200
    entry = _journal(receiver).get("run_nobody")
    assert entry is not None
    assert entry.state == "ignored"
    assert entry.event == "run.cancelled"


def test_a_handler_added_later_can_replay_an_ignored_event(backend: Backend) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    body, headers = _request(run_id="run_later")
    assert receiver.handle(body, headers).status == 200
    seen: list[str] = []
    receiver.on("run.completed")(lambda event: seen.append(event.data.run_id))
    entry = _journal(receiver).replay("run_later")
    assert seen == ["run_later"]
    assert entry.state == "handled"


def test_force_runs_every_handler_again_and_a_failure_makes_it_failed(backend: Backend) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    runs: list[str] = []
    fail = [False]

    @receiver.on("run.completed")
    def handler(event: RunCompleted) -> None:
        runs.append(event.data.run_id)
        if fail[0]:
            raise ValueError("bad row")

    body, headers = _request(run_id="run_force")
    assert receiver.handle(body, headers).status == 200
    journal = _journal(receiver)
    assert journal.replay("run_force").state == "handled"
    assert runs == ["run_force"]  # nothing left to run without force
    assert journal.replay("run_force", force=True).state == "handled"
    assert runs == ["run_force"] * 2
    fail[0] = True
    entry = journal.replay("run_force", force=True)
    assert entry.state == "failed"
    assert runs == ["run_force"] * 3
    # The forced replay failed: the sender's retry is no longer a duplicate.
    fail[0] = False
    assert receiver.handle(body, headers).status == 200
    assert runs == ["run_force"] * 4


def test_a_replay_while_the_event_is_held_raises_event_in_flight(backend: Backend) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    receiver.on("run.completed")(lambda event: (_ for _ in ()).throw(RuntimeError("x")))
    body, headers = _request(run_id="run_held")
    assert receiver.handle(body, headers).status == 500
    entry = _journal(receiver).get("run_held")
    assert entry is not None
    held = backend.store.claim(entry.key, 30)  # another worker is delivering it right now
    with pytest.raises(EventInFlight):
        _journal(receiver).replay("run_held")
    backend.store.release(entry.key, held.token)


def test_replay_failed_replays_every_failed_entry(backend: Backend) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    broken = [True]

    @receiver.on("run.completed")
    def handler(event: RunCompleted) -> None:
        if broken[0]:
            raise RuntimeError("down")

    for i in range(3):
        assert receiver.handle(*_request(run_id=f"run_f{i}")).status == 500
    assert receiver.handle(*_request(run_id="run_fine", agent_id="other")).status == 500
    broken[0] = False
    journal = _journal(receiver)
    done = journal.replay_failed()
    assert sorted(e.run_id or "" for e in done) == ["run_f0", "run_f1", "run_f2", "run_fine"]
    assert all(e.state == "handled" for e in done)
    assert journal.list(state="failed") == []


def test_unknown_entries_raise_key_error(backend: Backend) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    with pytest.raises(KeyError):
        _journal(receiver).replay("run_never_seen")


def test_journal_false_keeps_no_entries() -> None:
    store = MemoryStore()
    receiver = Receiver(SECRET, store=store, journal=False)
    receiver.on("run.completed")(lambda event: None)
    assert receiver.journal is None
    assert receiver.handle(*_request(run_id="run_off")).status == 200
    assert store.journal_get("run_off") is None


def test_a_forged_flood_is_one_hmac_each_and_rationed_refusal_writes() -> None:
    writes: list[Any] = []

    class CountingStore(MemoryStore):
        def record_refusal(self, refusal: Any) -> None:
            writes.append(refusal)
            super().record_refusal(refusal)

    receiver = Receiver(SECRET, store=CountingStore())
    receiver.on("run.completed")(lambda event: pytest.fail("a forgery reached a handler"))
    forged = wrong_secret_request(make_event("run.completed"))
    for _ in range(2_000):
        assert receiver.handle(forged.body, forged.headers).status == 401
    journal = _journal(receiver)
    refusals = journal.refusals(limit=1000)
    assert 1 <= len(writes) <= 40  # the first of a burst, then about one a second
    assert len(refusals) == len(writes)
    newest = refusals[0]
    assert newest.status == 401
    assert newest.reason == "signature_mismatch"
    assert SECRET not in newest.detail


def test_refusals_of_every_kind_say_their_reason() -> None:
    receiver = Receiver(SECRET, max_body_size=1000)
    body, headers = _request()
    receiver.handle(body, headers, method="GET")
    receiver.handle(b"x" * 2000, headers)
    receiver.handle(b"not json", {"X-FlyMyAI-Signature": signed_request_sig(b"not json")})
    reasons = [r.reason for r in _journal(receiver).refusals()]
    assert reasons == ["invalid_json", "too_large", "method_not_allowed"]


def signed_request_sig(body: bytes) -> str:
    from flymy_receiver import sign

    return sign(body, SECRET)


def test_a_cancelled_async_delivery_gives_its_claim_back(backend: Backend) -> None:
    receiver = Receiver(SECRET, store=backend.store)
    started = asyncio.Event()
    runs: list[str] = []

    @receiver.on("run.completed")
    async def slow(event: RunCompleted) -> None:
        runs.append(event.data.run_id)
        started.set()
        if len(runs) == 1:
            await asyncio.sleep(60)

    body, headers = _request(run_id="run_cancelled")

    async def scenario() -> int:
        task = asyncio.create_task(receiver.ahandle(body, headers))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the release runs in the background: bounded wait
            response = await receiver.ahandle(body, headers)
            if response.status != 409:
                return response.status
            await asyncio.sleep(0.05)
        return 409

    assert asyncio.run(scenario()) == 200
    assert runs == ["run_cancelled", "run_cancelled"]


def test_a_journal_over_a_bare_store_reads_but_cannot_replay() -> None:
    from flymy_receiver import ConfigurationError

    store = MemoryStore()
    receiver = Receiver(SECRET, store=store)
    receiver.on("run.completed")(lambda event: None)
    assert receiver.handle(*_request(run_id="run_read_only")).status == 200
    reader = Journal(store)
    entry = reader.get("run_read_only")
    assert entry is not None
    assert entry.state == "handled"
    assert [e.run_id for e in reader.list()] == ["run_read_only"]
    with pytest.raises(ConfigurationError, match="needs the receiver"):
        reader.replay("run_read_only")
