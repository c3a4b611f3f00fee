"""An app for the inspector's tests: ``inspect --app tests.inspector.sample_app:receiver``.

``save_profile`` fails for the agent "Broken Agent" until a file named after the run id
exists in the folder ``SAMPLE_APP_FIX``: creating it is "deploying the fix" for that run,
after which Replay succeeds.
"""

from __future__ import annotations

import os
from pathlib import Path

from flymy_receiver import Receiver, RunCompleted, RunFailed

SECRET = "whsec-inspector-sample"

receiver = Receiver(secret=SECRET)


def fixed(run_id: str) -> bool:
    folder = os.environ.get("SAMPLE_APP_FIX")
    return bool(folder) and (Path(folder) / run_id).exists()


@receiver.on("run.completed")
def save_profile(event: RunCompleted) -> None:
    if event.data.agent_name == "Broken Agent" and not fixed(str(event.data.run_id)):
        raise RuntimeError("the CRM refused the profile")


@receiver.on("run.failed")
def note_failure(event: RunFailed) -> None:
    return None
