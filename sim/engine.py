"""The event loop: one run of one (placement, routing) policy pair over a ``Workload``.

Events sit in a heap of (seconds, sequence, kind, a, b). Peers arrive, choose blocks (placement policy,
from the records announced so far), load them for ``reload_per_block`` seconds per block (JOINING), serve
(ONLINE), re-announce every ``announce_period`` s, check whether to move every balance interval, and leave
abruptly when their lifetime ends. A move by our placement loads the new span while the old one keeps
serving (``peer/server.py``); a Petals move is a full reload whose sessions fail over.

Sessions. A client plans a route from its view (the DHT records as of its last refresh, every ``refresh``
seconds), then opens it: a hop on a peer that is gone, no longer serves those blocks, or lacks the KV
cache the session declared is a failover (ban the peer for this session, stall ``failover_detect`` s,
re-plan that hop's range). A peer that leaves (or reloads, Petals) mid-session fails over its sessions
the same way, stalling also for the replay of the history (prompt + tokens so far) as a prefill on the
new hops (``prefill_speedup`` times cheaper per token than a decode step).

Per-token latency of a session = sum over its hops of (round trip client <-> peer + blocks x the peer's
seconds per block x (1 + ``load_factor`` x (sessions on the peer - 1))): each session sharing a peer
slows the others by ``load_factor`` of the compute (the LOAD_FACTOR model of ``client/routing.py``, a
linear stand-in for batched decoding; 0.5 by default, like routing's constant). Whenever a peer's session
count changes, every session on it is re-timed (processor-sharing style), so a session's duration follows
its load. Prefill time of the first step is not counted.
"""

from __future__ import annotations

import dataclasses
import heapq
import random

import numpy as np

from dht.records import PeerRecord, PeerState
from sim import geo, policies
from sim.metrics import Metrics
from sim.workload import CACHE_TOKENS, NUM_BLOCKS, Workload

ARRIVE, LOADED, LEAVE, ANNOUNCE, BALANCE, MOVED, CLIENT, END, REFRESH, SAMPLE = range(10)
ABSENT, JOINING, ONLINE, GONE = range(4)


@dataclasses.dataclass(frozen=True)
class SimConfig:
    placement: str = "ours"  # "ours" | "petals"
    routing: str = "ours"  # "ours" | "petals"
    warmup: float = 600.0  # seconds before measuring
    refresh: float = 60.0  # seconds between a client's DHT snapshots
    announce_period: float = 30.0  # seconds between a peer's re-announcements
    balance_period: float = 60.0  # mean seconds between rebalancing checks
    balance_threshold: float = 0.2  # ours: should_move's threshold (peer/config.py default)
    reload_per_block: float = 10.0  # seconds to load one block
    load_factor: float = 0.5
    failover_detect: float = 1.0  # seconds a failed hop costs before the re-planned one runs
    prefill_speedup: float = 64.0  # a replayed token costs this many times less than a decoded one
    max_retries: int = 16  # failovers one session may take (client.config ClientConfig.max_retries)
    bin_seconds: float = 60.0  # time-series resolution

    @property
    def name(self) -> str:
        return f"{self.placement} placement + {self.routing} routing"


@dataclasses.dataclass
class Result:
    name: str
    metrics: dict[str, float]
    series_t: list[float]  # seconds: start of each time bin
    series_tokens_per_s: list[float]
    samples: list[tuple[float, float, float, int, float]]  # t, min block strength, mean, peers online, mean sessions/peer
    latency_edges: list[float]
    latency_tokens: list[float]


class _Session:
    __slots__ = ("sid", "client", "k", "tokens_left", "done", "prompt", "max_length", "hops", "latency",
                 "seg_start", "version", "banned", "retries")

    def __init__(self, sid, client, k, tokens, prompt, max_length):
        self.sid, self.client, self.k = sid, client, k
        self.tokens_left, self.done, self.prompt, self.max_length = float(tokens), 0.0, prompt, max_length
        self.hops: list[tuple[int, int, int]] = []
        self.latency, self.seg_start, self.version, self.retries = 1.0, 0.0, 0, 0
        self.banned: set[str] = set()


class Sim:
    def __init__(self, w: Workload, cfg: SimConfig):
        self.w, self.cfg, self.T = w, cfg, w.cfg.duration
        n = w.num_peers
        self.placement = policies.make_placement(cfg.placement, NUM_BLOCKS, cfg.balance_threshold)
        self.routing = policies.make_routing(cfg.routing, NUM_BLOCKS, w.cfg.seed)
        self.m = Metrics(cfg.warmup, self.T, cfg.bin_seconds)
        self.pid = [f"peer{i}" for i in range(n)]
        self.index = {p: i for i, p in enumerate(self.pid)}
        self.state = [ABSENT] * n
        self.start, self.end = [0] * n, [0] * n
        self.thr = [1.0 / (int(w.num_blocks[i]) * float(w.block_seconds[i])) for i in range(n)]
        self.sb = [float(x) for x in w.block_seconds]
        self.sessions: list[set[int]] = [set() for _ in range(n)]
        self.cache_used = [0] * n
        self.gen, self.moving = [0] * n, [False] * n
        self.rng = [random.Random(int(s)) for s in w.seed_of]
        self.dht: dict[str, PeerRecord] = {}
        self.cover = np.zeros(NUM_BLOCKS, dtype=int)
        self.strength = np.zeros(NUM_BLOCKS)
        self.uncovered_since: float | None = 0.0  # every block starts uncovered
        self.cell_rtt = geo.rtt(w.cell_lat[:, None], w.cell_lon[:, None], geo.LAST_MILE_MEDIAN,
                                w.lat[None, :], w.lon[None, :], w.mile[None, :])  # (cells, peers)
        self.view = policies.View(0, [], self.index, self.cell_rtt, w.lat, w.lon, w.mile)
        self.live: dict[int, _Session] = {}
        self.next_sid = 0
        self.heap: list[tuple] = []
        self.seq = 0
        self.now = 0.0

    # ---- event plumbing ----------------------------------------------------------------------------

    def push(self, t: float, kind: int, a: int = 0, b: int = 0) -> None:
        if t <= self.T:
            self.seq += 1
            heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def run(self) -> Result:
        w = self.w
        for i in range(w.num_peers):
            self.push(float(w.arrive[i]), ARRIVE, i)
        for c in range(len(w.client_cell)):
            self.push(float(w.first_start[c]), CLIENT, c, 0)
        self.push(0.0, REFRESH)
        self.push(0.0, SAMPLE)
        handlers = {ARRIVE: self.on_arrive, LOADED: self.on_loaded, LEAVE: self.on_leave,
                    ANNOUNCE: self.on_announce, BALANCE: self.on_balance, MOVED: self.on_moved,
                    CLIENT: self.on_client, END: self.on_end, REFRESH: self.on_refresh, SAMPLE: self.on_sample}
        while self.heap:
            t, _, kind, a, b = heapq.heappop(self.heap)
            self.now = t
            handlers[kind](a, b)
        self.now = self.T
        for s in list(self.live.values()):
            self.finalize(s)
        self.set_cover(0, 0, 0)  # closes the uncovered interval
        self.m.plans = self.routing.calls
        return Result(self.cfg.name, self.m.summary(), [b * self.m.bin for b in range(len(self.m.series_tokens))],
                      list(self.m.series_tokens / self.m.bin), self.m.samples, list(self.m.edges),
                      list(self.m.latency))

    # ---- peers -------------------------------------------------------------------------------------

    def record(self, i: int) -> PeerRecord:
        return PeerRecord(peer_id=self.pid[i], model_id=policies.MODEL_ID, start=self.start[i], end=self.end[i],
                          state=PeerState.ONLINE if self.state[i] == ONLINE else PeerState.JOINING,
                          throughput=self.thr[i], dtype="bfloat16", version="sim",
                          cache_tokens_left=max(0, CACHE_TOKENS - self.cache_used[i]),
                          num_sessions=len(self.sessions[i]), model_blocks=NUM_BLOCKS)

    def announce(self, i: int) -> None:
        self.dht[self.pid[i]] = self.record(i)

    def others(self, i: int) -> list[PeerRecord]:
        me = self.pid[i]
        return [r for p, r in self.dht.items() if p != me]

    def set_cover(self, start: int, end: int, delta: int, thr: float = 0.0) -> None:
        if self.uncovered_since is not None:
            self.m.uncovered += self.m.window(self.uncovered_since, self.now)
            self.uncovered_since = self.now
        self.cover[start:end] += delta
        self.strength[start:end] += delta * thr
        self.uncovered_since = self.now if (self.cover == 0).any() else None

    def on_arrive(self, i: int, _: int) -> None:
        n = int(self.w.num_blocks[i])
        self.start[i] = self.placement.choose(self.others(i), n, self.rng[i])
        self.end[i] = self.start[i] + n
        self.state[i] = JOINING
        self.announce(i)
        self.push(self.now + n * self.cfg.reload_per_block, LOADED, i, self.gen[i])
        self.push(self.now + self.cfg.announce_period, ANNOUNCE, i)
        self.push(float(self.w.arrive[i] + self.w.lifetime[i]), LEAVE, i)

    def on_loaded(self, i: int, gen: int) -> None:
        if self.state[i] != JOINING or gen != self.gen[i]:
            return
        self.state[i] = ONLINE
        self.set_cover(self.start[i], self.end[i], 1, self.thr[i])
        self.announce(i)
        self.push(self.now + self.placement.interval(self.rng[i], self.cfg.balance_period), BALANCE, i, gen)

    def on_announce(self, i: int, _: int) -> None:
        if self.state[i] in (JOINING, ONLINE):
            self.announce(i)
            self.push(self.now + self.cfg.announce_period, ANNOUNCE, i)

    def on_leave(self, i: int, _: int) -> None:
        if self.state[i] == ONLINE:
            self.set_cover(self.start[i], self.end[i], -1, self.thr[i])
        self.state[i] = GONE
        self.dht.pop(self.pid[i], None)
        self.fail_sessions(i)

    def on_balance(self, i: int, gen: int) -> None:
        if self.state[i] != ONLINE or gen != self.gen[i]:
            return
        self.push(self.now + self.placement.interval(self.rng[i], self.cfg.balance_period), BALANCE, i, gen)
        if self.moving[i] or self.cfg.balance_period <= 0:
            return
        new = self.placement.check(self.others(i), self.record(i), self.rng[i])
        if new is None or new == self.start[i]:
            return
        n = self.end[i] - self.start[i]
        if self.m.measured(self.now):
            self.m.moves += 1
        if self.placement.full_reload:
            self.set_cover(self.start[i], self.end[i], -1, self.thr[i])
            self.state[i], self.gen[i] = JOINING, self.gen[i] + 1
            self.start[i], self.end[i] = new, new + n
            self.announce(i)
            self.fail_sessions(i)
            self.push(self.now + n * self.cfg.reload_per_block, LOADED, i, self.gen[i])
        else:
            self.moving[i] = True
            self.push(self.now + n * self.cfg.reload_per_block, MOVED, i, new)

    def on_moved(self, i: int, new: int) -> None:
        self.moving[i] = False
        if self.state[i] != ONLINE:
            return
        n = self.end[i] - self.start[i]
        self.set_cover(self.start[i], self.end[i], -1, self.thr[i])
        self.start[i], self.end[i] = new, new + n
        self.set_cover(new, new + n, 1, self.thr[i])
        self.announce(i)  # sessions already open stay on the old blocks until they end

    # ---- clients and sessions ----------------------------------------------------------------------

    def on_refresh(self, _: int, __: int) -> None:
        self.view = policies.View(self.view.version + 1, list(self.dht.values()), self.index, self.cell_rtt,
                                  self.w.lat, self.w.lon, self.w.mile)
        self.push(self.now + self.cfg.refresh, REFRESH)

    def on_sample(self, _: int, __: int) -> None:
        online = [i for i, s in enumerate(self.state) if s == ONLINE]
        load = float(np.mean([len(self.sessions[i]) for i in online])) if online else 0.0
        self.m.samples.append((self.now, float(self.strength.min()), float(self.strength.mean()), len(online), load))
        self.push(self.now + self.cfg.bin_seconds, SAMPLE)

    def on_client(self, c: int, k: int) -> None:
        w = self.w
        if k >= w.tokens.shape[1]:
            return
        s = _Session(self.next_sid, c, k, int(w.tokens[c, k]), int(w.prompt[c, k]), int(w.max_length[c, k]))
        self.next_sid += 1
        s.seg_start = self.now
        touched: set[int] = set()
        if not self.open(s, 0, NUM_BLOCKS, touched):
            self.abort(s, touched)
            return
        self.live[s.sid] = s
        self.retime(touched)

    def valid(self, p: int, a: int, b: int, s: _Session) -> bool:
        return (self.state[p] == ONLINE and self.start[p] <= a and b <= self.end[p]
                and self.cache_used[p] + s.max_length <= CACHE_TOKENS)

    def open(self, s: _Session, first: int, last: int, touched: set[int]) -> bool:
        """Plan and attach hops covering [first, last); False if no route could be opened."""
        pending = [(first, last)]
        cell = int(self.w.client_cell[s.client])
        while pending:
            a, b = pending.pop()
            plan = self.routing(self.view, cell, a, b, s.max_length, frozenset(s.banned))
            if plan is None:
                return False
            for p, x, y in plan:
                if self.valid(p, x, y, s):
                    s.hops.append((p, x, y))
                    self.sessions[p].add(s.sid)
                    self.cache_used[p] += s.max_length
                    touched.add(p)
                    continue
                s.retries += 1
                if s.retries > self.cfg.max_retries:
                    return False
                s.banned.add(self.pid[p])
                self.failover(s, 0.0)
                pending.append((x, y))
        return True

    def failover(self, s: _Session, replay_seconds: float) -> None:
        if self.m.measured(self.now):
            self.m.failovers += 1
        s.seg_start = max(s.seg_start, self.now) + self.cfg.failover_detect + replay_seconds
        self.m.stall(self.now, s.seg_start - self.now + s.latency)

    def detach(self, s: _Session, hop: tuple[int, int, int], touched: set[int]) -> None:
        p = hop[0]
        s.hops.remove(hop)
        self.sessions[p].discard(s.sid)
        self.cache_used[p] -= s.max_length
        touched.add(p)

    def fail_sessions(self, p: int) -> None:
        """Peer ``p`` stopped serving: each of its sessions re-plans the range it ran there."""
        touched: set[int] = set()
        for sid in sorted(self.sessions[p]):
            s = self.live[sid]
            self.finalize(s)
            for hop in [h for h in s.hops if h[0] == p]:
                self.detach(s, hop, touched)
                s.banned.add(self.pid[p])
                s.retries += 1
                replay = (s.prompt + s.done) * (hop[2] - hop[1]) * self.sb[p] / self.cfg.prefill_speedup
                self.failover(s, replay)
                if s.retries > self.cfg.max_retries or not self.open(s, hop[1], hop[2], touched):
                    del self.live[sid]
                    self.abort(s, touched)
                    break
        self.retime(touched)

    def abort(self, s: _Session, touched: set[int]) -> None:
        for hop in list(s.hops):
            self.detach(s, hop, touched)
        if self.m.measured(self.now):
            self.m.aborted += 1
        self.push(self.now + float(self.w.think[s.client, s.k]), CLIENT, s.client, s.k + 1)

    def per_token(self, s: _Session) -> float:
        lf, total, row = self.cfg.load_factor, 0.0, self.cell_rtt[int(self.w.client_cell[s.client])]
        for p, a, b in s.hops:
            total += row[p] + (b - a) * self.sb[p] * (1 + lf * (len(self.sessions[p]) - 1))
        return float(total)

    def finalize(self, s: _Session) -> None:
        """Credit the tokens decoded since the session's last re-timing."""
        if self.now > s.seg_start:
            done = min(s.tokens_left, (self.now - s.seg_start) / s.latency)
            self.m.decode(s.seg_start, self.now, done, s.latency)
            s.tokens_left -= done
            s.done += done
            s.seg_start = self.now

    def retime(self, peers: set[int]) -> None:
        sids = set()
        for p in peers:
            sids |= self.sessions[p]
        for sid in sorted(sids):
            s = self.live.get(sid)
            if s is None:
                continue
            self.finalize(s)
            s.latency = self.per_token(s)
            s.version += 1
            self.push(max(s.seg_start, self.now) + s.tokens_left * s.latency, END, sid, s.version)

    def on_end(self, sid: int, version: int) -> None:
        s = self.live.get(sid)
        if s is None or s.version != version:
            return
        self.finalize(s)
        del self.live[sid]
        touched: set[int] = set()
        for hop in list(s.hops):
            self.detach(s, hop, touched)
        if self.m.measured(self.now):
            self.m.completed += 1
        self.retime(touched)
        self.push(self.now + float(self.w.think[s.client, s.k]), CLIENT, s.client, s.k + 1)


def run(w: Workload, cfg: SimConfig) -> Result:
    return Sim(w, cfg).run()
