"""The peer's RPC handlers: validate every message, run blocks on the compute owner, answer, and push
the output on to the next peer when the client asked for it.

Only this module turns failures into wire errors. A bad message gets a typed error and changes
nothing; a failure while computing closes only the session it happened in. A session's steps come
from its client stream or from pushes (``rpc_push``) into the same inbox, and run in arrival order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from typing import Any, AsyncIterator, Callable, NamedTuple

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

import wire
from peer import backward, prefixes
from peer.blocks import BlockRunner
from peer.compute import ComputeOwner
from peer.push import PushSender, parse_next
from peer.sessions import Session, SessionTable
from wire import ErrorCode, WireError

logger = logging.getLogger(__name__)

MAX_BATCH_SIZE = 64
MAX_SESSION_ID_CHARS = 128
MAX_PROBE_DIGESTS = 1024  # digests one probe may ask about
MAX_INBOX = 8  # messages queued on one session: the client's stream waits, pushes beyond get 'busy'
_END = object()  # the client closed its side of the stream


class _Pushed(NamedTuple):
    """A step that came from the previous peer's push rather than from the client's stream."""

    meta: dict
    tensors: list


class PeerHandler:
    def __init__(
        self,
        runner: BlockRunner,
        sessions: SessionTable,
        *,
        max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
        idle_timeout: float = 300.0,  # seconds a session may wait for its next step
        max_session_length: int = 8192,  # tokens
        statistics: Callable[[], dict[str, Any]] = dict,
        prefix_cache: bool = True,  # keep recent sessions' histories for sessions that start the same way
        backward: bool = True,  # serve backward passes (clients fine-tuning through the swarm)
        max_backward_tokens: int = 8192,  # tokens x rows per backward request
    ):
        self.runner = runner
        self.sessions = sessions
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout
        self.max_session_length = max_session_length
        self.accepting = True  # False while draining: no new sessions
        self.prefix_cache = prefix_cache
        self.serves_backward, self.max_backward_tokens = backward, max_backward_tokens
        self.backward_tokens = 0  # tokens x rows whose input gradient this peer computed
        self._statistics = statistics
        self.compute = ComputeOwner()
        self.pusher: PushSender | None = None  # set by register()
        self._inboxes: dict[str, asyncio.Queue] = {}  # session id -> its inbox, for pushes
        self._open_sessions: dict[str, Session] = {}  # session id -> the session of that inbox
        self.requests_served = 0
        self.steps_computed = 0  # tokens x batch rows through the blocks
        self.pushes_received = 0
        self.prefix_pushes = 0  # pushes that named their first inputs by a kept prefix, accepted
        self.outputs_omitted = 0  # tokens x rows of reused outputs a reply named instead of carrying
        self.fetches = 0  # kept inputs/outputs a client fetched after a reply named them
        self.probe_hits = 0  # probes that found a kept history (the client then names it instead of uploading)
        self.errors: collections.Counter[str] = collections.Counter()  # wire errors sent, by code

    async def register(self, p2p: P2P) -> None:
        self.pusher = PushSender(p2p, lambda request: self.rpc_push(request, None))
        await p2p.add_protobuf_handler(wire.RPC_INFO, self.rpc_info, runtime_pb2.ExpertUID)
        await p2p.add_protobuf_handler(wire.RPC_PUSH, self.rpc_push, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(wire.RPC_FETCH, self.rpc_fetch, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(
            wire.RPC_FORWARD, self.rpc_forward, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )
        await p2p.add_protobuf_handler(
            wire.RPC_INFERENCE, self.rpc_inference, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )
        await p2p.add_protobuf_handler(
            wire.RPC_BACKWARD, self.rpc_backward, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )

    def shutdown(self) -> None:
        self.compute.shutdown()

    def counters(self) -> dict[str, int]:
        """Work counters for statistics(): pushes and batching."""
        return {"pushes_sent": self.pusher.sent if self.pusher else 0,
                "pushes_failed": self.pusher.failed if self.pusher else 0,
                "pushes_received": self.pushes_received, "prefix_pushes": self.prefix_pushes,
                "backward_tokens": self.backward_tokens, "outputs_omitted": self.outputs_omitted, "fetches": self.fetches, "probe_hits": self.probe_hits,
                "batched_passes": self.compute.batches, "batched_steps": self.compute.batched_steps}

    # ---- RPCs ---------------------------------------------------------------------------------------

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return wire.response(self._statistics())

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        # A stateless forward is an ephemeral session whose cache is dropped at the end of the stream,
        # outside the session budget (its size is bounded by max_session_length).
        async for reply in self._serve_stream(requests, ephemeral=True):
            yield reply

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for reply in self._serve_stream(requests, ephemeral=False):
            yield reply

    async def rpc_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Input gradients of a span for a client that fine-tunes (see peer/backward.py)."""
        runner, request = self.runner, None
        try:
            async for message in requests:
                meta, tensors = wire.unpack(message, max_bytes=self.max_message_bytes)
                if not self.serves_backward:
                    raise WireError(ErrorCode.NO_BACKWARD, "this peer serves no backward passes (--no-backward): "
                                                           "route them to a peer whose record says it does")
                if meta.get("op") != "backward":
                    raise WireError(ErrorCode.BAD_REQUEST, f"expected op 'backward', got {meta.get('op')!r}")
                if request is None:
                    request = backward.begin(meta, tensors, runner_start=runner.start, runner_end=runner.end,
                                             hidden_size=runner.hidden_size, max_tokens=self.max_backward_tokens,
                                             max_batch=MAX_BATCH_SIZE)
                else:
                    backward.add(request, meta, tensors, runner.hidden_size)
                if request.received == request.total:
                    break
            if request is None or request.received < request.total:
                return  # the client went away
            try:
                grad = await self.compute.call(runner.backward, torch.cat(request.hidden, 1),
                                               torch.cat(request.positions, 1), request.mask,
                                               torch.cat(request.grads, 1), request.start, request.end)
            except Exception as e:  # a compute failure must not take the peer down
                logger.exception("backward failed")
                raise WireError(ErrorCode.INTERNAL, f"the peer failed computing a backward ({type(e).__name__})") from e
        except WireError as e:
            logger.info("rejected a backward: %s", e)
            self.errors[e.code.value] += 1
            yield wire.error_response(e)
            return
        self.backward_tokens += request.batch * request.total
        for chunk in backward.split(grad, request):
            yield wire.response({"op": "grad"}, [chunk])

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext | None
                       ) -> runtime_pb2.ExpertResponse:
        """A step pushed by the previous peer of a route: queued on the session, answered to its client."""
        try:
            meta, tensors = wire.unpack(request, max_bytes=self.max_message_bytes)
            session_id = meta.get("session_id")
            inbox = self._inboxes.get(session_id) if isinstance(session_id, str) else None
            if inbox is None:
                raise WireError(ErrorCode.UNKNOWN_SESSION,
                                f"no open inference session {session_id!r} here to push into: the client relays instead")
            if meta.get("op") != "step":
                raise WireError(ErrorCode.BAD_REQUEST, f"only steps can be pushed, got op {meta.get('op')!r}")
            if inbox.full():
                raise WireError(ErrorCode.BUSY, f"session {session_id!r} already has {MAX_INBOX} messages queued",
                                retry_after=0.1)
            if "prefix" in meta:
                meta, tensors = self._resolve_prefix(self._open_sessions.get(session_id), meta, tensors)
        except WireError as e:
            self.errors[e.code.value] += 1
            return wire.error_response(e)
        self.pushes_received += 1
        inbox.put_nowait(_Pushed(meta, tensors))
        return wire.response({"op": "queued"})

    async def rpc_fetch(self, request: runtime_pb2.ExpertRequest, context: P2PContext | None
                        ) -> runtime_pb2.ExpertResponse:
        """Tokens [offset, offset + tokens) of an open session's kept inputs or outputs (as sent): what a
        reply named instead of carrying (``omitted``), fetched by a client that needs them after all
        (an audit, a failover replay). The session id is the capability, as for pushes."""
        try:
            meta, _ = wire.unpack(request, max_bytes=self.max_message_bytes)
            session_id = meta.get("session_id")
            session = self._open_sessions.get(session_id) if isinstance(session_id, str) else None
            if session is None:
                raise WireError(ErrorCode.UNKNOWN_SESSION, f"no open inference session {session_id!r} here")
            kind = meta.get("kind")
            if kind not in ("inputs", "outputs"):
                raise WireError(ErrorCode.BAD_REQUEST, f"kind must be 'inputs' or 'outputs', got {kind!r}")
            offset, tokens = wire.int_field(meta, "offset", 0), wire.int_field(meta, "tokens", 1)
            entry = session.prefix
            if entry is None or offset + tokens > entry.tokens:
                raise WireError(ErrorCode.UNKNOWN_PREFIX, f"this session no longer keeps tokens [{offset}, "
                                                          f"{offset + tokens}) (its history was reordered or rolled back)")
            if tokens * session.batch_size * session.runner.hidden_size * 4 > self.max_message_bytes:
                raise WireError(ErrorCode.TOO_LARGE, "fetch fewer tokens at a time")
            if kind == "inputs":
                tensor = entry.input(offset, offset + tokens)
            else:
                tensor = wire.to_wire_dtype(entry.output(offset, offset + tokens),
                                            session.wire_dtype or entry.inputs[0].dtype)
        except WireError as e:
            self.errors[e.code.value] += 1
            return wire.error_response(e)
        self.fetches += 1
        return wire.response({"op": "fetched"}, [tensor])

    def _resolve_prefix(self, session: Session | None, meta: dict, tensors: list) -> tuple[dict, list]:
        """A pushed step whose first inputs are named by the digest of their history: rebuilt from the
        entry that keeps them, or refused (the previous peer then sends it in full)."""
        ref = meta.get("prefix")
        if not isinstance(ref, dict) or not isinstance(ref.get("chain"), str) or len(ref["chain"]) != 64:
            raise WireError(ErrorCode.BAD_REQUEST, "prefix must be {tokens: int >= 1, chain: 64 hex digits}")
        tokens, offset = wire.int_field(ref, "tokens", 1), wire.int_field(meta, "offset", 0)
        chain = ref["chain"]
        if not tensors or tensors[0].ndim != 3:
            raise WireError(ErrorCode.BAD_REQUEST, "a step naming a prefix still carries (batch, tokens, hidden) states")
        try:
            digest = bytes.fromhex(chain)
        except ValueError:
            raise WireError(ErrorCode.BAD_REQUEST, "prefix chain must be 64 hex digits") from None
        entry = None
        if session is not None and session.prefix is not None:
            entry = self.sessions.prefixes.find(session.prefix.scope, digest, offset + tokens)
            pinned = session.pinned[0] if session.pinned else None
            if entry is None and pinned is not None and pinned.tokens >= offset + tokens \
                    and pinned.digests[offset + tokens - 1] == digest:
                entry = pinned  # found by this session's probe, evicted since (it stays alive while pinned)
        if entry is None or entry.batch_size != tensors[0].shape[0]:
            raise WireError(ErrorCode.UNKNOWN_PREFIX, "this peer keeps no such prefix: send the hidden states")
        kept = entry.input(offset, offset + tokens)
        if kept.dtype != tensors[0].dtype or kept.shape[2] != tensors[0].shape[2]:
            raise WireError(ErrorCode.UNKNOWN_PREFIX, "the kept prefix has other hidden states: send them")
        meta = {k: v for k, v in meta.items() if k != "prefix"}
        meta["named_tokens"] = tokens  # the reply tells the client the digests of both parts
        return meta, [torch.cat([kept, tensors[0]], dim=1), *tensors[1:]]

    def _probe(self, session: Session, meta: dict) -> dict:
        """How much of a step the client is about to send this peer keeps already: the longest of the
        given histories (digest chains after ``positions[j]`` tokens) some kept entry holds. The entry is
        pinned for the session's next steps, which name that part instead of carrying it."""
        offset = wire.int_field(meta, "offset", 0)
        positions, digests = meta.get("positions"), meta.get("digests")
        if (not isinstance(positions, list) or not isinstance(digests, list) or len(positions) != len(digests)
                or len(digests) > MAX_PROBE_DIGESTS
                or not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p <= self.max_session_length
                           for p in positions)
                or any(a >= b for a, b in zip(positions, positions[1:]))
                or not all(isinstance(d, str) and len(d) == 64 for d in digests)):
            raise WireError(ErrorCode.BAD_REQUEST, f"a probe carries increasing token counts 'positions' and as "
                                                   f"many 64-hex-digit 'digests' (at most {MAX_PROBE_DIGESTS})")
        if offset != session.length:
            raise WireError(ErrorCode.OUT_OF_ORDER, f"probe at token {offset} but the session holds {session.length}")
        if session.prefix is None:
            return {"op": "probed", "tokens": 0}
        for tokens, hex_digest in zip(reversed(positions), reversed(digests)):
            try:
                digest = bytes.fromhex(hex_digest)
            except ValueError:
                raise WireError(ErrorCode.BAD_REQUEST, "probe digests must be hex") from None
            entry = self.sessions.prefixes.find(session.prefix.scope, digest, offset + tokens)
            if entry is not None and entry.batch_size == session.batch_size:
                session.pinned = (entry, offset + tokens)
                self.probe_hits += 1
                return {"op": "probed", "tokens": tokens}
        return {"op": "probed", "tokens": 0}

    # ---- one stream = one session -------------------------------------------------------------------

    async def _serve_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], *, ephemeral: bool):
        session: Session | None = None
        inbox: asyncio.Queue = asyncio.Queue(MAX_INBOX)  # (meta, tensors) | WireError | _END, arrival order
        reader = asyncio.ensure_future(self._read_client(requests, inbox))  # owned: cancelled in finally
        early: dict[int, _Pushed] = {}  # pushed steps that overtook an earlier step, by offset
        try:
            while True:
                if session is not None and session.length in early:
                    item = early.pop(session.length)  # the step it was waiting for has run
                else:
                    try:
                        item = await asyncio.wait_for(inbox.get(), timeout=self.idle_timeout)
                    except asyncio.TimeoutError:
                        yield wire.error_response(WireError(
                            ErrorCode.EXPIRED, f"session idle for over {self.idle_timeout:.0f} s: it was closed"))
                        return
                if item is _END:
                    return
                if (isinstance(item, _Pushed) and session is not None and isinstance(item.meta.get("offset"), int)
                        and item.meta["offset"] > session.length and len(early) < MAX_INBOX):
                    # A pushed step ahead of the session: an earlier step is on its way (the client relays
                    # it after a failed push). It waits here rather than failing as out of order.
                    early[item.meta["offset"]] = item
                    continue
                try:
                    if isinstance(item, WireError):
                        raise item
                    meta, tensors = item
                    op = meta.get("op")
                    if op == "open":
                        if session is not None:
                            raise WireError(ErrorCode.BAD_REQUEST, "this stream already has an open session")
                        session = self._open(meta, ephemeral)
                        if not ephemeral:
                            self._inboxes[session.session_id] = inbox
                            self._open_sessions[session.session_id] = session
                        yield wire.response({"op": "opened", "session_id": session.session_id,
                                             "cache_tokens_left": self.sessions.tokens_left})
                    elif op in ("step", "probe"):
                        if session is None or meta.get("session_id") != session.session_id:
                            raise WireError(ErrorCode.UNKNOWN_SESSION,
                                            f"session {meta.get('session_id')!r} is not open on this stream: send 'open' first")
                        if op == "probe":
                            yield wire.response(self._probe(session, meta))
                            continue
                        if "prefix" in meta and not isinstance(item, _Pushed):  # pushed ones were resolved on arrival
                            meta, tensors = self._resolve_prefix(session, meta, tensors)
                        yield await self._step(session, meta, tensors)
                    else:
                        raise WireError(ErrorCode.BAD_REQUEST, f"unknown op {op!r}: expected 'open' or 'step'")
                except WireError as e:
                    logger.info("rejected a message: %s", e)
                    self.errors[e.code.value] += 1
                    yield wire.error_response(e)
                    if e.code == ErrorCode.INTERNAL:
                        return
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            if session is not None:
                self.compute.forget(session.cache)
            if session is not None and not ephemeral:
                if self._inboxes.get(session.session_id) is inbox:
                    del self._inboxes[session.session_id]
                    self._open_sessions.pop(session.session_id, None)
                self.sessions.close(session.session_id)

    async def _read_client(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], inbox: asyncio.Queue) -> None:
        """Moves the client's messages into the session's inbox (decoded, or the error decoding them),
        waiting while it is full, so a client cannot queue more than MAX_INBOX messages here."""
        try:
            async for message in requests:
                try:
                    item = wire.unpack(message, max_bytes=self.max_message_bytes)
                except WireError as e:
                    item = e
                await inbox.put(item)
        except Exception as e:  # the stream broke (hivemind/p2p errors): the session ends as if closed
            logger.info("a client stream failed: %s: %s", type(e).__name__, e)
        await inbox.put(_END)

    def _open(self, meta: dict, ephemeral: bool) -> Session:
        if not ephemeral and not self.accepting:
            raise WireError(ErrorCode.DRAINING, "this peer is shutting down and accepts no new sessions: re-plan the route")
        runner = self.runner  # sessions stay on the runner they opened on, even if the peer moves
        start = wire.int_field(meta, "start", 0)
        end = wire.int_field(meta, "end", 0)
        if not runner.start <= start < end <= runner.end:
            raise WireError(
                ErrorCode.WRONG_BLOCKS,
                f"peer serves blocks [{runner.start}, {runner.end}) but the request asked for "
                f"[{start}, {end}): re-plan the route",
            )
        batch_size = wire.int_field(meta, "batch_size", 1, MAX_BATCH_SIZE)
        max_length = wire.int_field(meta, "max_length", 1, self.max_session_length)
        session_id = meta.get("session_id") or uuid.uuid4().hex
        if not isinstance(session_id, str) or len(session_id) > MAX_SESSION_ID_CHARS:
            raise WireError(ErrorCode.BAD_REQUEST, f"session_id must be a string of at most {MAX_SESSION_ID_CHARS} chars")
        wire_dtype = meta.get("wire_dtype")
        if wire_dtype is not None and wire_dtype not in wire.HIDDEN_DTYPE_NAMES:
            raise WireError(ErrorCode.BAD_DTYPE,
                            f"wire_dtype must be one of {sorted(wire.HIDDEN_DTYPE_NAMES)}, got {wire_dtype!r}")

        def make_cache():
            return runner.new_cache(start, end)

        if ephemeral:
            session = Session(session_id, batch_size, max_length, runner, make_cache())
        else:
            session = self.sessions.open(session_id, batch_size, max_length, runner, make_cache)
        session.wire_dtype = None if wire_dtype is None else wire.HIDDEN_DTYPE_NAMES[wire_dtype]
        # a replacement starts from already reordered inputs (older clients do not send it)
        session.reorders = wire.int_field(meta, "reorders", 0) if "reorders" in meta else 0
        reuse, lazy = meta.get("prefix_cache", True), meta.get("lazy_outputs", False)
        for name, flag in (("prefix_cache", reuse), ("lazy_outputs", lazy)):
            if not isinstance(flag, bool):
                raise WireError(ErrorCode.BAD_REQUEST, f"{name} must be true or false, got {flag!r}")
        nonce = getattr(runner, "prefix_nonce", None)
        if reuse and self.prefix_cache and not ephemeral and nonce is not None and prefixes.reusable(session.cache):
            session.prefix = prefixes.Entry(prefixes.scope(nonce, start, end), batch_size)
            session.prefix_root = prefixes.root_digest(batch_size)
            session.out_digests = []
            session.lazy = lazy
        return session

    def _validate_step(self, session: Session, meta: dict, tensors: list[torch.Tensor], rewrite: bool = False):
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
        hidden, position_ids = tensors[0], tensors[1]
        mask = tensors[2] if len(tensors) == 3 else None
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
        if position_ids.numel() and (position_ids.min() < 0 or position_ids.max() >= self.max_session_length):
            raise WireError(ErrorCode.BAD_REQUEST, f"position ids must be in [0, {self.max_session_length})")
        if mask is not None:
            if tuple(mask.shape) != (batch, offset + new_tokens):
                raise WireError(ErrorCode.BAD_SHAPE,
                                f"attention_mask must be ({batch}, {offset + new_tokens}) (past + new tokens), got {tuple(mask.shape)}")
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise WireError(ErrorCode.BAD_REQUEST, "attention_mask must hold only 0 and 1")
        if not bool(torch.isfinite(hidden).all()):
            raise WireError(ErrorCode.BAD_REQUEST, "hidden states contain NaN or infinity")
        if "reorder" in meta:
            order, n = meta.get("reorder"), meta.get("reorders")
            if (not isinstance(order, list) or len(order) != batch or not isinstance(n, int) or isinstance(n, bool)
                    or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < batch for i in order)):
                raise WireError(ErrorCode.BAD_REQUEST, f"reorder must be {batch} row indices in [0, {batch}) with "
                                                       "'reorders' its sequence number")
            if n > session.reorders + 1:
                raise WireError(ErrorCode.OUT_OF_ORDER, f"reordering {n} but this session has applied only "
                                                        f"{session.reorders}")
        return hidden, position_ids.long(), None if mask is None else mask.long()

    def _rewind(self, session: Session, meta: dict) -> None:
        """A step marked ``rewrite`` replaces the tokens from its offset on (speculative decoding rejected
        them): the cache is cropped to the offset first. Idempotent, so a rewrite step that arrives twice
        (pushed, then re-sent) computes the same thing twice rather than going out of order. Called once
        the step is known to be valid, so a bad rewrite loses nothing."""
        offset = wire.int_field(meta, "offset", 0)
        drop = session.length - offset  # >= 0: checked by _validate_step
        if not drop:
            return
        if not getattr(session.cache, "is_croppable", True):
            raise WireError(ErrorCode.BAD_REQUEST, "this model's KV cache cannot be rolled back (a sliding-window "
                                                   "or recurrent layer past its window): generate without drafts")
        session.cache.crop(-drop)
        session.length = offset
        if session.prefix is not None:
            self.sessions.prefixes.truncate(session.prefix, offset)
            del session.out_digests[offset:]
        session.steps = {(o, t) for o, t in session.steps if o + t <= offset}

    async def _step(self, session: Session, meta: dict, tensors: list[torch.Tensor]) -> runtime_pb2.ExpertResponse:
        rewrite = meta.get("rewrite") is True
        if not rewrite and (duplicate := self._duplicate(session, meta, tensors)) is not None:
            return duplicate
        hidden, position_ids, mask = self._validate_step(session, meta, tensors, rewrite)
        if rewrite:
            self._rewind(session, meta)
        if "reorder" in meta and meta["reorders"] == session.reorders + 1:
            # beam search: the rows of the cache follow the beams chosen at the last step (applied once;
            # the same step pushed and re-sent, or a replacement built from reordered inputs, skips it)
            self.sessions.stop_reuse(session)  # its rows no longer follow one history each
            session.cache.reorder_cache(torch.tensor(meta["reorder"], dtype=torch.long))
            session.reorders += 1
        chain = parse_next(meta.get("next"))
        try:
            out, reused = await self._compute(session, hidden, position_ids, mask)
        except Exception as e:  # a compute failure must not take the peer down; this session is lost
            logger.exception("compute failed in session %s", session.session_id)
            raise WireError(ErrorCode.INTERNAL, f"the peer failed computing this step ({type(e).__name__}): re-route") from e
        offset, tokens = session.length, hidden.shape[1]
        if session.pinned is not None and offset + tokens >= session.pinned[1]:
            session.pinned = None  # past what the probe found: no later step names it
        omit = min(reused, tokens - 1)  # reused outputs the reply and the push may name (never the last token)
        session.length += tokens
        session.steps.add((offset, tokens))
        self.requests_served += 1
        self.steps_computed += hidden.shape[0] * (tokens - reused)
        out = wire.to_wire_dtype(out, session.wire_dtype or hidden.dtype)
        reply = {"op": "result", "length": session.length, "input_digest": wire.digest(hidden)}
        named = meta.get("named_tokens")
        if isinstance(named, int) and not isinstance(named, bool) and 0 < named < tokens:
            # the first inputs came named by the previous peer: the client checks each part on its own
            reply["input_split"] = named
            reply["input_digests"] = [wire.digest(hidden[:, :named]), wire.digest(hidden[:, named:])]
        if reused:
            reply["reused"] = reused
        answer = out
        if omit and session.lazy and session.prefix is not None and meta.get("full_outputs") is not True:
            # the client opted in: these outputs stay here (committed to by their digest) until it fetches them
            reply["omitted"], reply["omitted_digest"] = omit, wire.digest(out[:, :omit])
            answer = out[:, omit:]
            self.outputs_omitted += hidden.shape[0] * omit
        if session.out_digests is not None:  # what the next hop receives, named for a later reference
            head = session.out_digests[-1] if session.out_digests else session.prefix_root
            session.out_digests += prefixes.chain(head, out, position_ids, mask, offset)
        if chain:
            step = {"op": "step", "offset": offset}
            if rewrite:
                step["rewrite"] = True
            if "reorder" in meta:
                step["reorder"], step["reorders"] = meta["reorder"], meta["reorders"]
            tamper = getattr(session.runner, "tamper_push", None)  # only a testing adversary has one
            pushed = out if tamper is None else tamper(out)
            failure = "not tried"
            if omit and tamper is None and session.out_digests is not None:
                # the next hop most likely keeps this history too: name its first inputs instead of sending them
                named = {**step, "prefix": {"tokens": omit, "chain": session.out_digests[offset + omit - 1].hex()}}
                failure = await self.pusher.push(chain, named, [pushed[:, omit:], *tensors[1:]])
                self.prefix_pushes += failure is None
            if failure is not None:
                failure = await self.pusher.push(chain, step, [pushed, *tensors[1:]])
            reply["pushed"] = failure is None
            if failure is not None:
                reply["push_error"] = failure
        return wire.response(reply, [answer])

    async def _compute(self, session: Session, hidden: torch.Tensor, position_ids: torch.Tensor,
                       mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Run one step: (output (batch, t, hidden), tokens reused from a kept prefix). The first tokens
        of the step that some kept history holds are copied from it (keys, values and outputs); the
        rest are computed on top."""
        entry = session.prefix
        if entry is None:
            return await self.compute.run(session.runner, hidden, position_ids, mask, session.cache), 0
        offset, tokens = session.length, hidden.shape[1]
        head = entry.digests[-1] if entry.tokens else session.prefix_root
        digests = prefixes.chain(head, hidden, position_ids, mask, offset)
        store = self.sessions.prefixes
        source, reused = store.lookup(entry.scope, digests, offset)
        parts = []
        if reused:
            cache = session.cache
            for layer in range(len(cache.layers)):
                cache.update(*source.kv(layer, offset, offset + reused), cache.start + layer)
            parts.append(source.output(offset, offset + reused))
            store.hits += 1
            store.tokens_reused += hidden.shape[0] * reused
        if reused < tokens:
            parts.append(await self.compute.run(session.runner, hidden[:, reused:], position_ids[:, reused:], mask,
                                                session.cache))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (batch, t, hidden)
        store.publish(entry, session.cache, digests, hidden, out)
        return out, reused

    @staticmethod
    def _duplicate(session: Session, meta: dict, tensors: list[torch.Tensor]) -> runtime_pb2.ExpertResponse | None:
        """A step this session already computed (pushed by one peer, then re-sent by the client or by a
        replacement after a failover) is acknowledged without computing or pushing it again."""
        offset = meta.get("offset")
        if not isinstance(offset, int) or offset >= session.length or not tensors or tensors[0].ndim != 3:
            return None
        if (offset, tensors[0].shape[1]) not in session.steps:
            return None
        return wire.response({"op": "result", "length": offset + tensors[0].shape[1], "duplicate": True})
