"""Which (session, span) pairs to audit (pure; the randomness is the client's own and seeded).

The decision is made after the primary has answered, with randomness the peer never sees, so a peer
cannot behave only when watched. Rates by the peer's standing in the reputation book, and for a trusted
or active peer a floor that rises with the sessions it served since its last audit (``AuditRates.rate``):
trust is never a licence, so a long con (behave, then lie) cannot run long between checks.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable

from verify.reputation import Status


@dataclasses.dataclass(frozen=True)
class AuditRates:
    probation: float = 0.25
    active: float = 0.05
    trusted: float = 0.02  # the floor: never zero
    suspect: float = 1.0
    first_sessions: int = 10  # a new identity's first sessions (until this many audits passed) are all audited
    trusted_every: int = 50  # a trusted peer is audited at least once in every this many sessions (0: no floor)
    active_every: int = 20  # the same for an active peer

    def for_status(self, status: Status) -> float:
        """The base rate of a standing (what routing charges for it, ``standing_cost``)."""
        return {Status.PROBATION: self.probation, Status.ACTIVE: self.active, Status.TRUSTED: self.trusted,
                Status.SUSPECT: self.suspect, Status.BANNED: 1.0}[status]

    def every(self, status: Status) -> int:
        """M: a peer of this standing is audited at least once in every M sessions it serves (0: no bound)."""
        return {Status.TRUSTED: self.trusted_every, Status.ACTIVE: self.active_every}.get(status, 0)

    def rate(self, status: Status, unchecked: int = 0) -> float:
        """The probability of auditing a session of a peer that served ``unchecked`` sessions since its last
        audit: for a trusted (active) peer, the n-th session since its last audit is audited with
        probability max(base, n / M), M = ``trusted_every`` (``active_every``), so the M-th always is;
        any other standing, its base rate."""
        base, every = self.for_status(status), self.every(status)
        return max(base, min(1.0, (unchecked + 1) / every)) if every else base

    @classmethod
    def always(cls) -> "AuditRates":
        """Audit everything (tests, demos, high-stakes clients)."""
        return cls(1.0, 1.0, 1.0, 1.0)

    @classmethod
    def never(cls) -> "AuditRates":
        """Audit nothing (benchmarks' baselines only: a real client never stops auditing)."""
        return cls(0.0, 0.0, 0.0, 0.0, first_sessions=0, trusted_every=0, active_every=0)


def standing_cost(status: Status, rates: AuditRates, strict: bool = False) -> float:
    """How much more a route pays for a hop through a peer of this standing than through a trusted one
    of the same speed (a factor on the hop's expected seconds): each session it serves is re-run on
    another peer at its audit rate (load on the swarm; in strict mode every session of every peer, and
    the client waits for it), and a suspect's answers are the likeliest to be thrown away and generated
    again (+1)."""
    rate = 1.0 if strict else rates.for_status(status)
    return 1.0 + rate + (1.0 if status == Status.SUSPECT else 0.0)


class SamplingPolicy:
    def __init__(self, rates: AuditRates = AuditRates(), rng: random.Random | None = None):
        self.rates = rates
        self._rng = rng or random.SystemRandom()

    def should_audit(self, status: Status, passes: int | None = None, unchecked: int = 0) -> bool:
        """Draw for one session of a peer of this standing; ``passes``: audits it has passed so far (a
        new identity on probation is audited every time until it passed ``first_sessions``);
        ``unchecked``: sessions it served since its last audit (``AuditRates.rate``)."""
        if status == Status.PROBATION and passes is not None and passes < self.rates.first_sessions:
            return True
        return self._rng.random() < self.rates.rate(status, unchecked)

    def pick(self, candidates: list, load: Callable[[Any], float] | None = None):
        """One of ``candidates`` (peer ids or checkers), at random (sorted first: a seeded rng repeats);
        with ``load``, at random among the least loaded (a busy checker would delay a strict reply)."""
        if load is not None:
            loads = {c: load(c) for c in candidates}
            candidates = [c for c in candidates if loads[c] == min(loads.values())]
        return self._rng.choice(sorted(candidates))


def detection_probability(p: float, q: float, d: float, n: int) -> float:
    """P(a peer corrupting a fraction q of sessions is caught within n sessions), audit rate p,
    per-audit detection power d: 1 - (1 - p q d)^n."""
    return 1.0 - (1.0 - p * q * d) ** n


def expected_wrong_before_audit(rates: AuditRates, status: Status) -> float:
    """Expected sessions a peer of this standing serves one client, from just after an audit (the worst
    moment to turn: the rate only rises), before an audit is drawn: what a liar that then lies in every
    session hands that client with no audit seeing it. The sum over k >= 1 of P(sessions 1..k all
    unaudited); (1 - p) / p for a constant rate p. In background mode the session whose audit catches it
    was handed over too (+1); redo and strict generate that one again."""
    every = rates.every(status)
    if not every:
        p = rates.for_status(status)
        return float("inf") if p <= 0 else (1.0 - p) / p
    total, missed = 0.0, 1.0
    for unchecked in range(every):
        missed *= 1.0 - rates.rate(status, unchecked)
        total += missed
    return total
