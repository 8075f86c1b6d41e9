"""Every network call the client makes; hivemind/p2p/asyncio failures become client exceptions here.

Nothing else in ``client`` touches hivemind's P2P.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

import torch
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from client.errors import PeerBusy, PeerError
from dht.addressing import dial
import wire
from wire import ErrorCode, WireError

logger = logging.getLogger(__name__)

_NETWORK_ERRORS = (P2PDaemonError, P2PHandlerError, ConnectionError, OSError, EOFError, asyncio.IncompleteReadError)
_FATAL_CODES = {ErrorCode.BAD_REQUEST, ErrorCode.BAD_SHAPE, ErrorCode.BAD_DTYPE}  # our bug, not the peer's


def _peer_error(peer_id: str, error: WireError) -> PeerError:
    cls = PeerBusy if error.code == ErrorCode.BUSY else PeerError
    return cls(peer_id, str(error), code=error.code.value, recoverable=error.code not in _FATAL_CODES,
               retry_after=error.retry_after)


def _check(peer_id: str, message: runtime_pb2.ExpertResponse) -> tuple[dict[str, Any], list[torch.Tensor]]:
    try:
        meta, tensors = wire.unpack(message)
    except WireError as e:
        raise PeerError(peer_id, f"sent a malformed reply: {e}") from None
    error = WireError.from_metadata(meta)
    if error is not None:
        raise _peer_error(peer_id, error)
    return meta, tensors


class Transport:
    def __init__(self, p2p: P2P):
        self.p2p = p2p
        self._connected: set[str] = set()

    async def connect(self, peer_id: str, maddrs: tuple[str, ...], timeout: float = 10.0) -> None:
        """Make sure the daemon can reach ``peer_id``: dial the multiaddrs it announced (once)."""
        if peer_id in self._connected or not maddrs:
            return
        try:
            await dial(self.p2p, peer_id, maddrs, timeout)
        except (asyncio.TimeoutError, *_NETWORK_ERRORS, ValueError) as e:
            raise PeerError(peer_id, f"could not connect to {list(maddrs)}: {type(e).__name__}: {e}") from None
        self._connected.add(peer_id)

    def use(self, p2p: P2P) -> None:
        """Make every later call through ``p2p`` (a new daemon: nothing is connected through it yet)."""
        self.p2p = p2p
        self._connected.clear()

    def forget(self, peer_id: str) -> None:
        self._connected.discard(peer_id)

    async def _unary(self, peer_id: str, rpc: str, request, what: str, timeout: float
                     ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        try:
            reply = await asyncio.wait_for(
                self.p2p.call_protobuf_handler(PeerID.from_base58(peer_id), rpc, request, runtime_pb2.ExpertResponse),
                timeout)
        except asyncio.TimeoutError:
            raise PeerError(peer_id, f"no answer to {what} within {timeout:.1f} s") from None
        except _NETWORK_ERRORS as e:
            raise PeerError(peer_id, f"{what} failed: {type(e).__name__}: {e}") from None
        return _check(peer_id, reply)

    async def info(self, peer_id: str, timeout: float = 5.0) -> tuple[dict[str, Any], float]:
        """(the peer's statistics, round-trip time in seconds)."""
        began = time.perf_counter()
        meta, _ = await self._unary(peer_id, wire.RPC_INFO, runtime_pb2.ExpertUID(uid=""), "info", timeout)
        return meta, time.perf_counter() - began

    async def fetch(self, peer_id: str, meta: dict[str, Any], timeout: float) -> torch.Tensor:
        """Inputs or outputs an open session of ``peer_id`` kept and named instead of sending."""
        _, tensors = await self._unary(peer_id, wire.RPC_FETCH, wire.request(meta, []), "a fetch", timeout)
        if len(tensors) != 1:
            raise PeerError(peer_id, f"answered a fetch with {len(tensors)} tensors")
        return tensors[0]

    async def proof(self, peer_id: str, digest: str, timeout: float) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The fraud proof ``digest`` that ``peer_id`` (the client that caught the lie) holds, as sent."""
        return await self._unary(peer_id, wire.RPC_PROOF, wire.request({"digest": digest}), "a proof fetch", timeout)

    async def open_stream(self, peer_id: str, rpc: str) -> "Stream":
        stream = Stream(peer_id)
        try:
            stream._replies = await asyncio.wait_for(
                self.p2p.iterate_protobuf_handler(
                    PeerID.from_base58(peer_id), rpc, stream._requests(), runtime_pb2.ExpertResponse),
                timeout=10.0)
        except asyncio.TimeoutError:
            raise PeerError(peer_id, "could not open a stream within 10 s") from None
        except _NETWORK_ERRORS as e:
            raise PeerError(peer_id, f"could not open a stream: {type(e).__name__}: {e}") from None
        return stream


class Stream:
    """A bidirectional request/reply stream to one peer: send a message, wait for its one reply."""

    _END = object()

    def __init__(self, peer_id: str):
        self.peer_id = peer_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self._replies: AsyncIterator[runtime_pb2.ExpertResponse] | None = None
        self.closed = False
        self.decode_seconds = 0.0  # spent decoding the last reply (time.perf_counter)

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            item = await self._queue.get()
            if item is self._END:
                return
            yield item

    def send(self, meta: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        """Queue one message; its reply is read by ``receive``."""
        if self.closed:
            raise PeerError(self.peer_id, "stream already closed")
        self._queue.put_nowait(wire.request(meta, tensors))

    async def receive(self, timeout: float) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The next reply that is not a duplicate acknowledgement, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = await asyncio.wait_for(self._replies.__anext__(), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                self.closed = True
                raise PeerError(self.peer_id, "closed the stream without replying") from None
            except asyncio.TimeoutError:
                await self.close()
                raise PeerError(self.peer_id, f"no reply within {timeout:.1f} s") from None
            except _NETWORK_ERRORS as e:
                self.closed = True
                raise PeerError(self.peer_id, f"stream failed: {type(e).__name__}: {e}") from None
            began = time.perf_counter()
            meta, tensors = _check(self.peer_id, reply)
            self.decode_seconds = time.perf_counter() - began
            if not meta.get("duplicate"):  # a step it had already computed (push raced a re-send)
                return meta, tensors

    async def call(self, meta: dict[str, Any], tensors: list[torch.Tensor], timeout: float
                   ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Send one message and wait up to ``timeout`` seconds for its reply."""
        self.send(meta, tensors)
        return await self.receive(timeout)

    async def close(self, timeout: float = 2.0) -> None:
        """End our side of the stream, let the peer end its side (up to ``timeout`` seconds; 0 = don't
        wait, for a peer that already failed), and release the connection."""
        if self._replies is None:
            return
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(self._END)
        if timeout <= 0:
            await self._replies.aclose()
            self._replies = None
            return
        try:
            async def drain():
                async for _ in self._replies:
                    pass
            await asyncio.wait_for(drain(), timeout)
        except (asyncio.TimeoutError, *_NETWORK_ERRORS):
            pass  # the peer is gone or slow: closing the generator below releases our side anyway
        finally:
            await self._replies.aclose()
            self._replies = None
