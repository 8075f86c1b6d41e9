"""Building the health snapshot from what the monitor saw (pure: records, pings, verdicts in)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Iterable, Mapping

from dht.records import PeerRecord, PeerState, ProofRecord, VerdictRecord
from health.schema import BlockCell, ModelHealth, PeerView, ProofView, Snapshot

_FAILED = ("fail", "gross_fail")


@dataclasses.dataclass(frozen=True)
class Ping:
    rtt: float | None  # seconds; None = no answer
    info: Mapping | None = None  # the peer's statistics, when it answered


def _short(peer_id: str) -> str:
    return f"…{peer_id[-8:]}"


def _gaps(counts: list[int]) -> list[tuple[int, int]]:
    gaps, start = [], None
    for i, c in enumerate(counts + [1]):
        if c == 0 and start is None:
            start = i
        elif c and start is not None:
            gaps.append((start, i))
            start = None
    return gaps


def build(records: Iterable[PeerRecord], pings: Mapping[str, Ping], verdicts: Iterable[VerdictRecord],
          now: float, proofs: Iterable[tuple[ProofRecord, str]] = ()) -> Snapshot:
    """One section per model: coverage by online, reachable peers, gaps, a row per peer, and the fraud
    proofs against its peers (``proofs``: each record with what the monitor's check of it said)."""
    by_model: dict[str, list[PeerRecord]] = defaultdict(list)
    for r in records:
        if r.state != PeerState.OFFLINE:
            by_model[r.model_id].append(r)
    passed: dict[str, int] = defaultdict(int)
    failed: dict[str, int] = defaultdict(int)
    last: dict[str, tuple[float, str]] = {}
    for v in verdicts:
        if v.verdict == "pass":
            passed[v.target] += 1
        elif v.verdict in _FAILED:
            failed[v.target] += 1
        if v.target not in last or v.time > last[v.target][0]:
            last[v.target] = (v.time, v.verdict)
    audited = set(passed) | set(failed) | set(last)

    by_proofs: dict[str, list[ProofView]] = defaultdict(list)
    for p, status in sorted(proofs, key=lambda item: -item[0].time):
        by_proofs[p.model_id].append(ProofView(accused=p.accused, short_id=_short(p.accused), author=p.author,
                                               start=p.start, end=p.end, time=p.time, status=status))
    models = []
    for model_id in sorted(by_model):
        peers = sorted(by_model[model_id], key=lambda r: (r.start, r.end, r.peer_id))
        num_blocks = max([r.model_blocks for r in peers] + [r.end for r in peers])
        names: list[list[str]] = [[] for _ in range(num_blocks)]
        rows = []
        for r in peers:
            ping = pings.get(r.peer_id, Ping(None))
            reachable = ping.rtt is not None
            if r.state == PeerState.ONLINE and reachable:
                for b in range(r.start, r.end):
                    names[b].append(r.public_name or _short(r.peer_id))
            info = ping.info or {}
            rows.append(PeerView(
                peer_id=r.peer_id, short_id=_short(r.peer_id), public_name=r.public_name, start=r.start, end=r.end,
                state=r.state.value, dtype=r.dtype, quant=r.quant, format=r.format, num_parameters=r.num_parameters, throughput=r.throughput,
                rtt_ms=None if ping.rtt is None else ping.rtt * 1000, reachable=reachable,
                cache_tokens_left=r.cache_tokens_left, num_sessions=r.num_sessions, relayed=r.relayed,
                version=r.version, uptime_s=info.get("uptime"),
                audits_passed=passed[r.peer_id] if r.peer_id in audited else None,
                audits_failed=failed[r.peer_id] if r.peer_id in audited else None,
                last_verdict=last[r.peer_id][1] if r.peer_id in last else None,
            ))
        counts = [len(n) for n in names]
        families = sorted({r.model_type for r in peers if r.model_type})
        models.append(ModelHealth(
            model_id=model_id, model_type="/".join(families), num_blocks=num_blocks,
            coverage=[BlockCell(block=b, online=counts[b], peers=names[b]) for b in range(num_blocks)],
            gaps=_gaps(counts), min_coverage=min(counts) if counts else 0, peers=rows, proofs=by_proofs[model_id]))
    return Snapshot(generated_at=now, models=models, audits_passed=sum(passed.values()),
                    audits_failed=sum(failed.values()))
