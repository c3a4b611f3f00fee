"""The apps the end-to-end and memory benchmarks serve.

Each app serves the same events twice on one server: through this library's adapter at
``/webhooks/flymy`` and through a hand-written handler, like the platform's documented
example, at ``/hand``. Both acknowledge with ``{"received": true}`` after the signature
check and the JSON parse; neither does any other work.
"""
