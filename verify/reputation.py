"""The reputation book: Beta reputation with forgetting, probation for new identities, bans that
grow (pure; the clock is injected; saved as a small JSON file by the client).

Per peer: decayed pass evidence r and fail evidence s (each verdict first multiplies both by λ),
prior Beta(1, 2) (r=0, s=1: new identities start distrusted). Score T = (r+1)/(r+s+2).
Pass: r += 1. Confirmed fail: s += 10 and the peer becomes a suspect, whatever its history (a trusted
peer with 500 passes too: trust is never a licence). Ban on a gross confirmed fail, on a fail during
probation, on 2 confirmed fails within a week, or when T < 0.2; the k-th ban lasts ban_base * 2^(k-1).
The book also counts the sessions each peer served since its last audit (``drawn``), which raises its
audit rate (verify/policy.py: ``AuditRates.rate``).

Identities are free, so a banned operator comes back as a new one. What it keeps is harder to change:
its addresses and its public name (``identity_signals``). A new identity that shares one with a banned
peer starts as a suspect (audited every session, costlier to route through), not fresh on probation.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import os
import time
from typing import Callable, Iterable


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
    signals: list[str] = dataclasses.field(default_factory=list)  # kept once banned: who may come back as whom
    linked_to: str = ""  # the banned peer this identity shares an address or name with, if it started so
    unchecked: int = 0  # sessions it served this client since the last one drawn for an audit (the audit floor)

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


def identity_signals(maddrs: Iterable[str], public_name: str = "") -> frozenset[str]:
    """What an operator keeps when it makes a new identity: the networks it announces (a public IPv4 /24,
    a public IPv6 /48; a loopback or private address exactly, with its port, since many honest peers
    share those networks) and its public name. Relay addresses say nothing about the peer behind them."""
    signals = set()
    for maddr in maddrs:
        parts = maddr.split("/")
        if "p2p-circuit" in parts or len(parts) < 3:
            continue
        proto, host = parts[1], parts[2]
        port = parts[4] if len(parts) > 4 else ""
        if proto in ("dns", "dns4", "dns6"):
            signals.add(f"dns:{host.lower()}")
            continue
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if not ip.is_global:
            signals.add(f"addr:{host}:{port}")
        elif ip.version == 4:
            signals.add("net4:" + ".".join(host.split(".")[:3]))
        else:
            signals.add("net6:" + ":".join(ip.exploded.split(":")[:3]))
    name = public_name.strip().lower()
    if name:
        signals.add(f"name:{name}")
    return frozenset(signals)


class ReputationBook:
    def __init__(self, rules: ReputationRules = ReputationRules(), clock: Callable[[], float] = time.time):
        self.rules = rules
        self._clock = clock
        self.entries: dict[str, Entry] = {}
        self.log: list[tuple[float, str, str]] = []  # (time, peer, verdict)
        self.signals: dict[str, frozenset[str]] = {}  # peer -> identity_signals as last announced

    def observe(self, peer_id: str, signals: frozenset[str]) -> Status:
        """A peer announced itself with these signals. A new identity sharing one with a banned peer
        starts as a suspect."""
        self.signals[peer_id] = signals
        if peer_id not in self.entries and signals:
            now = self._clock()
            for other, e in self.entries.items():
                if e.banned_until > now and signals & set(e.signals):
                    self.entries[peer_id] = Entry(suspect_left=self.rules.suspect_sessions, linked_to=other)
                    break
        return self.status(peer_id)

    def related(self, a: str, b: str) -> bool:
        """Whether two peers share an address or a name (possibly one operator)."""
        return bool(self.signals.get(a, frozenset()) & self.signals.get(b, frozenset()))

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

    def drawn(self, peer_id: str, audited: bool) -> None:
        """A session this peer served was drawn for an audit (the count of unchecked sessions starts
        again) or not (one more). A peer the book does not know yet is audited on its first sessions."""
        e = self.entries.get(peer_id)
        if e is not None:
            e.unchecked = 0 if audited else e.unchecked + 1

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
            e.signals = sorted(set(e.signals) | self.signals.get(peer_id, frozenset()))
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
