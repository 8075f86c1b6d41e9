"""Peers that failed recently, kept out of routes with exponential back-off (pure; the clock is injected)."""

from __future__ import annotations

import time
from typing import Callable


class BanList:
    def __init__(self, base: float = 2.0, factor: float = 2.0, cap: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self.base, self.factor, self.cap = base, factor, cap  # seconds, multiplier, seconds
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def fail(self, peer_id: str) -> float:
        """Record a failure; returns how many seconds the peer is now banned for."""
        k = self._failures.get(peer_id, 0)
        self._failures[peer_id] = k + 1
        duration = min(self.base * self.factor ** k, self.cap)
        self._until[peer_id] = self._clock() + duration
        return duration

    def succeed(self, peer_id: str) -> None:
        self._failures.pop(peer_id, None)
        self._until.pop(peer_id, None)

    def banned(self) -> frozenset[str]:
        now = self._clock()
        return frozenset(p for p, until in self._until.items() if until > now)

    def failures(self, peer_id: str) -> int:
        return self._failures.get(peer_id, 0)
