"""Placement and routing policies, and the client's view of the swarm they plan from.

Ours call the project's real code: ``peer.placement.choose_start`` / ``block_throughputs`` when a peer
joins, ``peer.placement.should_move`` every U(0.5, 1.5) x ``balance_period`` seconds (as ``peer/server.py``
does), and ``client.routing.plan_route`` with ``believed_speeds`` (a client that has timed no peer yet:
claims count, capped), round trips from ``sim.geo``, ``hop_seconds=routing.HOP_SECONDS`` and a random
stream (``rng``: each plan draws its own cost jitter, as each real client does). Petals' are in
``sim.petals``.

A Petals plan depends only on (view, client cell, range, declared cache, banned peers), so its plans are
memoised per view: every client of a cell that plans from the same snapshot gets the route the code
returned for the first of them. That is exact, not an approximation: the inputs are identical. Ours
draws jitter per plan, so it is not memoised.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np

from client import MissingBlocksError, routing
from dht.records import PeerRecord, PeerState
from peer import placement
from sim import geo, petals

MODEL_ID = "llama-80L-sim"


class View:
    """The records a client read from the DHT at one refresh, and what is derived from them lazily."""

    def __init__(self, version: int, records: list[PeerRecord], index: dict[str, int], cell_rtt: np.ndarray,
                 lat: np.ndarray, lon: np.ndarray, mile: np.ndarray):
        self.version, self.records, self.index = version, records, index
        self.cell_rtt, self._lat, self._lon, self._mile = cell_rtt, lat, lon, mile
        self._rtts: dict[int, dict[str, float]] = {}
        self._speeds: dict[str, float] | None = None
        self._online: list[PeerRecord] | None = None

    def rtts(self, cell: int) -> dict[str, float]:
        """Seconds from the cell to each peer of the view (what the client's pings measured)."""
        if cell not in self._rtts:
            row = self.cell_rtt[cell]
            self._rtts[cell] = {r.peer_id: float(row[self.index[r.peer_id]]) for r in self.records}
        return self._rtts[cell]

    def speeds(self) -> dict[str, float]:
        if self._speeds is None:
            self._speeds = routing.believed_speeds(self.records, {})
        return self._speeds

    def online(self) -> list[PeerRecord]:
        if self._online is None:
            self._online = [r for r in self.records if r.state == PeerState.ONLINE]
        return self._online

    def peer_rtt(self, a: int, idx: np.ndarray) -> np.ndarray:
        return geo.rtt(self._lat[a], self._lon[a], self._mile[a], self._lat[idx], self._lon[idx], self._mile[idx])


# ---- placement ---------------------------------------------------------------------------------------

class OurPlacement:
    name = "ours"
    full_reload = False  # peer/server.py loads the new blocks while still serving the old ones

    def __init__(self, num_blocks: int, threshold: float):
        self.num_blocks, self.threshold = num_blocks, threshold

    def interval(self, rng: random.Random, period: float) -> float:
        return rng.uniform(0.5 * period, 1.5 * period)

    def choose(self, others: list[PeerRecord], n: int, rng: random.Random) -> int:
        return placement.choose_start(placement.block_throughputs(others, self.num_blocks), n, rng)

    def check(self, others: list[PeerRecord], me: PeerRecord, rng: random.Random) -> int | None:
        return placement.should_move(others + [me], me, self.num_blocks, threshold=self.threshold, rng=rng)


def _arrays(records: list[PeerRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counted = [r for r in records if r.state in (PeerState.JOINING, PeerState.ONLINE)]
    return (np.array([r.start for r in counted], dtype=int), np.array([r.num_blocks for r in counted], dtype=int),
            np.array([r.throughput for r in counted], dtype=float))


class PetalsPlacement:
    name = "petals"
    full_reload = True  # Petals shuts its container down and reloads (its sessions fail)

    def __init__(self, num_blocks: int, quality: float = petals.BALANCE_QUALITY):
        self.num_blocks, self.quality = num_blocks, quality

    def interval(self, rng: random.Random, period: float) -> float:
        return rng.uniform(0.0, 2.0 * period)

    def choose(self, others: list[PeerRecord], n: int, rng: random.Random) -> int:
        starts, ns, thr = _arrays(others)
        return petals.best_start(petals.throughputs(starts, starts + ns, thr, self.num_blocks), n)

    def check(self, others: list[PeerRecord], me: PeerRecord, rng: random.Random) -> int | None:
        starts, ns, thr = _arrays(others + [me])
        nrng = np.random.default_rng(rng.getrandbits(63))
        if not petals.should_choose_other_blocks(len(starts) - 1, starts, ns, thr, self.num_blocks, nrng,
                                                 self.quality):
            return None
        return self.choose(others, me.num_blocks, rng)  # after shutting down, it chooses blocks afresh


# ---- routing -----------------------------------------------------------------------------------------

Plan = list[tuple[int, int, int]]  # (peer index, start, end)


class _Memo:
    def __init__(self, plan: Callable[..., Plan | None], memoise: bool = True):
        self._plan, self._version, self._memo, self._memoise = plan, -1, {}, memoise
        self.calls = self.hits = 0

    def __call__(self, view: View, cell: int, start: int, end: int, max_length: int,
                 banned: frozenset[str]) -> Plan | None:
        if view.version != self._version:
            self._version, self._memo = view.version, {}
        if not self._memoise:
            self.calls += 1
            return self._plan(view, cell, start, end, max_length, banned)
        key = (cell, start, end, max_length, banned)
        if key in self._memo:
            self.hits += 1
        else:
            self.calls += 1
            self._memo[key] = self._plan(view, cell, start, end, max_length, banned)
        return self._memo[key]


def _our_plan(num_blocks: int, rng: random.Random | None = None):
    def plan(view: View, cell: int, start: int, end: int, max_length: int, banned: frozenset[str]) -> Plan | None:
        try:
            hops = routing.plan_route(view.records, MODEL_ID, num_blocks, rtts=view.rtts(cell), banned=banned,
                                      start=start, end=end, cache_tokens_needed=max_length, speeds=view.speeds(),
                                      hop_seconds=routing.HOP_SECONDS, rng=rng)
        except MissingBlocksError:
            return None
        return [(view.index[h.peer_id], h.start, h.end) for h in hops]
    return plan


def _petals_plan(view: View, cell: int, start: int, end: int, max_length: int, banned: frozenset[str]) -> Plan | None:
    usable = [r for r in view.online() if r.peer_id not in banned and r.start < end and r.end > start]
    if not usable:
        return None
    idx = np.array([view.index[r.peer_id] for r in usable])
    starts = np.array([r.start for r in usable])
    ends = np.array([r.end for r in usable])
    block_seconds = np.array([1.0 / (max(r.throughput, routing.MIN_THROUGHPUT) * r.num_blocks) for r in usable])
    cache_ok = np.array([r.cache_tokens_left >= max_length for r in usable])
    client_rtt = view.cell_rtt[cell][idx]
    hops = petals.route(starts, ends, block_seconds, client_rtt, lambda a, js: view.peer_rtt(idx[a], idx[js]),
                        cache_ok, start, end)
    return None if hops is None else [(int(idx[j]), a, b) for j, a, b in hops]


def make_routing(name: str, num_blocks: int, seed: int = 0) -> _Memo:
    """``seed``: of our routing's jitter stream (a run is deterministic given it)."""
    if name == "ours":
        return _Memo(_our_plan(num_blocks, random.Random(seed)), memoise=False)
    if name == "petals":
        return _Memo(_petals_plan)
    raise ValueError(f"unknown routing policy {name!r}: use 'ours' or 'petals'")


def make_placement(name: str, num_blocks: int, threshold: float):
    if name == "ours":
        return OurPlacement(num_blocks, threshold)
    if name == "petals":
        return PetalsPlacement(num_blocks)
    raise ValueError(f"unknown placement policy {name!r}: use 'ours' or 'petals'")


# (placement, routing) pairs compared by ``python -m sim``
POLICIES = (("ours", "ours"), ("petals", "petals"), ("ours", "petals"), ("petals", "ours"))
