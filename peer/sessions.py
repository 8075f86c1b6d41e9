"""Inference sessions and the KV-cache budget they live in (pure bookkeeping, no I/O).

The budget is counted in tokens of cache per block: a session of ``batch_size`` sequences up to
``max_length`` tokens reserves ``batch_size * max_length`` tokens for its whole life. A session lives as
long as its stream; the handler closes it when the stream ends or sits idle too long. Prefixes kept for
reuse (``peer.prefixes``) live in what sessions leave free and are evicted, least recently used first,
when a session needs the room.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from peer.prefixes import Entry, PrefixStore
from wire import ErrorCode, WireError


@dataclasses.dataclass
class Session:
    session_id: str
    batch_size: int
    max_length: int  # tokens
    runner: Any  # the BlockRunner computing this session (kept even if the peer moves to other blocks)
    cache: Any  # the runner's cache object (a SpanCache over the session's blocks)
    length: int = 0  # tokens already in the cache
    wire_dtype: Any = None  # torch dtype of the hidden states it answers and pushes; None = as the input
    steps: set[tuple[int, int]] = dataclasses.field(default_factory=set)  # (offset, tokens) of computed steps
    reorders: int = 0  # beam reorderings applied to the cache (a step's n-th reordering is applied once)
    prefix: Entry | None = None  # its history as a prefix others may reuse (None: not reusable)
    prefix_root: bytes = b""  # the digest of its empty history
    out_digests: list[bytes] | None = None  # the digest chain of what it answered (the next hop's inputs)
    pinned: tuple[Entry, int] | None = None  # (a kept history, tokens) a probe found: its next steps may name it
    lazy: bool = False  # replies may omit the outputs of reused tokens (the client fetches them if it needs them)
    span: tuple[int, int] = (0, 0)  # the blocks [start, end) it runs (what its receipts name)
    chain: list[bytes] | None = dataclasses.field(default_factory=list)  # history digest after each input token
    # (wire.receipts: what a step's receipt signs); None once beam search reordered its rows (no receipts)
    step_chain: tuple[bytes, Any, list[bytes]] | None = None  # (head, inputs, digests): the chain prefix
    # reuse computed over this step's inputs, which the receipt reuses (one computation per step)

    @property
    def reserved_tokens(self) -> int:
        return self.batch_size * self.max_length


class SessionTable:
    def __init__(self, budget_tokens: int, *, busy_retry_after: float = 1.0):
        if budget_tokens <= 0:
            raise ValueError(f"the cache budget must be a positive number of tokens, got {budget_tokens}")
        self.budget_tokens = budget_tokens
        self.busy_retry_after = busy_retry_after  # seconds
        self._sessions: dict[str, Session] = {}
        self.prefixes = PrefixStore()

    @property
    def used_tokens(self) -> int:
        return sum(s.reserved_tokens for s in self._sessions.values())

    @property
    def tokens_left(self) -> int:
        """Tokens a new session can reserve (kept prefixes make way for it)."""
        return self.budget_tokens - self.used_tokens

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, session_id: str, batch_size: int, max_length: int, runner: Any, make_cache: Callable[[], Any]
             ) -> Session:
        if session_id in self._sessions:
            raise WireError(ErrorCode.BAD_REQUEST, f"session {session_id!r} is already open on this peer")
        want = batch_size * max_length
        if want > self.budget_tokens:
            raise WireError(
                ErrorCode.TOO_LARGE,
                f"session needs {want} cache tokens (batch {batch_size} x max_length {max_length}) but this "
                f"peer's whole budget is {self.budget_tokens}: lower max_length or use a larger peer",
            )
        if want > self.tokens_left:
            raise WireError(
                ErrorCode.BUSY,
                f"cache budget full: session needs {want} tokens, {self.tokens_left} of {self.budget_tokens} "
                f"are free; retry later or on another peer",
                retry_after=self.busy_retry_after,
            )
        while self.prefixes.frozen_tokens > self.tokens_left - want and self.prefixes.evict_one():
            pass
        session = Session(session_id, batch_size, max_length, runner, make_cache())
        self._sessions[session_id] = session
        return session

    def stop_reuse(self, session: Session) -> None:
        """The session's history stops growing as a prefix (beam reordering): keep what it has so far."""
        if session.prefix is not None:
            self.prefixes.freeze(session.prefix, self.tokens_left)
            session.prefix = session.out_digests = None

    def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self.stop_reuse(session)
