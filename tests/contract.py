"""The behaviour contract every way of mounting a receiver honours (CHECKLIST.md, DESIGN.md §4).

Written once, webargs-style: a test module subclasses :class:`ReceiverContract` and says only
how to deliver a request (:meth:`~ReceiverContract.deliver`) and how to deliver a body that
is read as a stream, chunk by chunk, with no ``Content-Length`` unless the test gives one
(:meth:`~ReceiverContract.deliver_stream`). Everything else (the receiver, its recording
handlers, every hostile input and every expected answer) lives here, so each adapter gives
the same answer to the same request.

Every reply goes through :meth:`ReceiverContract.send`, which checks what must hold for any
answer: a JSON object body with the status policy's shape, and never the secret, the
expected signature, a traceback or a handler's exception text. Logs are checked for the
secret and the expected signatures after each test.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted, RunFailed, UnknownEvent
from flymy_receiver.signature import SIGNATURE_HEADER, sign

SECRET = "whsec-contract-secret"
#: A handler's exception text: it may reach the logs, never a response.
HANDLER_ERROR = "handler exploded: db password hunter2"

Headers = list[tuple[str, str]]

#: DESIGN.md §1, byte for byte as documented.
DOC_COMPLETED = b"""{"event": "run.completed", "timestamp": "2025-01-15T10:00:15Z",
 "data": {"run_id": "run_xyz789", "agent_id": "agent_abc123", "agent_name": "Sales Lead Profiler",
          "status": "done", "duration_ms": 14200,
          "input": {"name": "Dana Lee", "company": "Acme Robotics"},
          "output": {"background": "VP of Engineering at Acme Robotics...",
                     "buying_triggers": ["Scaling team", "New product launch"],
                     "outreach_angle": "Focus on engineering productivity tools..."}}}"""
DOC_FAILED = b"""{"event": "run.failed", "timestamp": "2025-01-15T10:00:15Z",
 "data": {"run_id": "run_xyz790", "agent_id": "agent_abc123", "status": "error",
          "error": {"type": "tool_error", "message": "web_search returned no results for query"}}}"""  # noqa: E501


@dataclass
class Reply:
    """What the sender got back: status, body and headers (names lowercased)."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


class Recorder:
    """What the receiver's handlers saw."""

    def __init__(self) -> None:
        self.completed: list[RunCompleted[Any]] = []
        self.failed: list[RunFailed] = []
        self.every: list[Any] = []
        self.attempts = 0
        self.failures_left = 0

    @property
    def calls(self) -> int:
        """Every handler call, of any handler."""
        return len(self.completed) + len(self.failed) + len(self.every)


class Tripwire(io.RawIOBase):
    """A request body served chunk by chunk that counts how many bytes were read from it."""

    def __init__(self, chunks: Iterable[bytes] = ()) -> None:
        super().__init__()
        self._chunks = [c for c in chunks if c]
        self.size = sum(len(c) for c in self._chunks)
        self.pulled = 0
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            if not self._chunks:
                return 0
            self._pending = self._chunks.pop(0)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self.pulled += n
        return n

    def next_chunk(self) -> bytes:
        """The next whole chunk (``b""`` at the end), for ASGI ``receive``."""
        chunk = self._pending or (self._chunks.pop(0) if self._chunks else b"")
        self._pending = b""
        self.pulled += len(chunk)
        return chunk

    async def aiter_chunks(self) -> Any:
        while chunk := self.next_chunk():
            yield chunk

    def __len__(self) -> int:  # Django's test AsyncClient limits its reads to this
        return self.size

    def __bool__(self) -> bool:
        return True


def signed(body: bytes, secret: str = SECRET, content_type: str = "application/json") -> Headers:
    """The headers the platform sends with ``body``."""
    return [("Content-Type", content_type), (SIGNATURE_HEADER, sign(body, secret))]


def event_body(name: str = "run.completed", run_id: Any = "run_1", **data: Any) -> bytes:
    """A compact event body with a current timestamp."""
    from flymy_receiver.testing import make_event

    event = make_event(name, run_id="placeholder", **data)
    payload = event.model_dump(mode="json")
    payload["data"]["run_id"] = run_id
    return json.dumps(payload, separators=(",", ":")).encode()


def wsgi_environ(headers: Headers) -> dict[str, Any]:
    """The WSGI environ keys for ``headers``; repeated lines are joined with a comma, as a
    WSGI server does (PEP 3333 inherits CGI's one value per header)."""
    environ: dict[str, Any] = {}
    for name, value in headers:
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = f"HTTP_{key}"
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def call_asgi(app: Any, method: str, path: str, headers: Headers, body: Tripwire) -> Reply:
    """One request straight through an ASGI app, pulling the body only when the app asks.

    Test clients buffer the whole body before the app runs, which hides whether an adapter
    stops reading at the limit; a raw ``receive`` shows it.
    """
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        finished = asyncio.Event()
        body_done = False

        async def receive() -> dict[str, Any]:
            nonlocal body_done
            if not body_done:
                chunk = body.next_chunk()
                body_done = not chunk
                return {"type": "http.request", "body": chunk, "more_body": bool(chunk)}
            await asyncio.wait_for(finished.wait(), 30)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
        }
        await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    names = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in start["headers"]}
    return Reply(start["status"], content, names)


class ReceiverContract:
    """The checklist, run through one way of delivering requests (see the module docstring)."""

    # -- what a subclass provides --------------------------------------------------------------

    def deliver(self, receiver: Receiver, body: bytes, headers: Headers, method: str) -> Reply:
        """Deliver one request with exactly these header lines (repeats included)."""
        raise NotImplementedError

    def deliver_stream(self, receiver: Receiver, body: Tripwire, headers: Headers) -> Reply:
        """POST ``body``, read only as the adapter asks for it; no ``Content-Length`` is sent
        unless ``headers`` has one (then it may lie, as a hostile client's would)."""
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------------------------

    @pytest.fixture(autouse=True)
    def _leak_watch(self, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
        self._secrets: list[str] = []
        self._signatures: set[str] = set()
        caplog.set_level(logging.DEBUG, logger="flymy_receiver")
        yield
        # caplog.text at teardown holds only teardown's records: read the test's own.
        formatter = logging.Formatter()
        logged = "\n".join(formatter.format(r) for r in caplog.get_records("call"))
        for secret in self._secrets:
            assert secret not in logged, "a log line contains the secret"
        for digest in self._signatures:
            assert digest not in logged.lower(), "a log line contains the expected signature"

    def build(self, secret: str | list[str] = SECRET, **options: Any) -> tuple[Receiver, Recorder]:
        """A receiver whose handlers record what they see: a typed sync ``run.completed``
        handler (which can be told to fail), an async ``run.failed`` one and a catch-all."""
        receiver = Receiver(secret=secret, **options)
        self._secrets.extend([secret] if isinstance(secret, str) else secret)
        seen = Recorder()

        @receiver.on("run.completed")
        def completed(event: RunCompleted[Any]) -> None:
            seen.attempts += 1
            if seen.failures_left:
                seen.failures_left -= 1
                raise RuntimeError(HANDLER_ERROR)
            seen.completed.append(event)

        @receiver.on("run.failed")
        async def failed(event: RunFailed) -> None:
            await asyncio.sleep(0)
            seen.failed.append(event)

        @receiver.on("*")
        def everything(event: Any) -> None:
            seen.every.append(event)

        return receiver, seen

    def send(
        self,
        receiver: Receiver,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        method: str = "POST",
    ) -> Reply:
        """Deliver, then check what holds for every answer."""
        self._remember(body)
        return self._checked(self.deliver(receiver, body, list(headers), method))

    def send_stream(self, receiver: Receiver, body: Tripwire, headers: Headers) -> Reply:
        return self._checked(self.deliver_stream(receiver, body, headers))

    def _remember(self, body: bytes) -> None:
        self._signatures.update(sign(body, s) for s in self._secrets)

    def _checked(self, reply: Reply) -> Reply:
        payload = reply.json()
        assert isinstance(payload, dict)
        if reply.status == 200:
            assert payload["received"] is True
        else:
            assert isinstance(payload["error"], str)
        assert reply.headers.get("content-type", "").startswith("application/json")
        seen = (reply.body.decode("latin-1") + repr(reply.headers)).lower()
        for secret in self._secrets:
            assert secret.lower() not in seen, "a response contains the secret"
        for digest in self._signatures:
            assert digest not in seen, "a response contains the expected signature"
        for text in ("traceback", HANDLER_ERROR.lower(), "hunter2"):
            assert text not in seen
        return reply

    def deliver_ok(self, **options: Any) -> tuple[Reply, Recorder]:
        receiver, seen = self.build(**options)
        body = event_body()
        return self.send(receiver, body, signed(body)), seen

    def refused(self, reply: Reply, seen: Recorder, status: int) -> None:
        assert reply.status == status, reply.body
        assert seen.calls == 0

    # -- the happy path and the documented payloads ----------------------------------------

    def test_valid_delivery_is_acknowledged_and_handled_once(self) -> None:
        reply, seen = self.deliver_ok()
        assert reply.status == 200
        assert reply.json() == {"received": True}
        assert len(seen.completed) == 1
        assert len(seen.every) == 1
        assert seen.failed == []

    @pytest.mark.parametrize("compact", [False, True], ids=["as-documented", "compact"])
    def test_documented_run_completed_reaches_typed_handler(self, compact: bool) -> None:
        receiver, seen = self.build(max_age=None)  # the example's timestamp is from 2025
        body = DOC_COMPLETED
        if compact:
            body = json.dumps(json.loads(body), separators=(",", ":")).encode()
        reply = self.send(receiver, body, signed(body))
        assert reply.status == 200
        (event,) = seen.completed
        assert isinstance(event, RunCompleted)
        assert event.timestamp.isoformat() == "2025-01-15T10:00:15+00:00"
        data = event.data
        assert (data.run_id, data.agent_id) == ("run_xyz789", "agent_abc123")
        assert (data.agent_name, data.status, data.duration_ms) == (
            "Sales Lead Profiler",
            "done",
            14200,
        )
        assert data.input == {"name": "Dana Lee", "company": "Acme Robotics"}
        assert data.output["buying_triggers"] == ["Scaling team", "New product launch"]
        assert data.output["outreach_angle"] == "Focus on engineering productivity tools..."

    def test_documented_run_failed_reaches_async_handler(self) -> None:
        receiver, seen = self.build(max_age=None)
        reply = self.send(receiver, DOC_FAILED, signed(DOC_FAILED))
        assert reply.status == 200
        assert seen.completed == []
        (event,) = seen.failed
        assert isinstance(event, RunFailed)
        assert (event.data.run_id, event.data.status) == ("run_xyz790", "error")
        assert event.data.agent_name is None
        assert event.data.duration_ms is None
        assert (event.data.error.type, event.data.error.message) == (
            "tool_error",
            "web_search returned no results for query",
        )

    def test_integer_run_id_becomes_a_string(self) -> None:
        receiver, seen = self.build(max_age=None)
        body = DOC_COMPLETED.replace(b'"run_xyz789"', b"789")
        assert self.send(receiver, body, signed(body)).status == 200
        assert seen.completed[0].data.run_id == "789"

    def test_documented_example_is_stale_under_the_default_replay_window(self) -> None:
        receiver, seen = self.build()
        self.refused(self.send(receiver, DOC_COMPLETED, signed(DOC_COMPLETED)), seen, 400)

    def test_timestamp_from_the_future_is_refused(self) -> None:
        receiver, seen = self.build()
        body = event_body(timestamp="2999-01-01T00:00:00Z")
        self.refused(self.send(receiver, body, signed(body)), seen, 400)

    # -- signature header -------------------------------------------------------------------

    def test_known_answer_vector(self) -> None:
        # A body that is not JSON: a valid signature gets past verification to a 400.
        secret = "It's a Secret to Everybody"
        receiver, seen = self.build(secret=secret)
        digest = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        body = b"Hello, World!"
        self.refused(self.send(receiver, body, [(SIGNATURE_HEADER, digest)]), seen, 400)
        wrong = digest[:-1] + "f"
        self.refused(self.send(receiver, body, [(SIGNATURE_HEADER, wrong)]), seen, 401)

    @pytest.mark.parametrize(
        "variant",
        [
            pytest.param(str.upper, id="upper"),
            pytest.param(lambda s: s[:32].upper() + s[32:], id="mixed-case"),
            pytest.param(lambda s: f"  {s}  ", id="spaces"),
            pytest.param(lambda s: f"\t{s}\t", id="tabs"),
            pytest.param(lambda s: f"{s}\r", id="trailing-cr"),
            pytest.param(lambda s: f"sha256={s}", id="sha256-prefix"),
            pytest.param(lambda s: f"SHA256={s.upper()}", id="upper-prefix"),
        ],
    )
    def test_tolerated_signature_spellings(self, variant: Any) -> None:
        receiver, seen = self.build()
        body = event_body()
        reply = self.send(receiver, body, [(SIGNATURE_HEADER, variant(sign(body, SECRET)))])
        assert reply.status == 200
        assert len(seen.completed) == 1

    def test_missing_signature(self) -> None:
        receiver, seen = self.build()
        reply = self.send(receiver, event_body(), [("Content-Type", "application/json")])
        self.refused(reply, seen, 401)
        assert reply.json() == {"error": "Invalid signature"}

    @pytest.mark.parametrize(
        "value",
        [
            pytest.param("", id="empty"),
            pytest.param("a" * 63, id="63-hex"),
            pytest.param("a" * 65, id="65-hex"),
            pytest.param("g" * 64, id="non-hex"),
            pytest.param("v1,abc", id="v1-scheme"),
            pytest.param("a" * 100_000, id="100KB"),
            # Test clients carry header values as latin-1 (WSGI environ strings, ASGI bytes),
            # and a real HTTP server can pass nothing wider, so latin-1 non-ASCII is what
            # any adapter can receive.
            pytest.param("\xe9" * 64, id="non-ascii"),
            pytest.param("caf\xe9", id="non-ascii-short"),
        ],
    )
    def test_malformed_signature(self, value: str) -> None:
        receiver, seen = self.build()
        body = event_body()
        reply = self.send(receiver, body, [(SIGNATURE_HEADER, value)])
        self.refused(reply, seen, 401)
        assert reply.json() == {"error": "Invalid signature"}

    def test_valid_signature_next_to_non_ascii_is_refused(self) -> None:
        receiver, seen = self.build()
        body = event_body()
        value = f"{sign(body, SECRET)},\xe9"
        self.refused(self.send(receiver, body, [(SIGNATURE_HEADER, value)]), seen, 401)

    def test_wrong_signature(self) -> None:
        receiver, seen = self.build()
        body = event_body()
        reply = self.send(receiver, body, signed(body, secret="some-other-secret"))
        self.refused(reply, seen, 401)
        assert reply.json() == {"error": "Invalid signature"}

    def test_two_header_lines_with_one_good_signature(self) -> None:
        receiver, seen = self.build()
        body = event_body()
        headers = [(SIGNATURE_HEADER, "0" * 64), (SIGNATURE_HEADER, sign(body, SECRET))]
        assert self.send(receiver, body, headers).status == 200
        assert len(seen.completed) == 1

    def test_comma_joined_value_with_one_good_signature(self) -> None:
        receiver, seen = self.build()
        body = event_body()
        value = f"{'0' * 64}, sha256={sign(body, SECRET)}"
        assert self.send(receiver, body, [(SIGNATURE_HEADER, value)]).status == 200
        assert len(seen.completed) == 1

    def test_too_many_candidates_are_refused_even_with_a_good_one(self) -> None:
        # The candidates are bounded (5), so a sender cannot make us compute or compare
        # without limit; the good signature in sixth place does not help.
        receiver, seen = self.build()
        body = event_body()
        values = [f"{n:064x}" for n in range(5)] + [sign(body, SECRET)]
        headers = [(SIGNATURE_HEADER, v) for v in values]
        self.refused(self.send(receiver, body, headers), seen, 401)

    def test_rotation_accepts_the_old_secret_and_refuses_a_removed_one(self) -> None:
        receiver, seen = self.build(secret=["whsec-new", "whsec-old"])
        body = event_body()
        assert self.send(receiver, body, signed(body, "whsec-old")).status == 200
        body = event_body(run_id="run_2")
        assert self.send(receiver, body, signed(body, "whsec-new")).status == 200
        assert len(seen.completed) == 2
        self._secrets.append("whsec-removed")
        body = event_body(run_id="run_3")
        self.refused_after(self.send(receiver, body, signed(body, "whsec-removed")), seen, 401, 2)

    def refused_after(self, reply: Reply, seen: Recorder, status: int, completed: int) -> None:
        assert reply.status == status
        assert len(seen.completed) == completed

    # -- configuration ----------------------------------------------------------------------

    def test_secret_with_trailing_newline_is_stripped(self) -> None:
        receiver, seen = self.build(secret=SECRET + "\n")
        body = event_body()
        assert self.send(receiver, body, signed(body, SECRET)).status == 200
        assert len(seen.completed) == 1

    # -- body -------------------------------------------------------------------------------

    @pytest.mark.parametrize("form", ["pretty", "reordered", "escaped"])
    def test_any_json_spelling_is_verified_over_the_raw_bytes(self, form: str) -> None:
        receiver, seen = self.build()
        payload = json.loads(event_body(agent_name="Caf\xe9 Bot"))
        if form == "pretty":
            body = json.dumps(payload, indent=4).encode()
        elif form == "reordered":
            body = json.dumps(dict(reversed(payload.items())), sort_keys=True).encode()
        else:
            body = json.dumps(payload, ensure_ascii=True).encode()
            assert b"\\u00e9" in body
        assert self.send(receiver, body, signed(body)).status == 200
        (event,) = seen.completed
        assert event.data.agent_name == "Caf\xe9 Bot"

    def test_reserialised_body_with_the_original_signature_is_refused(self) -> None:
        receiver, seen = self.build()
        original = json.dumps(json.loads(event_body()), indent=2).encode()
        reserialised = json.dumps(json.loads(original), separators=(",", ":")).encode()
        self.refused(self.send(receiver, reserialised, signed(original)), seen, 401)

    @pytest.mark.parametrize("tamper", ["flip-byte", "append-newline", "truncate"])
    def test_tampered_body_is_refused(self, tamper: str) -> None:
        receiver, seen = self.build()
        body = event_body()
        headers = signed(body)
        if tamper == "flip-byte":
            position = body.index(b"run_1") + 4
            body = body[:position] + bytes([body[position] ^ 1]) + body[position + 1 :]
        elif tamper == "append-newline":
            body += b"\n"
        else:
            body = body[:-1]
        self.refused(self.send(receiver, body, headers), seen, 401)

    def test_non_utf8_body(self) -> None:
        receiver, seen = self.build()
        body = b'{"event": "run.completed", "x": "\xff\xfe\xc3"}'
        self.refused(self.send(receiver, body, signed(b"something else")), seen, 401)
        self.refused(self.send(receiver, body, signed(body)), seen, 400)

    def test_utf8_bom_is_accepted(self) -> None:
        # Documented choice: one leading BOM is ignored (Windows tools write one), the
        # signature still covers the bytes as received, BOM included.
        receiver, seen = self.build()
        body = b"\xef\xbb\xbf" + event_body()
        assert self.send(receiver, body, signed(body)).status == 200
        assert len(seen.completed) == 1

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param(b"", id="empty"),
            pytest.param(b'{"event": "run.completed", "data": {', id="truncated"),
            pytest.param(b"{'event': 'run.completed'}", id="single-quotes"),
            pytest.param(b"[]", id="array"),
            pytest.param(b"null", id="null"),
            pytest.param(b'"x"', id="string"),
            pytest.param(b"1", id="number"),
            pytest.param(b'{"event": "run.completed"}', id="no-data-no-timestamp"),
        ],
    )
    def test_authentic_but_not_an_event(self, body: bytes) -> None:
        receiver, seen = self.build()
        self.refused(self.send(receiver, body, signed(body)), seen, 400)
        self.refused(self.send(receiver, body, signed(body, "not-the-secret")), seen, 401)

    def test_duplicate_event_keys_last_one_wins(self) -> None:
        receiver, seen = self.build()
        body = event_body("run.failed", run_id="run_dup").replace(
            b'"event":"run.failed"', b'"event":"run.completed","event":"run.failed"'
        )
        assert body.count(b'"event"') == 2
        assert self.send(receiver, body, signed(body)).status == 200
        assert [e.event for e in seen.failed] == ["run.failed"]
        assert seen.completed == []

    @pytest.mark.parametrize("where", ["in-output", "top-level"])
    def test_very_deep_nesting_is_refused(self, where: str) -> None:
        receiver, seen = self.build()
        deep = b"[" * 100_000 + b"]" * 100_000
        if where == "in-output":
            body = event_body(output={"deep": "@"}).replace(b'"@"', deep)
        else:
            body = deep
        self.refused(self.send(receiver, body, signed(body)), seen, 400)

    @pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
    def test_non_finite_numbers_are_refused(self, constant: str) -> None:
        # Documented choice: strict JSON (RFC 8259). Python's json.dumps writes these, the
        # platform's JSON does not; a 400 says so instead of storing a float nan.
        receiver, seen = self.build()
        body = event_body(output={"score": "@"}).replace(b'"@"', constant.encode())
        score = json.loads(body)["data"]["output"]["score"]  # Python's json takes it
        assert repr(score) == repr(float(constant))
        self.refused(self.send(receiver, body, signed(body)), seen, 400)

    @pytest.mark.parametrize(("literal", "value"), [("1e400", "inf"), ("-1e999", "-inf")])
    def test_a_float_beyond_double_range_reads_as_infinity(self, literal: str, value: str) -> None:
        # Documented choice: valid JSON whose range RFC 8259 leaves to the implementation;
        # read as JavaScript and Python's json read it.
        receiver, seen = self.build()
        body = event_body(output={"score": "@"}).replace(b'"@"', literal.encode())
        assert self.send(receiver, body, signed(body)).status == 200
        assert seen.completed[0].data.output["score"] == float(value)

    @pytest.mark.parametrize(
        "digits",
        ["7" * 4300, "-" + "9" * 4300, "123456789012345678901234567890", "-9223372036854775809"],
        ids=["4300-digits", "minus-4300-digits", "30-digits", "below-int64"],
    )
    def test_huge_integer_inside_output_is_kept_exact(self, digits: str) -> None:
        # Documented choice: integers are exact up to 4300 digits (Python's own limit for
        # turning an int into text, so a handler can print and store every one it gets).
        receiver, seen = self.build()
        body = event_body(output={"big": "@", "small": 1}).replace(b'"@"', digits.encode())
        assert self.send(receiver, body, signed(body)).status == 200
        (event,) = seen.completed
        assert str(event.data.output["big"]) == digits
        assert event.data.output["small"] == 1

    @pytest.mark.parametrize("where", ["output", "duration_ms", "key-order-last"])
    @pytest.mark.parametrize(
        "number",
        [
            pytest.param("7" * 4301, id="4301-digits"),
            pytest.param("7" * 100_000, id="100000-digits"),
            pytest.param("-" + "7" * 1_000_000, id="1000000-digits"),
            pytest.param("1" * 5000 + "e-5000", id="5000-digit-mantissa"),
        ],
    )
    def test_absurd_numbers_are_a_fast_400(self, number: str, where: str) -> None:
        # Refused as the parser reads them, before any conversion (converting a million
        # digits to an int is quadratic: tens of seconds). No timing here: benchmarks.
        receiver, seen = self.build()
        if where == "duration_ms":
            body = event_body(duration_ms=0).replace(b'"duration_ms":0', b'"duration_ms":@')
        elif where == "output":
            body = event_body(output={"n": "@"})
        else:
            body = event_body()[:-1] + b',"zz":"@"}'
        body = body.replace(b'"@"', number.encode()).replace(b":@", b":" + number.encode())
        assert number.encode() in body
        self.refused(self.send(receiver, body, signed(body)), seen, 400)

    def test_long_fractions_and_exponents_are_read_as_the_nearest_double(self) -> None:
        # Only the digits before the point are bounded: the rest costs no more than reading.
        receiver, seen = self.build()
        body = event_body(output={"a": "@", "b": "@@"})
        body = body.replace(b'"@"', b"0." + b"1" * 100_000)
        body = body.replace(b'"@@"', b"1e-" + b"9" * 100_000)
        assert self.send(receiver, body, signed(body)).status == 200
        assert seen.completed[0].data.output == {"a": 0.1111111111111111, "b": 0.0}

    @pytest.mark.parametrize(
        "text",
        [
            pytest.param('"\\ud83d"', id="lone-high"),
            pytest.param('"\\ude00"', id="lone-low"),
            pytest.param('"\\ude00\\ud83d"', id="reversed-pair"),
            pytest.param('"ok \\ud83d\\u0041"', id="high-then-non-low"),
            # Whatever else the body holds: long digit runs once sent bodies to another
            # parser that took lone surrogates.
            pytest.param(
                '"https://x.example/status/1234567890123456789 \\ud83d"', id="digits-in-url"
            ),
            pytest.param('["\\ud800", 123456789012345678901234567890]', id="next-to-a-big-int"),
        ],
    )
    @pytest.mark.parametrize("where", ["value", "key", "run_id"])
    def test_lone_surrogate_escapes_are_refused(self, text: str, where: str) -> None:
        # A string with a lone surrogate cannot be encoded as UTF-8: no store could record
        # its key and no handler could write it anywhere. Refused on every path.
        receiver, seen = self.build()
        string = text.split(",")[0].strip("[")  # a key or a run_id is one string
        if where == "run_id":
            body = event_body(run_id="@").replace(b'"@"', string.encode())
        elif where == "key":
            body = event_body(output={"@": 1}).replace(b'"@"', string.encode())
        else:
            body = event_body(output={"text": "@"}).replace(b'"@"', text.encode())
        # Python's json takes it, and gives a str that cannot be encoded.
        decoded = json.dumps(json.loads(body), ensure_ascii=False)
        with pytest.raises(UnicodeEncodeError):
            decoded.encode("utf-8")
        self.refused(self.send(receiver, body, signed(body)), seen, 400)

    def test_nesting_up_to_the_limit_is_accepted(self) -> None:
        # Documented limit: 200 levels, the envelope counted (3 of them here).
        receiver, seen = self.build()
        depth = 197
        nested = b'{"a":' * depth + b"1" + b"}" * depth
        body = event_body(output={"deep": "@"}).replace(b'"@"', nested)
        assert self.send(receiver, body, signed(body)).status == 200
        assert len(seen.completed) == 1

    def test_integer_run_id_beyond_64_bits(self) -> None:
        receiver, seen = self.build()
        body = event_body(run_id=123456789012345678901234567890)
        assert self.send(receiver, body, signed(body)).status == 200
        assert seen.completed[0].data.run_id == "123456789012345678901234567890"

    @pytest.mark.parametrize(
        ("path", "value"),
        [
            (("data", "run_id"), None),
            (("data", "run_id"), ["run_1"]),
            (("data", "run_id"), {"id": 1}),
            (("data", "run_id"), True),
            (("timestamp",), None),
            (("timestamp",), "yesterday"),
            (("timestamp",), ["2025-01-15T10:00:15Z"]),
            (("data",), None),
            (("data",), "run_1"),
        ],
    )
    def test_missing_or_wrong_type_field(self, path: tuple[str, ...], value: Any) -> None:
        receiver, seen = self.build()
        payload = json.loads(event_body())
        parent = payload
        for key in path[:-1]:
            parent = parent[key]
        if value is None:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        body = json.dumps(payload).encode()
        reply = self.send(receiver, body, signed(body))
        self.refused(reply, seen, 400)
        assert path[-1] in reply.json()["error"]  # names the field, never echoes its value

    def test_unknown_event_reaches_only_the_catch_all(self) -> None:
        receiver, seen = self.build()
        body = event_body("run.cancelled", reason="user", extra={"nested": [1, 2]})
        assert self.send(receiver, body, signed(body)).status == 200
        assert seen.completed == []
        assert seen.failed == []
        (event,) = seen.every
        assert isinstance(event, UnknownEvent)
        assert event.event == "run.cancelled"
        assert event.run_id == "run_1"
        assert event.data["reason"] == "user"

    def test_extra_fields_are_accepted(self) -> None:
        receiver, seen = self.build()
        payload = json.loads(event_body(new_field="x"))
        payload["delivery_attempt"] = 3
        body = json.dumps(payload).encode()
        assert self.send(receiver, body, signed(body)).status == 200
        (event,) = seen.completed
        assert event.data.model_extra == {"new_field": "x"}

    def test_body_over_the_limit_is_refused(self) -> None:
        receiver, seen = self.build(max_body_size=2048)
        body = event_body(output={"text": "x" * 4096})
        self.refused(self.send(receiver, body, signed(body)), seen, 413)

    def test_body_at_the_limit_is_accepted(self) -> None:
        body = event_body(output={"text": "x" * 4096})
        receiver, seen = self.build(max_body_size=len(body))
        assert self.send(receiver, body, signed(body)).status == 200
        assert len(seen.completed) == 1

    def test_content_length_over_the_limit_is_refused_before_reading(self) -> None:
        receiver, seen = self.build(max_body_size=1024)
        body = Tripwire([b"x" * 1024] * 4)
        headers = [*signed(b"x" * 4096), ("Content-Length", str(10**9))]
        self.refused(self.send_stream(receiver, body, headers), seen, 413)
        assert body.pulled == 0

    @pytest.mark.parametrize(
        "declared",
        [
            pytest.param("0" * 20 + "4096", id="20-leading-zeros"),
            pytest.param("0" * 1000 + "4096", id="1000-leading-zeros"),
            pytest.param("9" * 30, id="30-digits"),
        ],
    )
    def test_content_length_with_leading_zeros_is_refused_before_reading(
        self, declared: str
    ) -> None:
        receiver, seen = self.build(max_body_size=1024)
        body = Tripwire([b"x" * 1024] * 4)
        headers = [*signed(b"x" * 4096), ("Content-Length", declared)]
        self.refused(self.send_stream(receiver, body, headers), seen, 413)
        assert body.pulled == 0

    def test_chunked_body_over_the_limit_stops_reading_at_the_limit(self) -> None:
        receiver, seen = self.build(max_body_size=4096)
        body = Tripwire([b" " * 1024] * 64)
        self.refused(self.send_stream(receiver, body, signed(b" " * 65536)), seen, 413)
        assert 4096 < body.pulled <= 4096 + 1024

    def test_chunked_authentic_body_is_accepted(self) -> None:
        receiver, seen = self.build()
        payload = event_body(output={"text": "y" * 10_000})
        self._remember(payload)
        chunks = [payload[i : i + 1000] for i in range(0, len(payload), 1000)]
        reply = self.send_stream(receiver, Tripwire(chunks), signed(payload))
        assert reply.status == 200
        assert seen.completed[0].data.output["text"] == "y" * 10_000

    @pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP"])
    def test_content_encoding_is_refused(self, encoding: str) -> None:
        receiver, seen = self.build()
        body = event_body()
        headers = [*signed(body), ("Content-Encoding", encoding)]
        self.refused(self.send(receiver, body, headers), seen, 415)

    def test_identity_content_encoding_is_accepted(self) -> None:
        receiver, seen = self.build()
        body = event_body()
        headers = [*signed(body), ("Content-Encoding", "identity")]
        assert self.send(receiver, body, headers).status == 200
        assert len(seen.completed) == 1

    @pytest.mark.parametrize(
        "content_type",
        [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=xyz",
            "application/json; charset=latin-1",
            None,
        ],
    )
    def test_content_type_does_not_matter(self, content_type: str | None) -> None:
        # A framework that parsed this as a form would consume or re-encode the body and
        # the signature would fail: a 200 shows the raw bytes were verified.
        receiver, seen = self.build()
        body = event_body()
        headers = [(SIGNATURE_HEADER, sign(body, SECRET))]
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        assert self.send(receiver, body, headers).status == 200
        assert len(seen.completed) == 1

    @pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
    def test_other_methods_are_refused(self, method: str) -> None:
        receiver, seen = self.build()
        body = event_body()
        reply = self.send(receiver, body, signed(body), method=method)
        self.refused(reply, seen, 405)
        assert reply.headers["allow"] == "POST"

    # -- delivery ---------------------------------------------------------------------------

    def test_handler_failure_is_a_500_and_the_retry_runs_it_again(self) -> None:
        receiver, seen = self.build()
        seen.failures_left = 1
        body = event_body()
        first = self.send(receiver, body, signed(body))
        assert first.status == 500
        assert first.json() == {"error": "Handler failed"}
        assert (seen.attempts, seen.completed, seen.every) == (1, [], [])
        second = self.send(receiver, body, signed(body))
        assert second.status == 200
        assert second.json() == {"received": True}
        assert seen.attempts == 2
        assert (len(seen.completed), len(seen.every)) == (1, 1)

    def test_duplicate_delivery_is_acknowledged_and_handled_once(self) -> None:
        receiver, seen = self.build()
        body = event_body()
        first = self.send(receiver, body, signed(body))
        second = self.send(receiver, body, signed(body))
        assert (first.status, second.status) == (200, 200)
        assert second.json() == {"received": True, "duplicate": True}
        assert (len(seen.completed), len(seen.every)) == (1, 1)

    def test_same_run_with_another_spelling_is_still_a_duplicate(self) -> None:
        receiver, seen = self.build()
        body = event_body()
        pretty = json.dumps(json.loads(body), indent=2).encode()
        assert self.send(receiver, body, signed(body)).status == 200
        assert self.send(receiver, pretty, signed(pretty)).json()["duplicate"] is True
        assert len(seen.completed) == 1

    def test_completed_and_failed_of_one_run_are_distinct_events(self) -> None:
        receiver, seen = self.build()
        for name in ("run.completed", "run.failed"):
            body = event_body(name, run_id="run_same")
            assert self.send(receiver, body, signed(body)).json() == {"received": True}
        assert (len(seen.completed), len(seen.failed), len(seen.every)) == (1, 1, 2)

    def test_without_replay_window_an_old_event_is_accepted(self) -> None:
        receiver, seen = self.build(max_age=None)
        body = event_body(timestamp="2001-01-01T00:00:00Z")
        assert self.send(receiver, body, signed(body)).status == 200
        assert len(seen.completed) == 1

    def test_replay_window_boundary(self) -> None:
        receiver, seen = self.build(max_age=timedelta(hours=1))
        from datetime import datetime, timezone

        recent = datetime.now(timezone.utc) - timedelta(minutes=59)
        old = datetime.now(timezone.utc) - timedelta(minutes=61)
        body = event_body(timestamp=recent.isoformat(), run_id="run_recent")
        assert self.send(receiver, body, signed(body)).status == 200
        body = event_body(timestamp=old.isoformat(), run_id="run_old")
        self.refused_after(self.send(receiver, body, signed(body)), seen, 400, 1)
