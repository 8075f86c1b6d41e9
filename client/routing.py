"""Route planning: a pure function from a swarm snapshot to the route of peers with least latency.

Nodes are block boundaries; a peer serving [s, e) offers an edge a -> b for every pair of boundaries
s <= a < b <= e (it runs the sub-range [a, b)). An edge costs the seconds one decode step is expected
to spend there: the measured round trip (doubled and padded for relayed peers), plus (b - a) blocks
times the peer's seconds per block, inflated by the sessions the peer is already serving, plus a
large penalty when the peer's free cache cannot hold the session; the whole edge is then multiplied by
the peer's standing (``STANDING_COST``). Dijkstra finds the cheapest route; ties go to fewer hops,
then to peer ids (deterministic). A client should also charge each hop ``HOP_SECONDS`` (it reserves a
session's KV cache on one more peer) and pass an ``rng``, which jitters each peer's costs per plan so
that clients planning from one snapshot do not all crowd the same peers (``plan_route``).

**Speed is measured, not believed** (``believed_speeds``): a peer's announced throughput is a claim.
The client times its own steps on each peer it used (seconds per block per decode step) and ranks
those by that. A peer it has not measured yet is assumed a little faster (``EXPLORE``) than the median
measured peer of its format, whatever it claims, so the client tries it once and then knows; claiming
more attracts nothing. With none measured yet, a claim counts, but never for more than
``CLAIM_SLACK`` times the median claim of its format.

Formats: a peer computes in a dtype with weights in a quant (``float32``, ``bfloat16/nf4``); outputs
differ between formats, so a route only mixes formats the client allowed. A format pattern is
``DTYPE``, ``QUANT`` or ``DTYPE/QUANT`` (``float32``: float32 with any weights; ``nf4``: NF4 in any
dtype; ``bfloat16/none``: exactly that). With no patterns, a session takes one format, the most
precise that covers every block (``choose_format``), and keeps it through failovers.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import random
from typing import Iterable, Mapping

from client.errors import MissingBlocksError
from dht.records import DTYPES, QUANTS, PeerRecord, PeerState

DEFAULT_RTT = 0.05  # seconds, for a peer not pinged yet
MIN_THROUGHPUT = 1e-3  # steps/s, floor for a peer announcing ~0
LOAD_FACTOR = 0.5  # each open session on a peer adds this fraction of its compute time
RELAY_PENALTY = 0.05  # seconds added to a relayed peer's (doubled) round trip
CACHE_PENALTY = 10.0  # seconds: a peer whose free cache cannot hold the session is a last resort
CLAIM_SLACK = 2.0  # an unmeasured claim counts for at most this many times the median claim of its format
EXPLORE = 0.9  # an unmeasured peer is believed this fraction of the median measured peer's seconds per block
HOP_SECONDS = 0.05  # what a client should pass as plan_route's hop_seconds (see there; sim/ measured it)
JITTER = 0.3  # with an rng, each peer's costs are multiplied by a factor drawn from U(1, 1 + JITTER) per plan


@dataclasses.dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int
    maddrs: tuple[str, ...] = ()
    dtype: str = "float32"  # what the peer declares it computes in (audits compare like with like)
    quant: str = "none"  # and how it stores its weights

    @property
    def format(self) -> str:
        """The exact format pattern of this hop (what a session pins itself to)."""
        return f"{self.dtype}/{self.quant}"


def check_format(pattern: str) -> str:
    """Raise ValueError unless ``pattern`` is DTYPE, QUANT or DTYPE/QUANT."""
    dtype, slash, quant = pattern.partition("/")
    ok = (dtype in DTYPES and quant in QUANTS) if slash else (pattern in DTYPES or pattern in QUANTS)
    if not ok:
        raise ValueError(f"a format is DTYPE, QUANT or DTYPE/QUANT with DTYPE in {DTYPES} and QUANT in {QUANTS} "
                         f"(e.g. 'nf4', 'bfloat16', 'float16/int8'), got {pattern!r}")
    return pattern


def format_matches(record: PeerRecord, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        dtype, slash, quant = pattern.partition("/")
        if slash:
            if record.dtype == dtype and record.quant == quant:
                return True
        elif pattern in (record.dtype, record.quant):
            return True
    return False


def precision_rank(dtype: str, quant: str) -> tuple[int, int]:
    """Smaller is more precise: weights first (none, int8, nf4), then dtype (float32, bfloat16, float16)."""
    return QUANTS.index(quant), DTYPES.index(dtype)


def choose_format(records: Iterable[PeerRecord], model_id: str, num_blocks: int, *, banned: Iterable[str] = (),
                  start: int = 0, end: int | None = None) -> str:
    """The exact format (``DTYPE/QUANT``) a session should use when the client allowed no formats: the
    most precise one whose usable peers cover [start, end); if none does, the one covering most blocks."""
    end = num_blocks if end is None else end
    by_format: dict[tuple[str, str], list[PeerRecord]] = {}
    for r in usable_records(records, model_id, num_blocks, banned):
        by_format.setdefault((r.dtype, r.quant), []).append(r)
    if not by_format:
        return "float32/none"

    def gap(fmt):
        return sum(b - a for a, b in uncovered(by_format[fmt], start, end))

    dtype, quant = min(by_format, key=lambda fmt: (gap(fmt), precision_rank(*fmt)))
    return f"{dtype}/{quant}"


def claimed_speed(record: PeerRecord) -> float:
    """Seconds per block per decode step that the peer's announced throughput claims."""
    return 1.0 / (max(record.throughput, MIN_THROUGHPUT) * record.num_blocks)


def believed_speeds(records: Iterable[PeerRecord], measured: Mapping[str, float]) -> dict[str, float]:
    """Seconds per block per decode step to plan with, per peer: what this client measured; else
    ``EXPLORE`` times the median measured speed of peers of the same format (any format if none); else
    the peer's claim, but no faster than the median claim of its format over ``CLAIM_SLACK``."""
    records = list(records)

    def median(values: list[float]) -> float:
        values = sorted(values)
        return values[len(values) // 2]

    by_format: dict[str, list[PeerRecord]] = {}
    for r in records:
        by_format.setdefault(r.format, []).append(r)
    all_measured = [measured[r.peer_id] for r in records if r.peer_id in measured]
    believed: dict[str, float] = {}  # per format: the speed an unmeasured peer is believed to have
    claim_floor: dict[str, float] = {}  # per format, with nothing measured: the fastest claim that counts
    for fmt, alike in by_format.items():
        times = [measured[o.peer_id] for o in alike if o.peer_id in measured] or all_measured
        if times:
            believed[fmt] = EXPLORE * median(times)
        else:
            claim_floor[fmt] = median([claimed_speed(o) for o in alike]) / CLAIM_SLACK
    speeds = {}
    for r in records:
        if r.peer_id in measured:
            speeds[r.peer_id] = measured[r.peer_id]
        elif r.format in believed:
            speeds[r.peer_id] = believed[r.format]
        else:
            speeds[r.peer_id] = max(claimed_speed(r), claim_floor[r.format])
    return speeds


def hop_cost(record: PeerRecord, rtt: float | None, blocks: int | None = None, cache_tokens_needed: int = 0,
             speed: float | None = None, standing: float = 1.0) -> float:
    """Estimated seconds per decode step spent on ``blocks`` blocks (default: all) of this peer, at
    ``speed`` seconds per block (default: its claim), times its ``standing`` (reputation) factor."""
    network, speed, load, penalty = _cost_terms(record, rtt, cache_tokens_needed, speed)
    blocks = record.num_blocks if blocks is None else blocks
    return (network + blocks * speed * load + penalty) * standing


def _cost_terms(record: PeerRecord, rtt: float | None, cache_tokens_needed: int,
                speed: float | None) -> tuple[float, float, float, float]:
    """What ``hop_cost`` adds up, but for the number of blocks: network seconds, seconds per block,
    the load multiplier, and the cache penalty (seconds)."""
    rtt = DEFAULT_RTT if rtt is None else rtt
    network = 2 * rtt + RELAY_PENALTY if record.relayed else rtt
    speed = claimed_speed(record) if speed is None else speed
    penalty = CACHE_PENALTY if record.cache_tokens_left < cache_tokens_needed else 0.0
    return network, speed, 1 + LOAD_FACTOR * record.num_sessions, penalty


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


def usable_records(records: Iterable[PeerRecord], model_id: str, num_blocks: int,
                   banned: Iterable[str] = ()) -> list[PeerRecord]:
    banned = set(banned)
    return [r for r in records if r.model_id == model_id and r.state == PeerState.ONLINE
            and r.peer_id not in banned and r.end <= num_blocks]


def _leaving(usable: list[PeerRecord], boundaries: list[int], end: int, rtts: Mapping[str, float],
             speeds: Mapping[str, float], standing: Mapping[str, float], cache_tokens_needed: int,
             hop_seconds: float, rng: random.Random | None
             ) -> list[list[tuple[PeerRecord, int, tuple[float, float, float, float], float]]]:
    """Per boundary (by index), each record that can run from it: (record, the index just past the last
    boundary it can reach, its ``_cost_terms``, its cost factor: standing, times jitter with an ``rng``),
    in ``usable`` order, so that of equal candidates the first record wins as in a plain scan."""
    jitter: dict[str, float] = {}
    if rng is not None:
        for r in usable:
            if r.peer_id not in jitter:
                jitter[r.peer_id] = rng.uniform(1.0, 1.0 + JITTER)  # drawn in ``usable`` order: reproducible
    leaving: list[list[tuple[PeerRecord, int, tuple[float, float, float, float], float]]] = [[] for _ in boundaries]
    for r in usable:
        reach = bisect.bisect_right(boundaries, min(r.end, end))
        terms = _cost_terms(r, rtts.get(r.peer_id), cache_tokens_needed, speeds.get(r.peer_id))
        if hop_seconds:
            terms = (terms[0] + hop_seconds, *terms[1:])
        for i in range(bisect.bisect_left(boundaries, r.start), bisect.bisect_left(boundaries, r.end)):
            leaving[i].append((r, reach, terms, standing.get(r.peer_id, 1.0) * jitter.get(r.peer_id, 1.0)))
    return leaving


def plan_route(
    records: Iterable[PeerRecord],
    model_id: str,
    num_blocks: int,
    *,
    rtts: Mapping[str, float] | None = None,
    banned: Iterable[str] = (),
    start: int = 0,
    end: int | None = None,
    cache_tokens_needed: int = 0,
    formats: Iterable[str] | None = None,
    speeds: Mapping[str, float] | None = None,
    standing: Mapping[str, float] | None = None,
    hop_seconds: float = 0.0,
    rng: random.Random | None = None,
) -> list[Hop]:
    """The cheapest route of ONLINE, unbanned peers (or sub-ranges of them) that tiles [start, end),
    through peers of the allowed ``formats`` only (None: any). ``speeds``: seconds per block per step
    to plan with (``believed_speeds``; default: the claims); ``standing``: cost factors by peer
    (default 1). ``hop_seconds``: added to every hop's round trip, because a hop costs more than its
    round trip: it reserves the session's whole KV cache on one more peer (a peer reserves
    ``max_length`` tokens whatever sub-range it runs), and is one more peer that can be full or leave.
    Without it, a route splits into short sub-ranges of fast peers, and in a busy swarm their caches
    fill (``HOP_SECONDS`` is the value to pass). ``rng``: if given, each peer's costs are also multiplied
    by a factor drawn from U(1, 1 + ``JITTER``) for this plan, so that clients planning from the same
    snapshot spread over near-equal routes instead of all filling the cheapest one's caches. Without
    ``hop_seconds`` and ``rng``, the plan is exactly the cheapest (deterministic)."""
    # Long on purpose: Dijkstra in one piece, the hot loop of every plan (and of sim/'s 10,000 clients).
    end = num_blocks if end is None else end
    rtts, speeds, standing = rtts or {}, speeds or {}, standing or {}
    records = list(records)
    formats = None if formats is None else tuple(formats)
    usable = [r for r in usable_records(records, model_id, num_blocks, banned) if r.start < end and r.end > start
              and (formats is None or format_matches(r, formats))]
    boundaries = sorted({start, end} | {b for r in usable for b in (r.start, r.end) if start < b < end})
    leaving = _leaving(usable, boundaries, end, rtts, speeds, standing, cache_tokens_needed, hop_seconds, rng)
    last = len(boundaries) - 1  # the index of ``end``
    inf = float("inf")
    best_cost = [0.0] + [inf] * last  # by boundary index: the cost of ``best``, inf while unreached
    best: dict[int, tuple[float, int, tuple[str, ...]]] = {0: (0.0, 0, ())}  # by boundary index
    came_from: dict[int, tuple[PeerRecord, int]] = {}  # by boundary index: (record, index it ran from)
    heap = [(0.0, 0, (), 0)]  # boundary indices sort like the boundaries: same tie-breaking
    while heap:
        cost, hops, path, i = heapq.heappop(heap)
        if best[i] != (cost, hops, path):
            continue
        if i == last:
            break
        node = boundaries[i]
        for r, reach, (network, speed, load, penalty), factor in leaving[i]:
            for j in range(i + 1, reach):
                # hop_cost(r, rtt, blocks, cache_tokens_needed, speed, standing), term by term
                total = cost + (network + (boundaries[j] - node) * speed * load + penalty) * factor
                if total > best_cost[j]:
                    continue
                candidate = (total, hops + 1, path + (r.peer_id,))
                if j not in best or candidate < best[j]:
                    best[j], best_cost[j] = candidate, total
                    came_from[j] = (r, i)
                    heapq.heappush(heap, (*candidate, j))
    if last not in best:
        others = ()
        if formats is not None:
            others = tuple(sorted({r.format for r in usable_records(records, model_id, num_blocks, banned)
                                   if not format_matches(r, formats)}))
        raise MissingBlocksError(model_id, uncovered(usable, start, end) or [(boundaries[max(best)], end)], num_blocks,
                                 formats=formats, others=others)
    route, i = [], last
    while i != 0:
        r, a = came_from[i]
        route.append(Hop(r.peer_id, boundaries[a], boundaries[i], r.maddrs, r.dtype, r.quant))
        i = a
    return route[::-1]
