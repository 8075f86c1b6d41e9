"""Prefix reuse: the caches of prefixes this peer computed recently, so a session that starts with a known
prefix (a chat's system prompt, few-shot examples) skips computing it (pure bookkeeping, no I/O).

**Keys.** A history is named by a digest chain over its inputs: the digest after token t hashes the
digest after token t - 1 with token t's hidden states (every row, as sent, and their dtype), its position
ids and its attention-mask column, from a root that names the batch size. Equal digests mean equal
histories, so the keys and values of those tokens, and the outputs the blocks gave for them, are the
same ones a fresh computation would give (up to the rounding of a different chunking, as chunked prefill
already has). A peer looks digests up within a scope of its runner's random nonce and the span, so
entries made by other weights or blocks never match. The chain is public: a peer that reused a prefix
pushes the next peer of the route the digest of its outputs for it instead of the outputs themselves,
and the next peer, which kept the same history, rebuilds the inputs from its entry (if it does not keep
it, the push is refused and sent again in full). The client names nothing new: the peers key on the
inputs they exchange anyway, and the client can opt out per session (``prefix_cache: false``).

**Entries.** An open session publishes its history as an entry after each step: references to its cache
tensors (transformers' ``DynamicLayer`` grows by concatenation, so a tensor once referenced never changes:
a snapshot costs no copy) and the outputs of its steps. While the session is open the entry shares its
memory, which the session's reservation already counts. When the session closes, reorders its rows (beam
search) or stops being reusable, the entry is frozen: from then on it costs its own bytes, counted in
the peer's cache budget in cache tokens (its bytes over one token's keys and values across its blocks),
and it is the first thing evicted (least recently used first) when a session needs room.

Only caches made of plain ``DynamicLayer`` take part (a sliding window keeps only its last tokens).
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from wire import PREFIX_DOMAIN as DOMAIN
from wire import history_chain as chain  # the chain is wire protocol: a client names a prefix with it too
from wire import history_root as root_digest

__all__ = ["new_nonce", "reusable", "root_digest", "scope", "chain", "Entry", "PrefixStore"]


def new_nonce() -> bytes:
    """A runner's nonce: entries made by one set of weights never match a session on another."""
    return os.urandom(16)


def reusable(cache: Any) -> bool:
    """True if ``cache`` (a SpanCache) is made only of plain growing layers."""
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def scope(nonce: bytes, start: int, end: int) -> bytes:
    """What a peer prefixes its index keys with: its runner's weights and the span."""
    return hashlib.sha256(b"|".join([DOMAIN, nonce, f"{start}:{end}".encode()])).digest()[:16]


def _slice(chunks: list[torch.Tensor], begin: int, end: int) -> torch.Tensor:
    """Tokens [begin, end) of a sequence kept as chunks of (batch, t, hidden)."""
    parts, at = [], 0
    for chunk in chunks:
        n = chunk.shape[1]
        if at + n > begin and at < end:
            parts.append(chunk[:, max(begin - at, 0):min(end - at, n)])
        at += n
    return torch.cat(parts, dim=1)


def _truncate(chunks: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    kept, at = [], 0
    for chunk in chunks:
        if at >= tokens:
            break
        kept.append(chunk[:, :tokens - at])
        at += chunk.shape[1]
    return kept


class Entry:
    """The history of one session: keys/values (references to its cache tensors), inputs, outputs, digests."""

    def __init__(self, scope: bytes, batch_size: int):
        self.scope, self.batch_size = scope, batch_size
        self.digests: list[bytes] = []  # digest after token t, for t < tokens
        self.keys: list[torch.Tensor] = []  # per layer (batch, kv_heads, >= tokens, head_dim)
        self.values: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []  # the hidden states received, as sent: chunks of (batch, t, hidden)
        self.outputs: list[torch.Tensor] = []  # the blocks' outputs in order: chunks of (batch, t, hidden)
        self.live = True  # still owned by an open session, whose reservation counts its memory
        self.cost = 0  # cache tokens it is charged once frozen

    @property
    def tokens(self) -> int:
        return len(self.digests)

    def kv(self, layer: int, begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][..., begin:end, :], self.values[layer][..., begin:end, :]

    def output(self, begin: int, end: int) -> torch.Tensor:
        """The outputs for tokens [begin, end): (batch, end - begin, hidden)."""
        return _slice(self.outputs, begin, end)

    def input(self, begin: int, end: int) -> torch.Tensor:
        """The inputs received for tokens [begin, end): (batch, end - begin, hidden)."""
        return _slice(self.inputs, begin, end)

    def truncate(self, tokens: int) -> list[bytes]:
        """Keep the first ``tokens`` tokens; returns the digests dropped."""
        dropped, self.digests = self.digests[tokens:], self.digests[:tokens]
        self.inputs, self.outputs = _truncate(self.inputs, tokens), _truncate(self.outputs, tokens)
        return dropped

    def nbytes(self) -> int:
        def size(t: torch.Tensor) -> int:
            return t[..., :self.tokens, :].numel() * t.element_size() if t.ndim == 4 else t.numel() * t.element_size()
        return sum(size(t) for t in self.keys + self.values) + sum(size(t) for t in self.inputs + self.outputs)

    def token_bytes(self) -> int:
        """Bytes of one token's keys and values across the entry's blocks (one row): a cache token."""
        return sum(t.shape[1] * t.shape[3] * t.element_size() for t in self.keys + self.values)


class PrefixStore:
    """The index of entries by digest and the frozen entries, least recently used first."""

    def __init__(self):
        self._index: dict[bytes, tuple[Entry, int]] = {}  # digest -> (an entry holding it, tokens up to it)
        self._frozen: collections.OrderedDict[int, Entry] = collections.OrderedDict()  # id -> entry, LRU first
        self.hits = 0  # steps that reused at least one token
        self.tokens_reused = 0  # tokens x rows not computed thanks to a hit

    @property
    def frozen_tokens(self) -> int:
        """Cache tokens the frozen entries are charged."""
        return sum(e.cost for e in self._frozen.values())

    def __len__(self) -> int:
        return len(self._frozen)

    def lookup(self, scope: bytes, digests: list[bytes], offset: int) -> tuple[Entry | None, int]:
        """The longest run of a step's digests (tokens offset, offset + 1, ...) some entry holds: (entry, k)."""
        for k in range(len(digests), 0, -1):
            entry = self.find(scope, digests[k - 1], offset + k)
            if entry is not None:
                return entry, k
        return None, 0

    def find(self, scope: bytes, digest: bytes, tokens: int) -> Entry | None:
        """An entry whose first ``tokens`` tokens are the history named ``digest`` (marked as used)."""
        found = self._index.get(scope + digest)
        if found is None or found[1] != tokens:
            return None
        entry = found[0]
        if not entry.live:
            self._frozen.move_to_end(id(entry))
        return entry

    def publish(self, entry: Entry, cache: Any, digests: list[bytes], inputs: torch.Tensor, output: torch.Tensor
                ) -> None:
        """A live entry's session has computed (or reused) a step: record it. ``cache`` is its SpanCache."""
        offset = entry.tokens
        entry.keys = [layer.keys for layer in cache.layers]
        entry.values = [layer.values for layer in cache.layers]
        entry.inputs.append(inputs)
        entry.outputs.append(output)
        entry.digests.extend(digests)
        for t, digest in enumerate(digests):
            self._index[entry.scope + digest] = (entry, offset + t + 1)

    def truncate(self, entry: Entry, tokens: int) -> None:
        """The session rolled back to ``tokens`` (rejected draft tokens)."""
        self._unindex(entry, entry.truncate(tokens))

    def freeze(self, entry: Entry, room: int) -> None:
        """The entry's session is done with it. It is kept, charged its own bytes, if it fits in ``room``
        cache tokens (after evicting older entries); otherwise dropped."""
        if not entry.live:
            return
        entry.live = False
        if not entry.tokens:
            return
        # tensors cropped by a rollback are views of longer ones: keep only what the entry needs
        entry.keys = [k[..., :entry.tokens, :].clone() if k.shape[-2] > entry.tokens else k for k in entry.keys]
        entry.values = [v[..., :entry.tokens, :].clone() if v.shape[-2] > entry.tokens else v for v in entry.values]
        entry.cost = math.ceil(entry.nbytes() / max(1, entry.token_bytes()))
        if entry.cost > room:
            self._unindex(entry, entry.digests)
            return
        self._frozen[id(entry)] = entry
        while self.frozen_tokens > room:
            self.evict_one()

    def evict_one(self) -> int:
        """Evict the least recently used frozen entry; returns the cache tokens freed (0: none left)."""
        if not self._frozen:
            return 0
        _, entry = self._frozen.popitem(last=False)
        self._unindex(entry, entry.digests)
        return entry.cost

    def _unindex(self, entry: Entry, digests: list[bytes]) -> None:
        for digest in digests:
            found = self._index.get(entry.scope + digest)
            if found is not None and found[0] is entry:
                del self._index[entry.scope + digest]

    def statistics(self) -> dict[str, int]:
        return {"prefix_entries": len(self._frozen), "prefix_cache_tokens": self.frozen_tokens,
                "prefix_hits": self.hits, "prefix_tokens_reused": self.tokens_reused}
