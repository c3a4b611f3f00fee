"""What telemetry costs per delivery: the same receiver with OpenTelemetry off, with the API
installed but no SDK configured, and with the SDK recording every span and metric (spans to
an exporter that drops them), interleaved round by round in one run.

    python -m benchmarks.bench_telemetry            # full run, about a minute
    python -m benchmarks.bench_telemetry --quick    # a rough run

Target (issue 19): the API without an SDK within 3 % of off.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from benchmarks.apps.common import make_receiver
from benchmarks.bench_core import interleaved
from benchmarks.payloads import SIZES, Signed, distinct_bodies
from flymy_receiver import Receiver, telemetry
from flymy_receiver.stores import MemoryStore

PLAN_FULL = {"1 KB": (40, 300), "100 KB": (20, 30)}
PLAN_QUICK = {"1 KB": (10, 150), "100 KB": (6, 10)}


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _sdk_api() -> Any:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(_Drop()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return telemetry._Api(tracer_provider=tracer_provider, meter_provider=meter_provider)


def _variants() -> dict[str, Callable[[Signed], Any]]:
    off = make_receiver(store=MemoryStore())
    off._telemetry = telemetry.Telemetry(None)
    api_only = make_receiver(store=MemoryStore())
    api_only._telemetry = telemetry.Telemetry(telemetry._Api())
    sdk = make_receiver(store=MemoryStore())
    sdk._telemetry = telemetry.Telemetry(_sdk_api())
    receivers: dict[str, Receiver] = {
        "off (no opentelemetry)": off,
        "API installed, no SDK": api_only,
        "SDK, spans dropped": sdk,
    }

    def variant(receiver: Receiver) -> Callable[[Signed], Any]:
        def handle(s: Signed) -> Any:
            response = receiver.handle(s.body, s.headers)
            if response.status != 200:
                raise RuntimeError(f"handle answered {response.status}")
            return response

        return handle

    return {name: variant(receiver) for name, receiver in receivers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    plan = PLAN_QUICK if args.quick else PLAN_FULL
    print("| µs per delivery (median) | " + " | ".join(plan) + " |")
    print("|---|" + "---:|" * len(plan))
    results = {}
    for label, (rounds, per_round) in plan.items():
        variants = _variants()
        bodies = distinct_bodies(SIZES[label](), rounds * per_round)
        results[label] = interleaved(variants, bodies, rounds, per_round)
    names = list(next(iter(results.values())))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[label][name]:.1f}" for label in plan) + " |")
    for name in names[1:]:
        cells = [f"{results[label][name] / results[label][names[0]]:.3f}" for label in plan]
        print(f"| ratio {name} / off | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
