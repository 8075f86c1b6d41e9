"""One peer's part of a session: what a hop was sent (``StepInput``, kept for replays and audits) and its
stream (``HopSession``): sending a step, and receiving its result with the reply's shape checks."""

from __future__ import annotations

import dataclasses
import time
from typing import Awaitable, Callable

import torch

from client.errors import PeerError
from client.liveness import probed
from client.routing import Hop
from client.transport import Stream
from verify.auditor import ServedSpan
from wire.receipts import Receipt

# a stateless forward of a whole prefix on one given peer: (hop, hidden, position_ids, mask) -> its output
ForwardOn = Callable[[Hop, torch.Tensor, torch.Tensor, "torch.Tensor | None"], Awaitable[torch.Tensor]]


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
    chain: str = ""  # that digest (the history digest chain's value after them), hex

    def truncated(self, length: int) -> "StepInput":
        """This step cut to the tokens before ``length`` (which must lie inside it)."""
        keep = length - self.offset
        return dataclasses.replace(self, named=0, chain="", hidden=self.hidden[:, :keep], position_ids=self.position_ids[:, :keep],
                                   mask=None if self.mask is None else self.mask[:, :length])


class HopSession:
    """One peer's part of a session: its stream, and every input it was sent (for replay)."""

    def __init__(self, hop: Hop, stream: Stream, session_id: str):
        self.hop, self.stream, self.session_id = hop, stream, session_id
        self.history: list[StepInput] = []
        self.outputs: list[torch.Tensor] = []  # what the peer answered, step by step (for audits)
        self.receipts: list[Receipt | None] = []  # what the peer signed for each step (for fraud proofs)
        self.decode_seconds = 0.0  # spent decoding and checking the last reply received (time.perf_counter)

    def served(self) -> ServedSpan:
        last_mask = self.history[-1].mask if self.history else None
        return ServedSpan(self.hop.peer_id, self.hop.start, self.hop.end, self.hop.dtype,
                          [x.hidden for x in self.history], [x.position_ids for x in self.history], last_mask,
                          list(self.outputs), quant=self.hop.quant, session_id=self.session_id,
                          receipts=tuple(self.receipts))

    def push_target(self) -> dict:
        """This hop as an entry of a step's ``next`` list (the peers its output is pushed on to)."""
        return {"peer_id": self.hop.peer_id, "session_id": self.session_id, "maddrs": list(self.hop.maddrs)}

    def send(self, x: StepInput, downstream: list[dict] | None = None, *, full: bool = False) -> None:
        """Send one step; with ``downstream`` (push targets, next hop first) the peer pushes its output on
        along them. ``full``: the reply carries every output (none named instead)."""
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
        if downstream:
            meta["next"] = downstream
        self.stream.send(meta, [hidden, x.position_ids] + ([] if x.mask is None else [x.mask]))

    async def receive(self, x: StepInput, timeout: float, probe=None) -> tuple[dict, torch.Tensor]:
        """Wait up to ``timeout`` seconds for the result of step ``x`` (sent by us or pushed to the peer);
        meanwhile ``probe`` (if given) is awaited every time the reply is late by another probe interval,
        and may raise to give up early. Records the step for replay and audits."""
        meta, out = await probed(self.stream.receive(timeout), probe, self.hop.peer_id)
        began = time.perf_counter()
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
        self.receipts.append(Receipt.from_wire(meta.get("receipt")))
        self.decode_seconds = self.stream.decode_seconds + time.perf_counter() - began
        return meta, result

    def forget_last(self) -> None:
        """Drop the last step received (its input turned out not to be what the client was returned)."""
        self.history.pop()
        self.outputs.pop()
        self.receipts.pop()

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search picked ``rows``: the inputs and outputs kept for replays and audits follow them."""
        def pick(t):
            return None if t is None else t.index_select(0, rows)
        self.history = [dataclasses.replace(x, hidden=pick(x.hidden), position_ids=pick(x.position_ids),
                                            mask=pick(x.mask)) for x in self.history]
        self.outputs = [pick(out) for out in self.outputs]
        self.receipts = [None] * len(self.receipts)  # signed over the rows' old order: no longer provable

    def truncate(self, length: int) -> None:
        """Forget every token from ``length`` on (rolled back): replays and audits see only what stays."""
        kept, outs, receipts = [], [], []
        for x, out, receipt in zip(self.history, self.outputs, self.receipts):
            tokens = x.hidden.shape[1]
            if x.offset >= length:
                break
            if x.offset + tokens > length:  # its receipt signed the tokens cut off too
                x, out, receipt = x.truncated(length), out[:, :length - x.offset], None
            kept.append(x)
            outs.append(out)
            receipts.append(receipt)
        self.history, self.outputs, self.receipts = kept, outs, receipts

    async def step(self, x: StepInput, timeout: float, probe=None) -> torch.Tensor:
        """Send one step and wait for its whole result (client-relayed: replays)."""
        self.send(x, full=True)
        return (await self.receive(x, timeout, probe))[1]
