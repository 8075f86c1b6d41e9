"""What a run measures, counted only inside the measurement window [warmup, end).

Tokens are credited where they were decoded: a stretch of a session at a constant per-token latency L
from t0 to t1 decoded (t1 - t0) / L tokens, spread evenly over that stretch. Latency percentiles are
token-weighted (each decoded token is one sample of its per-token latency), from a log-spaced histogram.
"""

from __future__ import annotations

import numpy as np

LAT_MIN, LAT_MAX, LAT_BINS = 1e-3, 1e3, 1200  # seconds, log-spaced


class Metrics:
    def __init__(self, warmup: float, end: float, bin_seconds: float):
        self.warmup, self.end, self.bin = warmup, end, bin_seconds
        self.edges = np.logspace(np.log10(LAT_MIN), np.log10(LAT_MAX), LAT_BINS + 1)
        self.latency = np.zeros(LAT_BINS)  # tokens per latency bin
        self.series_tokens = np.zeros(int(np.ceil(end / bin_seconds)))  # tokens decoded per time bin
        self.tokens = 0.0
        self.failovers = self.moves = self.aborted = self.completed = self.plans = 0
        self.uncovered = 0.0  # seconds with some block served by no online peer
        self.samples: list[tuple[float, float, float, int, float]] = []  # t, min, mean strength, online, load

    def window(self, t0: float, t1: float) -> float:
        """Seconds of [t0, t1) inside the measurement window."""
        return max(0.0, min(t1, self.end) - max(t0, self.warmup))

    def measured(self, t: float) -> bool:
        return self.warmup <= t < self.end

    def decode(self, t0: float, t1: float, tokens: float, latency: float) -> None:
        if tokens <= 0 or t1 <= t0:
            return
        inside = tokens * self.window(t0, t1) / (t1 - t0)
        if inside <= 0:
            return
        self.tokens += inside
        self.latency[self._bin(latency)] += inside
        per_second = tokens / (t1 - t0)
        first, last = int(t0 // self.bin), int(min(t1, self.end - 1e-9) // self.bin)
        for b in range(max(first, 0), min(last, len(self.series_tokens) - 1) + 1):
            self.series_tokens[b] += per_second * max(0.0, min(t1, (b + 1) * self.bin) - max(t0, b * self.bin))

    def stall(self, t: float, latency: float) -> None:
        """One token that waited ``latency`` seconds (a failover's stall included)."""
        if self.measured(t):
            self.latency[self._bin(latency)] += 1.0

    def _bin(self, latency: float) -> int:
        return int(np.clip(np.searchsorted(self.edges, latency) - 1, 0, LAT_BINS - 1))

    def percentile(self, q: float) -> float:
        cum = np.cumsum(self.latency)
        if cum[-1] <= 0:
            return float("nan")
        i = int(np.searchsorted(cum, q / 100 * cum[-1]))
        return float(np.sqrt(self.edges[i] * self.edges[i + 1]))  # the bin's geometric middle

    def summary(self) -> dict[str, float]:
        span = self.end - self.warmup
        return {
            "tokens_per_s": round(self.tokens / span, 3),
            "p50_latency_s": round(self.percentile(50), 4),
            "p99_latency_s": round(self.percentile(99), 4),
            "uncovered_fraction": round(self.uncovered / span, 5),
            "moves": self.moves,
            "failovers": self.failovers,
            "sessions_completed": self.completed,
            "sessions_aborted": self.aborted,
            "route_plans": self.plans,
        }
