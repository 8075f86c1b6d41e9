"""Prefix reuse as the handler does it: a session's history grows as a kept prefix (``peer.prefixes``),
the first tokens of a step that some kept history holds are copied instead of computed, a probe finds
(and pins) the longest history the peer keeps, a step may name its first inputs by a history's
digest instead of carrying them, and a client may fetch the kept outputs a reply named. Checks of the messages are ``peer.validation``'s; this module
only looks things up in the session table's ``PrefixStore`` and keeps the sessions' digests.
"""

from __future__ import annotations

import torch

import wire
from peer import prefixes
from peer.compute import ComputeOwner
from peer.counters import Counters
from peer.sessions import Session, SessionTable
from peer.validation import PrefixRef, Probe
from wire import ErrorCode, WireError
from wire.phases import Timeline


class PrefixReuse:
    def __init__(self, sessions: SessionTable, counters: Counters, *, enabled: bool = True):
        self.sessions = sessions  # its .prefixes is the store of kept histories
        self.counters = counters  # counts probe hits
        self.enabled = enabled  # False (--no-prefix-cache): sessions neither keep nor reuse histories

    def begin(self, session: Session, runner, start: int, end: int, *, wanted: bool, lazy: bool) -> None:
        """A new session's history becomes a prefix others may reuse, if the client ``wanted`` it, this
        peer keeps prefixes, and the runner's cache can be copied; ``lazy``: replies may name reused outputs."""
        nonce = getattr(runner, "prefix_nonce", None)
        if wanted and self.enabled and nonce is not None and prefixes.reusable(session.cache):
            session.prefix = prefixes.Entry(prefixes.scope(nonce, start, end), session.batch_size)
            session.prefix_root = prefixes.root_digest(session.batch_size)
            session.out_digests = []
            session.lazy = lazy

    def probe(self, session: Session, probe: Probe) -> dict:
        """How much of a step the client is about to send this peer keeps already: the longest of the
        given histories (digest chains after ``positions[j]`` tokens) some kept entry holds. The entry is
        pinned for the session's next steps, which name that part instead of carrying it."""
        if session.prefix is None:
            return {"op": "probed", "tokens": 0}
        for tokens, hex_digest in zip(reversed(probe.positions), reversed(probe.digests)):
            try:
                digest = bytes.fromhex(hex_digest)
            except ValueError:
                raise WireError(ErrorCode.BAD_REQUEST, "probe digests must be hex") from None
            entry = self.sessions.prefixes.find(session.prefix.scope, digest, probe.offset + tokens)
            if entry is not None and entry.batch_size == session.batch_size:
                session.pinned = (entry, probe.offset + tokens)
                self.counters.probe_hits += 1
                return {"op": "probed", "tokens": tokens}
        return {"op": "probed", "tokens": 0}

    def resolve(self, session: Session | None, meta: dict, tensors: list, ref: PrefixRef) -> tuple[dict, list]:
        """A step whose first inputs are named by the digest of their history: rebuilt from the entry
        that keeps them (``named_tokens`` tells the reply to split its input digest), or refused with
        UNKNOWN_PREFIX (the sender then sends it in full)."""
        tokens, offset = ref.tokens, ref.offset
        entry = None
        if session is not None and session.prefix is not None:
            entry = self.sessions.prefixes.find(session.prefix.scope, ref.digest, offset + tokens)
            pinned = session.pinned[0] if session.pinned else None
            if entry is None and pinned is not None and pinned.tokens >= offset + tokens \
                    and pinned.digests[offset + tokens - 1] == ref.digest:
                entry = pinned  # found by this session's probe, evicted since (it stays alive while pinned)
        if entry is None or entry.batch_size != tensors[0].shape[0]:
            raise WireError(ErrorCode.UNKNOWN_PREFIX, "this peer keeps no such prefix: send the hidden states")
        kept = entry.input(offset, offset + tokens)  # (batch, tokens, hidden)
        if kept.dtype != tensors[0].dtype or kept.shape[2] != tensors[0].shape[2]:
            raise WireError(ErrorCode.UNKNOWN_PREFIX, "the kept prefix has other hidden states: send them")
        meta = {k: v for k, v in meta.items() if k != "prefix"}
        meta["named_tokens"] = tokens  # the reply tells the client the digests of both parts
        return meta, [torch.cat([kept, tensors[0]], dim=1), *tensors[1:]]

    async def run(self, compute: ComputeOwner, session: Session, hidden: torch.Tensor, position_ids: torch.Tensor,
                  mask: torch.Tensor | None, timeline: Timeline | None = None) -> tuple[torch.Tensor, int]:
        """Run one step: (output (batch, t, hidden), tokens reused from a kept prefix). The first tokens
        of the step that some kept history holds are copied from it (keys, values and outputs); the
        rest are computed on top."""
        entry = session.prefix
        session.step_chain = None
        if entry is None:
            return await compute.run(session.runner, hidden, position_ids, mask, session.cache, timeline), 0
        offset, tokens = session.length, hidden.shape[1]
        head = entry.digests[-1] if entry.tokens else session.prefix_root
        digests = prefixes.chain(head, hidden, position_ids, mask, offset)
        session.step_chain = (head, hidden, digests)
        store = self.sessions.prefixes
        source, reused = store.lookup(entry.scope, digests, offset)
        parts = []
        if reused:
            cache = session.cache
            for layer in range(len(cache.layers)):
                cache.update(*source.kv(layer, offset, offset + reused), cache.start + layer)
            parts.append(source.output(offset, offset + reused))  # (batch, reused, hidden)
            store.hits += 1
            store.tokens_reused += hidden.shape[0] * reused
        if timeline is not None:
            timeline.mark("reuse")
        if reused < tokens:
            parts.append(await compute.run(session.runner, hidden[:, reused:], position_ids[:, reused:], mask,
                                           session.cache, timeline))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (batch, t, hidden)
        store.publish(entry, session.cache, digests, hidden, out)
        return out, reused

    @staticmethod
    def answered(session: Session, out: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                 offset: int) -> None:
        """After a step [offset, offset + t) answered ``out`` (batch, t, hidden) as sent: a probe's pin
        ends past what it found, and the digests of what the next hop receives grow."""
        if session.pinned is not None and offset + out.shape[1] >= session.pinned[1]:
            session.pinned = None  # past what the probe found: no later step names it
        if session.out_digests is not None:  # what the next hop receives, named for a later reference
            head = session.out_digests[-1] if session.out_digests else session.prefix_root
            session.out_digests += prefixes.chain(head, out, position_ids, mask, offset)

    @staticmethod
    def nameable(session: Session, offset: int, omit: int) -> dict | None:
        """The ``prefix`` field of a push whose first ``omit`` tokens (from ``offset``) the next hop most
        likely keeps too, so the push names them instead of sending them; None if there is none."""
        if not omit or session.out_digests is None:
            return None
        return {"tokens": omit, "chain": session.out_digests[offset + omit - 1].hex()}

    @staticmethod
    def kept(session: Session, kind: str, offset: int, tokens: int, max_bytes: int) -> torch.Tensor:
        """Tokens [offset, offset + tokens) of the session's kept ``kind`` ('inputs' or 'outputs', as
        sent): (batch, tokens, hidden), in at most ``max_bytes``."""
        entry = session.prefix
        if entry is None or offset + tokens > entry.tokens:
            raise WireError(ErrorCode.UNKNOWN_PREFIX, f"this session no longer keeps tokens [{offset}, "
                                                      f"{offset + tokens}) (its history was reordered or rolled back)")
        if tokens * session.batch_size * session.runner.hidden_size * 4 > max_bytes:
            raise WireError(ErrorCode.TOO_LARGE, "fetch fewer tokens at a time")
        if kind == "inputs":
            return entry.input(offset, offset + tokens)
        return wire.to_wire_dtype(entry.output(offset, offset + tokens), session.wire_dtype or entry.inputs[0].dtype)

    def truncate(self, session: Session, offset: int) -> None:
        """A rewrite rolled the session back to ``offset`` tokens: its kept history follows."""
        if session.prefix is not None:
            self.sessions.prefixes.truncate(session.prefix, offset)
            del session.out_digests[offset:]
