"""Training through the swarm: the backward pass of a training forward, back along its route, with its own
failover (another route over a failed hop's blocks recomputes that hop's part)."""

from __future__ import annotations

import torch

import wire
from client.errors import PeerError, SwarmError, is_fault
from client.hop import ForwardOn
from client.routing import Hop
from client.view import SwarmView


class Backward:
    def __init__(self, view: SwarmView, forward_on: ForwardOn):
        self.view, self._forward_on = view, forward_on

    async def backward(self, spans: list[tuple[Hop, torch.Tensor]], grad: torch.Tensor, position_ids: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
        """The gradient of a loss with respect to the inputs of a training forward, given the gradient with
        respect to its output: back along the route (``spans``: each hop and the inputs it was sent)."""
        for hop, inputs in reversed(spans):
            grad = await self._span(hop, inputs, grad.to(inputs.dtype), position_ids, mask)
        return grad

    async def _span(self, hop: Hop, inputs: torch.Tensor, grad: torch.Tensor, position_ids: torch.Tensor,
                             mask: torch.Tensor | None) -> torch.Tensor:
        """One hop's backward; if its peer fails, another route over its blocks (any split, same format,
        peers that serve backward passes) recomputes it: forward through all but its last hop for their
        inputs, then backward through each."""
        skip: set[str] = set()
        last: PeerError | None = None
        route = [hop]
        for _ in range(self.view.cfg.max_retries + 1):
            try:
                if route is None:
                    route = await self.view.plan(hop.start, hop.end, exclude=frozenset(skip), formats=(hop.format,),
                                            needs_backward=True)
                xs = [inputs]
                for h in route[:-1]:
                    xs.append((await self._forward_on(h, xs[-1], position_ids, mask)).to(inputs.dtype))
                g = grad
                for h, x in reversed(list(zip(route, xs))):
                    g = await self.call(h, x, g, position_ids, mask)
                return g
            except PeerError as e:
                if not e.recoverable:
                    raise
                skip.add(e.peer_id)
                if is_fault(e) and e.code != wire.ErrorCode.NO_BACKWARD.value:
                    self.view.mark_failed(e.peer_id, e)
                last, route = e, None
        raise SwarmError(f"gave up on the backward of blocks [{hop.start}, {hop.end}) after "
                         f"{self.view.cfg.max_retries + 1} attempts; last error: {last}")

    async def call(self, hop: Hop, inputs: torch.Tensor, grad: torch.Tensor, position_ids: torch.Tensor,
                             mask: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, hidden = inputs.shape
        chunk = self.view.cfg.max_chunk_tokens or max(1, wire.chunk_tokens(batch, hidden, inputs.element_size()) // 2)
        await self.view.transport.connect(hop.peer_id, hop.maddrs)
        stream = await self.view.transport.open_stream(hop.peer_id, wire.RPC_BACKWARD)
        try:
            begins = list(range(0, tokens, chunk))
            for begin in begins:
                meta = {"op": "backward", "start": hop.start, "end": hop.end, "offset": begin, "total": tokens}
                part = [inputs[:, begin:begin + chunk], grad[:, begin:begin + chunk], position_ids[:, begin:begin + chunk]]
                stream.send(meta, part + ([mask] if begin == 0 and mask is not None else []))
            parts = []
            for begin in begins:
                _, tensors = await stream.receive(self.view.step_timeout(batch * tokens))
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
