"""Choosing which blocks a peer serves, and whether it should move (pure: records in, decisions out).

The swarm's strength at a block is the summed throughput of the joining and online peers covering
it. A new peer takes the window of N blocks whose weakest blocks are weakest (uncovered first); ties
are broken at random so peers started together spread out. A serving peer moves only if that makes
the swarm's weakest block clearly stronger, and never if it alone serves one of its current blocks.
"""

from __future__ import annotations

import random
from typing import Iterable

from dht.records import PeerRecord, PeerState

_COUNTED = (PeerState.JOINING, PeerState.ONLINE)


def block_throughputs(records: Iterable[PeerRecord], num_blocks: int, *, exclude: str | None = None) -> list[float]:
    """Per block, the summed throughput of joining/online peers covering it. A joining peer has not
    measured itself yet: it counts as the mean online peer (1.0 if there is none)."""
    records = [r for r in records if r.state in _COUNTED and r.peer_id != exclude and r.end <= num_blocks]
    online = [r.throughput for r in records if r.state == PeerState.ONLINE and r.throughput > 0]
    nominal = sum(online) / len(online) if online else 1.0
    totals = [0.0] * num_blocks
    for r in records:
        weight = r.throughput if r.state == PeerState.ONLINE and r.throughput > 0 else nominal
        for b in range(r.start, r.end):
            totals[b] += weight
    return totals


def choose_start(throughputs: list[float], n: int, rng: random.Random) -> int:
    """Start of the window of ``n`` blocks that is weakest (sorted throughputs compared lexicographically).

    Among equally weak windows, aligned ones (start a multiple of n, or the last window) come first,
    so that peers of one size tile the model instead of leaving gaps no single move can close; the
    rest of the tie is broken at random.
    """
    num_blocks = len(throughputs)
    if not 0 < n <= num_blocks:
        raise ValueError(f"cannot place {n} blocks in a model of {num_blocks} blocks")
    keys = {i: sorted(throughputs[i:i + n]) for i in range(num_blocks - n + 1)}
    weakest = min(keys.values())
    tied = [i for i, key in keys.items() if key == weakest]
    aligned = [i for i in tied if i % n == 0 or i == num_blocks - n]
    return rng.choice(aligned or tied)


def _weakness(throughputs: list[float]) -> tuple[int, float]:
    """(uncovered blocks, minus the weakest covered block's throughput): smaller is a stronger swarm."""
    return sum(1 for t in throughputs if t <= 0), -min(throughputs)


def should_move(records: Iterable[PeerRecord], me: PeerRecord, num_blocks: int, *, threshold: float,
                rng: random.Random) -> int | None:
    """The new start block if moving clearly strengthens the swarm, else None.

    ``threshold``: the weakest block must get at least this much stronger (0.2 = 20 %), unless the
    move covers a block that nobody serves.
    """
    records = list(records)
    current = block_throughputs(records, num_blocks)
    without_me = block_throughputs(records, num_blocks, exclude=me.peer_id)
    if any(without_me[b] <= 0 for b in range(me.start, me.end)):
        return None  # leaving would uncover a block that only this peer serves
    n = me.num_blocks
    start = choose_start(without_me, n, rng)
    if start == me.start:
        return None
    moved = list(without_me)
    for b in range(start, start + n):
        moved[b] += max(me.throughput, 1e-9)
    (gaps_now, neg_min_now), (gaps_moved, neg_min_moved) = _weakness(current), _weakness(moved)
    if gaps_moved < gaps_now:
        return start
    if gaps_moved == gaps_now == 0 and -neg_min_moved > -neg_min_now * (1 + threshold):
        return start
    return None
