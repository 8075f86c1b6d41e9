"""The client's view of the swarm and its sessions: records from the DHT, measured RTTs, bans, routes,
and inference sessions that stream hidden states through a chain of peers and survive their failures.

Async core on the client's loop thread; ``RemoteSwarm`` and ``RemoteSession`` are the synchronous faces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import time
import uuid

import torch

from client import routing
from client.bans import BanList
from client.errors import MissingBlocksError, PeerBusy, PeerError, SwarmError
from client.loop import LoopThread
from client.routing import Hop
from client.transport import Stream, Transport
from dht import directory
from dht import identity
from dht.records import PeerRecord, PeerState, VerdictRecord
import wire
from verify.auditor import LOST_OUTPUTS, AuditResult, Auditor, Checker, ServedSpan
from verify.policy import AuditRates, SamplingPolicy, standing_cost
from verify.reputation import ReputationBook, Status, Verdict, identity_signals

DEFAULT_REPUTATION_PATH = os.environ.get(
    "SWARMLLM_REPUTATION_PATH", os.path.join(os.path.expanduser("~"), ".cache", "swarmllm", "reputation.json"))

logger = logging.getLogger(__name__)

# Refusals that say nothing bad about the peer: it is full, has moved to other blocks, or is leaving.
_NOT_A_FAULT = {wire.ErrorCode.BUSY.value, wire.ErrorCode.WRONG_BLOCKS.value, wire.ErrorCode.DRAINING.value,
                wire.ErrorCode.UNKNOWN_PREFIX.value}
PROBE_EVERY = 32  # tokens between the histories a probe asks about
VERIFY_MODES = ("background", "redo", "strict")
TIMED_MAX_TOKENS = 16  # steps of at most this many tokens x rows time the peers' speed (decode-like steps)


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    initial_peers: tuple[str, ...]
    model_id: str
    num_blocks: int
    hidden_size: int
    step_timeout: float = 30.0  # seconds one step may take on one peer, plus the per-token allowance
    step_timeout_per_token: float = 0.05  # seconds per token in the step
    route_timeout: float = 30.0  # seconds to wait for peers to cover missing blocks
    max_retries: int = 16  # failed hops one session step may recover from before giving up
    max_chunk_tokens: int | None = None  # tokens per message; None = derived from message size
    refresh_period: float = 5.0  # seconds between background refreshes of records and pings
    ping_timeout: float = 3.0  # seconds
    stale_refresh_timeout: float = 0.5  # seconds a re-plan waits for the DHT before using its last snapshot
    ban_base: float = 2.0  # seconds a peer is avoided after its first failure (doubles each time)
    probe_after: float = 0.25  # seconds without a reply before the peer is pinged (and every this often after)
    probe_timeout: float = 1.0  # seconds a probed peer has to answer before it counts as dead or hung
    audit_rates: AuditRates = AuditRates()  # how often spans are re-run elsewhere, by the peer's standing
    reputation_path: str | None = DEFAULT_REPUTATION_PATH  # the client's book across runs; None = memory only
    identity_path: str | None = None  # the client's key (signs its verdicts); None = a fresh one per run
    verify_mode: str = "background"  # "background": audits never delay generate(); "redo": generate() waits
    # for the audits of its sessions and generates again (avoiding the cheater) if one confirms a lie;
    # "strict": every span a peer that is not trusted served is re-run on another peer and must match
    # before generate() returns (UnverifiableError when no other peer can check it)
    push: bool = True  # peers forward each step to the next peer (k + 1 messages per token); False = the
    # client relays every hop itself (2k messages), which is also the fallback for a link that fails
    wire_dtype: str | None = None  # hidden states on the wire: None = as computed (float32 stays bit-exact);
    # "bfloat16" / "float16" = half the bytes, negotiated with each peer when the session opens

    prefix_cache: bool = True  # peers may reuse their kept caches of earlier sessions that began with the same
    # inputs (and keep this session's for later ones); False = this client's sessions neither reuse nor leave any
    probe_min_bytes: int = 256 * 2**10  # a session's first step at least this large (on the wire) first asks the
    # first peer how much of it it keeps (one small round trip), and names that part instead of uploading it
    formats: tuple[str, ...] | None = None  # formats a route may use, mixed ("nf4", "bfloat16", "float16/int8");
    # None = one format per session, the most precise that covers every block (see client.routing)
    hop_seconds: float = 0.0  # charged per hop when planning; routing.HOP_SECONDS (0.05) is what sim/ found
    # best at 1,000 peers (fewer, longer hops: each one reserves a whole session's cache on one more peer)
    route_jitter: bool = False  # spread near-equal routes at random (routing.JITTER), so that clients planning
    # from one snapshot do not all fill the same peers; both off by default: plans stay the cheapest, as tests expect

    def __post_init__(self):
        if self.formats is not None:
            formats = (self.formats,) if isinstance(self.formats, str) else tuple(self.formats)
            if not formats:
                raise ValueError("formats must name at least one format, or be None")
            object.__setattr__(self, "formats", tuple(routing.check_format(f) for f in formats))
        if self.verify_mode not in VERIFY_MODES:
            raise ValueError(f"verify_mode must be one of {VERIFY_MODES}, got {self.verify_mode!r}")
        if self.wire_dtype is not None and self.wire_dtype not in wire.HIDDEN_DTYPE_NAMES:
            raise ValueError(f"wire_dtype must be None or one of {sorted(wire.HIDDEN_DTYPE_NAMES)}, got {self.wire_dtype!r}")


@dataclasses.dataclass(frozen=True)
class StepInput:
    """What one hop received in one step: enough to replay it exactly on a replacement."""

    hidden: torch.Tensor  # (batch, t, hidden)
    position_ids: torch.Tensor  # (batch, t)
    mask: torch.Tensor | None  # (batch, offset + t)
    offset: int
    rewrite: bool = False  # the peer first drops what it holds from ``offset`` on (a rolled-back draft)
    reorder: tuple[tuple[int, ...], int] | None = None  # (rows, sequence number): beam search's reordering
    # of the cache, applied by the peer before computing (never kept in a hop's history, which is reordered)
    named: int = 0  # the first tokens are sent as the digest of their history (the peer keeps them: a probe said so)
    chain: str = ""  # that digest, hex

    def truncated(self, length: int) -> "StepInput":
        """This step cut to the tokens before ``length`` (which must lie inside it)."""
        keep = length - self.offset
        return dataclasses.replace(self, named=0, chain="", hidden=self.hidden[:, :keep], position_ids=self.position_ids[:, :keep],
                                   mask=None if self.mask is None else self.mask[:, :length])


@dataclasses.dataclass
class Hole:
    """Outputs a peer named instead of sending (reused from a prefix it keeps): the first ``tokens``
    positions of ``tensor`` are NaN until fetched from one of ``sources`` (the hop that produced them,
    then the hop that received them as inputs), which must return bytes with the ``digest`` the producer
    committed to in its reply. NaN marks a hole unambiguously: real hidden states are always finite."""

    tensor: torch.Tensor  # (batch, t, hidden), holes first
    tokens: int
    digest: str
    offset: int  # session position of the tensor's first token
    sources: list[tuple["HopSession", str]]  # (hop, "outputs" | "inputs") to fetch from, in order


class Equivocation(PeerError):
    """A peer pushed the next peer different hidden states from the ones it returned to the client."""


class HopSession:
    """One peer's part of a session: its stream, and every input it was sent (for replay)."""

    def __init__(self, hop: Hop, stream: Stream, session_id: str):
        self.hop, self.stream, self.session_id = hop, stream, session_id
        self.history: list[StepInput] = []
        self.outputs: list[torch.Tensor] = []  # what the peer answered, step by step (for audits)

    def served(self) -> ServedSpan:
        last_mask = self.history[-1].mask if self.history else None
        return ServedSpan(self.hop.peer_id, self.hop.start, self.hop.end, self.hop.dtype,
                          [x.hidden for x in self.history], [x.position_ids for x in self.history], last_mask,
                          list(self.outputs), quant=self.hop.quant)

    def push_target(self) -> dict:
        """This hop as an entry of a step's push chain."""
        return {"peer_id": self.hop.peer_id, "session_id": self.session_id, "maddrs": list(self.hop.maddrs)}

    def send(self, x: StepInput, chain: list[dict] | None = None, *, full: bool = False) -> None:
        """Send one step; with ``chain`` the peer pushes its output on along it. ``full``: the reply
        carries every output (none named instead)."""
        meta = {"op": "step", "session_id": self.session_id, "offset": x.offset}
        hidden = x.hidden
        if full:
            meta["full_outputs"] = True
        elif x.named:
            meta["prefix"] = {"tokens": x.named, "chain": x.chain}
            hidden = hidden[:, x.named:]
        if x.rewrite:
            meta["rewrite"] = True
        if x.reorder is not None:
            meta["reorder"], meta["reorders"] = list(x.reorder[0]), x.reorder[1]
        if chain:
            meta["next"] = chain
        self.stream.send(meta, [hidden, x.position_ids] + ([] if x.mask is None else [x.mask]))

    async def receive(self, x: StepInput, timeout: float, probe=None) -> tuple[dict, torch.Tensor]:
        """Wait up to ``timeout`` seconds for the result of step ``x`` (sent by us or pushed to the peer);
        meanwhile ``probe`` (if given) is awaited every time the reply is late by another probe interval,
        and may raise to give up early. Records the step for replay and audits."""
        call = asyncio.ensure_future(self.stream.receive(timeout))
        try:  # the call is owned here: awaited below, cancelled if the probe gives up
            while probe is not None and not call.done():
                done, _ = await asyncio.wait({call}, timeout=probe.interval)
                if not done:
                    await probe(self.hop.peer_id)
            meta, out = await call
        finally:
            if not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
        batch, tokens, hidden = x.hidden.shape
        omitted = meta.get("omitted", 0)
        if (not isinstance(omitted, int) or isinstance(omitted, bool) or not 0 <= omitted < tokens
                or (omitted and not isinstance(meta.get("omitted_digest"), str))):
            raise PeerError(self.hop.peer_id, f"named {omitted!r} of {tokens} outputs instead of sending them")
        if len(out) != 1 or tuple(out[0].shape) != (batch, tokens - omitted, hidden):
            raise PeerError(self.hop.peer_id, f"returned {[tuple(t.shape) for t in out]} for input {tuple(x.hidden.shape)}"
                                              + (f" less {omitted} named tokens" if omitted else ""))
        if not torch.isfinite(out[0]).all():
            raise PeerError(self.hop.peer_id, "returned NaN or infinite hidden states")
        result = out[0]
        if omitted:  # NaN where the peer kept its outputs: fetched only if something needs them
            result = torch.full((batch, tokens, hidden), float("nan"), dtype=out[0].dtype)
            result[:, omitted:] = out[0]
        self.history.append(dataclasses.replace(x, reorder=None) if x.reorder is not None else x)
        self.outputs.append(result)
        return meta, result

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search picked ``rows``: the inputs and outputs kept for replays and audits follow them."""
        def pick(t):
            return None if t is None else t.index_select(0, rows)
        self.history = [dataclasses.replace(x, hidden=pick(x.hidden), position_ids=pick(x.position_ids),
                                            mask=pick(x.mask)) for x in self.history]
        self.outputs = [pick(out) for out in self.outputs]

    def truncate(self, length: int) -> None:
        """Forget every token from ``length`` on (rolled back): replays and audits see only what stays."""
        kept, outs = [], []
        for x, out in zip(self.history, self.outputs):
            tokens = x.hidden.shape[1]
            if x.offset >= length:
                break
            if x.offset + tokens > length:
                x, out = x.truncated(length), out[:, :length - x.offset]
            kept.append(x)
            outs.append(out)
        self.history, self.outputs = kept, outs

    async def step(self, x: StepInput, timeout: float, probe=None) -> torch.Tensor:
        """Send one step and wait for its whole result (client-relayed: replays)."""
        self.send(x, full=True)
        return (await self.receive(x, timeout, probe))[1]


class SwarmCore:
    """Async: everything here runs on the client's loop thread."""

    def __init__(self, cfg: ClientConfig, transport: Transport, dht, peer_id: str):
        self.cfg, self.transport, self.dht, self.peer_id = cfg, transport, dht, peer_id
        self.rtts: dict[str, float] = {}  # peer id -> smoothed RTT (seconds) of peers that answered
        self.speeds: dict[str, float] = {}  # peer id -> smoothed seconds per block of its decode steps, as timed here
        self.unreachable: set[str] = set()  # peers whose last ping failed
        self.records: list[PeerRecord] = []
        self.route_rng = random.Random() if cfg.route_jitter else None  # for plan_route's jitter
        self.records_at = float("-inf")  # monotonic time of the last fetch
        self.bans = BanList(base=cfg.ban_base)
        self.retries = 0  # failed hops recovered from, over the client's life (for tests and notes)
        self.book = ReputationBook()
        if cfg.reputation_path:
            self.book.load(cfg.reputation_path)
        self.auditor = Auditor(self.book, SamplingPolicy(cfg.audit_rates), self._audit_checkers, self._replay,
                               replay_errors=(PeerError,), publish=self._publish, related=self.book.related)
        self._audits: set[asyncio.Task] = set()  # owned here: awaited by wait_audits() and at shutdown

    async def refresh(self, *, ping_all: bool = False) -> None:
        """Fetch every record of the model and ping the peers not measured yet (all of them with
        ``ping_all``, which is how a dead peer that still has a record gets noticed)."""
        self.records = await directory.fetch_peers(self.dht, self.cfg.model_id)
        self.records_at = time.monotonic()
        for r in self.records:  # a banned operator's new identity on the same address or name starts as a suspect
            self.book.observe(r.peer_id, identity_signals(r.maddrs, r.public_name))
        targets = self.records if ping_all else [
            r for r in self.records if r.peer_id not in self.rtts and r.peer_id not in self.unreachable]
        await asyncio.gather(*(self._ping(r) for r in targets))

    async def run_refresh_loop(self) -> None:
        """Background: re-read records and re-ping every known peer, so a dead peer stops being routed
        to within one refresh period, long before its record expires."""
        while True:
            await asyncio.sleep(self.cfg.refresh_period)
            try:
                await self.refresh(ping_all=True)
            except (OSError, RuntimeError) as e:  # the DHT process is shutting down or unreachable
                logger.info("swarm refresh failed: %s", e)

    async def _ping(self, record: PeerRecord) -> None:
        try:
            await self.transport.connect(record.peer_id, record.maddrs)
            _, rtt = await self.transport.info(record.peer_id, timeout=self.cfg.ping_timeout)
        except PeerError as e:
            logger.info("peer unreachable, not routing through it: %s", e)
            self.unreachable.add(record.peer_id)
            self.rtts.pop(record.peer_id, None)
            self.transport.forget(record.peer_id)
            return
        self.unreachable.discard(record.peer_id)
        old = self.rtts.get(record.peer_id)
        self.rtts[record.peer_id] = rtt if old is None else 0.8 * old + 0.2 * rtt

    async def plan(self, start: int = 0, end: int | None = None, *, exclude: frozenset[str] = frozenset(),
                   cache_tokens_needed: int = 0, wait: bool = True, formats: tuple[str, ...] | None = None,
                   needs_backward: bool = False) -> list[Hop]:
        """A route over [start, end) avoiding banned, unreachable and excluded peers; waits up to
        route_timeout (if ``wait``) for peers to cover missing blocks. Uses the background-refreshed
        snapshot when it is recent, so failover does not wait on the DHT. ``formats`` (default: the
        client's) limits the peers' formats; with neither, one format is chosen (``routing.choose_format``).
        ``needs_backward``: only peers whose record says they serve backward passes."""
        began = time.monotonic()
        fresh_enough = 2 * self.cfg.refresh_period  # the background loop keeps the snapshot this fresh
        if time.monotonic() - self.records_at > fresh_enough:
            await self._refresh_or_keep()
        while True:
            avoid = exclude | self.bans.banned() | self.unreachable | self.book.banned()
            if needs_backward:
                avoid = avoid | {r.peer_id for r in self.records if not r.backward}
            allowed = formats or self.cfg.formats or (routing.choose_format(
                self.records, self.cfg.model_id, self.cfg.num_blocks, banned=avoid, start=start, end=end),)
            try:
                strict = self.cfg.verify_mode == "strict"
                standing = {r.peer_id: standing_cost(self.book.status(r.peer_id), self.cfg.audit_rates, strict)
                            for r in self.records}
                return routing.plan_route(self.records, self.cfg.model_id, self.cfg.num_blocks, rtts=self.rtts,
                                          banned=avoid, start=start, end=end, cache_tokens_needed=cache_tokens_needed,
                                          formats=allowed, speeds=routing.believed_speeds(self.records, self.speeds),
                                          standing=standing, hop_seconds=self.cfg.hop_seconds, rng=self.route_rng)
            except MissingBlocksError as e:
                waited = time.monotonic() - began
                if not wait or waited > self.cfg.route_timeout:
                    if needs_backward:
                        raise SwarmError(f"no peer that serves backward passes covers blocks {e.missing} (peers "
                                         f"started with --no-backward, or older ones, do not): gradients through "
                                         f"the swarm need them") from None
                    raise MissingBlocksError(e.model_id, e.missing, e.num_blocks, waited, e.formats, e.others) from None
            await asyncio.sleep(0.5)
            await self.refresh()  # peers may have joined meanwhile

    async def _refresh_or_keep(self) -> None:
        """Refresh before planning, but within ``stale_refresh_timeout`` when there is a snapshot to fall
        back on: a frozen peer is also a DHT node and can hold a DHT read for seconds (measured 1.5 s),
        which a failover must not wait for; bans and the unreachable set already avoid the failed peer."""
        if not self.records:
            await self.refresh()
            return
        try:
            await asyncio.wait_for(self.refresh(), self.cfg.stale_refresh_timeout)
        except asyncio.TimeoutError:
            logger.info("the DHT did not answer within %.1f s: planning from the records of %.0f s ago",
                        self.cfg.stale_refresh_timeout, time.monotonic() - self.records_at)

    def timed(self, peer_id: str, seconds: float, blocks: int) -> None:
        """A decode step spent ``seconds`` on ``blocks`` blocks of this peer (as the client saw it)."""
        speed = max(seconds, 0.0) / max(blocks, 1)
        old = self.speeds.get(peer_id)
        self.speeds[peer_id] = speed if old is None else 0.7 * old + 0.3 * speed

    def step_timeout(self, tokens: int) -> float:
        return self.cfg.step_timeout + self.cfg.step_timeout_per_token * tokens

    # ---- audits ------------------------------------------------------------------------------------------

    def _audit_candidates(self, start: int, end: int, dtype: str, quant: str, exclude: frozenset[str]) -> list[str]:
        return [r.peer_id for r in self.records
                if r.state == PeerState.ONLINE and r.start <= start and end <= r.end and r.dtype == dtype
                and r.quant == quant and r.peer_id not in exclude and r.peer_id not in self.unreachable]

    def _audit_checkers(self, start: int, end: int, dtype: str, quant: str, exclude: frozenset[str]) -> list[Checker]:
        """Who can re-run [start, end) in this format: each peer serving all of it; if none does, chains of
        other peers that split it differently (so a lone peer is still checkable), as many disjoint ones as
        can be found, so that one can check and another referee."""
        exclude = exclude | self.book.banned()
        singles = self._audit_candidates(start, end, dtype, quant, exclude)
        if singles:
            return [((peer, start, end),) for peer in singles]
        records = [r for r in self.records if r.dtype == dtype and r.quant == quant]

        def chain(avoid: frozenset[str]) -> Checker | None:
            try:
                route = routing.plan_route(records, self.cfg.model_id, self.cfg.num_blocks, rtts=self.rtts,
                                           start=start, end=end, banned=avoid | self.unreachable)
            except MissingBlocksError:
                return None
            return tuple((h.peer_id, h.start, h.end) for h in route)

        first = chain(exclude)
        if first is None:
            return []
        found = {first} | {c for p, _, _ in first if (c := chain(exclude | {p})) is not None}
        found = sorted(found)
        peers = [set(c_peer for c_peer, _, _ in c) for c in found]
        best: list[int] = [0]
        for mask in range(1, 2 ** len(found)):  # the largest set of chains that share no peer (a handful)
            pick = [i for i in range(len(found)) if mask >> i & 1]
            if len(pick) > len(best) and all(not peers[i] & peers[j] for i in pick for j in pick if i < j):
                best = pick
        return [found[i] for i in best] if len(best) > 1 else found

    async def _replay(self, checker: Checker, hidden: torch.Tensor, position_ids: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
        """Run a prefix through a checker's peers, one stateless forward each (what audits send)."""
        for peer_id, start, end in checker:
            record = next((r for r in self.records if r.peer_id == peer_id), None)
            hop = Hop(peer_id, start, end, record.maddrs if record else (), record.dtype if record else "float32",
                      record.quant if record else "none")
            hidden = await self.forward_on(hop, hidden, position_ids, mask)
        return hidden

    async def _publish(self, result: AuditResult, span: ServedSpan) -> None:
        """Publish a verdict on the DHT, signed with this client's identity (the health page shows it)."""
        c = result.comparison
        verdict = VerdictRecord(
            author=self.peer_id, target=result.peer_id, model_id=self.cfg.model_id, start=span.start, end=span.end,
            verdict=result.verdict.value, median_error=c.median if c else float("nan"),
            max_error=c.maximum if c else float("nan"), time=time.time())
        try:
            if not await asyncio.wait_for(directory.publish_verdict(self.dht, verdict), 10):
                logger.info("no DHT node stored the verdict about %s", result.peer_id)
        except asyncio.TimeoutError:
            logger.info("publishing the verdict about %s timed out", result.peer_id)

    async def forward_on(self, hop: Hop, hidden: torch.Tensor, position_ids: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
        """A stateless forward of a whole prefix on one given peer (no failover): what audits send."""
        core = SessionCore(self, hidden.shape[0], hidden.shape[1], rpc=wire.RPC_FORWARD)
        core.hops = [await core._open_hop(hop)]
        try:
            return await core.step(hidden, position_ids, mask, recover=False)
        finally:
            await core._close_hops(core.hops)

    async def backward(self, spans: list[tuple[Hop, torch.Tensor]], grad: torch.Tensor, position_ids: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
        """The gradient of a loss with respect to the inputs of a training forward, given the gradient with
        respect to its output: back along the route (``spans``: each hop and the inputs it was sent)."""
        for hop, inputs in reversed(spans):
            grad = await self._backward_span(hop, inputs, grad.to(inputs.dtype), position_ids, mask)
        return grad

    async def _backward_span(self, hop: Hop, inputs: torch.Tensor, grad: torch.Tensor, position_ids: torch.Tensor,
                             mask: torch.Tensor | None) -> torch.Tensor:
        """One hop's backward; if its peer fails, another route over its blocks (any split, same format,
        peers that serve backward passes) recomputes it: forward through all but its last hop for their
        inputs, then backward through each."""
        skip: set[str] = set()
        last: PeerError | None = None
        route = [hop]
        for _ in range(self.cfg.max_retries + 1):
            try:
                if route is None:
                    route = await self.plan(hop.start, hop.end, exclude=frozenset(skip), formats=(hop.format,),
                                            needs_backward=True)
                xs = [inputs]
                for h in route[:-1]:
                    xs.append((await self.forward_on(h, xs[-1], position_ids, mask)).to(inputs.dtype))
                g = grad
                for h, x in reversed(list(zip(route, xs))):
                    g = await self._backward_call(h, x, g, position_ids, mask)
                return g
            except PeerError as e:
                if not e.recoverable:
                    raise
                skip.add(e.peer_id)
                if e.code not in _NOT_A_FAULT and e.code != wire.ErrorCode.NO_BACKWARD.value:
                    self.mark_failed(e.peer_id, e)
                last, route = e, None
        raise SwarmError(f"gave up on the backward of blocks [{hop.start}, {hop.end}) after "
                         f"{self.cfg.max_retries + 1} attempts; last error: {last}")

    async def _backward_call(self, hop: Hop, inputs: torch.Tensor, grad: torch.Tensor, position_ids: torch.Tensor,
                             mask: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, hidden = inputs.shape
        chunk = self.cfg.max_chunk_tokens or max(1, wire.chunk_tokens(batch, hidden, inputs.element_size()) // 2)
        await self.transport.connect(hop.peer_id, hop.maddrs)
        stream = await self.transport.open_stream(hop.peer_id, wire.RPC_BACKWARD)
        try:
            begins = list(range(0, tokens, chunk))
            for begin in begins:
                meta = {"op": "backward", "start": hop.start, "end": hop.end, "offset": begin, "total": tokens}
                part = [inputs[:, begin:begin + chunk], grad[:, begin:begin + chunk], position_ids[:, begin:begin + chunk]]
                stream.send(meta, part + ([mask] if begin == 0 and mask is not None else []))
            parts = []
            for begin in begins:
                _, tensors = await stream.receive(self.step_timeout(batch * tokens))
                want = (batch, min(chunk, tokens - begin), hidden)
                if len(tensors) != 1 or tuple(tensors[0].shape) != want:
                    raise PeerError(hop.peer_id, f"answered a backward chunk with {[tuple(t.shape) for t in tensors]}, "
                                                 f"expected {want}")
                if not torch.isfinite(tensors[0]).all():
                    raise PeerError(hop.peer_id, "returned a NaN or infinite gradient")
                parts.append(tensors[0])
            return torch.cat(parts, dim=1)
        finally:
            await stream.close()

    def submit_audits(self, spans: list[ServedSpan], *, sampled: bool = False,
                      after: asyncio.Future | None = None) -> list[asyncio.Task]:
        """Audit the spans the sampling policy draws (all of them if ``sampled``: already drawn), once
        ``after`` (fetching the outputs peers named instead of sending) is done."""
        tasks = []
        for span in spans:
            if sampled or self.auditor.sampled(span):
                task = asyncio.get_running_loop().create_task(self._audit_after(after, span), name="audit")
                self._audits.add(task)
                task.add_done_callback(self._audits.discard)
                tasks.append(task)
        return tasks

    async def _audit_after(self, after: asyncio.Future | None, span: ServedSpan) -> AuditResult:
        if after is not None:
            await asyncio.shield(after)
            if any(torch.isnan(t).any() for t in span.hidden + span.outputs):
                logger.info("not auditing %s on [%d, %d): outputs it named could not be fetched",
                            span.peer_id, span.start, span.end)
                return AuditResult(span.peer_id, Verdict.IMPOSSIBLE, start=span.start, end=span.end,
                                   reason=LOST_OUTPUTS)
        return await self.auditor.audit(span)

    def draw_audit(self, span: ServedSpan) -> bool:
        """Whether to audit a span a session was served: the sampling policy's draw, or in strict mode
        every span of a peer that is not trusted yet."""
        if self.cfg.verify_mode == "strict":
            return bool(span.hidden) and self.book.status(span.peer_id) != Status.TRUSTED
        return self.auditor.sampled(span)

    async def wait_audits(self, timeout: float | None = None) -> None:
        """Wait for every audit in flight; errors inside an audit propagate here."""
        if self._audits:
            done, _ = await asyncio.wait(set(self._audits), timeout=timeout)
            for task in done:
                task.result()

    def mark_failed(self, peer_id: str, error: PeerError) -> None:
        """Avoid a peer that failed: banned with back-off, and unreachable until a ping proves otherwise."""
        duration = self.bans.fail(peer_id)
        self.retries += 1
        if not isinstance(error, PeerBusy):
            self.unreachable.add(peer_id)
            self.rtts.pop(peer_id, None)
        logger.warning("peer %s failed (%s); avoiding it for %.0f s and re-routing", peer_id, error, duration)

    def probe(self) -> "Probe":
        return Probe(self.transport, self.cfg.probe_after, self.cfg.probe_timeout)


class Probe:
    """Checks on a peer whose reply is late: a dead peer refuses the connection and a frozen one does
    not answer info (served on its event loop, so a peer busy computing still answers)."""

    def __init__(self, transport: Transport, interval: float, timeout: float):
        self.transport, self.interval, self.timeout = transport, interval, timeout

    async def __call__(self, peer_id: str) -> None:
        try:
            await self.transport.info(peer_id, timeout=self.timeout)
        except PeerError as e:
            raise PeerError(peer_id, f"stopped answering mid-step ({e})") from None


class WatchNext:
    """The probe for a hop whose output is pushed to the next peer: it also checks that next peer, and
    notes (does not raise) its failure, so the hop's own answer is still read; the caller then replaces
    the next peer at once (its predecessor's push to it fails only after the push timeout)."""

    def __init__(self, probe: Probe, next_peer: str):
        self.probe, self.next_peer, self.interval = probe, next_peer, probe.interval
        self.next_failed: PeerError | None = None

    async def __call__(self, peer_id: str) -> None:
        await self.probe(peer_id)
        if self.next_failed is None:
            try:
                await self.probe(self.next_peer)
            except PeerError as e:
                self.next_failed = e


class SessionCore:
    """An inference session across a route. Each hop keeps its KV cache on its peer; the client keeps
    each hop's inputs, so when a peer dies or hangs, a replacement (one peer or several, split any
    way) rebuilds the cache by replaying them step by step — the same computation, so the same bits."""

    def __init__(self, swarm: SwarmCore, batch_size: int, max_length: int, *, rpc: str = wire.RPC_INFERENCE,
                 needs_backward: bool = False):
        self.swarm, self.batch_size, self.max_length, self.rpc = swarm, batch_size, max_length, rpc
        self.needs_backward = needs_backward  # a training forward: only peers that can also run its backward
        self.hops: list[HopSession] = []
        self.position = 0  # tokens every hop holds
        self.rewind = False  # the next step rewrites from ``position`` (tokens after it were rolled back)
        self.reorders = 0  # beam reorderings so far; the peers apply each exactly once
        self.pending_reorder: tuple[int, ...] | None = None  # rows the next step's cache must follow
        self.formats: tuple[str, ...] | None = swarm.cfg.formats  # pinned to one format at open if None
        self.holes: list[Hole] = []  # outputs peers named instead of sending, not fetched yet
        self.retired: list[ServedSpan] = []  # what replaced hops served before they failed (audited too)

    async def open(self) -> None:
        self.hops = await self._open_route(0, self.swarm.cfg.num_blocks)
        cfg = self.swarm.cfg
        if self.formats is None:  # failovers keep the format this session started in
            self.formats = (self.hops[0].hop.format,)
        mode = "peers push to each other" if cfg.push and self.rpc == wire.RPC_INFERENCE else "the client relays every hop"
        logger.info("session over %s in %s: %s; wire dtype %s", [(h.hop.start, h.hop.end) for h in self.hops],
                    " + ".join(sorted({h.hop.format for h in self.hops})), mode, cfg.wire_dtype or "as computed")

    async def _open_route(self, start: int, end: int) -> list[HopSession]:
        """Open sessions on a route over [start, end). A peer that is busy, has moved to other blocks
        since our snapshot, is leaving, or fails is skipped and the route re-planned (bounded)."""
        skip: set[str] = set()
        last: PeerError | None = None
        for _ in range(self.swarm.cfg.max_retries + 1):
            try:
                route = await self.swarm.plan(start, end, exclude=frozenset(skip),
                                              cache_tokens_needed=self.batch_size * self.max_length,
                                              wait=not (last and isinstance(last, PeerBusy)), formats=self.formats,
                                              needs_backward=self.needs_backward)
            except MissingBlocksError:
                if isinstance(last, PeerBusy):
                    raise last from None  # nobody else can take it: the busy error is the useful one
                raise
            opened = await asyncio.gather(*(self._open_hop(h) for h in route), return_exceptions=True)
            failures = [r for r in opened if isinstance(r, BaseException)]
            if not failures:
                return list(opened)
            await self._close_hops([r for r in opened if isinstance(r, HopSession)])
            for failure in failures:
                if not isinstance(failure, PeerError) or not failure.recoverable:
                    raise failure
                skip.add(failure.peer_id)
                if failure.code not in _NOT_A_FAULT:
                    self.swarm.mark_failed(failure.peer_id, failure)
            last = failures[0] if all(isinstance(f, PeerBusy) for f in failures) else failures[-1]
            self.swarm.records_at = float("-inf")  # our snapshot may be stale: re-read it
        raise SwarmError(f"could not open a route over blocks [{start}, {end}) after "
                         f"{self.swarm.cfg.max_retries + 1} attempts; last error: {last}")

    async def _open_hop(self, hop: Hop) -> HopSession:
        await self.swarm.transport.connect(hop.peer_id, hop.maddrs)
        stream = await self.swarm.transport.open_stream(hop.peer_id, self.rpc)
        session_id = uuid.uuid4().hex  # per hop: it is also the capability to push into the peer's session
        meta = {"op": "open", "session_id": session_id, "start": hop.start, "end": hop.end,
                "batch_size": self.batch_size, "max_length": self.max_length,
                "reorders": self.reorders}
        if not self.swarm.cfg.prefix_cache:
            meta["prefix_cache"] = False
        elif self.rpc == wire.RPC_INFERENCE:
            meta["lazy_outputs"] = True  # the outputs of reused tokens may be named instead of sent
        if self.swarm.cfg.wire_dtype is not None:
            meta["wire_dtype"] = self.swarm.cfg.wire_dtype
        try:
            await stream.call(meta, [], timeout=self.swarm.cfg.step_timeout)
        except BaseException:
            await stream.close()
            raise
        return HopSession(hop, stream, session_id)

    async def reorder(self, rows: list[int]) -> None:
        """Beam search: row i of every hop's cache becomes row ``rows[i]``. Costs no message: the next step
        carries it (numbered, so a step that reaches a peer twice reorders once)."""
        await self.fill_holes()  # the peers stop keeping histories whose rows move
        if len(rows) != self.batch_size or not all(0 <= r < self.batch_size for r in rows):
            raise SwarmError(f"a reordering of a batch of {self.batch_size} needs as many rows in range, got {rows}")
        if list(rows) == list(range(self.batch_size)):
            return
        index = torch.tensor(rows, dtype=torch.long)
        for hop in self.hops:
            hop.reorder(index)
        pending = self.pending_reorder
        self.pending_reorder = tuple(rows) if pending is None else tuple(pending[r] for r in rows)
        if pending is None:
            self.reorders += 1

    async def crop(self, length: int) -> None:
        """Roll the session back to its first ``length`` tokens (rejected draft tokens). Costs no message:
        the next step tells every hop to crop its cache to that offset before computing."""
        if not 0 <= length <= self.position:
            raise SwarmError(f"cannot roll a session of {self.position} tokens back to {length}")
        if length == self.position:
            return
        await self.fill_holes()  # the peers will drop what they kept after ``length``
        for hop in self.hops:
            hop.truncate(length)
        self.position = length
        self.rewind = True

    async def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   *, recover: bool = True, need_last: int = 0) -> torch.Tensor:
        """hidden (batch, t, hidden) -> (batch, t, hidden) through every hop; long inputs go in chunks.
        ``recover=False``: a failing peer raises instead of being replaced (audits target one peer).
        ``need_last`` > 0: only the last ``need_last`` positions of the result are read (the head's
        ``logits_to_keep``); outputs before them that the last peer named instead of sending stay NaN."""
        batch, tokens = hidden.shape[:2]
        if batch != self.batch_size:
            raise SwarmError(f"session was opened for batch size {self.batch_size}, step has {batch}")
        if self.position + tokens > self.max_length:
            raise SwarmError(f"session max_length is {self.max_length} tokens; this step would reach {self.position + tokens}")
        cfg = self.swarm.cfg
        wire_dtype = wire.HIDDEN_DTYPE_NAMES[cfg.wire_dtype] if cfg.wire_dtype else hidden.dtype
        chunk = cfg.max_chunk_tokens or wire.chunk_tokens(batch, hidden.shape[2], wire_dtype.itemsize)
        steps = []
        for begin in range(0, tokens, chunk):
            pos = position_ids[:, begin:begin + chunk]
            mask = None if attention_mask is None else attention_mask[:, : self.position + begin + pos.shape[1]]
            steps.append(StepInput(wire.to_wire_dtype(hidden[:, begin:begin + chunk], wire_dtype), pos, mask,
                                   self.position + begin, rewrite=self.rewind and begin == 0))
        if self.pending_reorder is not None:
            steps[0] = dataclasses.replace(steps[0], reorder=(self.pending_reorder, self.reorders))
        if (self.position == 0 and cfg.prefix_cache and self.rpc == wire.RPC_INFERENCE
                and batch * tokens * hidden.shape[2] * wire_dtype.itemsize >= cfg.probe_min_bytes):
            steps = await self._name_known_prefix(steps)
        outputs = await self._through_route(steps, recover, push=cfg.push and self.rpc == wire.RPC_INFERENCE)
        self.position += tokens
        self.rewind = False
        self.pending_reorder = None
        out = torch.cat(outputs, dim=1)
        needed = out[:, -need_last:] if 0 < need_last < tokens else out
        if self.holes and torch.isnan(needed).any():
            await self.fill_holes()
            out = torch.cat(outputs, dim=1)
            needed = out[:, -need_last:] if 0 < need_last < tokens else out
            if torch.isnan(needed).any():
                raise SwarmError("the last peer named outputs instead of sending them and no peer could hand "
                                 "them over (they failed): generate again")
        return out.to(hidden.dtype)

    async def _name_known_prefix(self, steps: list[StepInput]) -> list[StepInput]:
        """A session's first long step: ask the first peer how much of it it keeps already (one small
        round trip), and name that part by its digest instead of uploading it (prefix reuse)."""
        hidden = torch.cat([x.hidden for x in steps], dim=1)
        positions = torch.cat([x.position_ids for x in steps], dim=1)
        chain = wire.history_chain(wire.history_root(hidden.shape[0]), hidden, positions, steps[-1].mask, 0)
        ask = sorted({*range(PROBE_EVERY, len(chain), PROBE_EVERY), len(chain)})
        meta = {"op": "probe", "session_id": self.hops[0].session_id, "offset": 0, "positions": ask,
                "digests": [chain[p - 1].hex() for p in ask]}
        try:
            reply, _ = await self.hops[0].stream.call(meta, [], timeout=self.swarm.cfg.step_timeout)
        except PeerError as e:
            if e.recoverable:  # the peer is gone: replaced now, and the step goes in full
                await self._replace(0, e, ban=e.code not in _NOT_A_FAULT)
            return steps  # (an older peer does not know probes: nothing is named)
        known = reply.get("tokens")
        if not isinstance(known, int) or isinstance(known, bool) or not 0 <= known <= len(chain):
            return steps
        named = []
        for x in steps:
            n = min(known - x.offset, x.hidden.shape[1] - 1)  # every message still carries one token
            named.append(dataclasses.replace(x, named=n, chain=chain[x.offset + n - 1].hex()) if n > 0 else x)
        return named

    async def fill_holes(self) -> None:
        """Fetch every output a peer named instead of sending. One that no source can hand over (every
        peer holding it failed) stays NaN: a replay that needs it fails with a clear error, an audit
        skips its span."""
        holes, self.holes = self.holes, []
        await asyncio.gather(*(self._fill(hole) for hole in holes))

    async def _fill(self, hole: Hole) -> bool:
        batch, _, hidden = hole.tensor.shape
        for hop, kind in hole.sources:
            meta = {"kind": kind, "session_id": hop.session_id, "offset": hole.offset, "tokens": hole.tokens}
            try:
                got = await self.swarm.transport.fetch(hop.hop.peer_id, meta, self.swarm.cfg.step_timeout)
            except PeerError as e:
                logger.info("could not fetch named %s from %s: %s", kind, hop.hop.peer_id, e)
                continue
            if (tuple(got.shape) != (batch, hole.tokens, hidden) or got.dtype != hole.tensor.dtype
                    or wire.digest(got) != hole.digest):
                logger.warning("peer %s answered a fetch of named %s with other data than the producer "
                               "committed to", hop.hop.peer_id, kind)
                continue
            hole.tensor[:, :hole.tokens] = got
            return True
        return False

    def _chain(self, first: int, push: bool) -> list[dict] | None:
        """The push chain from hop ``first`` to the last (None when the client relays)."""
        return [h.push_target() for h in self.hops[first:]] if push else None

    async def _through_route(self, steps: list[StepInput], recover: bool, push: bool) -> list[torch.Tensor]:
        """Every chunk goes to the first hop at once, so chunks pipeline across peers. With ``push`` each
        peer pushes its output to the next one (k + 1 messages per token on the critical path); without,
        the client relays each output to the next hop as it arrives (2k). Either way the client reads
        every hop's result in order: failover replays and audits need them."""
        began = time.monotonic()
        for x in steps:
            self.hops[0].send(x, self._chain(1, push))
        timed = len(steps) == 1 and steps[0].hidden.shape[0] * steps[0].hidden.shape[1] <= TIMED_MAX_TOKENS
        return [await self._one_step(x, steps[n + 1:], recover, push, began if timed else None)
                for n, x in enumerate(steps)]

    async def _one_step(self, x: StepInput, later: list[StepInput], recover: bool, push: bool,
                        began: float | None = None) -> torch.Tensor:
        """Collect chunk ``x`` from every hop; ``later`` chunks are already queued on the first hop. A link
        whose push failed is relayed by the client; a failed peer is replaced and the chunk (and, for the
        first hop, the later ones) re-sent from there. ``began``: when the chunk was sent, to time each
        hop's part of a decode step (routing ranks peers by it); None: not timed."""
        timeout = self.swarm.step_timeout(x.hidden.shape[0] * x.hidden.shape[1])
        probe = self.swarm.probe()
        retries, i = 0, 0
        hole: Hole | None = None  # the outputs of the hop before i that it named instead of sending
        clock, relayed, prev_rtt = began, True, 0.0  # when hop i's input left, and whether the client sent it
        while i < len(self.hops):
            hop = self.hops[i]
            watch = WatchNext(probe, self.hops[i + 1].hop.peer_id) if push and i + 1 < len(self.hops) else probe
            try:
                meta, out = await hop.receive(x, timeout, watch)
                if i > 0 and not await self._received_as_returned(meta, x, hole):
                    hop.history.pop()
                    hop.outputs.pop()
                    raise Equivocation(self.hops[i - 1].hop.peer_id, "pushed the next peer other hidden states "
                                       "than it returned to the client")
            except PeerError as e:
                clock = None  # a failover's timings say nothing about a peer's speed
                retries = self._one_more_retry(retries, e, recover)
                if isinstance(e, Equivocation):
                    i, x = await self._rebuild(i - 1, e)
                else:
                    await self._replace(i, e, ban=e.code not in _NOT_A_FAULT)
                hole = None
                if i < len(self.hops):
                    for resend in [x] + (later if i == 0 else []):
                        self.hops[i].send(await self._whole(resend), self._chain(i + 1, push))
                continue
            self.swarm.bans.succeed(hop.hop.peer_id)
            if clock is not None:
                # client -> peer -> client: the whole round trip is the network's; a pushed input left
                # when the previous peer answered (its reply's half trip before ours)
                now, rtt = time.monotonic(), self.swarm.rtts.get(hop.hop.peer_id, 0.0)
                spent = now - clock - (rtt if relayed else rtt / 2 - prev_rtt / 2)
                self.swarm.timed(hop.hop.peer_id, spent, hop.hop.end - hop.hop.start)
                clock, relayed, prev_rtt = now, False, rtt
            if hole is not None:
                hole.sources.append((hop, "inputs"))  # the next peer keeps them as its inputs too
            hole = None
            if meta.get("omitted"):
                hole = Hole(out, meta["omitted"], meta["omitted_digest"], x.offset, [(hop, "outputs")])
                self.holes.append(hole)
            x = dataclasses.replace(x, hidden=out)
            i += 1
            if isinstance(watch, WatchNext) and watch.next_failed is not None:
                # the peer this hop pushes to died or froze while we waited: replace it now rather than
                # relay to it and wait for it to fail a probe again
                clock = None
                retries = self._one_more_retry(retries, watch.next_failed, recover)
                await self._replace(i, watch.next_failed)
                self.hops[i].send(await self._whole(x), self._chain(i + 1, push))
            elif i < len(self.hops) and meta.get("pushed") is not True:
                if "push_error" in meta:
                    logger.info("peer %s could not push to the next peer (%s): relaying that link",
                                hop.hop.peer_id, meta["push_error"])
                self.hops[i].send(await self._whole(x), self._chain(i + 1, push))
                if clock is not None:
                    clock, relayed = time.monotonic(), True
        return x.hidden

    async def _received_as_returned(self, meta: dict, x: StepInput, hole: Hole | None) -> bool:
        """Did the hop compute on what the hop before it returned to us (``x``, whose first tokens may be
        a hole that producer named)? A named part is checked against the digest its producer committed to."""
        if hole is None:
            return meta.get("input_digest") == wire.digest(x.hidden)
        parts = meta.get("input_digests")
        if meta.get("input_split") == hole.tokens and isinstance(parts, list) and len(parts) == 2:
            return parts == [hole.digest, wire.digest(x.hidden[:, hole.tokens:])]
        # the push went in full (this peer did not keep the prefix): compare the whole input
        await self.fill_holes()
        return meta.get("input_digest") == wire.digest(x.hidden)

    async def _whole(self, x: StepInput) -> StepInput:
        """``x`` with its named part fetched, before the client sends it on itself (to a replacement,
        which may not keep what a probe found: nothing is named)."""
        if x.named:
            x = dataclasses.replace(x, named=0, chain="")
        if torch.isnan(x.hidden).any():
            await self.fill_holes()
            if torch.isnan(x.hidden).any():
                raise SwarmError("a peer named outputs instead of sending them and no peer could hand them over "
                                 "(they failed): generate again")
        return x

    def _one_more_retry(self, retries: int, error: PeerError, recover: bool) -> int:
        """Count one more failover in this step, or raise ``error`` if it may not be recovered from."""
        if not error.recoverable or not recover:
            raise error
        if retries >= self.swarm.cfg.max_retries:
            raise SwarmError(f"gave up after {retries} failovers in one step; last error: {error}") from error
        return retries + 1

    async def _rebuild(self, culprit: int, error: PeerError) -> tuple[int, StepInput]:
        """Hop ``culprit`` pushed one thing and told us another: every hop after it computed on what we
        never saw. Replace the culprit (banned) and every later hop (not banned), replaying what each was
        sent; returns where the route resumes and the input for it (the culprit's replacement's output)."""
        await self.fill_holes()
        for j in reversed(range(culprit + 1, len(self.hops))):
            await self._replace(j, error, ban=False)
        old_len = len(self.hops)
        await self._replace(culprit, error)
        resume = culprit + 1 + len(self.hops) - old_len
        last = self.hops[resume - 1]
        return resume, dataclasses.replace(last.history[-1], hidden=last.outputs[-1])

    async def _replace(self, i: int, error: PeerError, *, ban: bool = True) -> None:
        """Swap hop i for a fresh route over its blocks and replay its history into it. Every peer that
        fails on the way is avoided too; at most max_retries attempts. ``ban=False``: the hop is rebuilt
        but its peer did nothing wrong."""
        failed = self.hops[i]
        await self.fill_holes()  # while the failed hop's neighbours still keep what it was named
        if self.rpc == wire.RPC_INFERENCE and failed.history:
            self.retired.append(failed.served())  # the tokens so far came from its outputs: audit them too
        if ban:
            self.swarm.mark_failed(failed.hop.peer_id, error)
        await failed.stream.close(timeout=0)
        for _ in range(self.swarm.cfg.max_retries):
            replacement: list[HopSession] = []
            try:
                replacement = await self._open_route(failed.hop.start, failed.hop.end)
                probe = self.swarm.probe()
                for x in failed.history:
                    x = await self._whole(x)
                    timeout = self.swarm.step_timeout(x.hidden.shape[0] * x.hidden.shape[1])
                    for new in replacement:
                        x = dataclasses.replace(x, hidden=await new.step(x, timeout, probe))
            except PeerError as e:
                if not e.recoverable:
                    raise
                self.swarm.mark_failed(e.peer_id, e)
                await self._close_hops(replacement)
                continue
            self.hops[i:i + 1] = replacement
            return
        raise SwarmError(f"could not replace the peer for blocks [{failed.hop.start}, {failed.hop.end}) "
                         f"after {self.swarm.cfg.max_retries} attempts; last error: {error}")

    async def close(self) -> list[asyncio.Task]:
        """Close every hop, then (off the critical path) audit a sample of the spans they served. The
        sample is drawn first: outputs the peers named instead of sending are fetched only if an audit
        needs them, in the background, before those hops' streams close (the peers keep them until then)."""
        if self.rpc != wire.RPC_INFERENCE:
            await self._close_hops(self.hops)
            return []
        hops, holes, self.holes = list(self.hops), self.holes, []
        sampled = [span for span in self.retired + [h.served() for h in hops] if self.swarm.draw_audit(span)]
        if not (sampled and holes):
            await self._close_hops(hops)
            return self.swarm.submit_audits(sampled, sampled=True)

        async def fetch_then_close() -> None:
            try:
                await asyncio.gather(*(self._fill(hole) for hole in holes))
            finally:
                await self._close_hops(hops)

        ready = asyncio.ensure_future(fetch_then_close())  # owned by the audits, which await it
        return self.swarm.submit_audits(sampled, sampled=True, after=ready)

    @staticmethod
    async def _close_hops(hops: list[HopSession]) -> None:
        await asyncio.gather(*(h.stream.close() for h in hops), return_exceptions=True)


class RemoteSession:
    """Synchronous handle on a SessionCore (what the model and users hold)."""

    def __init__(self, swarm: "RemoteSwarm", core: SessionCore):
        self._swarm, self._core = swarm, core
        self.token_ids: torch.Tensor | None = None  # (batch, position) ids seen so far, for generate() reuse
        self.attention_mask: torch.Tensor | None = None
        self._audits: list[asyncio.Task] = []

    @property
    def position(self) -> int:
        return self._core.position

    @property
    def max_length(self) -> int:
        return self._core.max_length

    @property
    def batch_size(self) -> int:
        return self._core.batch_size

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self._core.hops]

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             need_last: int = 0) -> torch.Tensor:
        """``need_last`` > 0: only the last positions of the result are read (see SessionCore.step)."""
        return self._swarm.loop.run(self._core.step(hidden, position_ids, attention_mask, need_last=need_last))

    def reorder(self, rows: list[int]) -> None:
        """Beam search: row i of the peers' caches becomes row ``rows[i]`` (with the next step)."""
        self._swarm.loop.run(self._core.reorder(rows))

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (the peers crop their caches with the next step)."""
        self._swarm.loop.run(self._core.crop(length))

    def close(self) -> None:
        self._audits = self._swarm.loop.run(self._core.close())

    def audit_results(self, timeout: float = 120.0) -> list[AuditResult]:
        """Wait for this session's audits (after close) and return their results."""
        async def gather():
            return await asyncio.wait_for(asyncio.gather(*self._audits), timeout)
        return self._swarm.loop.run(gather()) if self._audits else []

    def served_by_a_liar(self, timeout: float = 120.0) -> list[str]:
        """Peers of this session that an audit caught lying."""
        return [r.peer_id for r in self.audit_results(timeout) if r.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL)]

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteSwarm:
    """Synchronous entry point: a client DHT node, a transport, a background refresher, and the loop
    thread they all live on."""

    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.loop = LoopThread()
        self.identity = identity.load_or_create(cfg.identity_path)  # signs the verdicts this client publishes
        self.dht = directory.start_node(self.identity, cfg.initial_peers, client_mode=True)
        try:
            self.core, self._refresher = self.loop.run(self._start(), timeout=60)
        except BaseException:
            self.dht.shutdown()
            self.loop.stop()
            raise

    async def _start(self) -> tuple[SwarmCore, asyncio.Task]:
        core = SwarmCore(self.cfg, Transport(await self.dht.replicate_p2p()), self.dht, self.identity.peer_id)
        # Owned by this RemoteSwarm: cancelled in shutdown(); it catches the errors it can recover from.
        return core, asyncio.get_running_loop().create_task(core.run_refresh_loop(), name="swarm-refresh")

    def open_session(self, batch_size: int, max_length: int) -> RemoteSession:
        core = SessionCore(self.core, batch_size, max_length)
        self.loop.run(core.open())
        return RemoteSession(self, core)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None
                ) -> torch.Tensor:
        """A stateless forward of a whole sequence through the swarm (no cache is kept)."""
        return self.loop.run(self._forward(hidden, position_ids, attention_mask))

    async def _forward(self, hidden, position_ids, attention_mask):
        core = SessionCore(self.core, hidden.shape[0], hidden.shape[1], rpc=wire.RPC_FORWARD)
        await core.open()
        try:
            return await core.step(hidden, position_ids, attention_mask)
        finally:
            await core.close()

    def forward_for_training(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                             attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, list[tuple[Hop, torch.Tensor]]]:
        """A stateless forward through peers that also serve backward passes: (output, each hop and the
        inputs it was sent, for ``backward``)."""
        return self.loop.run(self._forward_for_training(hidden, position_ids, attention_mask))

    async def _forward_for_training(self, hidden, position_ids, attention_mask):
        core = SessionCore(self.core, hidden.shape[0], hidden.shape[1], rpc=wire.RPC_FORWARD, needs_backward=True)
        await core.open()
        try:
            out = await core.step(hidden, position_ids, attention_mask)
        finally:
            await core.close()
        return out, [(h.hop, torch.cat([x.hidden for x in h.history], dim=1)) for h in core.hops]

    def backward(self, spans: list[tuple[Hop, torch.Tensor]], grad: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The gradient with respect to a training forward's inputs (see SwarmCore.backward)."""
        return self.loop.run(self.core.backward(spans, grad, position_ids, attention_mask))

    def route(self) -> list[Hop]:
        return self.loop.run(self.core.plan())

    def shutdown(self) -> None:
        """Stop the refresher, close the RPC side, the DHT node (and its daemon), then the loop thread.
        Safe to call twice."""
        if self.loop.loop.is_running():
            self.loop.run(self._shutdown(), timeout=10)
            self.loop.stop()
        self.dht.shutdown()

    def wait_audits(self, timeout: float | None = 120.0) -> None:
        self.loop.run(self.core.wait_audits(timeout))

    async def _shutdown(self) -> None:
        try:
            await self.core.wait_audits(timeout=30)
        finally:
            if self.cfg.reputation_path:
                self.core.book.save(self.cfg.reputation_path)
        self._refresher.cancel()
        try:
            await self._refresher  # re-raises whatever killed it, if not our cancel
        except asyncio.CancelledError:
            pass
        await self.core.transport.p2p.shutdown()
        await asyncio.sleep(0)  # let the cancelled reader/writer tasks finish
