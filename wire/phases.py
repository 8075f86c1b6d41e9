"""Where a step's time goes: per-phase durations, kept by the peer and by the client under the names here.

Each side marks the end of each phase of a step on a ``Timeline``; ``Phases`` keeps every duration in a
prometheus_client ``Histogram`` (its own registry: the peer's ``/metrics`` includes it) and the last
``keep`` of each phase for ``summary()`` (count, mean, p50, p90 in milliseconds: the peer's statistics,
``bench.overhead``). Recording a phase costs about a microsecond; nothing here blocks.

Peer phases, in order (``PEER_PHASES``): ``decode`` (msgpack and tensor decoding of the message),
``queue`` (decoded until its session takes it from its inbox: earlier steps of the session, a pushed
step waiting for the client's), ``validate`` (shape/dtype checks, duplicates, a named prefix rebuilt),
``reuse`` (the step's prefix digests and the lookup of a kept history that starts the same way),
``compute_wait`` (handed to the compute thread until a pass starts it: other sessions' passes, batching's
short wait), ``compute`` (the blocks' forward pass), ``handback`` (the pass ended until the event loop
resumes the step), ``encode`` (cast to the wire dtype, outputs' digests, history kept for reuse),
``sign`` (the receipt), ``push`` (the push RPC to the next peer, until its acknowledgement), ``reply``
(the reply message built). A step that pushes does so right after casting and naming its outputs:
the reply's digests and receipt (``encode``, ``sign``) come after the push, off the next hop's path. Everything but ``compute`` (and ``push``, the next peer's receiving) is the
peer's software time per step.

Client phases (``CLIENT_PHASES``), per session step: ``handoff`` (the caller's thread to the event loop
and back), ``prepare`` (chunking, naming a known prefix, the first hop's message built and queued),
``wait`` (until the last hop's reply arrived: the route's compute, network and peers' software, less
what the client spent meanwhile on the earlier hops' replies), ``decode`` (every hop's reply decoded
and checked), and ``model`` (the caller's time between two steps of the session: the client's own model,
embeddings and LM head, and generate()'s sampling; not recorded for a session's first step).
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram

PEER_PHASES = ("decode", "queue", "validate", "reuse", "compute_wait", "compute", "handback", "encode", "sign", "push", "reply")
CLIENT_PHASES = ("handoff", "prepare", "wait", "decode", "model")
# seconds: 20 us .. 5 s
BUCKETS = (2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Phases:
    """Durations of the phases ``names`` (seconds), as a histogram ``<prefix>_phase_seconds{phase=...}``
    and the last ``keep`` samples of each phase."""

    def __init__(self, names: Iterable[str], *, prefix: str, keep: int = 1024, clock: Callable[[], float] = time.monotonic):
        self.names = tuple(names)
        self.registry = CollectorRegistry(auto_describe=False)
        self.histogram = Histogram(f"{prefix}_phase_seconds", "Seconds spent in each phase of a step.",
                                   labelnames=["phase"], buckets=BUCKETS, registry=self.registry)
        self._children = {name: self.histogram.labels(phase=name) for name in self.names}
        self._recent = {name: collections.deque(maxlen=keep) for name in self.names}
        self._counts = dict.fromkeys(self.names, 0)
        self._clock, self._summary = clock, (float("-inf"), {})  # (when, what): summary() is reused for 1 s

    def observe(self, phase: str, seconds: float) -> None:
        self._children[phase].observe(seconds)
        self._recent[phase].append(seconds)
        self._counts[phase] += 1

    def counts(self) -> dict[str, int]:
        """Samples recorded per phase, all time."""
        return dict(self._counts)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per phase with samples: count (all time), and over the last ``keep``: mean, p50, p90 (ms).
        The percentiles are computed at most once a second (the info RPC that carries them is also a
        liveness probe), or when a phase got its first sample; the counts are always current."""
        at, quantiles = self._summary
        if self._clock() - at >= 1.0 or any(n and name not in quantiles for name, n in self._counts.items()):
            quantiles = {}
            for name in self.names:
                recent = sorted(self._recent[name])
                if recent:
                    quantiles[name] = {"mean_ms": 1e3 * sum(recent) / len(recent),
                                       "p50_ms": 1e3 * recent[len(recent) // 2],
                                       "p90_ms": 1e3 * recent[min(len(recent) - 1, (9 * len(recent)) // 10)]}
            self._summary = (self._clock(), quantiles)
        return {name: {"count": self._counts[name], **q} for name, q in quantiles.items()}


class Timeline:
    """One step's phases: ``mark(phase)`` adds the time since the previous mark (or the start) to
    ``phase``; ``done()`` records each phase's total once (a phase marked per hop sums over the hops)."""

    __slots__ = ("phases", "at", "clock", "spent")

    def __init__(self, phases: Phases | None, clock: Callable[[], float] = time.perf_counter):
        self.phases, self.clock = phases, clock
        self.at = clock()
        self.spent: dict[str, float] = {}  # phase -> seconds so far in this step

    def mark(self, phase: str) -> None:
        """End ``phase`` now."""
        now = self.clock()
        self.spent[phase] = self.spent.get(phase, 0.0) + now - self.at
        self.at = now

    def split(self, *ends: tuple[str, float] | str) -> None:
        """Several phases at once: each ``(phase, ended_at)`` ends at that clock reading (taken elsewhere,
        e.g. on another thread); a last bare ``phase`` ends now."""
        for end in ends:
            if isinstance(end, str):
                self.mark(end)
            else:
                phase, at = end
                self.spent[phase] = self.spent.get(phase, 0.0) + max(0.0, at - self.at)
                self.at = max(self.at, at)

    def done(self) -> None:
        """Record the step's phases (each once)."""
        if self.phases is not None:
            for phase, seconds in self.spent.items():
                self.phases.observe(phase, seconds)
        self.spent = {}
