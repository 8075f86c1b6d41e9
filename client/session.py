"""The session engine: an inference (or stateless forward) session across a route of hops, its steps
(chunked, prefix named, beam reorders and roll-backs carried by the next step), and closing it with its
audits drawn. A chunk's walk through the hops is ``client.step``; failover is ``client.failover``; the
outputs peers named instead of sending are ``client.holes``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import TYPE_CHECKING

import torch

import wire
from wire.phases import Timeline
from client.errors import MissingBlocksError, PeerBusy, PeerError, SwarmError, is_fault
from client.failover import Failover
from client.holes import Hole, Holes
from client.hop import HopSession, StepInput
from client.liveness import probed
from client.routing import Hop
from client.step import TIMED_MAX_TOKENS, StepWalk
from verify.auditor import ServedSpan

if TYPE_CHECKING:
    from client.swarm import SwarmCore

logger = logging.getLogger(__name__)

PROBE_EVERY = 32  # tokens between the histories a probe asks about


class SessionCore:
    """An inference session across a route. Each hop keeps its KV cache on its peer; the client keeps
    each hop's inputs, so when a peer dies or hangs, a replacement (one peer or several, split any
    way) rebuilds the cache by replaying them step by step — the same computation, so the same bits."""

    def __init__(self, swarm: "SwarmCore", batch_size: int, max_length: int, *, rpc: str = wire.RPC_INFERENCE,
                 needs_backward: bool = False):
        self.swarm, self.batch_size, self.max_length, self.rpc = swarm, batch_size, max_length, rpc
        self.needs_backward = needs_backward  # a training forward: only peers that can also run its backward
        self.hops: list[HopSession] = []
        self.position = 0  # tokens every hop holds
        self.rewind = False  # the next step rewrites from ``position`` (tokens after it were rolled back)
        self.reorders = 0  # beam reorderings so far; the peers apply each exactly once
        self.pending_reorder: tuple[int, ...] | None = None  # rows the next step's cache must follow
        self.formats: tuple[str, ...] | None = swarm.cfg.formats  # pinned to one format at open if None
        self.holes = Holes(swarm.transport, swarm.cfg.step_timeout)  # outputs peers named instead of sending
        self.failover = Failover(self)
        self.retired: list[ServedSpan] = []  # what replaced hops served before they failed (audited too)

    async def open(self) -> None:
        self.hops = await self.open_route(0, self.swarm.cfg.num_blocks)
        cfg = self.swarm.cfg
        if self.formats is None:  # failovers keep the format this session started in
            self.formats = (self.hops[0].hop.format,)
        mode = "peers push to each other" if cfg.push and self.rpc == wire.RPC_INFERENCE else "the client relays every hop"
        logger.info("session over %s in %s: %s; wire dtype %s", [(h.hop.start, h.hop.end) for h in self.hops],
                    " + ".join(sorted({h.hop.format for h in self.hops})), mode, cfg.wire_dtype or "as computed")

    async def open_route(self, start: int, end: int) -> list[HopSession]:
        """Open sessions on a route over [start, end). A peer that is busy, has moved to other blocks
        since our snapshot, is leaving, or fails is skipped and the route re-planned (bounded)."""
        skip: set[str] = set()
        last: PeerError | None = None
        for _ in range(self.swarm.cfg.max_retries + 1):
            try:
                route = await self.swarm.plan(start, end, exclude=frozenset(skip),
                                              cache_tokens_needed=self.batch_size * self.max_length,
                                              wait=not (last and isinstance(last, PeerBusy)), formats=self.formats,
                                              needs_backward=self.needs_backward)
            except MissingBlocksError:
                if isinstance(last, PeerBusy):
                    raise last from None  # nobody else can take it: the busy error is the useful one
                raise
            if self.rpc == wire.RPC_INFERENCE and (caught := await self.swarm.audits.settle(
                    [h.peer_id for h in route], self.swarm.cfg.step_timeout)):
                skip.update(caught)  # its audit, still running when we planned, caught it lying: plan again
                continue
            opened = await asyncio.gather(*(self.open_hop(h) for h in route), return_exceptions=True)
            failures = [r for r in opened if isinstance(r, BaseException)]
            if not failures:
                return list(opened)
            await self.close_hops([r for r in opened if isinstance(r, HopSession)])
            for failure in failures:
                if not isinstance(failure, PeerError) or not failure.recoverable:
                    raise failure
                skip.add(failure.peer_id)
                if is_fault(failure):
                    self.swarm.mark_failed(failure.peer_id, failure)
            last = failures[0] if all(isinstance(f, PeerBusy) for f in failures) else failures[-1]
            self.swarm.records_at = float("-inf")  # our snapshot may be stale: re-read it
        raise SwarmError(f"could not open a route over blocks [{start}, {end}) after "
                         f"{self.swarm.cfg.max_retries + 1} attempts; last error: {last}")

    async def open_hop(self, hop: Hop) -> HopSession:
        """Open one hop's session. A peer that froze or died since our snapshot is found out by a probe
        within about a second, not by the stream's or the step's timeout."""
        probe = self.swarm.probe()
        await self.swarm.transport.connect(hop.peer_id, hop.maddrs)
        stream = await probed(self.swarm.transport.open_stream(hop.peer_id, self.rpc), probe, hop.peer_id)
        session_id = uuid.uuid4().hex  # per hop: it is also the capability to push into the peer's session
        meta = {"op": "open", "session_id": session_id, "start": hop.start, "end": hop.end,
                "batch_size": self.batch_size, "max_length": self.max_length,
                "reorders": self.reorders}
        if not self.swarm.cfg.prefix_cache:
            meta["prefix_cache"] = False
        elif self.rpc == wire.RPC_INFERENCE:
            meta["lazy_outputs"] = True  # the outputs of reused tokens may be named instead of sent
        if self.swarm.cfg.wire_dtype is not None:
            meta["wire_dtype"] = self.swarm.cfg.wire_dtype
        try:
            stream.send(meta, [])
            await probed(stream.receive(self.swarm.cfg.step_timeout), probe, hop.peer_id)
        except BaseException:
            await stream.close()
            raise
        return HopSession(hop, stream, session_id)

    async def reorder(self, rows: list[int]) -> None:
        """Beam search: row i of every hop's cache becomes row ``rows[i]``. Costs no message: the next step
        carries it (numbered, so a step that reaches a peer twice reorders once)."""
        await self.fill_holes()  # the peers stop keeping histories whose rows move
        if len(rows) != self.batch_size or not all(0 <= r < self.batch_size for r in rows):
            raise SwarmError(f"a reordering of a batch of {self.batch_size} needs as many rows in range, got {rows}")
        if list(rows) == list(range(self.batch_size)):
            return
        index = torch.tensor(rows, dtype=torch.long)
        for hop in self.hops:
            hop.reorder(index)
        pending = self.pending_reorder
        self.pending_reorder = tuple(rows) if pending is None else tuple(pending[r] for r in rows)
        if pending is None:
            self.reorders += 1

    async def crop(self, length: int) -> None:
        """Roll the session back to its first ``length`` tokens (rejected draft tokens). Costs no message:
        the next step tells every hop to crop its cache to that offset before computing."""
        if not 0 <= length <= self.position:
            raise SwarmError(f"cannot roll a session of {self.position} tokens back to {length}")
        if length == self.position:
            return
        await self.fill_holes()  # the peers will drop what they kept after ``length``
        for hop in self.hops:
            hop.truncate(length)
        self.position = length
        self.rewind = True

    async def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   *, recover: bool = True, need_last: int = 0) -> torch.Tensor:
        """hidden (batch, t, hidden) -> (batch, t, hidden) through every hop; long inputs go in chunks.
        ``recover=False``: a failing peer raises instead of being replaced (audits target one peer).
        ``need_last`` > 0: only the last ``need_last`` positions of the result are read (the head's
        ``logits_to_keep``); outputs before them that the last peer named instead of sending stay NaN."""
        self.timeline = timeline = Timeline(self.swarm.phases)  # RemoteSession.step records it
        batch, tokens = hidden.shape[:2]
        if batch != self.batch_size:
            raise SwarmError(f"session was opened for batch size {self.batch_size}, step has {batch}")
        if self.position + tokens > self.max_length:
            raise SwarmError(f"session max_length is {self.max_length} tokens; this step would reach {self.position + tokens}")
        cfg = self.swarm.cfg
        wire_dtype = wire.HIDDEN_DTYPE_NAMES[cfg.wire_dtype] if cfg.wire_dtype else hidden.dtype
        chunk = cfg.max_chunk_tokens or wire.chunk_tokens(batch, hidden.shape[2], wire_dtype.itemsize)
        steps = []
        for begin in range(0, tokens, chunk):
            pos = position_ids[:, begin:begin + chunk]
            mask = None if attention_mask is None else attention_mask[:, : self.position + begin + pos.shape[1]]
            steps.append(StepInput(wire.to_wire_dtype(hidden[:, begin:begin + chunk], wire_dtype), pos, mask,
                                   self.position + begin, rewrite=self.rewind and begin == 0))
        if self.pending_reorder is not None:
            steps[0] = dataclasses.replace(steps[0], reorder=(self.pending_reorder, self.reorders))
        if (self.position == 0 and cfg.prefix_cache and self.rpc == wire.RPC_INFERENCE
                and batch * tokens * hidden.shape[2] * wire_dtype.itemsize >= cfg.probe_min_bytes):
            steps = await self._name_known_prefix(steps)
        outputs = await self._through_route(steps, recover, push=cfg.push and self.rpc == wire.RPC_INFERENCE,
                                            timeline=timeline)
        self.position += tokens
        self.rewind = False
        self.pending_reorder = None
        out = torch.cat(outputs, dim=1)
        needed = out[:, -need_last:] if 0 < need_last < tokens else out
        if self.holes and torch.isnan(needed).any():
            await self.fill_holes()
            out = torch.cat(outputs, dim=1)
            needed = out[:, -need_last:] if 0 < need_last < tokens else out
            if torch.isnan(needed).any():
                raise SwarmError("the last peer named outputs instead of sending them and no peer could hand "
                                 "them over (they failed): generate again")
        out = out.to(hidden.dtype)
        timeline.mark("decode")
        return out

    async def _name_known_prefix(self, steps: list[StepInput]) -> list[StepInput]:
        """A session's first long step: ask the first peer how much of it it keeps already (one small
        round trip), and name that part by its digest instead of uploading it (prefix reuse)."""
        hidden = torch.cat([x.hidden for x in steps], dim=1)
        positions = torch.cat([x.position_ids for x in steps], dim=1)
        chain = wire.history_chain(wire.history_root(hidden.shape[0]), hidden, positions, steps[-1].mask, 0)
        ask = sorted({*range(PROBE_EVERY, len(chain), PROBE_EVERY), len(chain)})
        meta = {"op": "probe", "session_id": self.hops[0].session_id, "offset": 0, "positions": ask,
                "digests": [chain[p - 1].hex() for p in ask]}
        try:
            reply, _ = await self.hops[0].stream.call(meta, [], timeout=self.swarm.cfg.step_timeout)
        except PeerError as e:
            if e.recoverable:  # the peer is gone: replaced now, and the step goes in full
                await self.failover.replace(0, e, ban=is_fault(e))
            return steps  # (an older peer does not know probes: nothing is named)
        known = reply.get("tokens")
        if not isinstance(known, int) or isinstance(known, bool) or not 0 <= known <= len(chain):
            return steps
        named = []
        for x in steps:
            n = min(known - x.offset, x.hidden.shape[1] - 1)  # every message still carries one token
            named.append(dataclasses.replace(x, named=n, chain=chain[x.offset + n - 1].hex()) if n > 0 else x)
        return named

    async def fill_holes(self) -> None:
        """Fetch every output a peer named instead of sending (see ``Holes.fill_all``)."""
        await self.holes.fill_all()

    def downstream(self, first: int, push: bool) -> list[dict] | None:
        """The push targets from hop ``first`` to the last, for a step's ``next`` (None when the client relays)."""
        return [h.push_target() for h in self.hops[first:]] if push else None

    async def _through_route(self, steps: list[StepInput], recover: bool, push: bool,
                             timeline: Timeline | None = None) -> list[torch.Tensor]:
        """Every chunk goes to the first hop at once, so chunks pipeline across peers. With ``push`` each
        peer pushes its output to the next one (k + 1 messages per token on the critical path); without,
        the client relays each output to the next hop as it arrives (2k). Either way the client reads
        every hop's result in order: failover replays and audits need them."""
        began = time.monotonic()
        for x in steps:
            self.hops[0].send(x, self.downstream(1, push))
        if timeline is not None:
            timeline.mark("prepare")
        timed = len(steps) == 1 and steps[0].hidden.shape[0] * steps[0].hidden.shape[1] <= TIMED_MAX_TOKENS
        return [await StepWalk(self, x, steps[n + 1:], recover=recover, push=push, began=began if timed else None,
                               timeline=timeline).run()
                for n, x in enumerate(steps)]

    async def received_as_returned(self, meta: dict, x: StepInput, hole: Hole | None) -> bool:
        """Did the hop compute on what the hop before it returned to us (``x``, whose first tokens may be
        a hole that producer named)? A named part is checked against the digest its producer committed to."""
        if hole is None:
            return meta.get("input_digest") == wire.digest(x.hidden)
        parts = meta.get("input_digests")
        if meta.get("input_split") == hole.tokens and isinstance(parts, list) and len(parts) == 2:
            return parts == [hole.digest, wire.digest(x.hidden[:, hole.tokens:])]
        # the push went in full (this peer did not keep the prefix): compare the whole input
        await self.fill_holes()
        return meta.get("input_digest") == wire.digest(x.hidden)

    async def close(self) -> list[asyncio.Task]:
        """Close every hop, then (off the critical path) audit a sample of the spans they served. The
        sample is drawn first: outputs the peers named instead of sending are fetched only if an audit
        needs them, in the background, before those hops' streams close (the peers keep them until then)."""
        if self.rpc != wire.RPC_INFERENCE:
            await self.close_hops(self.hops)
            return []
        hops, holes = list(self.hops), self.holes.take()
        sampled = [span for span in self.retired + [h.served() for h in hops] if self.swarm.audits.draw(span)]
        if not (sampled and holes):
            await self.close_hops(hops)
            return self.swarm.audits.submit(sampled, sampled=True)

        async def fetch_then_close() -> None:
            try:
                await asyncio.gather(*(self.holes.fill(hole) for hole in holes))
            finally:
                await self.close_hops(hops)

        ready = asyncio.ensure_future(fetch_then_close())  # owned by the audits, which await it
        return self.swarm.audits.submit(sampled, sampled=True, after=ready)

    @staticmethod
    async def close_hops(hops: list[HopSession]) -> None:
        await asyncio.gather(*(h.stream.close() for h in hops), return_exceptions=True)
