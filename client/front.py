"""The client's synchronous faces: ``RemoteSwarm`` (a client DHT node, a transport, the background refresher
and DHT watcher, and the loop thread they live on) and ``RemoteSession`` (a handle on one session). What the model and
users hold; each call crosses into the loop thread once."""

from __future__ import annotations

import asyncio
import logging
import time

import torch

import wire
from client.config import ClientConfig
from client.loop import LoopThread
from client.routing import Hop
from client.session import SessionCore
from client.swarm import SwarmCore
from client.transport import Transport
from dht import identity
from dht.node import Node
from verify.auditor import AuditResult
from verify.reputation import Verdict

logger = logging.getLogger(__name__)


class RemoteSession:
    """Synchronous handle on a SessionCore (what the model and users hold)."""

    def __init__(self, swarm: "RemoteSwarm", core: SessionCore):
        self._swarm, self._core = swarm, core
        self.token_ids: torch.Tensor | None = None  # (batch, position) ids seen so far, for generate() reuse
        self._returned_at: float | None = None  # time.perf_counter() when the last step returned to the caller
        self.attention_mask: torch.Tensor | None = None
        self._audits: list[asyncio.Task] = []

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

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             need_last: int = 0) -> torch.Tensor:
        """``need_last`` > 0: only the last positions of the result are read (see SessionCore.step).
        Records the step's phases (wire/phases.py): ``model`` is the caller's time since the last step
        returned (the client's embeddings, LM head, sampling), ``handoff`` the crossing to the client's
        event loop and back."""
        called = time.perf_counter()
        out = self._swarm.loop.run(self._core.step(hidden, position_ids, attention_mask, need_last=need_last))
        returned = time.perf_counter()
        timeline = self._core.timeline
        timeline.spent["handoff"] = max(0.0, returned - called - sum(timeline.spent.values()))
        if self._returned_at is not None:
            timeline.spent["model"] = called - self._returned_at
        timeline.done()
        self._returned_at = returned
        return out

    def reorder(self, rows: list[int]) -> None:
        """Beam search: row i of the peers' caches becomes row ``rows[i]`` (with the next step)."""
        self._swarm.loop.run(self._core.reorder(rows))

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (the peers crop their caches with the next step)."""
        self._swarm.loop.run(self._core.crop(length))

    def close(self) -> None:
        self._audits = self._swarm.loop.run(self._core.close())

    def audit_results(self, timeout: float = 120.0) -> list[AuditResult]:
        """Wait for this session's audits (after close) and return their results."""
        async def gather():
            return await asyncio.wait_for(asyncio.gather(*self._audits), timeout)
        return self._swarm.loop.run(gather()) if self._audits else []

    def served_by_a_liar(self, timeout: float = 120.0) -> list[str]:
        """Peers of this session that an audit caught lying."""
        return [r.peer_id for r in self.audit_results(timeout) if r.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL)]

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteSwarm:
    """Synchronous entry point: a client DHT node (``dht.node.Node``: its p2p daemon lives in this process,
    its DHT process is restarted if it dies), a transport over that daemon, the background refresher and
    the node's watcher, and the loop thread they all live on."""

    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.loop = LoopThread()
        self.identity = identity.load_or_create(cfg.identity_path)  # signs the verdicts this client publishes
        try:
            self.node: Node = self.loop.run(Node.start(self.identity, cfg.initial_peers, client_mode=True), timeout=90)
        except BaseException:
            self.loop.stop()
            raise
        try:
            self.core, self._background = self.loop.run(self._start(), timeout=60)
        except BaseException:
            self.loop.run(self.node.shutdown(), timeout=10)
            self.loop.stop()
            raise

    async def _start(self) -> tuple[SwarmCore, asyncio.Task]:
        core = SwarmCore(self.cfg, Transport(self.node.p2p), self.node, self.identity.peer_id)
        await core.start()
        # Owned by this RemoteSwarm: cancelled in shutdown(); its loops catch the errors they can recover from.
        return core, asyncio.get_running_loop().create_task(self._run_background(core), name="swarm-background")

    async def _run_background(self, core: SwarmCore) -> None:
        """The refresher and the DHT watcher, until shutdown() cancels them."""
        async def rejoin(daemon_replaced: bool) -> None:  # the restarted DHT answers at once: re-read the swarm
            if daemon_replaced:  # sessions on the old daemon fail like failed peers; failover rebuilds them
                core.transport.use(self.node.p2p)
                await core.audits.proofs.register(self.node.p2p)  # its proofs are served on the new daemon
            try:
                await core.refresh()
            except (OSError, RuntimeError) as e:
                logger.info("refresh after the DHT restart failed (the refresh loop tries again): %s", e)

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(core.run_refresh_loop(), name="swarm-refresh")
            tasks.create_task(self.node.watch(rejoin), name="dht-watch")

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

    def forward_for_training(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                             attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, list[tuple[Hop, torch.Tensor]]]:
        """A stateless forward through peers that also serve backward passes: (output, each hop and the
        inputs it was sent, for ``backward``)."""
        return self.loop.run(self._forward_for_training(hidden, position_ids, attention_mask))

    async def _forward_for_training(self, hidden, position_ids, attention_mask):
        core = SessionCore(self.core, hidden.shape[0], hidden.shape[1], rpc=wire.RPC_FORWARD, needs_backward=True)
        await core.open()
        try:
            out = await core.step(hidden, position_ids, attention_mask)
        finally:
            await core.close()
        return out, [(h.hop, torch.cat([x.hidden for x in h.history], dim=1)) for h in core.hops]

    def backward(self, spans: list[tuple[Hop, torch.Tensor]], grad: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The gradient with respect to a training forward's inputs (see ``client.training.Backward``)."""
        return self.loop.run(self.core.training.backward(spans, grad, position_ids, attention_mask))

    def route(self) -> list[Hop]:
        return self.loop.run(self.core.plan())

    def shutdown(self) -> None:
        """Stop the refresher and the watcher, the DHT node (its process, then its daemon), then the loop
        thread. Safe to call twice."""
        if self.loop.loop.is_running():
            self.loop.run(self._shutdown(), timeout=10)
            self.loop.stop()

    def wait_for_checkers(self, results: list[AuditResult], timeout: float) -> bool:
        """Strict mode: whether checkers for these unchecked spans came back within ``timeout`` seconds."""
        return self.loop.run(self.core.audits.wait_for_checkers(results, timeout), timeout=timeout + 60)

    def wait_audits(self, timeout: float | None = 120.0) -> None:
        self.loop.run(self.core.audits.wait(timeout))

    async def _shutdown(self) -> None:
        try:
            await self.core.audits.wait(timeout=30)
        finally:
            if self.cfg.reputation_path:
                self.core.book.save(self.cfg.reputation_path)
        self._background.cancel()
        try:
            await self._background  # re-raises whatever killed it, if not our cancel
        except asyncio.CancelledError:
            pass
        finally:
            await self.node.shutdown()
        await asyncio.sleep(0)  # let the cancelled reader/writer tasks finish
