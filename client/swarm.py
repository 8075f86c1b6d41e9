"""The client's view of the swarm and its sessions: records from the DHT, measured RTTs, routes,
and inference sessions that stream hidden states through a chain of peers.

Async core on the client's loop thread; ``RemoteSwarm`` is the synchronous face the model uses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

import torch

from client import routing
from client.errors import MissingBlocksError, PeerBusy, PeerError, SwarmError
from client.loop import LoopThread
from client.routing import Hop
from client.transport import Stream, Transport
from dht import directory
from dht.records import PeerRecord
from peer import wire

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    initial_peers: tuple[str, ...]
    model_id: str
    num_blocks: int
    hidden_size: int
    step_timeout: float = 60.0  # seconds for one step on one peer, plus per-token allowance below
    step_timeout_per_token: float = 0.05  # seconds per token in the step
    route_timeout: float = 30.0  # seconds to wait for peers to cover every block
    max_chunk_tokens: int | None = None  # tokens per message; None = derived from message size
    record_ttl: float = 2.0  # seconds a fetched snapshot of records is reused


class HopSession:
    """One peer's part of a session: its stream and the number of tokens it holds."""

    def __init__(self, hop: Hop, stream: Stream, session_id: str):
        self.hop, self.stream, self.session_id = hop, stream, session_id

    async def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                   offset: int, timeout: float) -> torch.Tensor:
        tensors = [hidden, position_ids] + ([] if mask is None else [mask])
        meta, out = await self.stream.call({"op": "step", "session_id": self.session_id, "offset": offset}, tensors, timeout)
        if len(out) != 1 or tuple(out[0].shape) != tuple(hidden.shape):
            raise PeerError(self.hop.peer_id, f"returned {[tuple(t.shape) for t in out]} for input {tuple(hidden.shape)}")
        return out[0]


class SwarmCore:
    """Async: everything here runs on the client's loop thread."""

    def __init__(self, cfg: ClientConfig, transport: Transport, dht):
        self.cfg, self.transport, self.dht = cfg, transport, dht
        self.rtts: dict[str, float] = {}  # peer id -> smoothed RTT, seconds
        self._snapshot: tuple[float, list[PeerRecord]] | None = None

    async def records(self, fresh: bool = False) -> list[PeerRecord]:
        now = time.monotonic()
        if fresh or self._snapshot is None or now - self._snapshot[0] > self.cfg.record_ttl:
            self._snapshot = (now, await directory.fetch_peers(self.dht, self.cfg.model_id))
        return self._snapshot[1]

    async def _measure(self, record: PeerRecord) -> None:
        try:
            await self.transport.connect(record.peer_id, record.maddrs)
            _, rtt = await self.transport.info(record.peer_id, timeout=3.0)
        except PeerError as e:
            logger.info("peer unreachable, not routing through it: %s", e)
            self.rtts.pop(record.peer_id, None)
            return
        old = self.rtts.get(record.peer_id)
        self.rtts[record.peer_id] = rtt if old is None else 0.8 * old + 0.2 * rtt

    async def plan(self, start: int = 0, end: int | None = None, banned: frozenset[str] = frozenset(),
                   wait: bool = True) -> list[Hop]:
        """A route over [start, end), waiting up to route_timeout (if ``wait``) for peers to cover it."""
        began = time.monotonic()
        while True:
            records = await self.records(fresh=True)
            unmeasured = [r for r in records if r.peer_id not in self.rtts and r.peer_id not in banned]
            await asyncio.gather(*(self._measure(r) for r in unmeasured))
            reachable = [r for r in records if r.peer_id in self.rtts]
            try:
                return routing.plan_route(reachable, self.cfg.model_id, self.cfg.num_blocks, rtts=self.rtts,
                                          banned=banned, start=start, end=end)
            except MissingBlocksError as e:
                waited = time.monotonic() - began
                if not wait or waited > self.cfg.route_timeout:
                    raise MissingBlocksError(e.model_id, e.missing, e.num_blocks, waited) from None
            await asyncio.sleep(0.5)

    def step_timeout(self, tokens: int) -> float:
        return self.cfg.step_timeout + self.cfg.step_timeout_per_token * tokens


class SessionCore:
    """An inference session across a route: each hop keeps its own KV cache on its peer."""

    def __init__(self, swarm: SwarmCore, batch_size: int, max_length: int, *, rpc: str = wire.RPC_INFERENCE):
        self.swarm, self.batch_size, self.max_length, self.rpc = swarm, batch_size, max_length, rpc
        self.session_id = uuid.uuid4().hex
        self.hops: list[HopSession] = []
        self.position = 0  # tokens every hop holds

    async def open(self) -> None:
        """Open a session on every hop of a route; a busy peer is routed around when another can serve."""
        banned: set[str] = set()
        while True:
            route = await self.swarm.plan(banned=frozenset(banned))
            opened = await asyncio.gather(*(self._open_hop(h) for h in route), return_exceptions=True)
            failures = [r for r in opened if isinstance(r, BaseException)]
            if not failures:
                self.hops = list(opened)
                return
            await self._close_hops([r for r in opened if isinstance(r, HopSession)])
            busy = [f for f in failures if isinstance(f, PeerBusy)]
            if len(busy) != len(failures):
                raise next(f for f in failures if not isinstance(f, PeerBusy))
            banned.update(f.peer_id for f in busy)
            try:
                await self.swarm.plan(banned=frozenset(banned), wait=False)
            except MissingBlocksError:
                raise busy[0] from None  # nobody else can take it: the busy error is the useful one

    async def _open_hop(self, hop: Hop) -> HopSession:
        await self.swarm.transport.connect(hop.peer_id, hop.maddrs)
        stream = await self.swarm.transport.open_stream(hop.peer_id, self.rpc)
        try:
            await stream.call({"op": "open", "session_id": self.session_id, "start": hop.start, "end": hop.end,
                               "batch_size": self.batch_size, "max_length": self.max_length},
                              [], timeout=self.swarm.cfg.step_timeout)
        except BaseException:
            await stream.close()
            raise
        return HopSession(hop, stream, self.session_id)

    async def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None
                   ) -> torch.Tensor:
        """hidden (batch, t, hidden) -> (batch, t, hidden) through every hop; long inputs go in chunks."""
        batch, tokens = hidden.shape[:2]
        if batch != self.batch_size:
            raise SwarmError(f"session was opened for batch size {self.batch_size}, step has {batch}")
        if self.position + tokens > self.max_length:
            raise SwarmError(f"session max_length is {self.max_length} tokens; this step would reach {self.position + tokens}")
        chunk = self.swarm.cfg.max_chunk_tokens or wire.chunk_tokens(batch, hidden.shape[2])
        outputs = []
        for begin in range(0, tokens, chunk):
            h = hidden[:, begin:begin + chunk]  # (batch, t_chunk, hidden)
            pos = position_ids[:, begin:begin + chunk]
            mask = None if attention_mask is None else attention_mask[:, : self.position + h.shape[1]]
            timeout = self.swarm.step_timeout(h.shape[1] * batch)
            for hop in self.hops:
                h = await hop.step(h, pos, mask, self.position, timeout)
            self.position += pos.shape[1]
            outputs.append(h)
        return torch.cat(outputs, dim=1)

    async def close(self) -> None:
        await self._close_hops(self.hops)

    @staticmethod
    async def _close_hops(hops: list[HopSession]) -> None:
        await asyncio.gather(*(h.stream.close() for h in hops), return_exceptions=True)


class RemoteSession:
    """Synchronous handle on a SessionCore (what the model and users hold)."""

    def __init__(self, swarm: "RemoteSwarm", core: SessionCore):
        self._swarm, self._core = swarm, core
        self.token_ids: torch.Tensor | None = None  # (batch, position) ids seen so far, for generate() reuse
        self.attention_mask: torch.Tensor | None = None

    @property
    def position(self) -> int:
        return self._core.position

    @property
    def max_length(self) -> int:
        return self._core.max_length

    @property
    def batch_size(self) -> int:
        return self._core.batch_size

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self._core.hops]

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self._swarm.loop.run(self._core.step(hidden, position_ids, attention_mask))

    def close(self) -> None:
        self._swarm.loop.run(self._core.close())

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteSwarm:
    """Synchronous entry point: a client DHT node, a transport, and the loop thread they live on."""

    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.loop = LoopThread()
        self.dht = directory.start_node(None, cfg.initial_peers, client_mode=True)
        self.core = self.loop.run(self._make_core(), timeout=60)

    async def _make_core(self) -> SwarmCore:
        return SwarmCore(self.cfg, Transport(await self.dht.replicate_p2p()), self.dht)

    def open_session(self, batch_size: int, max_length: int) -> RemoteSession:
        core = SessionCore(self.core, batch_size, max_length)
        self.loop.run(core.open())
        return RemoteSession(self, core)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None
                ) -> torch.Tensor:
        """A stateless forward of a whole sequence through the swarm (no cache is kept)."""
        return self.loop.run(self._forward(hidden, position_ids, attention_mask))

    async def _forward(self, hidden, position_ids, attention_mask):
        core = SessionCore(self.core, hidden.shape[0], hidden.shape[1], rpc=wire.RPC_FORWARD)
        await core.open()
        try:
            return await core.step(hidden, position_ids, attention_mask)
        finally:
            await core.close()

    def route(self) -> list[Hop]:
        return self.loop.run(self.core.plan())

    def shutdown(self) -> None:
        """Close the RPC side, the DHT node (and its daemon), then the loop thread. Safe to call twice."""
        if self.loop.loop.is_running():
            self.loop.run(self._shutdown(), timeout=10)
            self.loop.stop()
        self.dht.shutdown()

    async def _shutdown(self) -> None:
        await self.core.transport.p2p.shutdown()
        await asyncio.sleep(0)  # let the cancelled reader/writer tasks finish
