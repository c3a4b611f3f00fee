"""Flask: ``gunicorn benchmarks.apps.flask_app:app``."""

from __future__ import annotations

import json

from flask import Flask, jsonify, request

from benchmarks.apps.common import authentic, make_receiver
from flymy_receiver.flask import blueprint

app = Flask(__name__)
app.register_blueprint(blueprint(make_receiver(), url="/webhooks/flymy"))


@app.post("/hand")
def hand():  # type: ignore[no-untyped-def]
    body = request.get_data()
    if not authentic(body, request.headers.get("X-FlyMyAI-Signature")):
        return jsonify(error="Invalid signature"), 401
    event = json.loads(body)
    if event["event"] == "run.completed":
        pass  # the handler's work would go here
    return jsonify(received=True)
