"""Outputs a peer named instead of sending (reused from a prefix it keeps): NaN in the client's copy until
something needs them (an audit, a replay, a relay, the head), then fetched and checked against the digest
their producer committed to."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import torch

import wire
from client.errors import PeerError, SwarmError
from client.hop import HopSession, StepInput
from client.transport import Transport

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Hole:
    """Outputs a peer named instead of sending (reused from a prefix it keeps): the first ``tokens``
    positions of ``tensor`` are NaN until fetched from one of ``sources`` (the hop that produced them,
    then the hop that received them as inputs), which must return bytes with the ``digest`` the producer
    committed to in its reply. NaN marks a hole unambiguously: real hidden states are always finite."""

    tensor: torch.Tensor  # (batch, t, hidden), holes first
    tokens: int
    digest: str
    offset: int  # session position of the tensor's first token
    sources: list[tuple[HopSession, str]]  # (hop, "outputs" | "inputs") to fetch from, in order


class Holes:
    """A session's holes not fetched yet, and fetching them (``timeout`` seconds per fetch)."""

    def __init__(self, transport: Transport, timeout: float):
        self.transport, self.timeout = transport, timeout
        self.pending: list[Hole] = []

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, hole: Hole) -> None:
        self.pending.append(hole)

    def take(self) -> list[Hole]:
        """Every pending hole, which this object then forgets (the caller fills or drops them)."""
        holes, self.pending = self.pending, []
        return holes

    async def fill_all(self) -> None:
        """Fetch every pending hole. One that no source can hand over (every peer holding it failed) stays
        NaN: a replay that needs it fails with a clear error, an audit skips its span."""
        await asyncio.gather(*(self.fill(hole) for hole in self.take()))

    async def fill(self, hole: Hole) -> bool:
        """Fetch one hole from its sources in order, checked against its digest; False if none handed it over."""
        batch, _, hidden = hole.tensor.shape
        for hop, kind in hole.sources:
            meta = {"kind": kind, "session_id": hop.session_id, "offset": hole.offset, "tokens": hole.tokens}
            try:
                got = await self.transport.fetch(hop.hop.peer_id, meta, self.timeout)
            except PeerError as e:
                logger.info("could not fetch named %s from %s: %s", kind, hop.hop.peer_id, e)
                continue
            if (tuple(got.shape) != (batch, hole.tokens, hidden) or got.dtype != hole.tensor.dtype
                    or wire.digest(got) != hole.digest):
                logger.warning("peer %s answered a fetch of named %s with other data than the producer "
                               "committed to", hop.hop.peer_id, kind)
                continue
            hole.tensor[:, :hole.tokens] = got
            return True
        return False

    async def whole(self, x: StepInput) -> StepInput:
        """``x`` with its named part fetched, before the client sends it on itself (to a replacement,
        which may not keep what a probe found: nothing is named)."""
        if x.named:
            x = dataclasses.replace(x, named=0, chain="")
        if torch.isnan(x.hidden).any():
            await self.fill_all()
            if torch.isnan(x.hidden).any():
                raise SwarmError("a peer named outputs instead of sending them and no peer could hand them over "
                                 "(they failed): generate again")
        return x
