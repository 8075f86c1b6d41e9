"""The peer's Prometheus metrics (``--metrics-port``): prometheus_client's exposition (HELP and TYPE lines,
its content type) of the peer's statistics, read at scrape time on the peer's event loop."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PATH = "/metrics"

# (metric name without the swarmllm_peer_ prefix, how to read it from statistics(), help)
GAUGES: list[tuple[str, Callable[[dict], float], str]] = [
    ("sessions", lambda s: s["sessions"], "Inference sessions open on this peer."),
    ("cache_tokens_used", lambda s: s["cache_tokens_total"] - s["cache_tokens_left"],
     "KV-cache tokens (per block) reserved by open sessions."),
    ("cache_tokens_total", lambda s: s["cache_tokens_total"], "KV-cache budget, tokens per block."),
    ("throughput_steps_per_second", lambda s: s["throughput"], "Single-token steps per second it announces."),
    ("prefix_cache_tokens", lambda s: s["prefix_cache_tokens"],
     "Cache tokens charged to kept prefixes of finished sessions."),
]
COUNTERS: list[tuple[str, Callable[[dict], float], str]] = [
    ("requests", lambda s: s["requests_served"], "Steps answered."),
    ("tokens", lambda s: s["tokens_computed"], "Tokens x rows computed through the blocks."),
    ("pushes_sent", lambda s: s["pushes_sent"], "Steps pushed to the next peer of a route."),
    ("pushes_failed", lambda s: s["pushes_failed"], "Pushes that failed (the client relayed them)."),
    ("pushes_received", lambda s: s["pushes_received"], "Steps received from the previous peer of a route."),
    ("batched_steps", lambda s: s["batched_steps"], "Session steps that shared a forward pass with others."),
    ("prefix_tokens_reused", lambda s: s["prefix_tokens_reused"], "Tokens x rows copied from kept prefixes."),
    ("backward_tokens", lambda s: s["backward_tokens"], "Tokens x rows whose input gradient was computed."),
]


class _Collector:
    def __init__(self, statistics: Callable[[], dict[str, Any]], also: Callable[[], Sequence[CollectorRegistry]]):
        self.statistics, self.also = statistics, also

    def collect(self) -> Iterator:
        stats = self.statistics()
        for name, read, text in GAUGES:
            yield GaugeMetricFamily(f"swarmllm_peer_{name}", text, value=float(read(stats)))
        for name, read, text in COUNTERS:
            yield CounterMetricFamily(f"swarmllm_peer_{name}", text, value=float(read(stats)))
        errors = CounterMetricFamily("swarmllm_peer_errors", "Typed errors sent, by code.", labels=["code"])
        for code, n in sorted(stats["errors"].items()):
            errors.add_metric([code], float(n))
        yield errors
        for reg in self.also():  # histograms kept elsewhere (the step phases: wire/phases.py)
            yield from reg.collect()


def registry(statistics: Callable[[], dict[str, Any]],
             also: Callable[[], Sequence[CollectorRegistry]] = tuple) -> CollectorRegistry:
    """A registry whose only collector reads ``statistics()`` at each scrape, then the metrics of the
    registries ``also()`` returns then."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(statistics, also))
    return reg


def exposition(reg: CollectorRegistry) -> tuple[bytes, str]:
    """(the body, its content type) for a scrape."""
    return generate_latest(reg), CONTENT_TYPE_LATEST
