"""The backward RPC: a client fine-tuning through the swarm (soft prompts, adapters on its own modules)
sends the inputs a span of blocks received in its forward pass and the gradient of its loss with
respect to that span's output; the peer recomputes the forward with autograd and returns the gradient
with respect to the inputs. Weights stay frozen and nothing is kept between calls (stateless, like
``forward``), so any peer serving the span in the same format can answer, and a failed one is simply
replaced.

A request is a stream of chunks (messages stay near the client's chunk size): each carries
``{"op": "backward", "start", "end", "offset", "total"}`` and the chunk's hidden states, output
gradient and position ids; the first also carries the whole attention mask. Once ``total`` tokens
are in, the peer computes, and answers every chunk with the input gradient for its tokens. Bad input
gets a typed error and ends the stream; the peer keeps serving.
"""

from __future__ import annotations

import dataclasses
from typing import AsyncIterator

import torch
from hivemind.proto import runtime_pb2

import wire
from wire import ErrorCode, WireError


@dataclasses.dataclass
class Request:
    """The chunks of one backward request, as they arrive."""

    start: int
    end: int
    total: int  # tokens
    batch: int
    mask: torch.Tensor | None
    hidden: list[torch.Tensor] = dataclasses.field(default_factory=list)
    grads: list[torch.Tensor] = dataclasses.field(default_factory=list)
    positions: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def received(self) -> int:
        return sum(h.shape[1] for h in self.hidden)


async def receive(requests: AsyncIterator[runtime_pb2.ExpertRequest], runner, *, enabled: bool, max_bytes: int,
                  max_tokens: int, max_batch: int) -> Request | None:
    """Read one request's chunks off its stream for ``runner``'s blocks (``enabled``: this peer serves
    backward passes; ``max_tokens``: tokens x rows per request); None if the client went away before
    all ``total`` tokens arrived."""
    request = None
    async for message in requests:
        meta, tensors = wire.unpack(message, max_bytes=max_bytes)
        if not enabled:
            raise WireError(ErrorCode.NO_BACKWARD, "this peer serves no backward passes (--no-backward): "
                                                   "route them to a peer whose record says it does")
        if meta.get("op") != "backward":
            raise WireError(ErrorCode.BAD_REQUEST, f"expected op 'backward', got {meta.get('op')!r}")
        if request is None:
            request = begin(meta, tensors, runner_start=runner.start, runner_end=runner.end,
                            hidden_size=runner.hidden_size, max_tokens=max_tokens, max_batch=max_batch)
        else:
            add(request, meta, tensors, runner.hidden_size)
        if request.received == request.total:
            break
    if request is None or request.received < request.total:
        return None
    return request


def arguments(request: Request) -> tuple:
    """What ``BlockRunner.backward`` takes for a complete request: hidden (batch, total, hidden), position
    ids (batch, total), the mask (batch, total) or None, the output gradient (batch, total, hidden), start, end."""
    return (torch.cat(request.hidden, 1), torch.cat(request.positions, 1), request.mask,
            torch.cat(request.grads, 1), request.start, request.end)


def begin(meta: dict, tensors: list[torch.Tensor], *, runner_start: int, runner_end: int, hidden_size: int,
          max_tokens: int, max_batch: int) -> Request:
    """The first chunk of a request: its span, size and mask."""
    start, end = wire.int_field(meta, "start", 0), wire.int_field(meta, "end", 1)
    if not runner_start <= start < end <= runner_end:
        raise WireError(ErrorCode.WRONG_BLOCKS, f"peer serves blocks [{runner_start}, {runner_end}) but the backward "
                                                f"asked for [{start}, {end}): re-plan the route")
    total = wire.int_field(meta, "total", 1)
    if len(tensors) not in (3, 4) or tensors[0].ndim != 3:
        raise WireError(ErrorCode.BAD_REQUEST, "a backward chunk carries hidden (batch, t, hidden), the output "
                                               "gradient, position ids and (first chunk) the attention mask")
    batch = tensors[0].shape[0]
    if not 1 <= batch <= max_batch:
        raise WireError(ErrorCode.BAD_SHAPE, f"batch must be in [1, {max_batch}], got {batch}")
    if batch * total > max_tokens:
        raise WireError(ErrorCode.TOO_LARGE, f"a backward of {batch} x {total} tokens is over this peer's budget "
                                             f"of {max_tokens} tokens x rows per request: send smaller batches")
    mask = tensors[3] if len(tensors) == 4 else None
    if mask is not None:
        if tuple(mask.shape) != (batch, total):
            raise WireError(ErrorCode.BAD_SHAPE, f"attention_mask must be ({batch}, {total}), got {tuple(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise WireError(ErrorCode.BAD_REQUEST, "attention_mask must hold only 0 and 1")
    request = Request(start, end, total, batch, None if mask is None else mask.long())
    add(request, meta, tensors[:3], hidden_size)
    return request


def add(request: Request, meta: dict, tensors: list[torch.Tensor], hidden_size: int) -> None:
    """One more chunk (validated: a bad gradient is the client's error, never computed on)."""
    if wire.int_field(meta, "offset", 0) != request.received:
        raise WireError(ErrorCode.OUT_OF_ORDER, f"backward chunk at token {meta.get('offset')} but "
                                                f"{request.received} tokens arrived so far")
    if len(tensors) != 3:
        raise WireError(ErrorCode.BAD_REQUEST, "a later backward chunk carries hidden, gradient and position ids")
    hidden, grad, positions = tensors
    shape = (request.batch, hidden.shape[1] if hidden.ndim == 3 else -1, hidden_size)
    for name, t in (("hidden states", hidden), ("output gradient", grad)):
        if t.dtype not in wire.HIDDEN_DTYPES:
            raise WireError(ErrorCode.BAD_DTYPE, f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.ndim != 3 or tuple(t.shape) != shape or shape[1] < 1:
            raise WireError(ErrorCode.BAD_SHAPE, f"{name} must be (batch={request.batch}, tokens>=1, "
                                                 f"hidden={hidden_size}) like the hidden states, got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise WireError(ErrorCode.BAD_REQUEST, f"{name} contain NaN or infinity")
    if positions.dtype not in (torch.int64, torch.int32) or tuple(positions.shape) != shape[:2]:
        raise WireError(ErrorCode.BAD_SHAPE, f"position_ids must be int64 {shape[:2]}, got {positions.dtype} "
                                             f"{tuple(positions.shape)}")
    if request.received + shape[1] > request.total:
        raise WireError(ErrorCode.BAD_REQUEST, f"more than the announced {request.total} tokens")
    request.hidden.append(hidden)
    request.grads.append(grad)
    request.positions.append(positions.long())


def split(grad: torch.Tensor, request: Request) -> list[torch.Tensor]:
    """The input gradient cut like the request's chunks."""
    out, at = [], 0
    for h in request.hidden:
        out.append(grad[:, at:at + h.shape[1]].contiguous())
        at += h.shape[1]
    return out
