"""Fraud proofs on the client (``verify.proofs``): proving the lies its audits catch to everyone else, and
judging the proofs others publish.

- **Accusing.** An audit that confirms a lie builds the proof from what the liar signed (its receipts,
  the inputs and outputs this client kept), checks it once more on other peers (only a proof that holds
  is published: an honest client never slanders by accident), keeps it, serves it on ``wire.RPC_PROOF``
  and publishes a record on the DHT saying who is accused and where to fetch the proof.
- **Judging.** At start and after each refresh the client reads the model's proof records; for each one
  it has not judged it fetches the proof, checks the signatures and digests, then re-runs the inputs on
  peers of the same format. A proven lie bans the accused (before this client's first session with it),
  a forged or refuted proof bans its author, whose other proofs are then ignored.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Callable

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

import wire
from client.errors import PeerError
from client.view import SwarmView
from dht import directory
from dht.records import ProofRecord
from verify import proofs
from verify.auditor import Auditor, ServedSpan
from verify.proofs import FraudProof, ProofError, Ruling
from verify.reputation import Status, Verdict
from wire import ErrorCode, WireError

logger = logging.getLogger(__name__)

MAX_KEPT = 64  # proofs this client keeps and serves (the oldest go first)
MAX_JUDGED_PER_REVIEW = 8  # proofs fetched and judged per review (a flood of records cannot stall a client)
FETCH_TIMEOUT = 5.0  # seconds to reach a proof's author and get the proof
RETRY_AFTER = 60.0  # seconds before a proof that could not be fetched or re-run is tried again
PROOF_TTL = 600.0  # seconds a proof record lives unless its author, still serving it, publishes it again


class Proofs:
    def __init__(self, view: SwarmView, auditor: Auditor):
        self.view, self.auditor = view, auditor
        self.kept: collections.OrderedDict[str, FraudProof] = collections.OrderedDict()  # digest -> proof
        self.rulings: dict[tuple[str, str], str] = {}  # (author, digest) -> ruling, or why it was forged
        self.published: list[ProofRecord] = []  # this client's proof records, kept alive by review()
        self.retry_at: dict[tuple[str, str], float] = {}  # (author, digest) -> monotonic time to try it again
        self._reviewing: asyncio.Task | None = None  # the background review, if one is running

    async def register(self, p2p: P2P) -> None:
        await p2p.add_protobuf_handler(wire.RPC_PROOF, self.rpc_proof, runtime_pb2.ExpertRequest)

    async def rpc_proof(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            meta, _ = wire.unpack(request, max_bytes=0)
            proof = self.kept.get(meta.get("digest"))
            if proof is None:
                raise WireError(ErrorCode.UNKNOWN_PROOF, f"this client holds no proof {meta.get('digest')!r}")
        except WireError as e:
            return wire.error_response(e)
        return wire.response(*proofs.encode(proof))

    # ---- accusing -----------------------------------------------------------------------------------

    async def accuse(self, span: ServedSpan) -> ProofRecord | None:
        """Prove the lie an audit of ``span`` confirmed, if its peer signed what it answered: keep the
        proof, publish its record. None if there is nothing provable or the proof does not hold."""
        if any(p.accused == span.peer_id for p in self.kept.values()):
            return None  # one proof per liar is enough (re-checks of its other sessions may catch more lies)
        proof = proofs.build(span, self.view.cfg.model_id, self.view.peer_id)
        if proof is None:
            logger.info("%s signed none of the steps it lied in: no proof to publish", span.peer_id)
            return None
        if (forged := proofs.check(proof)) is not None:  # its receipts do not match what we hold: nothing to prove
            logger.info("the receipts of %s do not prove its lie (%s): no proof to publish", span.peer_id, forged)
            return None
        ruling = proofs.ruling(await self.auditor.judge(proofs.span(proof), proofs.compared(proof)))
        if ruling != Ruling.PROVEN:
            logger.info("the signed steps of %s alone do not show its lie (%s): no proof to publish",
                        span.peer_id, ruling.value)
            return None
        return await self.publish(proof)

    async def publish(self, proof: FraudProof) -> ProofRecord | None:
        """Keep ``proof``, serve it, and publish its record (``accuse`` publishes only proofs that hold)."""
        digest = proof.digest()
        self.kept[digest] = proof
        while len(self.kept) > MAX_KEPT:
            self.kept.popitem(last=False)
        self.rulings[(self.view.peer_id, digest)] = Ruling.PROVEN.value
        record = ProofRecord(self.view.peer_id, proof.accused, proof.model_id, proof.start, proof.end, digest,
                             tuple(await self.view.node.visible_maddrs()), time.time())
        try:
            if not await asyncio.wait_for(directory.publish_proof(self.view.dht, record, ttl=PROOF_TTL), 10):
                logger.info("no DHT node stored the proof against %s", proof.accused)
                return None
        except asyncio.TimeoutError:
            logger.info("publishing the proof against %s timed out", proof.accused)
            return None
        logger.warning("published a fraud proof: %s signed outputs on blocks [%d, %d) that other peers do not "
                       "compute", proof.accused, proof.start, proof.end)
        self.published.append(record)
        return record

    # ---- judging ------------------------------------------------------------------------------------

    async def review(self) -> None:
        """Judge the proof records of this model not judged yet (a few per call, newest first, all at once; an author
        that cannot be reached is asked again after ``RETRY_AFTER``), and keep this client's own records
        alive while it serves their proofs."""
        book, now = self.view.book, time.monotonic()
        todo = [r for r in await directory.fetch_proofs(self.view.dht, self.view.cfg.model_id)
                if (r.author, r.digest) not in self.rulings and r.author != self.view.peer_id
                and now >= self.retry_at.get((r.author, r.digest), float("-inf"))
                and book.status(r.author) != Status.BANNED and book.status(r.accused) != Status.BANNED]
        await asyncio.gather(*(self._review(r) for r in sorted(todo, key=lambda r: -r.time)[:MAX_JUDGED_PER_REVIEW]),
                             *(self._republish(r) for r in self.published if time.time() - r.time > PROOF_TTL / 2))

    async def _review(self, record: ProofRecord) -> None:
        try:
            outcome = await self._judge(record)
        except PeerError as e:  # the author is gone or does not answer: asked again later
            logger.info("could not fetch the proof against %s from %s: %s", record.accused, record.author, e)
            outcome = None
        if outcome is not None:
            self.rulings[(record.author, record.digest)] = outcome
        else:  # unreachable, or nobody could re-run it now: not fetched and re-run again at every refresh
            self.retry_at[(record.author, record.digest)] = time.monotonic() + RETRY_AFTER

    def review_in_background(self, owner: Callable[[asyncio.Task], asyncio.Task]) -> None:
        """Start a review unless one is running (``owner`` keeps the task): judging re-runs proofs on peers,
        which must not hold up the refresh that notices dead peers."""
        async def review() -> None:
            try:
                await self.review()
            except (OSError, RuntimeError) as e:  # the DHT is shutting down or restarting: the next refresh retries
                logger.info("reviewing fraud proofs failed: %s", e)

        if self._reviewing is None or self._reviewing.done():
            self._reviewing = owner(asyncio.get_running_loop().create_task(review(), name="review-proofs"))

    async def _republish(self, record: ProofRecord) -> None:
        """A proof record lives PROOF_TTL seconds: an author that left (its proofs with it) is soon forgotten."""
        if record.digest in self.kept:
            self.published.remove(record)
            fresh = dataclasses.replace(record, time=time.time(), maddrs=tuple(await self.view.node.visible_maddrs()))
            if await directory.publish_proof(self.view.dht, fresh, ttl=PROOF_TTL):
                self.published.append(fresh)

    async def _judge(self, record: ProofRecord) -> str | None:
        """Fetch and judge one proof; the ruling (or why it is forged), None if undecided."""
        await self.view.transport.connect(record.author, record.maddrs, timeout=FETCH_TIMEOUT)
        meta, tensors = await self.view.transport.proof(record.author, record.digest, FETCH_TIMEOUT)
        try:
            proof = proofs.decode(meta, tensors)
            forged = proofs.check(proof)
            if forged is None and (proof.digest(), proof.author, proof.accused, proof.model_id) != (
                    record.digest, record.author, record.accused, record.model_id):
                forged = "the proof served is not the one its record names"
        except ProofError as e:
            forged, proof = str(e), None
        if forged is not None:
            logger.warning("a forged fraud proof by %s against %s (%s): banning its author", record.author,
                           record.accused, forged)
            self.view.book.record(record.author, Verdict.GROSS_FAIL)
            return forged
        ruling = proofs.ruling(await self.auditor.judge(proofs.span(proof), proofs.compared(proof)))
        banned = proofs.sentence(self.view.book, proof, ruling)
        if banned is not None:
            logger.warning("fraud proof by %s against %s: %s, %s banned", proof.author, proof.accused, ruling.value,
                           banned)
        return ruling.value if ruling != Ruling.UNDECIDED else None
