"""Without ``opentelemetry-api`` nothing of OpenTelemetry is imported, and deliveries work."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_no_opentelemetry_is_imported_when_it_is_missing() -> None:
    script = textwrap.dedent(
        """
        import sys
        for name in ("opentelemetry", "opentelemetry.trace", "opentelemetry.metrics"):
            sys.modules[name] = None  # as if opentelemetry-api were not installed
        from flymy_receiver import Receiver
        from flymy_receiver.testing import make_event, signed_request

        receiver = Receiver(secret="s")
        calls = []
        receiver.on("run.completed")(lambda event: calls.append(event))
        req = signed_request(make_event("run.completed"), secret="s")
        assert receiver.handle(req.body, req.headers).status == 200
        assert len(calls) == 1
        assert not receiver._telemetry.available
        loaded = [m for m, v in sys.modules.items() if m.startswith("opentelemetry") and v]
        assert loaded == [], loaded
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
