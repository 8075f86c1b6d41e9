"""The health monitor: reads the models index, then every model's announcements, verdicts and fraud-proof
records from the DHT, pings every peer with its info RPC (a few hundred at a time), fetches and checks
each new proof once (signatures and digests, verify.proofs.check), then builds a snapshot
(health/snapshot.py). Runs in the web server's event loop, over a ``dht.node.Node`` whose watcher
(health/cli.py) restarts its DHT process if it dies; a refresh meanwhile fails, is logged, and the page
keeps the last snapshot."""

from __future__ import annotations

import asyncio
import logging
import time

import msgpack
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from dht import directory
from dht.addressing import dial
from dht.node import Node
from dht.records import PeerRecord, ProofRecord
from health import snapshot
from health.schema import Snapshot
from verify import proofs
import wire

logger = logging.getLogger(__name__)


class Monitor:
    def __init__(self, node: Node, *, period: float = 10.0, ping_timeout: float = 3.0,
                 min_interval: float = 2.0, max_concurrent_pings: int = 256):
        self.node = node  # .dht (replaced when the node restarts it) and .p2p, read at each use
        self.period = period  # seconds between background refreshes
        self.ping_timeout = ping_timeout  # seconds
        self.min_interval = min_interval  # seconds: on-demand refreshes are rate-limited to this
        self.latest = Snapshot(generated_at=0.0, models=[], audits_passed=0, audits_failed=0)
        self._refreshed_at = float("-inf")
        self._lock = asyncio.Lock()
        # thousands of peers are pinged a few hundred at a time (each ping is a dial and an RPC)
        self._ping_slots = asyncio.Semaphore(max_concurrent_pings)
        self._proofs_checked: dict[tuple[str, str], str] = {}  # (author, digest) -> 'signed' | 'forged'

    @property
    def p2p(self) -> P2P:
        return self.node.p2p

    async def start(self) -> None:
        await self.refresh()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.refresh()
            except (OSError, RuntimeError) as e:  # the DHT process is shutting down or unreachable
                logger.warning("health refresh failed: %s", e)

    async def refresh(self, *, on_demand: bool = False) -> Snapshot:
        async with self._lock:
            if on_demand and time.monotonic() - self._refreshed_at < self.min_interval:
                return self.latest
            dht = self.node.dht
            records = await directory.fetch_index(dht)
            models = sorted({r.model_id for r in records})
            pings, verdicts, proofs = await asyncio.gather(  # every ping, every model's verdicts and proofs at once
                asyncio.gather(*(self._ping(r) for r in records)),
                asyncio.gather(*(directory.fetch_verdicts(dht, m) for m in models)),
                asyncio.gather(*(directory.fetch_proofs(dht, m) for m in models)))
            proofs = [p for found in proofs for p in found]
            checked = await asyncio.gather(*(self._check_proof(p) for p in proofs))
            pings = dict(zip([r.peer_id for r in records], pings))
            self.latest = snapshot.build(records, pings, [v for found in verdicts for v in found], time.time(),
                                         list(zip(proofs, checked)))
            self._refreshed_at = time.monotonic()
            return self.latest

    async def _check_proof(self, record: ProofRecord) -> str:
        """'signed', 'forged' or 'unreachable' (see ProofView): fetched once per proof, then remembered."""
        key = (record.author, record.digest)
        if key not in self._proofs_checked:
            try:
                await dial(self.p2p, record.author, record.maddrs, self.ping_timeout)
                reply = await asyncio.wait_for(self.p2p.call_protobuf_handler(
                    PeerID.from_base58(record.author), wire.RPC_PROOF, wire.request({"digest": record.digest}),
                    runtime_pb2.ExpertResponse), self.ping_timeout)
                meta, tensors = wire.unpack(reply)
            except Exception as e:  # any failure to serve the proof: "unreachable" on the page, asked again later
                logger.info("the proof by %s against %s could not be fetched: %s", record.author, record.accused, e)
                return "unreachable"
            try:
                proof = proofs.decode(meta, tensors)
                forged = proofs.check(proof) is not None or (proof.digest(), proof.accused) != (record.digest,
                                                                                               record.accused)
            except proofs.ProofError:
                forged = True
            self._proofs_checked[key] = "forged" if forged else "signed"
        return self._proofs_checked[key]

    async def _ping(self, record: PeerRecord) -> snapshot.Ping:
        async with self._ping_slots:
            return await self._ping_now(record)

    async def _ping_now(self, record: PeerRecord) -> snapshot.Ping:
        peer = PeerID.from_base58(record.peer_id)
        began = time.perf_counter()
        try:
            if record.maddrs:
                await dial(self.p2p, record.peer_id, record.maddrs, self.ping_timeout)
            reply = await asyncio.wait_for(self.p2p.call_protobuf_handler(
                peer, wire.RPC_INFO, runtime_pb2.ExpertUID(uid=""), runtime_pb2.ExpertResponse), self.ping_timeout)
            info = msgpack.unpackb(reply.metadata, raw=False)
        except Exception as e:  # any failure to answer means "unreachable" on the page; logged, not hidden
            logger.info("peer %s did not answer: %s", record.peer_id, e)
            return snapshot.Ping(None)
        return snapshot.Ping(time.perf_counter() - began, info if isinstance(info, dict) else None)
