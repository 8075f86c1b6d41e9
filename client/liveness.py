"""Probes of a peer whose reply is late: is it dead (refuses the connection) or frozen (does not answer info)?"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, TypeVar

from client.errors import PeerError
from client.transport import Transport

T = TypeVar("T")


class Probe:
    """Checks on a peer whose reply is late: a dead peer refuses the connection and a frozen one does
    not answer info (served on its event loop, so a peer busy computing still answers)."""

    def __init__(self, transport: Transport, interval: float, timeout: float):
        self.transport, self.interval, self.timeout = transport, interval, timeout

    async def __call__(self, peer_id: str) -> None:
        try:
            await self.transport.info(peer_id, timeout=self.timeout)
        except PeerError as e:
            raise PeerError(peer_id, f"stopped answering mid-step ({e})") from None


class WatchNext:
    """The probe for a hop whose output is pushed to the next peer: it also checks that next peer, and
    notes (does not raise) its failure, so the hop's own answer is still read; the caller then replaces
    the next peer at once (its predecessor's push to it fails only after the push timeout)."""

    def __init__(self, probe: Probe, next_peer: str):
        self.probe, self.next_peer, self.interval = probe, next_peer, probe.interval
        self.next_failed: PeerError | None = None

    async def __call__(self, peer_id: str) -> None:
        await self.probe(peer_id)
        if self.next_failed is None:
            try:
                await self.probe(self.next_peer)
            except PeerError as e:
                self.next_failed = e


async def probed(awaitable: Awaitable[T], probe: Callable[[str], Awaitable[None]] | None, peer_id: str) -> T:
    """Await a peer's reply; meanwhile ``probe`` (if given) is awaited every time the reply is late by
    another probe interval, and may raise to give up early (the pending call is cancelled)."""
    call = asyncio.ensure_future(awaitable)
    try:  # the call is owned here: awaited below, cancelled if the probe gives up
        while probe is not None and not call.done():
            done, _ = await asyncio.wait({call}, timeout=probe.interval)
            if not done:
                await probe(peer_id)
        return await call
    finally:
        if not call.done():
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
