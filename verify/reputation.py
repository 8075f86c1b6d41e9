"""The reputation book: Beta reputation with forgetting, probation for new identities, bans that
grow (pure; the clock is injected; saved as a small JSON file by the client).

Per peer: decayed pass evidence r and fail evidence s (each verdict first multiplies both by λ),
prior Beta(1, 2) (r=0, s=1: new identities start distrusted). Score T = (r+1)/(r+s+2).
Pass: r += 1. Confirmed fail: s += 10 and the peer becomes a suspect. Ban on a gross confirmed
fail, on a fail during probation, on 2 confirmed fails within a week, or when T < 0.2; the k-th ban
lasts ban_base * 2^(k-1).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import time
from typing import Callable


class Status(str, enum.Enum):
    PROBATION = "probation"
    ACTIVE = "active"
    TRUSTED = "trusted"
    SUSPECT = "suspect"
    BANNED = "banned"


class Verdict(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"  # confirmed by a referee (2 of 3)
    GROSS_FAIL = "gross_fail"  # confirmed, and far beyond any honest noise
    INCONCLUSIVE = "inconclusive"  # no majority: nobody is penalised, both become suspects
    IMPOSSIBLE = "impossible"  # nobody else serves those blocks in the same dtype: not a pass


@dataclasses.dataclass
class Entry:
    r: float = 0.0
    s: float = 1.0
    passes: int = 0
    fails: list[float] = dataclasses.field(default_factory=list)  # clock times of confirmed fails
    suspect_left: int = 0  # sessions still audited at the suspect rate
    bans: int = 0
    banned_until: float = 0.0

    @property
    def score(self) -> float:
        return (self.r + 1) / (self.r + self.s + 2)


@dataclasses.dataclass(frozen=True)
class ReputationRules:
    decay: float = 0.99  # λ per verdict
    fail_weight: float = 10.0
    probation_passes: int = 50
    trusted_passes: int = 200
    trusted_score: float = 0.9
    ban_score: float = 0.2
    fails_window: float = 7 * 86400.0  # seconds
    suspect_sessions: int = 20
    ban_base: float = 86400.0  # seconds for the first ban
    permanent_after: int = 3


class ReputationBook:
    def __init__(self, rules: ReputationRules = ReputationRules(), clock: Callable[[], float] = time.time):
        self.rules = rules
        self._clock = clock
        self.entries: dict[str, Entry] = {}
        self.log: list[tuple[float, str, str]] = []  # (time, peer, verdict)

    def entry(self, peer_id: str) -> Entry:
        return self.entries.setdefault(peer_id, Entry())

    def status(self, peer_id: str) -> Status:
        e = self.entries.get(peer_id)
        if e is None:
            return Status.PROBATION
        if e.banned_until > self._clock():
            return Status.BANNED
        if e.suspect_left > 0:
            return Status.SUSPECT
        if e.passes < self.rules.probation_passes:
            return Status.PROBATION
        if e.passes >= self.rules.trusted_passes and e.score >= self.rules.trusted_score:
            return Status.TRUSTED
        return Status.ACTIVE

    def banned(self) -> frozenset[str]:
        now = self._clock()
        return frozenset(p for p, e in self.entries.items() if e.banned_until > now)

    def suspects(self) -> frozenset[str]:
        return frozenset(p for p in self.entries if self.status(p) == Status.SUSPECT)

    def record(self, peer_id: str, verdict: Verdict) -> Status:
        """Fold one verdict about ``peer_id`` into the book; returns the peer's new status."""
        now, rules = self._clock(), self.rules
        e = self.entry(peer_id)
        self.log.append((now, peer_id, verdict.value))
        if verdict in (Verdict.INCONCLUSIVE, Verdict.IMPOSSIBLE):
            if verdict == Verdict.INCONCLUSIVE:
                e.suspect_left = rules.suspect_sessions
            return self.status(peer_id)
        was_probation = self.status(peer_id) == Status.PROBATION
        e.r *= rules.decay
        e.s *= rules.decay
        if verdict == Verdict.PASS:
            e.r += 1
            e.passes += 1
            e.suspect_left = max(0, e.suspect_left - 1)
            return self.status(peer_id)
        e.s += rules.fail_weight
        e.fails = [t for t in e.fails if now - t < rules.fails_window] + [now]
        e.suspect_left = rules.suspect_sessions
        if verdict == Verdict.GROSS_FAIL or was_probation or len(e.fails) >= 2 or e.score < rules.ban_score:
            e.bans += 1
            duration = float("inf") if e.bans >= rules.permanent_after else rules.ban_base * 2 ** (e.bans - 1)
            e.banned_until = now + duration
        return self.status(peer_id)

    # ---- persistence (the client keeps its book across runs) ----------------------------------------

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        data = {p: dataclasses.asdict(e) for p, e in self.entries.items()}
        for e in data.values():
            if e["banned_until"] == float("inf"):
                e["banned_until"] = "inf"
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"version": 1, "peers": data}, f)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        """Merge a saved book; a missing or unreadable file leaves the book as it is."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return
        if not isinstance(data, dict) or data.get("version") != 1:
            return
        for peer_id, fields in data.get("peers", {}).items():
            try:
                if fields.get("banned_until") == "inf":
                    fields["banned_until"] = float("inf")
                self.entries[peer_id] = Entry(**fields)
            except TypeError:
                continue  # a field this version does not know: skip that peer, keep the rest
