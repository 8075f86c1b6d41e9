"""What a step does to its session besides computing it (bookkeeping on a ``Session``, no I/O): a step
already computed is acknowledged, a ``rewrite`` rolls the session back first, a beam ``reorder`` moves
the cache's rows, the result names what the reply carries, and its receipt signs the outputs. Called by the handler on checked steps.
"""

from __future__ import annotations

from typing import Callable

import torch

import wire
from peer.reuse import PrefixReuse
from peer.sessions import Session, SessionTable
from wire import ErrorCode, WireError
from wire.receipts import Receipt, Statement


def duplicate(session: Session, meta: dict, tensors: list[torch.Tensor]) -> dict | None:
    """A step this session already computed (pushed by one peer, then re-sent by the client or by a
    replacement after a failover) is acknowledged without computing or pushing it again: the reply."""
    offset = meta.get("offset")
    if not isinstance(offset, int) or offset >= session.length or not tensors or tensors[0].ndim != 3:
        return None
    if (offset, tensors[0].shape[1]) not in session.steps:
        return None
    return {"op": "result", "length": offset + tensors[0].shape[1], "duplicate": True}


def rewind(session: Session, offset: int, reuse: PrefixReuse) -> None:
    """A step marked ``rewrite`` replaces the tokens from its offset on (speculative decoding rejected
    them): the cache is cropped to the offset first. Idempotent, so a rewrite step that arrives twice
    (pushed, then re-sent) computes the same thing twice rather than going out of order. Called once
    the step is known to be valid, so a bad rewrite loses nothing."""
    drop = session.length - offset  # >= 0: checked by validation.step_tensors
    if not drop:
        return
    if not getattr(session.cache, "is_croppable", True):
        raise WireError(ErrorCode.BAD_REQUEST, "this model's KV cache cannot be rolled back (a sliding-window "
                                               "or recurrent layer past its window): generate without drafts")
    session.cache.crop(-drop)
    session.length = offset
    reuse.truncate(session, offset)
    session.steps = {(o, t) for o, t in session.steps if o + t <= offset}
    if session.chain is not None:
        del session.chain[offset:]


def reorder(sessions: SessionTable, session: Session, meta: dict) -> None:
    """Beam search: the rows of the cache follow the beams chosen at the last step (applied once; the
    same step pushed and re-sent, or a replacement built from reordered inputs, skips it)."""
    if "reorder" in meta and meta["reorders"] == session.reorders + 1:
        sessions.stop_reuse(session)  # its rows no longer follow one history each
        session.cache.reorder_cache(torch.tensor(meta["reorder"], dtype=torch.long))
        session.reorders += 1
        session.chain = None  # its rows no longer follow the inputs' history: no more receipts


def receipt(session: Session, model_id: str, sign: Callable[[bytes], bytes], hidden: torch.Tensor,
            position_ids: torch.Tensor, mask: torch.Tensor | None, offset: int, out: torch.Tensor) -> dict | None:
    """Extend the session's history chain by a step's inputs and sign its outputs (wire.receipts): the
    reply's ``receipt`` field, or None once the session stopped signing (reordered rows)."""
    if session.chain is None:
        return None
    head = session.chain[-1] if session.chain else wire.history_root(session.batch_size)
    known = session.step_chain  # the same chain over the same inputs, if prefix reuse computed it
    if known is not None and known[0] == head and known[1] is hidden:
        session.chain += known[2]
    else:
        session.chain += wire.history_chain(head, hidden, position_ids, mask, offset)
    start, end = session.span
    statement = Statement(model_id, start, end, session.session_id, offset, hidden.shape[1], session.chain[-1],
                          wire.digest(out))
    return Receipt(statement.chain, statement.output_digest, sign(statement.message())).to_wire()


def result(session: Session, meta: dict, hidden: torch.Tensor, out: torch.Tensor, reused: int,
           omit: int) -> tuple[dict, torch.Tensor]:
    """The result of a step of inputs ``hidden`` (batch, t, hidden): its metadata, and the outputs it
    carries: all of ``out`` (batch, t, hidden), or all but the first ``omit`` tokens (``omitted``) when
    the client lets reused outputs stay here until it fetches them."""
    reply = {"op": "result", "length": session.length, "input_digest": wire.digest(hidden)}
    named = meta.get("named_tokens")
    if isinstance(named, int) and not isinstance(named, bool) and 0 < named < hidden.shape[1]:
        # the first inputs came named by the previous peer: the client checks each part on its own
        reply["input_split"] = named
        reply["input_digests"] = [wire.digest(hidden[:, :named]), wire.digest(hidden[:, named:])]
    if reused:
        reply["reused"] = reused
    if omit and session.lazy and session.prefix is not None and meta.get("full_outputs") is not True:
        # the client opted in: these outputs stay here (committed to by their digest) until it fetches them
        reply["omitted"], reply["omitted_digest"] = omit, wire.digest(out[:, :omit])
        return reply, out[:, omit:]
    return reply, out
