"""Failover inside a session step: a failed hop is replaced by a fresh route over its blocks, which rebuilds
the hop's cache by replaying every input the client kept (the same computation, so the same bits); a hop
that equivocated is replaced with every hop after it. Bounded by the config's max_retries."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import wire
from client.errors import PeerError, SwarmError
from client.hop import HopSession, StepInput

if TYPE_CHECKING:
    from client.session import SessionCore


class Failover:
    def __init__(self, session: "SessionCore"):
        self.session = session

    def count(self, retries: int, error: PeerError, recover: bool) -> int:
        """Count one more failover in this step, or raise ``error`` if it may not be recovered from."""
        if not error.recoverable or not recover:
            raise error
        if retries >= self.session.swarm.cfg.max_retries:
            raise SwarmError(f"gave up after {retries} failovers in one step; last error: {error}") from error
        return retries + 1

    async def rebuild(self, culprit: int, error: PeerError) -> tuple[int, StepInput]:
        """Hop ``culprit`` pushed one thing and told us another: every hop after it computed on what we
        never saw. Replace the culprit (banned) and every later hop (not banned), replaying what each was
        sent; returns where the route resumes and the input for it (the culprit's replacement's output)."""
        session = self.session
        await session.fill_holes()
        for j in reversed(range(culprit + 1, len(session.hops))):
            await self.replace(j, error, ban=False)
        old_len = len(session.hops)
        await self.replace(culprit, error)
        resume = culprit + 1 + len(session.hops) - old_len
        last = session.hops[resume - 1]
        return resume, dataclasses.replace(last.history[-1], hidden=last.outputs[-1])

    async def replace(self, i: int, error: PeerError, *, ban: bool = True) -> None:
        """Swap hop i for a fresh route over its blocks and replay its history into it. Every peer that
        fails on the way is avoided too; at most max_retries attempts. ``ban=False``: the hop is rebuilt
        but its peer did nothing wrong."""
        session, swarm = self.session, self.session.swarm
        failed = session.hops[i]
        await session.fill_holes()  # while the failed hop's neighbours still keep what it was named
        if session.rpc == wire.RPC_INFERENCE and failed.history:
            session.retired.append(failed.served())  # the tokens so far came from its outputs: audit them too
        if ban:
            swarm.mark_failed(failed.hop.peer_id, error)
        await failed.stream.close(timeout=0)
        for _ in range(swarm.cfg.max_retries):
            replacement: list[HopSession] = []
            try:
                replacement = await session.open_route(failed.hop.start, failed.hop.end)
                probe = swarm.probe()
                for x in failed.history:
                    x = await session.holes.whole(x)
                    timeout = swarm.step_timeout(x.hidden.shape[0] * x.hidden.shape[1])
                    for new in replacement:
                        x = dataclasses.replace(x, hidden=await new.step(x, timeout, probe))
            except PeerError as e:
                if not e.recoverable:
                    raise
                swarm.mark_failed(e.peer_id, e)
                await session.close_hops(replacement)
                continue
            session.hops[i:i + 1] = replacement
            return
        raise SwarmError(f"could not replace the peer for blocks [{failed.hop.start}, {failed.hop.end}) "
                         f"after {swarm.cfg.max_retries} attempts; last error: {error}")
