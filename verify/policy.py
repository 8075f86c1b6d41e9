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

    def for_status(self, status: Status) -> float:
        return {Status.PROBATION: self.probation, Status.ACTIVE: self.active, Status.TRUSTED: self.trusted,
                Status.SUSPECT: self.suspect, Status.BANNED: 1.0}[status]

    @classmethod
    def always(cls) -> "AuditRates":
        """Audit everything (tests, demos, high-stakes clients)."""
        return cls(1.0, 1.0, 1.0, 1.0)


class SamplingPolicy:
    def __init__(self, rates: AuditRates = AuditRates(), rng: random.Random | None = None):
        self.rates = rates
        self._rng = rng or random.SystemRandom()

    def should_audit(self, status: Status) -> bool:
        return self._rng.random() < self.rates.for_status(status)

    def pick(self, candidates: list[str]) -> str:
        return self._rng.choice(sorted(candidates))


def detection_probability(p: float, q: float, d: float, n: int) -> float:
    """P(a peer corrupting a fraction q of sessions is caught within n sessions), audit rate p,
    per-audit detection power d: 1 - (1 - p q d)^n."""
    return 1.0 - (1.0 - p * q * d) ** n
