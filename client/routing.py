"""Route planning: a pure function from a swarm snapshot to the chain of peers with least latency.

Nodes are block boundaries 0..L; a peer serving [s, e) is an edge s -> e whose cost is the estimated
seconds one decode step spends on it: network round trip plus compute (1 / announced throughput).
Dijkstra finds the cheapest chain from ``start`` to ``end``; ties go to fewer hops, then peer ids.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Iterable, Mapping

from client.errors import MissingBlocksError
from dht.records import PeerRecord, PeerState

DEFAULT_RTT = 0.05  # seconds, for a peer not pinged yet
MIN_THROUGHPUT = 1e-3  # steps/s, floor for a peer announcing ~0


@dataclasses.dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int
    maddrs: tuple[str, ...] = ()


def hop_cost(record: PeerRecord, rtt: float | None) -> float:
    """Estimated seconds per decode step spent on this peer."""
    return (DEFAULT_RTT if rtt is None else rtt) + 1.0 / max(record.throughput, MIN_THROUGHPUT)


def uncovered(records: Iterable[PeerRecord], start: int, end: int) -> list[tuple[int, int]]:
    """Maximal ranges of blocks in [start, end) that no record covers."""
    covered = [False] * (end - start)
    for r in records:
        for b in range(max(r.start, start), min(r.end, end)):
            covered[b - start] = True
    gaps, gap_start = [], None
    for i, c in enumerate(covered + [True]):
        if not c and gap_start is None:
            gap_start = i
        elif c and gap_start is not None:
            gaps.append((start + gap_start, start + i))
            gap_start = None
    return gaps


def plan_route(
    records: Iterable[PeerRecord],
    model_id: str,
    num_blocks: int,
    *,
    rtts: Mapping[str, float] | None = None,
    banned: Iterable[str] = (),
    start: int = 0,
    end: int | None = None,
) -> list[Hop]:
    """The cheapest chain of ONLINE, unbanned peers whose spans tile [start, end) exactly."""
    end = num_blocks if end is None else end
    rtts = rtts or {}
    banned = set(banned)
    usable = [r for r in records if r.model_id == model_id and r.state == PeerState.ONLINE
              and r.peer_id not in banned and r.end <= num_blocks]
    edges: dict[int, list[PeerRecord]] = {}
    for r in usable:
        if start <= r.start and r.end <= end:
            edges.setdefault(r.start, []).append(r)
    # (cost, hops, tie-break path of peer ids, boundary)
    best: dict[int, tuple[float, int, tuple[str, ...]]] = {start: (0.0, 0, ())}
    came_from: dict[int, PeerRecord] = {}
    heap = [(0.0, 0, (), start)]
    while heap:
        cost, hops, path, node = heapq.heappop(heap)
        if best.get(node) != (cost, hops, path):
            continue
        if node == end:
            break
        for r in sorted(edges.get(node, []), key=lambda r: r.peer_id):
            candidate = (cost + hop_cost(r, rtts.get(r.peer_id)), hops + 1, path + (r.peer_id,))
            if r.end not in best or candidate < best[r.end]:
                best[r.end] = candidate
                came_from[r.end] = r
                heapq.heappush(heap, (*candidate, r.end))
    if end not in best:
        gaps = uncovered(usable, start, end)
        if not gaps:  # covered, but spans do not line up on common boundaries
            reachable = max(best)
            gaps = [(reachable, end)]
        raise MissingBlocksError(model_id, gaps, num_blocks)
    route, node = [], end
    while node != start:
        r = came_from[node]
        route.append(Hop(r.peer_id, r.start, r.end, r.maddrs))
        node = r.start
    return route[::-1]
