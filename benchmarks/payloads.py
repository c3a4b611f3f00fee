"""Realistic ``run.completed`` bodies for the benchmarks, built once and signed up front.

An agent's output is modelled on what profiling and research agents return: nested objects,
lists of records, paragraphs of text, scores and counts. Sizes are approximate (within a few
per cent); every body carries a fresh ``run_id`` so that no delivery is a duplicate.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

import orjson

SECRET = "whsec-benchmark-secret"
KEY = SECRET.encode()
SIGNATURE_HEADER = "X-FlyMyAI-Signature"

KB = 1024
MB = 1024 * 1024

_WORDS = [
    "platform",
    "engineering",
    "team",
    "scaling",
    "hiring",
    "pipeline",
    "revenue",
    "growth",
    "series",
    "funding",
    "customers",
    "enterprise",
    "security",
    "compliance",
    "launch",
    "product",
    "roadmap",
    "integration",
    "cloud",
    "migration",
    "latency",
    "reliability",
    "observability",
    "budget",
    "quarter",
    "pilot",
    "renewal",
    "churn",
    "automation",
    "workflow",
    "onboarding",
    "analytics",
    "dashboard",
    "partner",
    "channel",
    "expansion",
    "region",
]


_FIRST = ("Dana", "Lee", "Ari", "Sam", "Noor")
_LAST = ("Kim", "Ortiz", "Novak")


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def _record(rng: random.Random, index: int) -> dict[str, Any]:
    """One research record: the unit realistic outputs repeat (about 1 KB of JSON)."""
    return {
        "id": f"lead_{index:06d}",
        "name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
        "company": {
            "name": f"Company {index}",
            "domain": f"company{index}.example",
            "employees": rng.randint(10, 50_000),
            "funding_usd": rng.randint(0, 10**9),
            "industries": [rng.choice(_WORDS) for _ in range(3)],
        },
        "score": round(rng.random() * 100, 3),
        "confidence": round(rng.random(), 4),
        "qualified": rng.random() > 0.5,
        "buying_triggers": [_sentence(rng, 4) for _ in range(3)],
        "background": _sentence(rng, 40),
        "sources": [
            {"url": f"https://news.example/{index}/{n}", "rank": n, "snippet": _sentence(rng, 8)}
            for n in range(2)
        ],
    }


def small_output(seed: int = 7) -> dict[str, Any]:
    """The documented lead profile, a little richer: a body of about 1 KB."""
    rng = random.Random(seed)
    return {
        "background": _sentence(rng, 40),
        "buying_triggers": [_sentence(rng, 3) for _ in range(3)],
        "outreach_angle": _sentence(rng, 12),
        "company": {"name": "Acme Robotics", "employees": 420, "funding_usd": 38_000_000},
        "score": 87.5,
        "confidence": 0.92,
        "sources": [{"url": "https://news.example/acme", "rank": 1}],
    }


@lru_cache(maxsize=8)
def realistic_output(size: int, seed: int = 7) -> dict[str, Any]:
    """A nested agent output whose JSON is about ``size`` bytes."""
    rng = random.Random(seed)
    output: dict[str, Any] = {
        "summary": _sentence(rng, 12),
        "outreach_angle": _sentence(rng, 10),
        "leads": [],
        "stats": {"searched": 0, "kept": 0, "elapsed_s": 12.5},
    }
    # Add records until the output is large enough (each record's size counted once).
    total = len(orjson.dumps(output))
    while total < size - 400:
        record = _record(rng, len(output["leads"]))
        output["leads"].append(record)
        total += len(orjson.dumps(record)) + 1
    output["stats"]["kept"] = len(output["leads"])
    output["stats"]["searched"] = 3 * len(output["leads"])
    return output


@lru_cache(maxsize=8)
def huge_string_output(size: int) -> dict[str, Any]:
    """An output that is one long markdown report (a single huge string)."""
    rng = random.Random(11)
    paragraphs = []
    total = 0
    while total < size - 400:
        paragraph = _sentence(rng, 30) + "\n\n"
        paragraphs.append(paragraph)
        total += len(paragraph) + 1  # the newline escapes grow in JSON
    return {"report": "".join(paragraphs)[: size - 400]}


@lru_cache(maxsize=8)
def text_output(size: int) -> dict[str, Any]:
    """What agents mostly return: a few small fields and one long markdown text field."""
    rng = random.Random(5)
    paragraphs = []
    total = 0
    while total < size - 600:
        paragraph = _sentence(rng, 30) + "\n\n"
        paragraphs.append(paragraph)
        total += len(paragraph) + 2  # each newline is escaped in JSON
    return {
        "summary": _sentence(rng, 12),
        "report": "".join(paragraphs),
        "score": 0.9,
        "sources": [{"url": "https://news.example/acme", "rank": 1}],
    }


@lru_cache(maxsize=8)
def id_records_output(size: int) -> dict[str, Any]:
    """Records whose ids and URLs hold 19-digit (snowflake) ids, as strings: the body that
    used to fall back to the standard library parser."""
    rng = random.Random(9)
    output: dict[str, Any] = {"items": []}
    total = 0
    while total < size - 400:
        status = rng.randrange(10**18, 9 * 10**18)
        record = {
            "id": str(status),
            "url": f"https://social.example/status/{status}",
            "author": f"https://social.example/u/{rng.randrange(10**18, 9 * 10**18)}",
            "text": _sentence(rng, 12),
            "likes": rng.randint(0, 10_000),
            "score": round(rng.random(), 4),
        }
        output["items"].append(record)
        total += len(orjson.dumps(record)) + 1
    return output


def envelope(output: Any, run_id: str | None = None) -> dict[str, Any]:
    return {
        "event": "run.completed",
        "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "data": {
            "run_id": run_id or f"run_{uuid.uuid4().hex}",
            "agent_id": "agent_abc123",
            "agent_name": "Sales Lead Profiler",
            "status": "done",
            "duration_ms": 14200,
            "input": {"name": "Dana Lee", "company": "Acme Robotics"},
            "output": output,
        },
    }


@dataclass(frozen=True)
class Signed:
    body: bytes
    signature: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json", SIGNATURE_HEADER: self.signature}


def sign(body: bytes) -> str:
    return hmac.new(KEY, body, hashlib.sha256).hexdigest()


def distinct_bodies(output: Any, count: int) -> list[Signed]:
    """``count`` signed bodies sharing ``output`` but each with its own ``run_id``.

    The output is serialised once and spliced in, so building large batches stays cheap.
    """
    marker = "__OUTPUT__"
    template = orjson.dumps(envelope(marker, run_id="run_PLACEHOLDER00000000000000000000000"))
    out = orjson.dumps(output)
    head, tail = template.split(b'"' + marker.encode() + b'"')
    bodies = []
    for _ in range(count):
        run_id = f"run_{uuid.uuid4().hex}".encode()
        body = head.replace(b"run_PLACEHOLDER00000000000000000000000", run_id) + out + tail
        bodies.append(Signed(body, sign(body)))
    return bodies


#: The bodies the issues ask for: label -> output factory.
SIZES: dict[str, Any] = {
    "1 KB": small_output,
    "100 KB": lambda: realistic_output(100 * KB),
    "100 KB text": lambda: text_output(100 * KB),
    "100 KB id records": lambda: id_records_output(100 * KB),
    "1 MB": lambda: realistic_output(1 * MB),
    "1 MB string": lambda: huge_string_output(1 * MB),
}
