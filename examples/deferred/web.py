"""The web app: ``gunicorn -w 2 -b 127.0.0.1:8000 web:app``."""

from __future__ import annotations

from flask import Flask

from flymy_receiver.flask import blueprint

from webhooks import receiver

app = Flask(__name__)
app.register_blueprint(blueprint(receiver, url="/webhooks/flymy"))
