"""Checks of the messages a peer's streams carry (pure: no I/O, no session state changes).

Each function takes a decoded message (metadata, tensors) and what it is checked against, and returns the
parsed values or raises ``wire.WireError`` (the handler answers it; nothing has changed yet):
- ``open_fields``   an ``open``: blocks, batch size, max length (tokens), session id, wire dtype, flags
- ``step_tensors``  a ``step`` against its session: order, shapes, dtypes, positions, mask, beam reorder
- ``probe_fields``  a ``probe``: increasing token counts and as many history digests
- ``prefix_ref``    a step naming its first inputs by a kept prefix: how many tokens, by which digest
- ``fetch_fields``  a ``fetch`` of kept inputs or outputs: which, and tokens [offset, offset + tokens)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

import wire
from peer.sessions import Session
from wire.history import as_numpy
from wire import ErrorCode, WireError

MAX_BATCH_SIZE = 64
MAX_SESSION_ID_CHARS = 128
MAX_PROBE_DIGESTS = 1024  # digests one probe may ask about


class Open(NamedTuple):
    start: int
    end: int
    batch_size: int
    max_length: int  # tokens
    session_id: str | None  # None: the peer names it
    wire_dtype: torch.dtype | None  # of the hidden states it answers and pushes; None: as the input
    reorders: int  # beam reorderings a replacement's inputs already went through
    prefix_cache: bool  # the client lets this session reuse and keep histories
    lazy_outputs: bool  # replies may name reused outputs instead of carrying them


class Probe(NamedTuple):
    offset: int  # tokens
    positions: list[int]  # increasing token counts after the offset
    digests: list[str]  # 64 hex digits each: the history after positions[j] tokens


class PrefixRef(NamedTuple):
    tokens: int  # the step's first inputs named instead of carried
    offset: int  # tokens: where the step starts
    digest: bytes  # the history digest after offset + tokens tokens


def open_fields(meta: dict, *, runner_start: int, runner_end: int, max_session_length: int) -> Open:
    """An ``open`` message for blocks [runner_start, runner_end), sessions of at most max_session_length tokens."""
    start = wire.int_field(meta, "start", 0)
    end = wire.int_field(meta, "end", 0)
    if not runner_start <= start < end <= runner_end:
        raise WireError(
            ErrorCode.WRONG_BLOCKS,
            f"peer serves blocks [{runner_start}, {runner_end}) but the request asked for "
            f"[{start}, {end}): re-plan the route",
        )
    batch_size = wire.int_field(meta, "batch_size", 1, MAX_BATCH_SIZE)
    max_length = wire.int_field(meta, "max_length", 1, max_session_length)
    session_id = meta.get("session_id")
    if session_id and (not isinstance(session_id, str) or len(session_id) > MAX_SESSION_ID_CHARS):
        raise WireError(ErrorCode.BAD_REQUEST, f"session_id must be a string of at most {MAX_SESSION_ID_CHARS} chars")
    wire_dtype = meta.get("wire_dtype")
    if wire_dtype is not None and wire_dtype not in wire.HIDDEN_DTYPE_NAMES:
        raise WireError(ErrorCode.BAD_DTYPE,
                        f"wire_dtype must be one of {sorted(wire.HIDDEN_DTYPE_NAMES)}, got {wire_dtype!r}")
    # a replacement starts from already reordered inputs (older clients do not send it)
    reorders = wire.int_field(meta, "reorders", 0) if "reorders" in meta else 0
    reuse, lazy = meta.get("prefix_cache", True), meta.get("lazy_outputs", False)
    for name, flag in (("prefix_cache", reuse), ("lazy_outputs", lazy)):
        if not isinstance(flag, bool):
            raise WireError(ErrorCode.BAD_REQUEST, f"{name} must be true or false, got {flag!r}")
    return Open(start, end, batch_size, max_length, session_id or None,
                None if wire_dtype is None else wire.HIDDEN_DTYPE_NAMES[wire_dtype], reorders, reuse, lazy)


def step_tensors(session: Session, meta: dict, tensors: list[torch.Tensor], *, rewrite: bool,
                 max_session_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden (batch, t, hidden), position_ids (batch, t) int64, mask (batch, past + t) int64 or None)
    of a step of ``session``. A ``rewrite`` may start before the session's end (it replaces tokens)."""
    offset = wire.int_field(meta, "offset", 0)
    if rewrite and offset > session.length:
        raise WireError(ErrorCode.OUT_OF_ORDER, f"a rewrite from token {offset} but the session holds only "
                                                f"{session.length} tokens")
    if not rewrite and offset != session.length:
        raise WireError(
            ErrorCode.OUT_OF_ORDER,
            f"step starts at token {offset} but the session holds {session.length} tokens: "
            f"send steps in order (or replay from {session.length})",
        )
    if len(tensors) not in (2, 3):
        raise WireError(ErrorCode.BAD_REQUEST,
                        f"a step carries hidden, position_ids and optionally attention_mask; got {len(tensors)} tensors")
    hidden, position_ids = tensors[0], tensors[1]  # (batch, t, hidden), (batch, t)
    mask = tensors[2] if len(tensors) == 3 else None  # (batch, past + t)
    if hidden.dtype not in wire.HIDDEN_DTYPES:
        raise WireError(ErrorCode.BAD_DTYPE, f"hidden states must be float32, bfloat16 or float16, got {hidden.dtype}")
    hidden_size = session.runner.hidden_size
    if hidden.ndim != 3 or hidden.shape[0] != session.batch_size or hidden.shape[2] != hidden_size or hidden.shape[1] < 1:
        raise WireError(
            ErrorCode.BAD_SHAPE,
            f"hidden states must be (batch={session.batch_size}, tokens>=1, hidden={hidden_size}), "
            f"got {tuple(hidden.shape)}",
        )
    batch, new_tokens = hidden.shape[:2]
    if offset + new_tokens > session.max_length:
        raise WireError(
            ErrorCode.TOO_LARGE,
            f"step would bring the session to {offset + new_tokens} tokens, over its max_length {session.max_length}",
        )
    if position_ids.dtype not in (torch.int64, torch.int32) or tuple(position_ids.shape) != (batch, new_tokens):
        raise WireError(ErrorCode.BAD_SHAPE,
                        f"position_ids must be int64 ({batch}, {new_tokens}), got {position_ids.dtype} {tuple(position_ids.shape)}")
    # The checks of values run in numpy: on a decode step's one-token tensors torch's per-call dispatch is
    # most of their cost (these run on every step of every hop; see wire/history.py).
    positions = as_numpy(position_ids)
    if positions.size and (positions.min() < 0 or positions.max() >= max_session_length):
        raise WireError(ErrorCode.BAD_REQUEST, f"position ids must be in [0, {max_session_length})")
    if mask is not None:
        if tuple(mask.shape) != (batch, offset + new_tokens):
            raise WireError(ErrorCode.BAD_SHAPE,
                            f"attention_mask must be ({batch}, {offset + new_tokens}) (past + new tokens), got {tuple(mask.shape)}")
        if not _zeros_and_ones(mask):
            raise WireError(ErrorCode.BAD_REQUEST, "attention_mask must hold only 0 and 1")
    if not _finite(hidden):
        raise WireError(ErrorCode.BAD_REQUEST, "hidden states contain NaN or infinity")
    if "reorder" in meta:
        _check_reorder(session, meta, batch)
    return (hidden, position_ids if position_ids.dtype == torch.int64 else position_ids.long(),
            None if mask is None else mask if mask.dtype == torch.int64 else mask.long())


def _finite(hidden: torch.Tensor) -> bool:
    if hidden.dtype == torch.bfloat16:  # numpy has no bfloat16
        return bool(torch.isfinite(hidden).all())
    return bool(np.isfinite(as_numpy(hidden)).all())


def _zeros_and_ones(mask: torch.Tensor) -> bool:
    if mask.dtype.is_floating_point or mask.dtype.is_complex:  # 0.5 lies between 0 and 1
        return bool(((mask == 0) | (mask == 1)).all())
    values = as_numpy(mask)  # integers or booleans
    return not values.size or (values.min() >= 0 and values.max() <= 1)


def _check_reorder(session: Session, meta: dict, batch: int) -> None:
    """A beam search step's ``reorder`` (the row each beam continues) and its sequence number ``reorders``."""
    order, n = meta.get("reorder"), meta.get("reorders")
    if (not isinstance(order, list) or len(order) != batch or not isinstance(n, int) or isinstance(n, bool)
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < batch for i in order)):
        raise WireError(ErrorCode.BAD_REQUEST, f"reorder must be {batch} row indices in [0, {batch}) with "
                                               "'reorders' its sequence number")
    if n > session.reorders + 1:
        raise WireError(ErrorCode.OUT_OF_ORDER, f"reordering {n} but this session has applied only "
                                                f"{session.reorders}")


def probe_fields(meta: dict, *, session_length: int, max_session_length: int) -> Probe:
    """A ``probe`` at the end of a session holding session_length tokens (its digests still hex text)."""
    offset = wire.int_field(meta, "offset", 0)
    positions, digests = meta.get("positions"), meta.get("digests")
    if (not isinstance(positions, list) or not isinstance(digests, list) or len(positions) != len(digests)
            or len(digests) > MAX_PROBE_DIGESTS
            or not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p <= max_session_length
                       for p in positions)
            or any(a >= b for a, b in zip(positions, positions[1:]))
            or not all(isinstance(d, str) and len(d) == 64 for d in digests)):
        raise WireError(ErrorCode.BAD_REQUEST, f"a probe carries increasing token counts 'positions' and as "
                                               f"many 64-hex-digit 'digests' (at most {MAX_PROBE_DIGESTS})")
    if offset != session_length:
        raise WireError(ErrorCode.OUT_OF_ORDER, f"probe at token {offset} but the session holds {session_length}")
    return Probe(offset, positions, digests)


def prefix_ref(meta: dict, tensors: list[torch.Tensor]) -> PrefixRef:
    """The ``prefix`` of a step ({tokens, chain: the history digest in hex}) and the step's offset."""
    ref = meta.get("prefix")
    if not isinstance(ref, dict) or not isinstance(ref.get("chain"), str) or len(ref["chain"]) != 64:
        raise WireError(ErrorCode.BAD_REQUEST, "prefix must be {tokens: int >= 1, chain: 64 hex digits}")
    tokens, offset = wire.int_field(ref, "tokens", 1), wire.int_field(meta, "offset", 0)
    if not tensors or tensors[0].ndim != 3:
        raise WireError(ErrorCode.BAD_REQUEST, "a step naming a prefix still carries (batch, tokens, hidden) states")
    try:
        digest = bytes.fromhex(ref["chain"])
    except ValueError:
        raise WireError(ErrorCode.BAD_REQUEST, "prefix chain must be 64 hex digits") from None
    return PrefixRef(tokens, offset, digest)


def fetch_fields(meta: dict) -> tuple[str, int, int]:
    """(kind: 'inputs' or 'outputs', offset, tokens) of a ``fetch``."""
    kind = meta.get("kind")
    if kind not in ("inputs", "outputs"):
        raise WireError(ErrorCode.BAD_REQUEST, f"kind must be 'inputs' or 'outputs', got {kind!r}")
    return kind, wire.int_field(meta, "offset", 0), wire.int_field(meta, "tokens", 1)
