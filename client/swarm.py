"""The client's swarm core: its view of the swarm (``SwarmView``) with the audits and the training backward
that run over it, and the stateless forward on one given peer that both use. Everything here runs on the
client's loop thread; ``client.front`` holds the synchronous faces."""

from __future__ import annotations

import asyncio
import logging

import torch

import wire
from client.audits import Audits
from client.config import ClientConfig
from client.routing import Hop
from client.session import SessionCore
from client.training import Backward
from client.transport import Transport
from client.view import SwarmView
from dht.node import Node
from verify.auditor import Auditor
from wire.phases import CLIENT_PHASES, Phases

logger = logging.getLogger(__name__)


class SwarmCore(SwarmView):
    def __init__(self, cfg: ClientConfig, transport: Transport, node: Node, peer_id: str):
        super().__init__(cfg, transport, node, peer_id)
        self.phases = Phases(CLIENT_PHASES, prefix="swarmllm_client")  # where each session step's time goes
        self.audits = Audits(self, self.forward_on)
        self.training = Backward(self, self.forward_on)

    async def start(self, review_timeout: float = 30.0) -> None:
        """Serve the fraud proofs this client will publish, read the swarm, and judge the proofs others
        published (up to ``review_timeout`` seconds), so that a proven liar is banned before the first
        session is routed."""
        await self.audits.proofs.register(self.transport.p2p)
        try:
            await self.refresh()
            await asyncio.wait_for(self.audits.proofs.review(), review_timeout)
        except asyncio.TimeoutError:
            logger.info("judging published fraud proofs took over %.0f s: the rest are judged in the background",
                        review_timeout)
        except (OSError, RuntimeError) as e:  # the DHT is not answering yet: the first plan reads it again
            logger.info("could not read the swarm at start (%s): proofs are judged at the next refresh", e)

    async def after_refresh(self) -> None:
        self.audits.proofs.review_in_background(self.audits.own)

    @property
    def auditor(self) -> Auditor:
        """The audits' verdict log and reputation updates (``model.swarm.core.auditor.results``, as the README shows)."""
        return self.audits.auditor

    async def forward_on(self, hop: Hop, hidden: torch.Tensor, position_ids: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
        """A stateless forward of a whole prefix on one given peer (no failover): what audits send."""
        core = SessionCore(self, hidden.shape[0], hidden.shape[1], rpc=wire.RPC_FORWARD)
        core.hops = [await core.open_hop(hop)]
        try:
            return await core.step(hidden, position_ids, mask, recover=False)
        finally:
            await core.close_hops(core.hops)
