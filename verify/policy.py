"""Which (session, span) pairs to audit (pure; the randomness is the client's own and seeded).

The decision is made after the primary has answered, with randomness the peer never sees, so a peer
cannot behave only when watched. Rates by the peer's standing in the reputation book.
"""

from __future__ import annotations

import dataclasses
import random

from verify.reputation import Status


@dataclasses.dataclass(frozen=True)
class AuditRates:
    probation: float = 0.25
    active: float = 0.05
    trusted: float = 0.02  # the floor: never zero
    suspect: float = 1.0
    first_sessions: int = 10  # a new identity's first sessions (until this many audits passed) are all audited

    def for_status(self, status: Status) -> float:
        return {Status.PROBATION: self.probation, Status.ACTIVE: self.active, Status.TRUSTED: self.trusted,
                Status.SUSPECT: self.suspect, Status.BANNED: 1.0}[status]

    @classmethod
    def always(cls) -> "AuditRates":
        """Audit everything (tests, demos, high-stakes clients)."""
        return cls(1.0, 1.0, 1.0, 1.0)

    @classmethod
    def never(cls) -> "AuditRates":
        """Audit nothing (benchmarks' baselines only: a real client never stops auditing)."""
        return cls(0.0, 0.0, 0.0, 0.0, first_sessions=0)


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

    def should_audit(self, status: Status, passes: int | None = None) -> bool:
        """Draw for one session of a peer of this standing; ``passes``: audits it has passed so far (a
        new identity on probation is audited every time until it passed ``first_sessions``)."""
        if status == Status.PROBATION and passes is not None and passes < self.rates.first_sessions:
            return True
        return self._rng.random() < self.rates.for_status(status)

    def pick(self, candidates: list):
        """One of ``candidates`` (peer ids or checkers), at random (sorted first: a seeded rng repeats)."""
        return self._rng.choice(sorted(candidates))


def detection_probability(p: float, q: float, d: float, n: int) -> float:
    """P(a peer corrupting a fraction q of sessions is caught within n sessions), audit rate p,
    per-audit detection power d: 1 - (1 - p q d)^n."""
    return 1.0 - (1.0 - p * q * d) ** n
