"""Digests over what crosses the wire: ``digest`` fingerprints one tensor (a peer reports the one of the
input it computed on), and the *history digest chain* names a session's inputs token by token (a peer
names the histories it keeps by it; a client names the part of a first step the first peer keeps)."""

from __future__ import annotations

import hashlib

import torch


def digest(tensor: torch.Tensor) -> str:
    """A short fingerprint of a tensor's bytes: a peer reports the one of the input it computed on, so a
    client can tell that a pushed input is what the previous peer told the client it sent."""
    data = tensor.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()


PREFIX_DOMAIN = b"swarmllm-prefix-v1"  # the digest chains that name histories (peer.prefixes)


def history_root(batch_size: int) -> bytes:
    """The digest of an empty history of ``batch_size`` rows (peer.prefixes: how kept histories are named)."""
    return hashlib.sha256(b"|".join([PREFIX_DOMAIN, f"batch={batch_size}".encode()])).digest()


def history_chain(previous: bytes, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                  offset: int) -> list[bytes]:
    """The digests after each new token of a step: hidden (batch, t, hidden) as received, position_ids
    (batch, t), mask (batch, offset + t) or None. Returns t digests. A peer names the histories it keeps
    by them, and a client names the part of a step the first peer keeps (a probe) the same way."""
    tokens = hidden.shape[1]
    rows = hidden.detach().cpu().transpose(0, 1).contiguous()  # (t, batch, hidden)
    raw = rows.view(torch.uint8).reshape(tokens, -1).numpy()  # (t, bytes): the bits as sent, any dtype
    dtype = str(hidden.dtype).encode()
    positions = position_ids.detach().cpu().long().t().contiguous().numpy()  # (t, batch)
    columns = None if mask is None else mask[:, offset:offset + tokens].detach().cpu().long().t().contiguous().numpy()
    out = []
    for t in range(tokens):
        h = hashlib.sha256(previous)
        h.update(dtype)
        h.update(raw[t].tobytes())
        h.update(positions[t].tobytes())
        h.update(b"-" if columns is None else columns[t].tobytes())
        previous = h.digest()
        out.append(previous)
    return out
