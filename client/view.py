"""What a client knows of the swarm: the peers' records from the DHT, pings and round-trip times, the speeds
it timed, failures (bans with back-off), the reputation book, and route planning over all of it."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from client import routing
from client.bans import BanList
from client.config import ClientConfig
from client.errors import MissingBlocksError, PeerBusy, PeerError, SwarmError
from client.liveness import Probe
from client.routing import Hop
from client.transport import Transport
from dht import directory
from dht.directory import DHTDied
from dht.node import Node
from dht.records import PeerRecord
from verify.policy import standing_cost
from verify.reputation import ReputationBook, identity_signals

logger = logging.getLogger(__name__)


class SwarmView:
    """Async: everything here runs on the client's loop thread."""

    def __init__(self, cfg: ClientConfig, transport: Transport, node: Node, peer_id: str):
        self.cfg, self.transport, self.node, self.peer_id = cfg, transport, node, peer_id
        self.rtts: dict[str, float] = {}  # peer id -> smoothed RTT (seconds) of peers that answered
        self.speeds: dict[str, float] = {}  # peer id -> smoothed seconds per block of its decode steps, as timed here
        self.unreachable: set[str] = set()  # peers whose last ping failed
        self.records: list[PeerRecord] = []
        self._sightings: dict[str, tuple[PeerRecord, float]] = {}  # peer id -> its last record read, when (monotonic)
        self.route_rng = random.Random() if cfg.route_jitter else None  # for plan_route's jitter
        self.records_at = float("-inf")  # monotonic time of the last fetch
        self.bans = BanList(base=cfg.ban_base)
        self.retries = 0  # failed hops recovered from, over the client's life (for tests and notes)
        self.book = ReputationBook()
        if cfg.reputation_path:
            self.book.load(cfg.reputation_path)

    @property
    def dht(self):
        """The node's current DHT (a new one after the node restarted a dead DHT process)."""
        return self.node.dht

    async def refresh(self, *, ping_all: bool = False) -> None:
        """Fetch every record of the model and ping the peers not measured yet (all of them with
        ``ping_all``, which is how a dead peer that still has a record gets noticed).

        A record the DHT stops returning is kept for ``record_grace`` seconds after it was last read, as
        long as its peer answers pings: peers that leave say so (state offline) and dead ones stop
        answering, so a live peer's record that vanished is the DHT's trouble (a restarted bootstrap node,
        a partial read during an outage), which must not shrink the routes and the checkers a client has."""
        fetched = await directory.fetch_peers(self.dht, self.cfg.model_id)
        now = self.records_at = time.monotonic()
        for r in fetched:
            self._sightings[r.peer_id] = (r, now)
        seen = {r.peer_id for r in fetched}
        for peer_id, (_, at) in list(self._sightings.items()):
            if now - at > self.cfg.record_grace or (peer_id not in seen and peer_id in self.unreachable):
                del self._sightings[peer_id]
        self.records = fetched + [r for peer_id, (r, _) in self._sightings.items() if peer_id not in seen]
        for r in self.records:  # a banned operator's new identity on the same address or name starts as a suspect
            self.book.observe(r.peer_id, identity_signals(r.maddrs, r.public_name))
        targets = self.records if ping_all else [
            r for r in self.records if r.peer_id not in self.rtts and r.peer_id not in self.unreachable]
        await asyncio.gather(*(self._ping(r) for r in targets))

    async def run_refresh_loop(self) -> None:
        """Background: re-read records and re-ping every known peer, so a dead peer stops being routed
        to within one refresh period, long before its record expires."""
        while True:
            await asyncio.sleep(self.cfg.refresh_period)
            try:
                await self.refresh(ping_all=True)
                await self.after_refresh()
            except (OSError, RuntimeError) as e:  # the DHT process is shutting down or unreachable
                logger.info("swarm refresh failed: %s", e)

    async def after_refresh(self) -> None:
        """What the background refresh does once the records are new (``SwarmCore``: judge fraud proofs)."""

    async def _ping(self, record: PeerRecord) -> None:
        try:
            await self.transport.connect(record.peer_id, record.maddrs)
            _, rtt = await self.transport.info(record.peer_id, timeout=self.cfg.ping_timeout)
        except PeerError as e:
            logger.info("peer unreachable, not routing through it: %s", e)
            self.unreachable.add(record.peer_id)
            self.rtts.pop(record.peer_id, None)
            self.transport.forget(record.peer_id)
            return
        self.unreachable.discard(record.peer_id)
        old = self.rtts.get(record.peer_id)
        self.rtts[record.peer_id] = rtt if old is None else 0.8 * old + 0.2 * rtt

    async def plan(self, start: int = 0, end: int | None = None, *, exclude: frozenset[str] = frozenset(),
                   cache_tokens_needed: int = 0, wait: bool = True, formats: tuple[str, ...] | None = None,
                   needs_backward: bool = False) -> list[Hop]:
        """A route over [start, end) avoiding banned, unreachable and excluded peers; waits up to
        route_timeout (if ``wait``) for peers to cover missing blocks. Uses the background-refreshed
        snapshot when it is recent, so failover does not wait on the DHT. ``formats`` (default: the
        client's) limits the peers' formats; with neither, one format is chosen (``routing.choose_format``).
        ``needs_backward``: only peers whose record says they serve backward passes."""
        began = time.monotonic()
        fresh_enough = 2 * self.cfg.refresh_period  # the background loop keeps the snapshot this fresh
        if time.monotonic() - self.records_at > fresh_enough:
            await self._refresh_or_keep()
        while True:
            avoid = exclude | self.bans.banned() | self.unreachable | self.book.banned()
            if needs_backward:
                avoid = avoid | {r.peer_id for r in self.records if not r.backward}
            allowed = formats or self.cfg.formats or (routing.choose_format(
                self.records, self.cfg.model_id, self.cfg.num_blocks, banned=avoid, start=start, end=end),)
            try:
                strict = self.cfg.verify_mode == "strict"
                standing = {r.peer_id: standing_cost(self.book.status(r.peer_id), self.cfg.audit_rates, strict)
                            for r in self.records}
                return routing.plan_route(self.records, self.cfg.model_id, self.cfg.num_blocks, rtts=self.rtts,
                                          banned=avoid, start=start, end=end, cache_tokens_needed=cache_tokens_needed,
                                          formats=allowed, speeds=routing.believed_speeds(self.records, self.speeds),
                                          standing=standing, hop_seconds=self.cfg.hop_seconds, rng=self.route_rng)
            except MissingBlocksError as e:
                waited = time.monotonic() - began
                if not wait or waited > self.cfg.route_timeout:
                    if needs_backward:
                        raise SwarmError(f"no peer that serves backward passes covers blocks {e.missing} (peers "
                                         f"started with --no-backward, or older ones, do not): gradients through "
                                         f"the swarm need them") from None
                    raise MissingBlocksError(e.model_id, e.missing, e.num_blocks, waited, e.formats, e.others) from None
            await asyncio.sleep(0.5)
            try:
                await self.refresh()  # peers may have joined meanwhile
            except DHTDied as e:  # the node's watcher restarts it within a second or so; wait on
                logger.info("could not re-read the swarm: %s", e)

    async def _refresh_or_keep(self) -> None:
        """Refresh before planning, but within ``stale_refresh_timeout`` when there is a snapshot to fall
        back on: a frozen peer is also a DHT node and can hold a DHT read for seconds (measured 1.5 s),
        which a failover must not wait for; bans and the unreachable set already avoid the failed peer."""
        if not self.records:
            await self.refresh()
            return
        try:
            await asyncio.wait_for(self.refresh(), self.cfg.stale_refresh_timeout)
        except asyncio.TimeoutError:
            logger.info("the DHT did not answer within %.1f s: planning from the records of %.0f s ago",
                        self.cfg.stale_refresh_timeout, time.monotonic() - self.records_at)
        except DHTDied as e:  # the node's watcher restarts it; the snapshot is good enough meanwhile
            logger.info("%s: planning from the records of %.0f s ago", e, time.monotonic() - self.records_at)

    def timed(self, peer_id: str, seconds: float, blocks: int) -> None:
        """A decode step spent ``seconds`` on ``blocks`` blocks of this peer (as the client saw it)."""
        speed = max(seconds, 0.0) / max(blocks, 1)
        old = self.speeds.get(peer_id)
        self.speeds[peer_id] = speed if old is None else 0.7 * old + 0.3 * speed

    def step_timeout(self, tokens: int) -> float:
        return self.cfg.step_timeout + self.cfg.step_timeout_per_token * tokens

    def mark_failed(self, peer_id: str, error: PeerError) -> None:
        """Avoid a peer that failed: banned with back-off, and unreachable until a ping proves otherwise."""
        duration = self.bans.fail(peer_id)
        self.retries += 1
        if not isinstance(error, PeerBusy):
            self.unreachable.add(peer_id)
            self.rtts.pop(peer_id, None)
        logger.warning("peer %s failed (%s); avoiding it for %.0f s and re-routing", peer_id, error, duration)

    def probe(self) -> Probe:
        return Probe(self.transport, self.cfg.probe_after, self.cfg.probe_timeout)
