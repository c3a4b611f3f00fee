"""Django: ``gunicorn benchmarks.apps.django_app:application`` (settings in this module)."""

from __future__ import annotations

import json

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="benchmark-only-not-secret",
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
    ],
    INSTALLED_APPS=[],
    USE_TZ=True,
    # The hand-written view reads request.body, which Django caps at 2.5 MB by default.
    DATA_UPLOAD_MAX_MEMORY_SIZE=None,
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402

from benchmarks.apps.common import authentic, make_receiver  # noqa: E402
from flymy_receiver.django import view  # noqa: E402


@csrf_exempt
def hand(request: HttpRequest) -> JsonResponse:
    body = request.body
    if not authentic(body, request.headers.get("X-FlyMyAI-Signature")):
        return JsonResponse({"error": "Invalid signature"}, status=401)
    event = json.loads(body)
    if event["event"] == "run.completed":
        pass  # the handler's work would go here
    return JsonResponse({"received": True})


urlpatterns = [path("webhooks/flymy", view(make_receiver())), path("hand", hand)]
application = get_wsgi_application()
