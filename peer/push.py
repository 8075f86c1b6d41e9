"""Server-to-server push: a peer hands its output for one step straight to the next peer of the route.

The client puts the rest of the route in the step ("next": peer id, that peer's session id, its
multiaddrs); each peer pushes to next[0] with next[1:] and the next peer answers the step on its own
stream to the client. A token then costs k + 1 messages on the critical path instead of 2k. A push
that fails is reported in the step's result ("pushed": false) and the client relays that link itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from typing import Any

from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from dht.addressing import dial
import wire
from wire import ErrorCode, WireError

logger = logging.getLogger(__name__)

_NETWORK_ERRORS = (P2PDaemonError, P2PHandlerError, ConnectionError, OSError, EOFError, asyncio.IncompleteReadError)
MAX_MADDRS_PER_HOP = 8
MAX_FIELD_CHARS = 512


@dataclasses.dataclass(frozen=True)
class NextHop:
    peer_id: str
    session_id: str
    maddrs: tuple[str, ...]

    def to_metadata(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "session_id": self.session_id, "maddrs": list(self.maddrs)}


def _text(entry: dict, name: str) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_FIELD_CHARS:
        raise WireError(ErrorCode.BAD_REQUEST, f"each 'next' entry needs a non-empty string {name!r}, got {value!r}")
    return value


@functools.lru_cache(maxsize=1024)
def peer_id_of(text: str) -> PeerID:
    """The PeerID a base58 text names (ValueError or another decoding error if none). Every pushed step
    names its next hop: decoding the same few ids again on each step would cost tens of microseconds."""
    return PeerID.from_base58(text)


def parse_next(value: Any) -> list[NextHop]:
    """The downstream hops of a step's metadata (its "next" field; empty if absent); WireError if malformed."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > wire.MAX_NEXT_HOPS:
        raise WireError(ErrorCode.BAD_REQUEST, f"'next' must be a list of at most {wire.MAX_NEXT_HOPS} hops")
    hops = []
    for entry in value:
        if not isinstance(entry, dict):
            raise WireError(ErrorCode.BAD_REQUEST, f"each 'next' entry must be a map, got {type(entry).__name__}")
        peer_id, session_id = _text(entry, "peer_id"), _text(entry, "session_id")
        try:
            peer_id_of(peer_id)
        except Exception:  # base58/multihash decoding raises several types
            raise WireError(ErrorCode.BAD_REQUEST, f"'next' names an invalid peer id {peer_id!r}") from None
        maddrs = entry.get("maddrs", [])
        if not isinstance(maddrs, list) or len(maddrs) > MAX_MADDRS_PER_HOP or not all(
                isinstance(m, str) and 0 < len(m) <= MAX_FIELD_CHARS for m in maddrs):
            raise WireError(ErrorCode.BAD_REQUEST, f"'maddrs' of a 'next' entry must be at most "
                                                   f"{MAX_MADDRS_PER_HOP} multiaddr strings")
        hops.append(NextHop(peer_id, session_id, tuple(maddrs)))
    return hops


class PushSender:
    """Sends pushes from this peer; remembers which peers its daemon has dialed."""

    def __init__(self, p2p: P2P, deliver_here, *, timeout: float = 1.0, connect_timeout: float = 5.0):
        self.p2p = p2p
        self._deliver_here = deliver_here  # async (request) -> response: a push to this very peer
        # Seconds for the next peer to accept a push. It only queues the step, so this is about a round
        # trip; it is short because this peer's answer to the client waits for it, and the client
        # notices a frozen next peer only after that answer (then it relays, and its probe fails).
        self.timeout = timeout
        self.connect_timeout = connect_timeout  # seconds to dial a peer not connected yet
        self._connected: set[str] = set()
        self.sent = 0
        self.failed = 0

    async def push(self, targets: list[NextHop], meta: dict[str, Any], tensors) -> str | None:
        """Push one step to targets[0], handing on targets[1:] as its "next"; None on success, else why it
        failed (the client relays instead)."""
        target = targets[0]
        message = wire.request({**meta, "session_id": target.session_id,
                                "next": [h.to_metadata() for h in targets[1:]]}, tensors)
        try:
            peer = peer_id_of(target.peer_id)
            if peer == self.p2p.peer_id:  # consecutive hops on one peer: the daemon cannot dial itself
                reply = await self._deliver_here(message)
            else:
                if target.peer_id not in self._connected and target.maddrs:
                    await dial(self.p2p, target.peer_id, target.maddrs, self.connect_timeout)
                    self._connected.add(target.peer_id)
                reply = await asyncio.wait_for(self.p2p.call_protobuf_handler(
                    peer, wire.RPC_PUSH, message, runtime_pb2.ExpertResponse), self.timeout)
            answer, _ = wire.unpack(reply)
        except asyncio.TimeoutError:
            return self._failed(target, f"no answer within {self.timeout:.1f} s")
        except (*_NETWORK_ERRORS, ValueError, WireError) as e:
            return self._failed(target, f"{type(e).__name__}: {e}")
        error = WireError.from_metadata(answer)
        if error is not None and error.code == wire.ErrorCode.UNKNOWN_PREFIX:
            return str(error)  # not a failure of the link: the caller sends the step in full
        if error is not None:
            return self._failed(target, str(error))
        self.sent += 1
        return None

    def _failed(self, target: NextHop, why: str) -> str:
        self.failed += 1
        self._connected.discard(target.peer_id)
        logger.info("push to %s failed: %s", target.peer_id, why)
        return f"push to {target.peer_id} failed: {why}"
