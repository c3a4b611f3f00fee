"""Per-event cost of ``Receiver.handle`` against the floor and other verifiers, in one run.

Every variant runs on the same signed bodies, interleaved round by round (the order rotates
each round), so a noisy machine slows them all alike and the ratios stay meaningful. Each
``handle`` call gets a body it has never seen (a fresh ``run_id``), so the duplicate
short-cut is never timed.

    python -m benchmarks.bench_core            # full run, about 2 minutes
    python -m benchmarks.bench_core --quick    # a rough run, under 30 seconds
    python -m benchmarks.bench_core --profile "1 MB"   # pyinstrument profile of handle
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import hmac
import json
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import orjson
import pydantic_core
import stripe
from standardwebhooks import Webhook

from benchmarks.payloads import KEY, SECRET, SIZES, Signed, distinct_bodies
from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.events import parse_json

# Rounds x events per round, per size: enough rounds for a stable median, few enough
# events that the whole run stays bounded.
PLAN_FULL = {
    "1 KB": (40, 200),
    "100 KB": (30, 10),
    "100 KB text": (30, 10),
    "100 KB id records": (30, 10),
    "1 MB": (20, 2),
    "1 MB string": (20, 2),
}
PLAN_QUICK = {
    "1 KB": (10, 100),
    "100 KB": (8, 5),
    "100 KB text": (8, 5),
    "100 KB id records": (8, 5),
    "1 MB": (6, 1),
    "1 MB string": (6, 1),
}

STRIPE_SECRET = "whsec_benchmark"
SW_SECRET = base64.b64encode(b"benchmark-standard-webhooks-key!").decode()

Variant = Callable[[Signed], Any]


def _floor(s: Signed) -> Any:
    expected = hmac.new(KEY, s.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, s.signature)


def _floor_validate_json(s: Signed) -> Any:
    _floor(s)
    return RunCompleted.model_validate_json(s.body)


def _floor_orjson_validate(s: Signed) -> Any:
    _floor(s)
    return RunCompleted.model_validate(orjson.loads(s.body))


def _floor_pydantic_core_validate(s: Signed) -> Any:
    _floor(s)
    return RunCompleted.model_validate(pydantic_core.from_json(s.body))


def _floor_our_parse_validate(s: Signed) -> Any:
    _floor(s)
    return RunCompleted.model_validate(parse_json(s.body))


def _floor_json_validate(s: Signed) -> Any:
    _floor(s)
    return RunCompleted.model_validate(json.loads(s.body))


def build_variants(bodies: list[Signed]) -> dict[str, Variant]:
    """The compared callables; third-party verifiers get headers signed their way, up front."""
    receiver = Receiver(secret=SECRET)  # the default MemoryStore, journal on
    unjournaled = Receiver(secret=SECRET, journal=False)

    @receiver.on("run.completed")
    @unjournaled.on("run.completed")
    def noop(event: RunCompleted[Any]) -> None:
        pass

    def checked(r: Receiver) -> Variant:
        def handle(s: Signed) -> Any:
            response = r.handle(s.body, s.headers)
            if response.status != 200 or b"duplicate" in response.body:
                raise RuntimeError(f"handle answered {response.status} {response.body!r}")
            return response

        return handle

    webhook = Webhook(SW_SECRET)
    now = datetime.now(timezone.utc)
    sw_headers: dict[bytes, dict[str, str]] = {}
    stripe_headers: dict[bytes, str] = {}
    for n, s in enumerate(bodies):
        text = s.body.decode()
        sw_headers[s.body] = {
            "webhook-id": f"msg_{n}",
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": webhook.sign(f"msg_{n}", now, text),
        }
        t = int(time.time())
        digest = hmac.new(STRIPE_SECRET.encode(), f"{t}.{text}".encode(), hashlib.sha256)
        stripe_headers[s.body] = f"t={t},v1={digest.hexdigest()}"

    def standard_webhooks(s: Signed) -> Any:
        return webhook.verify(s.body, sw_headers[s.body])

    def stripe_construct_event(s: Signed) -> Any:
        return stripe.Webhook.construct_event(s.body, stripe_headers[s.body], STRIPE_SECRET)

    return {
        "floor: HMAC + compare": _floor,
        "floor + pydantic model_validate_json": _floor_validate_json,
        "floor + orjson.loads + model_validate": _floor_orjson_validate,
        "floor + pydantic_core.from_json + model_validate": _floor_pydantic_core_validate,
        "floor + json.loads + model_validate": _floor_json_validate,
        "floor + flymy parse_json + model_validate": _floor_our_parse_validate,
        "standardwebhooks Webhook.verify": standard_webhooks,
        "stripe Webhook.construct_event": stripe_construct_event,
        "Receiver.handle": checked(receiver),
        "Receiver.handle, journal off": checked(unjournaled),
    }


TYPED_PARSES = (
    "floor + pydantic model_validate_json",
    "floor + orjson.loads + model_validate",
    "floor + pydantic_core.from_json + model_validate",
    "floor + json.loads + model_validate",
)


def measure(label: str, rounds: int, per_round: int) -> dict[str, float]:
    """Median µs per event of every variant for one body size."""
    output = SIZES[label]()
    *bodies, warm_up = distinct_bodies(output, rounds * per_round + 1)
    variants = build_variants([*bodies, warm_up])
    for variant in variants.values():  # a body handle never sees again
        variant(warm_up)
    return interleaved(variants, bodies, rounds, per_round)


def interleaved(
    variants: dict[str, Callable[[Any], Any]], bodies: list[Any], rounds: int, per_round: int
) -> dict[str, float]:
    """Median µs per body of each variant, timed round by round with the order rotating, so
    that a busy moment of the machine slows every variant alike."""
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        batch = bodies[r * per_round : (r + 1) * per_round]
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            variant = variants[name]
            gc.collect()
            start = time.perf_counter()
            for s in batch:
                variant(s)
            samples[name].append((time.perf_counter() - start) / per_round * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def report(results: dict[str, dict[str, float]]) -> str:
    labels = list(results)
    size_of = {label: len(distinct_bodies(SIZES[label](), 1)[0].body) for label in labels}
    lines = [
        "| µs per event (median) | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
        "| body bytes | " + " | ".join(f"{size_of[label]:,}" for label in labels) + " |",
    ]
    for name in results[labels[0]]:
        cells = [_fmt(results[label][name]) for label in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| ratio | " + " | ".join(labels) + " | target |")
    lines.append("|---|" + "---:|" * len(labels) + "---|")
    best = {label: min(results[label][name] for name in TYPED_PARSES) for label in labels}
    cells = [f"{results[label]['Receiver.handle'] / best[label]:.2f}" for label in labels]
    lines.append("| handle / (floor + fastest typed parse) | " + " | ".join(cells) + " | - |")
    cells = [_ratio(results[label], "floor + pydantic model_validate_json") for label in labels]
    lines.append(
        "| handle / (floor + pydantic model_validate_json) | " + " | ".join(cells) + " | ≤ 1.2 |"
    )
    cells = [_ratio(results[label], "standardwebhooks Webhook.verify") for label in labels]
    lines.append("| handle / standardwebhooks verify | " + " | ".join(cells) + " | ≤ 1.0 at 1 KB |")
    off = "Receiver.handle, journal off"
    cells = [_ratio(results[label], "standardwebhooks Webhook.verify", off) for label in labels]
    lines.append(
        "| handle, journal off / standardwebhooks verify | "
        + " | ".join(cells)
        + " | ≤ 1.0 at 1 KB |"
    )
    cells = [_ratio(results[label], "stripe Webhook.construct_event") for label in labels]
    lines.append("| handle / stripe construct_event | " + " | ".join(cells) + " | - |")
    fastest = [
        min(TYPED_PARSES, key=lambda name, label=label: results[label][name]) for label in labels
    ]
    lines.append("")
    lines.append(
        "Fastest typed parse: "
        + "; ".join(
            f"{label}: {name.removeprefix('floor + ')}"
            for label, name in zip(labels, fastest, strict=True)
        )
    )
    return "\n".join(lines)


def _ratio(medians: dict[str, float], other: str, ours: str = "Receiver.handle") -> str:
    return f"{medians[ours] / medians[other]:.2f}"


def _fmt(us: float) -> str:
    return f"{us:,.1f}" if us < 100 else f"{us:,.0f}"


def profile(label: str) -> None:
    """Profile ``Receiver.handle`` alone on one size with pyinstrument."""
    from pyinstrument import Profiler

    rounds, per_round = PLAN_FULL[label]
    bodies = distinct_bodies(SIZES[label](), rounds * per_round * 5)
    handle = build_variants(bodies[:1])["Receiver.handle"]
    profiler = Profiler(interval=0.0001)
    with profiler:
        for s in bodies:
            handle(s)
    print(profiler.output_text(unicode=True, color=False, show_all=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, under 30 s")
    parser.add_argument("--sizes", nargs="*", choices=list(SIZES), help="only these sizes")
    parser.add_argument("--profile", choices=list(SIZES), help="profile handle on one size")
    parser.add_argument("--json", help="also write the medians to this JSON file")
    args = parser.parse_args()
    if args.profile:
        profile(args.profile)
        return
    plan = PLAN_QUICK if args.quick else PLAN_FULL
    started = time.monotonic()
    results = {}
    for label in args.sizes or list(SIZES):
        results[label] = measure(label, *plan[label])
    print(report(results))
    print(f"\n({time.monotonic() - started:.0f} s, {'quick' if args.quick else 'full'} run)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
