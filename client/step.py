"""One chunk of a session step through every hop of the route, hop by hop: receive -> check -> advance.

- receive: the hop's reply (sent by the client, or pushed to the hop by the one before it), while a probe
  watches the hop (and, when it pushes, the next one);
- check:   a hop fed by a push computed on what the hop before it returned to the client (equivocation);
- advance: note the hop's timing and its holes, then see that the next hop gets this output: pushed by the
  peer, or relayed by the client when the push failed, or sent to a replacement when the next peer died.
A failed hop is handed to ``Failover`` and the chunk (and for the first hop, the later chunks already
queued on it) is sent again from there.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import torch

from client.errors import Equivocation, PeerError, is_fault
from client.holes import Hole
from client.hop import HopSession, StepInput
from client.liveness import Probe, WatchNext
from client.routing import Hop
from wire.phases import Timeline

if TYPE_CHECKING:
    from client.session import SessionCore
    from client.view import SwarmView

logger = logging.getLogger(__name__)

TIMED_MAX_TOKENS = 16  # steps of at most this many tokens x rows time the peers' speed (decode-like steps)


class StepClock:
    """Times each hop's part of a decode step (routing ranks peers by what they deliver); a failover stops
    it for the rest of the step (its timings would say nothing about a peer's speed)."""

    def __init__(self, view: "SwarmView", began: float | None):
        self.view = view
        self.at = began  # when the current hop's input left; None: not timed
        self.relayed, self.prev_rtt = True, 0.0  # whether the client sent that input; the last hop's RTT

    def stop(self) -> None:
        self.at = None

    def answered(self, hop: Hop) -> None:
        """``hop`` answered now. Client -> peer -> client: the whole round trip is the network's; a pushed
        input left when the previous peer answered (its reply's half trip before ours)."""
        if self.at is None:
            return
        now, rtt = time.monotonic(), self.view.rtts.get(hop.peer_id, 0.0)
        spent = now - self.at - (rtt if self.relayed else rtt / 2 - self.prev_rtt / 2)
        self.view.timed(hop.peer_id, spent, hop.end - hop.start)
        self.at, self.relayed, self.prev_rtt = now, False, rtt

    def relayed_now(self) -> None:
        """The client itself just sent the next hop its input."""
        if self.at is not None:
            self.at, self.relayed = time.monotonic(), True


class StepWalk:
    """Chunk ``x`` from the first hop to the last; ``later`` chunks are already queued on the first hop.
    ``recover=False``: a failing peer raises instead of being replaced. ``began``: when the chunk was
    sent, to time each hop's part of a decode step; None: not timed."""

    def __init__(self, session: "SessionCore", x: StepInput, later: list[StepInput], *, recover: bool, push: bool,
                 began: float | None, timeline: Timeline | None = None):
        self.session, self.x, self.later, self.recover, self.push = session, x, later, recover, push
        swarm = session.swarm
        self.timeout = swarm.step_timeout(x.hidden.shape[0] * x.hidden.shape[1])
        self.probe: Probe = swarm.probe()
        self.clock = StepClock(swarm, began)
        self.i = 0  # the hop whose reply is awaited
        self.retries = 0
        self.hole: Hole | None = None  # the outputs of the hop before i that it named instead of sending
        self.timeline = timeline  # the session step's phases: ``wait`` and ``decode`` per hop

    async def run(self) -> torch.Tensor:
        hops = self.session.hops
        while self.i < len(hops):
            watch = self._watch()
            try:
                meta, out = await self._receive(hops[self.i], watch)
                if self.timeline is not None:
                    self.timeline.split(("wait", time.perf_counter() - hops[self.i].decode_seconds), "decode")
            except PeerError as e:
                await self._fail_over(e)
                continue
            await self._advance(hops[self.i], meta, out, watch)
        return self.x.hidden

    def _watch(self) -> Probe | WatchNext:
        hops = self.session.hops
        if self.push and self.i + 1 < len(hops):
            return WatchNext(self.probe, hops[self.i + 1].hop.peer_id)
        return self.probe

    async def _receive(self, hop: HopSession, watch: Probe | WatchNext) -> tuple[dict, torch.Tensor]:
        """The hop's reply, checked: a pushed input must be what the hop before returned to the client."""
        meta, out = await hop.receive(self.x, self.timeout, watch)
        if self.i > 0 and not await self.session.received_as_returned(meta, self.x, self.hole):
            hop.forget_last()
            raise Equivocation(self.session.hops[self.i - 1].hop.peer_id, "pushed the next peer other hidden "
                               "states than it returned to the client")
        return meta, out

    async def _fail_over(self, error: PeerError) -> None:
        """Replace the failed hop (or, for an equivocation, its culprit and every hop after it), then send
        the chunk again from there."""
        failover = self.session.failover
        self.clock.stop()
        self.retries = failover.count(self.retries, error, self.recover)
        if isinstance(error, Equivocation):
            self.i, self.x = await failover.rebuild(self.i - 1, error)
        else:
            await failover.replace(self.i, error, ban=is_fault(error))
        self.hole = None
        if self.i < len(self.session.hops):
            for resend in [self.x] + (self.later if self.i == 0 else []):
                await self._send(self.i, resend)

    async def _advance(self, hop: HopSession, meta: dict, out: torch.Tensor, watch: Probe | WatchNext) -> None:
        self.session.swarm.bans.succeed(hop.hop.peer_id)
        self.clock.answered(hop.hop)
        if self.hole is not None:
            self.hole.sources.append((hop, "inputs"))  # the next peer keeps them as its inputs too
        self.hole = None
        if meta.get("omitted"):
            self.hole = Hole(out, meta["omitted"], meta["omitted_digest"], self.x.offset, [(hop, "outputs")])
            self.session.holes.add(self.hole)
        self.x = dataclasses.replace(self.x, hidden=out)
        self.i += 1
        await self._hand_on(hop, meta, watch)

    async def _hand_on(self, hop: HopSession, meta: dict, watch: Probe | WatchNext) -> None:
        """See that the next hop gets this output: the peer pushed it, unless the next peer died or froze
        while we waited (replaced now, rather than relayed to and waited for again) or the push failed
        (the client relays that link)."""
        if isinstance(watch, WatchNext) and watch.next_failed is not None:
            self.clock.stop()
            self.retries = self.session.failover.count(self.retries, watch.next_failed, self.recover)
            await self.session.failover.replace(self.i, watch.next_failed)
            await self._send(self.i, self.x)
        elif self.i < len(self.session.hops) and meta.get("pushed") is not True:
            if "push_error" in meta:
                logger.info("peer %s could not push to the next peer (%s): relaying that link",
                            hop.hop.peer_id, meta["push_error"])
            await self._send(self.i, self.x)
            self.clock.relayed_now()

    async def _send(self, i: int, x: StepInput) -> None:
        whole = await self.session.holes.whole(x)
        self.session.hops[i].send(whole, self.session.downstream(i + 1, self.push))
