"""Multiaddrs as the go-libp2p daemon wants them (hivemind's encoder gets /p2p/<id> wrong for it)."""

from __future__ import annotations

import asyncio
import re
from typing import Iterable

import base58
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr


class _DaemonMaddr:
    """A multiaddr as go-libp2p encodes it. hivemind's Multiaddr encodes /p2p/<id> as a CID, which the
    daemon cannot parse; the daemon wants the raw multihash. Only ``to_bytes`` is needed by its client."""

    _P2P_CODE = bytes([0xA5, 0x03])  # varint(421)

    def __init__(self, text: str):
        self.text = text
        parts = re.split(r"(/p2p/[^/]+)", text)
        chunks = []
        for part in parts:
            if not part:
                continue
            if part.startswith("/p2p/"):
                multihash = base58.b58decode(part[len("/p2p/"):])
                chunks.append(self._P2P_CODE + _varint(len(multihash)) + multihash)
            else:
                chunks.append(Multiaddr(part).to_bytes())
        self._bytes = b"".join(chunks)

    def to_bytes(self) -> bytes:
        return self._bytes

    def __str__(self) -> str:
        return self.text


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def daemon_maddr(text: str, peer_id: str | None = None) -> _DaemonMaddr:
    """Multiaddr text -> what the daemon's connect() accepts; a trailing /p2p/<peer_id> is dropped."""
    text = str(text)
    if peer_id and text.endswith("/p2p/" + peer_id):
        text = text[: -len("/p2p/" + peer_id)]
    return _DaemonMaddr(text)


async def dial(p2p: P2P, peer_id: str, maddrs: Iterable[str], timeout: float) -> None:
    """Make ``p2p``'s daemon connect to ``peer_id`` at ``maddrs`` (hivemind's P2P has no public connect;
    its daemon client does). Raises the daemon's errors, ValueError for bad addresses, or TimeoutError."""
    addrs = [daemon_maddr(m, peer_id) for m in maddrs]
    await asyncio.wait_for(p2p._client.connect(PeerID.from_base58(peer_id), addrs), timeout)
