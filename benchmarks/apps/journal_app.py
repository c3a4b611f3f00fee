"""Flask with an SQLite store, the journal on at one URL and off at another:
``BENCH_SQLITE_DIR=/tmp/x gunicorn benchmarks.apps.journal_app:app``."""

from __future__ import annotations

import os
from pathlib import Path

from flask import Flask

from benchmarks.apps.common import make_receiver
from flymy_receiver.flask import blueprint
from flymy_receiver.stores import SQLiteStore

JOURNAL_ON, JOURNAL_OFF = "/journal-on", "/journal-off"

_directory = Path(os.environ["BENCH_SQLITE_DIR"])
app = Flask(__name__)
# One file each, so that neither endpoint's rows make the other's transactions bigger.
on = make_receiver(store=SQLiteStore(_directory / "journal-on.sqlite3"))
off = make_receiver(store=SQLiteStore(_directory / "journal-off.sqlite3"), journal=False)
app.register_blueprint(blueprint(on, url=JOURNAL_ON, name="journal_on"))
app.register_blueprint(blueprint(off, url=JOURNAL_OFF, name="journal_off"))
