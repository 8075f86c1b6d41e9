"""Digests over what crosses the wire: ``digest`` fingerprints one tensor (a peer reports the one of the
input it computed on), and the *history digest chain* names a session's inputs token by token (a peer
names the histories it keeps by it; a client names the part of a first step the first peer keeps)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's elements as a numpy array of the same bytes (bfloat16 seen as int16). These digests
    run on every step of every hop, a few tensors of one token each: numpy's per-call cost is a fraction
    of torch's dispatch, which is most of the time on such tiny tensors."""
    if tensor.requires_grad or tensor.device.type != "cpu":
        tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy()


def digest(tensor: torch.Tensor) -> str:
    """A short fingerprint of a tensor's bytes: a peer reports the one of the input it computed on, so a
    client can tell that a pushed input is what the previous peer told the client it sent."""
    return hashlib.blake2b(as_numpy(tensor).tobytes(), digest_size=16).hexdigest()  # C order, as contiguous


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
    raw = as_numpy(hidden).swapaxes(0, 1)  # (t, batch, hidden): token t's rows, the bits as sent
    dtype = str(hidden.dtype).encode()
    positions = as_numpy(position_ids).astype(np.int64, copy=False).T  # (t, batch)
    columns = None if mask is None else as_numpy(mask)[:, offset:offset + tokens].astype(np.int64, copy=False).T
    out = []
    for t in range(tokens):  # tobytes() copies in C order: the same bytes as a contiguous (t, batch, ...) tensor
        h = hashlib.sha256(previous)
        h.update(dtype)
        h.update(raw[t].tobytes())
        h.update(positions[t].tobytes())
        h.update(b"-" if columns is None else columns[t].tobytes())
        previous = h.digest()
        out.append(previous)
    return out
