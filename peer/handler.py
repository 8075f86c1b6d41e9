"""The peer's RPC handlers: take every message off its stream, dispatch it, run blocks on the compute
owner, answer, and push the output on to the next peer when the client asked for it.

Only this module turns failures into wire errors. A bad message gets a typed error and changes
nothing; a failure while computing closes only the session it happened in. A session's steps come
from its client stream or from pushes (``rpc_push``) into the same inbox, and run in arrival order.
Message checks are peer/validation.py's, prefix reuse peer/reuse.py's, backward passes peer/backward.py's.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, AsyncIterator, Callable, NamedTuple

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

import wire
from peer import backward, steps, validation
from peer.blocks import BlockRunner
from peer.compute import ComputeOwner
from peer.counters import Counters
from peer.push import NextHop, PushSender, parse_next
from peer.reuse import PrefixReuse
from peer.sessions import Session, SessionTable
from wire import ErrorCode, WireError
from wire.phases import PEER_PHASES, Phases, Timeline

logger = logging.getLogger(__name__)

MAX_INBOX = 8  # messages queued on one session: the client's stream waits, pushes beyond get 'busy'
_END = object()  # the client closed its side of the stream


class _Message(NamedTuple):
    """A decoded message from the client's stream, with the timeline of its step."""

    meta: dict
    tensors: list
    timeline: Timeline


class _Pushed(NamedTuple):
    """A step that came from the previous peer's push rather than from the client's stream."""

    meta: dict
    tensors: list
    timeline: Timeline


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
        tamper_push: Callable[[torch.Tensor], torch.Tensor] | None = None,  # TESTING AID: see below
        sign: Callable[[bytes], bytes] | None = None,  # the peer's identity: signs every step's receipt
        model_id: str = "",  # what the receipts name
    ):
        self.runner = runner
        self.sessions = sessions
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout
        self.max_session_length = max_session_length
        self.accepting = True  # False while draining: no new sessions
        self.serves_backward, self.max_backward_tokens = backward, max_backward_tokens
        # The push seam: what is pushed to the next peer instead of a step's output (batch, t, hidden).
        # Only a testing adversary has one (peer/adversary.py's PushTamper, wired by the server with
        # --adversary); with one, pushes always carry every token (never a named prefix).
        self.tamper_push = tamper_push
        self.sign, self.model_id = sign, model_id  # without a signer, replies carry no receipts
        self._statistics = statistics
        self.compute = ComputeOwner()
        self.pusher: PushSender | None = None  # set by register()
        self._inboxes: dict[str, asyncio.Queue] = {}  # session id -> its inbox, for pushes
        self._open_sessions: dict[str, Session] = {}  # session id -> the session of that inbox
        self.counts = Counters()
        self.phases = Phases(PEER_PHASES, prefix="swarmllm_peer")  # where each step's time goes
        self.reuse = PrefixReuse(sessions, self.counts, enabled=prefix_cache)

    async def register(self, p2p: P2P) -> None:
        """Serve the RPCs on ``p2p``; again on a new daemon when the node replaced a dead one."""
        if self.pusher is None:
            self.pusher = PushSender(p2p, lambda request: self.rpc_push(request, None))
        else:
            self.pusher.p2p = p2p  # pushes go out through the new daemon; the counters carry on
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

    def counters(self) -> dict[str, Any]:
        """Work counters for statistics(): steps, pushes, reuse, backward, batching and errors by code."""
        return {**self.counts.as_dict(),
                "pushes_sent": self.pusher.sent if self.pusher else 0,
                "pushes_failed": self.pusher.failed if self.pusher else 0,
                "batched_passes": self.compute.batches, "batched_steps": self.compute.batched_steps,
                "inline_steps": self.compute.inline_steps}

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
        runner = self.runner
        try:
            request = await backward.receive(requests, runner, enabled=self.serves_backward,
                                             max_bytes=self.max_message_bytes, max_tokens=self.max_backward_tokens,
                                             max_batch=validation.MAX_BATCH_SIZE)
            if request is None:
                return  # the client went away
            try:
                grad = await self.compute.call(runner.backward, *backward.arguments(request))
            except Exception as e:  # a compute failure must not take the peer down
                logger.exception("backward failed")
                raise WireError(ErrorCode.INTERNAL, f"the peer failed computing a backward ({type(e).__name__})") from e
        except WireError as e:
            logger.info("rejected a backward: %s", e)
            self.counts.errors[e.code.value] += 1
            yield wire.error_response(e)
            return
        self.counts.backward_tokens += request.batch * request.total
        for chunk in backward.split(grad, request):
            yield wire.response({"op": "grad"}, [chunk])

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext | None
                       ) -> runtime_pb2.ExpertResponse:
        """A step pushed by the previous peer of a route: queued on the session, answered to its client."""
        timeline = Timeline(self.phases)
        try:
            meta, tensors = wire.unpack(request, max_bytes=self.max_message_bytes)
            timeline.mark("decode")
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
            self.counts.errors[e.code.value] += 1
            return wire.error_response(e)
        self.counts.pushes_received += 1
        inbox.put_nowait(_Pushed(meta, tensors, timeline))
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
            tensor = self.reuse.kept(session, *validation.fetch_fields(meta), self.max_message_bytes)
        except WireError as e:
            self.counts.errors[e.code.value] += 1
            return wire.error_response(e)
        self.counts.fetches += 1
        return wire.response({"op": "fetched"}, [tensor])

    def _resolve_prefix(self, session: Session | None, meta: dict, tensors: list) -> tuple[dict, list]:
        """A step whose first inputs are named by the digest of their history, rebuilt in full (peer/reuse.py)."""
        return self.reuse.resolve(session, meta, tensors, validation.prefix_ref(meta, tensors))

    def _probe(self, session: Session, meta: dict) -> dict:
        """How much of the client's next step this peer keeps already (peer/reuse.py)."""
        return self.reuse.probe(session, validation.probe_fields(
            meta, session_length=session.length, max_session_length=self.max_session_length))

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
                if isinstance(item, (_Message, _Pushed)):
                    item.timeline.mark("queue")
                if (isinstance(item, _Pushed) and session is not None and isinstance(item.meta.get("offset"), int)
                        and item.meta["offset"] > session.length and len(early) < MAX_INBOX):
                    # A pushed step ahead of the session: an earlier step is on its way (the client relays
                    # it after a failed push). It waits here rather than failing as out of order.
                    early[item.meta["offset"]] = item
                    continue
                try:
                    session, reply = await self._dispatch(session, item, inbox, ephemeral)
                except WireError as e:
                    logger.info("rejected a message: %s", e)
                    self.counts.errors[e.code.value] += 1
                    yield wire.error_response(e)
                    if e.code == ErrorCode.INTERNAL:
                        return
                    continue
                yield reply
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self._end_stream(session, inbox, ephemeral)

    async def _dispatch(self, session: Session | None, item, inbox: asyncio.Queue, ephemeral: bool
                        ) -> tuple[Session | None, runtime_pb2.ExpertResponse]:
        """One message of a stream (or a push into it): (the stream's session after it, the answer)."""
        if isinstance(item, WireError):
            raise item
        meta, tensors, timeline = item
        op = meta.get("op")
        if op == "open":
            if session is not None:
                raise WireError(ErrorCode.BAD_REQUEST, "this stream already has an open session")
            session = self._open(meta, ephemeral)
            if not ephemeral:
                self._inboxes[session.session_id] = inbox
                self._open_sessions[session.session_id] = session
            return session, wire.response({"op": "opened", "session_id": session.session_id,
                                           "cache_tokens_left": self.sessions.tokens_left})
        if op not in ("step", "probe"):
            raise WireError(ErrorCode.BAD_REQUEST, f"unknown op {op!r}: expected 'open' or 'step'")
        if session is None or meta.get("session_id") != session.session_id:
            raise WireError(ErrorCode.UNKNOWN_SESSION,
                            f"session {meta.get('session_id')!r} is not open on this stream: send 'open' first")
        if op == "probe":
            return session, wire.response(self._probe(session, meta))
        if "prefix" in meta and not isinstance(item, _Pushed):  # pushed ones were resolved on arrival
            meta, tensors = self._resolve_prefix(session, meta, tensors)
        return session, await self._step(session, meta, tensors, timeline)

    def _end_stream(self, session: Session | None, inbox: asyncio.Queue, ephemeral: bool) -> None:
        if session is None:
            return
        self.compute.forget(session.cache)
        if not ephemeral:
            if self._inboxes.get(session.session_id) is inbox:
                del self._inboxes[session.session_id]
                self._open_sessions.pop(session.session_id, None)
            self.sessions.close(session.session_id)

    async def _read_client(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], inbox: asyncio.Queue) -> None:
        """Moves the client's messages into the session's inbox (decoded, or the error decoding them),
        waiting while it is full, so a client cannot queue more than MAX_INBOX messages here."""
        try:
            async for message in requests:
                timeline = Timeline(self.phases)
                try:
                    item = _Message(*wire.unpack(message, max_bytes=self.max_message_bytes), timeline)
                    timeline.mark("decode")
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
        fields = validation.open_fields(meta, runner_start=runner.start, runner_end=runner.end,
                                        max_session_length=self.max_session_length)
        session_id = fields.session_id or uuid.uuid4().hex

        def make_cache():
            return runner.new_cache(fields.start, fields.end)

        if ephemeral:
            session = Session(session_id, fields.batch_size, fields.max_length, runner, make_cache())
        else:
            session = self.sessions.open(session_id, fields.batch_size, fields.max_length, runner, make_cache)
        session.wire_dtype = fields.wire_dtype
        session.reorders = fields.reorders
        session.span = (fields.start, fields.end)
        if ephemeral:  # a stateless forward (audits' re-runs, training): nobody keeps its receipts
            session.chain = None
        self.reuse.begin(session, runner, fields.start, fields.end, wanted=fields.prefix_cache and not ephemeral,
                         lazy=fields.lazy_outputs)
        return session

    async def _step(self, session: Session, meta: dict, tensors: list[torch.Tensor], timeline: Timeline | None = None
                    ) -> runtime_pb2.ExpertResponse:
        timeline = timeline or Timeline(self.phases)
        rewrite = meta.get("rewrite") is True
        if not rewrite and (duplicate := steps.duplicate(session, meta, tensors)) is not None:
            return wire.response(duplicate)
        hidden, position_ids, mask = validation.step_tensors(session, meta, tensors, rewrite=rewrite,
                                                             max_session_length=self.max_session_length)
        if rewrite:
            steps.rewind(session, meta["offset"], self.reuse)
        steps.reorder(self.sessions, session, meta)
        targets = parse_next(meta.get("next"))  # the downstream hops to push the output to
        timeline.mark("validate")
        try:
            out, reused = await self.reuse.run(self.compute, session, hidden, position_ids, mask, timeline)
        except Exception as e:  # a compute failure must not take the peer down; this session is lost
            logger.exception("compute failed in session %s", session.session_id)
            raise WireError(ErrorCode.INTERNAL, f"the peer failed computing this step ({type(e).__name__}): re-route") from e
        offset, tokens = session.length, hidden.shape[1]
        omit = min(reused, tokens - 1)  # reused outputs the reply and the push may name (never the last token)
        session.length += tokens
        session.steps.add((offset, tokens))
        self.counts.requests_served += 1
        self.counts.steps_computed += hidden.shape[0] * (tokens - reused)
        out = wire.to_wire_dtype(out, session.wire_dtype or hidden.dtype)  # (batch, t, hidden) as sent
        self.reuse.answered(session, out, position_ids, mask, offset)
        # The next hop waits for the push, nobody waits for this peer's own reply: push first, then
        # digest and sign what the reply carries (off the pipeline's critical path).
        pushed = None
        if targets:
            timeline.mark("encode")
            pushed = await self._push(session, meta, tensors[1:], out, targets, offset, omit)
            timeline.mark("push")
        reply, answer = steps.result(session, meta, hidden, out, reused, omit)
        self.counts.outputs_omitted += hidden.shape[0] * reply.get("omitted", 0)
        if pushed is not None:
            reply.update(pushed)
        timeline.mark("encode")
        if self.sign is not None and (signed := steps.receipt(session, self.model_id, self.sign, hidden, position_ids,
                                                              mask, offset, out)) is not None:
            reply["receipt"] = signed
            timeline.mark("sign")
        response = wire.response(reply, [answer])
        timeline.mark("reply")
        timeline.done()
        return response

    async def _push(self, session: Session, meta: dict, rest: list[torch.Tensor], out: torch.Tensor,
                    targets: list[NextHop], offset: int, omit: int) -> dict:
        """Push a step's output (batch, t, hidden) with its ``rest`` (position ids, mask) to targets[0]: its
        first ``omit`` tokens named by their history when the next hop likely keeps it, else (or if that
        is refused) in full. The reply's push fields."""
        step = {"op": "step", "offset": offset}
        if meta.get("rewrite") is True:
            step["rewrite"] = True
        if "reorder" in meta:
            step["reorder"], step["reorders"] = meta["reorder"], meta["reorders"]
        pushed = out if self.tamper_push is None else self.tamper_push(out)
        failure = "not tried"
        prefix = self.reuse.nameable(session, offset, omit) if self.tamper_push is None else None
        if prefix is not None:
            # the next hop most likely keeps this history too: name its first inputs instead of sending them
            failure = await self.pusher.push(targets, {**step, "prefix": prefix}, [pushed[:, omit:], *rest])
            self.counts.prefix_pushes += failure is None
        if failure is not None:
            failure = await self.pusher.push(targets, step, [pushed, *rest])
        return {"pushed": True} if failure is None else {"pushed": False, "push_error": failure}
