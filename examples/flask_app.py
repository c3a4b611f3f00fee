"""The lead profiler webhook on Flask.

FLYMY_WEBHOOK_SECRET=... gunicorn --bind 127.0.0.1:8000 flask_app:app
"""

from __future__ import annotations

from flask import Flask

from flymy_receiver.flask import blueprint

from leads import make_receiver

app = Flask(__name__)
app.register_blueprint(blueprint(make_receiver(), url="/webhooks/flymy"))
