"""The baseline: Petals' placement, rebalancing and inference routing, written from the description in
shared/notes/petals.md sections 1.3 and 1.4 (not copied code), vectorised with numpy.

Placement (``choose_best_blocks``): per-block throughput = the sum of the throughputs of the joining and
online servers covering it; a new server takes the start ``i`` minimising ``(sorted(t[i:i+n]), i)``.

Rebalancing (``should_choose_other_blocks``), checked every U(0, 2 * period) seconds: remove my span
(times 1 + eps); refuse if that uncovers a block; find my best start, stay if it is mine; else move there,
then let every server greedily move to its own best start (shuffled order, repeated until nothing moves:
capped at ``MAX_PASSES`` passes here); move iff ``initial_min / new_min < quality - eps`` (quality 0.75).
The simulation is skipped when even the mean block strength (an upper bound of any arrangement's
minimum) could not pass the rule: same decision, far less time.
A Petals move is a full reload: the server's sessions fail, it reloads and rejoins.

Routing (min_latency, inference): Dijkstra over (server, block) where a route may switch servers only at
the end of a span; edge costs (seconds): start -> first server rtt/2 + 0.018, block -> next block of the
same server 1 / inference_rps, server a -> server b ping(a, b)/2 + 0.018, last server -> end rtt/2, and
+10 s on entering a server whose free cache cannot hold the session. No load signal. Since switches happen
only at span ends, the graph is a DAG over span exits, solved here exactly by dynamic programming in
block order (same shortest path as Dijkstra).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

EPS = 1e-3
BALANCE_QUALITY = 0.75
MAX_PASSES = 10
SERIALIZATION = 0.018  # seconds per server entered
CACHE_PENALTY = 10.0  # seconds


def throughputs(starts: np.ndarray, ends: np.ndarray, thr: np.ndarray, num_blocks: int) -> np.ndarray:
    """Per block, the summed throughput of the given (joining + online) servers."""
    diff = np.zeros(num_blocks + 1)
    np.add.at(diff, starts, thr)
    np.add.at(diff, ends, -thr)
    return np.cumsum(diff)[:num_blocks]


def best_start(t: np.ndarray, n: int) -> int:
    """argmin over i of (sorted(t[i:i+n]), i)."""
    windows = np.sort(sliding_window_view(t, n), axis=1)  # (starts, n)
    return int(np.lexsort(windows.T[::-1])[0])  # stable: ties go to the smallest start


def should_choose_other_blocks(me: int, starts: np.ndarray, ns: np.ndarray, thr: np.ndarray, num_blocks: int,
                               rng: np.random.Generator, quality: float = BALANCE_QUALITY) -> bool:
    """Petals' rebalancing rule for server ``me`` (an index into the arrays of joining/online servers)."""
    starts = starts.copy()
    t = throughputs(starts, starts + ns, thr, num_blocks)
    initial = t.min()
    s, n = starts[me], ns[me]
    t[s:s + n] -= thr[me] * (1 + EPS)
    if initial > EPS and t.min() <= 0:
        return False  # moving would make the swarm disjoint
    new = best_start(t, n)
    if new == s:
        return False
    if initial >= (quality - EPS) * float(np.dot(thr, ns)) / num_blocks:
        return False  # exact shortcut: no arrangement's weakest block beats the mean block, so none passes
    t[s:s + n] += thr[me] * EPS
    starts[me] = new
    t[new:new + n] += thr[me]
    for _ in range(MAX_PASSES):
        moved = False
        for j in rng.permutation(len(starts)):
            s, n = starts[j], ns[j]
            t[s:s + n] -= thr[j] * (1 + EPS)
            new = best_start(t, n)
            t[s:s + n] += thr[j] * EPS
            if new != s:
                starts[j], moved = new, True
            t[starts[j]:starts[j] + n] += thr[j]
        if not moved:
            break
    new_min = t.min()
    if new_min < initial or new_min < EPS:
        return False
    return initial / new_min < quality - EPS


def route(starts: np.ndarray, ends: np.ndarray, block_seconds: np.ndarray, client_rtt: np.ndarray,
          peer_rtt, cache_ok: np.ndarray, first: int, last: int) -> list[tuple[int, int, int]] | None:
    """Petals' min-latency inference route over [first, last) through the given servers (all usable):
    a list of (server index, start, end), or None if some block is uncovered.

    ``peer_rtt(a, idx)``: round trips from server ``a`` to the servers ``idx`` (seconds, array)."""
    INF = float("inf")
    best_exit = np.full(len(starts), INF)  # cost of leaving server j at min(end_j, last)
    came = np.full(len(starts), -2)  # predecessor server (-1: the client), and where j was entered
    entered = np.zeros(len(starts), dtype=int)
    exits = np.minimum(ends, last)
    penalty = np.where(cache_ok, 0.0, CACHE_PENALTY)
    for pos in range(first, last):
        targets = np.nonzero((starts <= pos) & (ends > pos))[0]
        if len(targets) == 0:
            return None
        through = (exits[targets] - pos) * block_seconds[targets] + SERIALIZATION + penalty[targets]
        if pos == first:
            cost, pred = client_rtt[targets] / 2 + through, np.full(len(targets), -1)
        else:
            sources = np.nonzero((exits == pos) & np.isfinite(best_exit))[0]
            if len(sources) == 0:
                continue
            hop = np.stack([peer_rtt(a, targets) for a in sources]) / 2  # (sources, targets)
            total = best_exit[sources][:, None] + hop
            arg = total.argmin(axis=0)
            cost, pred = total[arg, np.arange(len(targets))] + through, sources[arg]
        better = cost < best_exit[targets]
        best_exit[targets[better]] = cost[better]
        came[targets[better]] = pred[better]
        entered[targets[better]] = pos
    done = np.nonzero((exits == last) & np.isfinite(best_exit))[0]
    if len(done) == 0:
        return None
    j = int(done[np.argmin(best_exit[done] + client_rtt[done] / 2)])
    hops = []
    while j >= 0:
        hops.append((j, int(entered[j]), int(exits[j])))
        j = int(came[j])
    return hops[::-1]
