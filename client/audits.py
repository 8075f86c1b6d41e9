"""Audits: re-running a sample of what peers served on other peers, off the critical path.

Who can check a span (``checkers``: peers serving all of it, else disjoint routes of peers that split it
differently), the stateless replay that a checker runs, publishing verdicts on the DHT (and proving a
confirmed lie: ``client.proofs``), and owning the audit tasks in flight. The verdicts feed the view's reputation book (``verify.auditor``)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import torch

from client import routing
from client.errors import MissingBlocksError, PeerError
from client.hop import ForwardOn
from client.proofs import Proofs
from client.routing import Hop
from client.view import SwarmView
from dht import directory
from dht.records import PeerState, VerdictRecord
from verify.auditor import LOST_OUTPUTS, AuditResult, Auditor, Checker, ServedSpan
from verify.policy import SamplingPolicy
from verify.reputation import Status, Verdict

logger = logging.getLogger(__name__)

RECHECK_SPANS = 4  # unaudited spans kept per peer, re-checked if it is caught lying (outputs that named
# reused tokens instead of sending them are not kept: they can no longer be fetched)

class Audits:
    def __init__(self, view: SwarmView, forward_on: ForwardOn):
        self.view, self._forward_on = view, forward_on
        self.auditor = Auditor(view.book, SamplingPolicy(view.cfg.audit_rates), self.checkers, self.replay,
                               replay_errors=(PeerError,), publish=self.publish, related=view.book.related,
                               load=self.load)
        self.replaying: collections.Counter[str] = collections.Counter()  # peer -> our re-runs in flight on it
        self.in_flight: dict[str, set[asyncio.Task]] = {}  # peer -> audits of its spans running
        self.recent: dict[str, collections.deque[ServedSpan]] = {}  # peer -> spans it served unaudited, newest last
        self.proofs = Proofs(view, self.auditor)  # a confirmed lie is proven to everyone (client/proofs.py)
        self._tasks: set[asyncio.Task] = set()  # owned here: awaited by wait() and at shutdown

    def _candidates(self, start: int, end: int, dtype: str, quant: str, exclude: frozenset[str]) -> list[str]:
        return [r.peer_id for r in self.view.records
                if r.state == PeerState.ONLINE and r.start <= start and end <= r.end and r.dtype == dtype
                and r.quant == quant and r.peer_id not in exclude and r.peer_id not in self.view.unreachable]

    def checkers(self, start: int, end: int, dtype: str, quant: str, exclude: frozenset[str]) -> list[Checker]:
        """Who can re-run [start, end) in this format: each peer serving all of it; if none does, routes of
        other peers that split it differently (so a lone peer is still checkable), as many disjoint ones as
        can be found, so that one can check and another referee."""
        exclude = exclude | self.view.book.banned()
        singles = self._candidates(start, end, dtype, quant, exclude)
        if singles:
            return [((peer, start, end),) for peer in singles]
        records = [r for r in self.view.records if r.dtype == dtype and r.quant == quant]

        def route_around(avoid: frozenset[str]) -> Checker | None:
            try:
                route = routing.plan_route(records, self.view.cfg.model_id, self.view.cfg.num_blocks, rtts=self.view.rtts,
                                           start=start, end=end, banned=avoid | self.view.unreachable)
            except MissingBlocksError:
                return None
            return tuple((h.peer_id, h.start, h.end) for h in route)

        first = route_around(exclude)
        if first is None:
            return []
        found = {first} | {c for p, _, _ in first if (c := route_around(exclude | {p})) is not None}
        found = sorted(found)
        peers = [set(c_peer for c_peer, _, _ in c) for c in found]
        best: list[int] = [0]
        for mask in range(1, 2 ** len(found)):  # the largest set of routes that share no peer (a handful)
            pick = [i for i in range(len(found)) if mask >> i & 1]
            if len(pick) > len(best) and all(not peers[i] & peers[j] for i in pick for j in pick if i < j):
                best = pick
        return [found[i] for i in best] if len(best) > 1 else found

    async def settle(self, peers: list[str], timeout: float) -> list[str]:
        """Wait (up to ``timeout`` seconds) for the running audits of those of ``peers`` not trusted yet
        (probation, suspect), so that a new liar is not handed a second session before its first audit bans
        it; returns the peers banned meanwhile. Trusted and active peers are not waited for."""
        waiting = {t for p in peers if self.view.book.status(p) in (Status.PROBATION, Status.SUSPECT)
                   for t in self.in_flight.get(p, ())}
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)
        return [p for p in peers if self.view.book.status(p) == Status.BANNED]

    def could_check_later(self, result: AuditResult) -> bool:
        """Whether an audit that found no checker may find one soon: other peers of the audited peer's
        format announce some of its blocks (joining, restarting, unreachable or busy right now)."""
        record = next((r for r in self.view.records if r.peer_id == result.peer_id), None)
        return record is not None and any(
            r.peer_id != result.peer_id and (r.dtype, r.quant) == (record.dtype, record.quant)
            and r.start < result.end and result.start < r.end and r.state != PeerState.OFFLINE
            for r in self.view.records)

    def checkable_now(self, result: AuditResult) -> bool:
        record = next((r for r in self.view.records if r.peer_id == result.peer_id), None)
        return record is not None and bool(self.checkers(result.start, result.end, record.dtype, record.quant,
                                                         frozenset({result.peer_id})))

    async def wait_for_checkers(self, results: list[AuditResult], timeout: float) -> bool:
        """Wait up to ``timeout`` seconds (re-reading and re-pinging the swarm) until every span of
        ``results`` that found no checker has one again; False at once if some span has no other peer of
        its format at all (nobody is coming), or when the time is up."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            await self.view.refresh(ping_all=True)  # who answers now (a frozen checker does not)
            if all(self.checkable_now(r) for r in results):
                return True
            if not all(self.could_check_later(r) for r in results) or asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.5)

    async def replay(self, checker: Checker, hidden: torch.Tensor, position_ids: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
        """Run a prefix through a checker's peers, one stateless forward each (what audits send)."""
        self.replaying.update(peer for peer, _, _ in checker)
        try:
            for peer_id, start, end in checker:
                record = next((r for r in self.view.records if r.peer_id == peer_id), None)
                hop = Hop(peer_id, start, end, record.maddrs if record else (), record.dtype if record else "float32",
                          record.quant if record else "none")
                hidden = await self._forward_on(hop, hidden, position_ids, mask)
            return hidden
        finally:
            self.replaying.subtract(peer for peer, _, _ in checker)

    def load(self, checker: Checker) -> int:
        """How many of this client's re-runs are in flight on the checker's busiest peer: a strict generation
        checks its spans at once, and spreading them over the redundant peers spreads the wait. (Only what
        this client knows: a load a peer announced could be a lie to attract checks it would collude on.)"""
        return max(self.replaying[peer] for peer, _, _ in checker)

    async def publish(self, result: AuditResult, span: ServedSpan) -> None:
        """Publish a verdict on the DHT, signed with this client's identity (the health page shows it); a
        confirmed lie is also proven (in the background: a strict generation does not wait for it)."""
        if result.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL):
            if self.view.cfg.publish_proofs:
                self.own(asyncio.get_running_loop().create_task(self.proofs.accuse(span), name="accuse"))
            if kept := self.recent.pop(result.peer_id, None):  # what else did it hand over unchecked?
                logger.warning("re-checking the last %d sessions %s served unaudited", len(kept), result.peer_id)
                self.submit(list(kept), sampled=True)
        c = result.comparison
        verdict = VerdictRecord(
            author=self.view.peer_id, target=result.peer_id, model_id=self.view.cfg.model_id, start=span.start, end=span.end,
            verdict=result.verdict.value, median_error=c.median if c else float("nan"),
            max_error=c.maximum if c else float("nan"), time=time.time())
        try:
            if not await asyncio.wait_for(directory.publish_verdict(self.view.dht, verdict), 10):
                logger.info("no DHT node stored the verdict about %s", result.peer_id)
        except asyncio.TimeoutError:
            logger.info("publishing the verdict about %s timed out", result.peer_id)
        except directory.DHTDied as e:  # the node restarts it; this verdict stays in the local book only
            logger.info("could not publish the verdict about %s: %s", result.peer_id, e)

    def submit(self, spans: list[ServedSpan], *, sampled: bool = False,
                      after: asyncio.Future | None = None) -> list[asyncio.Task]:
        """Audit the spans the sampling policy draws (all of them if ``sampled``: already drawn), once
        ``after`` (fetching the outputs peers named instead of sending) is done."""
        tasks = []
        for span in spans:
            if sampled or self.auditor.sampled(span):
                task = self.own(asyncio.get_running_loop().create_task(self._after(after, span), name="audit"))
                running = self.in_flight.setdefault(span.peer_id, set())
                running.add(task)
                task.add_done_callback(running.discard)
                tasks.append(task)
        return tasks

    def own(self, task: asyncio.Task) -> asyncio.Task:
        """Keep ``task`` until it ends (``wait`` awaits it; its errors propagate there)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _after(self, after: asyncio.Future | None, span: ServedSpan) -> AuditResult:
        if after is not None:
            await asyncio.shield(after)
            if any(torch.isnan(t).any() for t in span.hidden + span.outputs):
                logger.info("not auditing %s on [%d, %d): outputs it named could not be fetched",
                            span.peer_id, span.start, span.end)
                return AuditResult(span.peer_id, Verdict.IMPOSSIBLE, start=span.start, end=span.end,
                                   reason=LOST_OUTPUTS)
        return await self.auditor.audit(span)

    def draw(self, span: ServedSpan) -> bool:
        """Whether to audit a span a session was served: the sampling policy's draw, or in strict mode
        every span, whoever served it (a trusted peer too: trust is earned by audits, never a licence).
        The last few spans a peer served unaudited are kept: if it is caught lying, they are re-checked."""
        audit = self.auditor.sampled(span, every=self.view.cfg.verify_mode == "strict")
        if not audit and span.hidden and all(torch.isfinite(out).all() for out in span.outputs):
            self.recent.setdefault(span.peer_id, collections.deque(maxlen=RECHECK_SPANS)).append(span)
        return audit

    async def wait(self, timeout: float | None = None) -> None:
        """Wait for every audit in flight, and what they started (proving a lie); errors inside an audit
        propagate here."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while self._tasks:
            left = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
            done, pending = await asyncio.wait(set(self._tasks), timeout=left)
            for task in done:
                task.result()
            if pending and left == 0.0:
                return
