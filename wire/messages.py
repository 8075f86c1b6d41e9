"""The wire's messages: RPC names, message layout, limits, and packing tensors and metadata.

Every message is a hivemind
``runtime_pb2.ExpertRequest``/``ExpertResponse``: msgpack metadata plus tensors serialised by hivemind.

RPCs (all on hivemind P2P, handle names below):
- INFO      unary   ExpertUID -> ExpertResponse(metadata = the peer's statistics()).
- FORWARD   stream  [open, step, step, ...] -> [result, result, ...]: a stateless forward over a full
            sequence, sent as chunks of tokens; nothing is kept after the stream ends.
- INFERENCE stream  [open, step, ...] -> [opened, result, ...]: a session with a server-side KV cache
            that lives as long as the stream (closing the stream closes the session).
- PUSH      unary   step -> {"op": "queued"} | error: a peer hands its output straight to the next
            peer's open session (server-to-server push); that peer answers the step on its own
            INFERENCE stream to the client, as if the client had sent it.

open:   {"op": "open", "session_id": str, "start": int, "end": int, "batch_size": int, "max_length": int,
         ["wire_dtype": "float32" | "bfloat16" | "float16"]}  (the dtype of the hidden states it answers
         and pushes; default: the dtype of each step's input)
step:   {"op": "step", "session_id": str, "offset": int, ["next": [{"peer_id", "session_id", "maddrs"}, ...]]}
        tensors: hidden (batch, t, hidden) float, position_ids (batch, t) int64,
        [attention_mask (batch, offset + t) 0/1]. With "next", the peer pushes its output (same
        position_ids and mask) to next[0]'s session, carrying next[1:] along.
result: {"op": "result", "length": int, "input_digest": str, ["pushed": bool, "push_error": str],
         ["duplicate": true], ["receipt": {"chain", "out", "sig"}]}  tensors: hidden (batch, t, hidden),
         none for a duplicate (a step this session already computed, e.g. pushed and then re-sent by a
         client after a failover). The receipt signs the step's outputs after the session's input
         history (wire/receipts.py); a session whose rows were reordered (beam search) stops signing.
error:  {"error": {"code": ErrorCode, "message": str, "retry_after": float | None}}
A peer answers a bad message with an error and keeps the session as it was. A session queues at most
a few messages (the client's stream waits; a push beyond that is answered 'busy'); a pushed step
that arrives ahead of its predecessor (relayed by the client after a failed push) waits for it.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.proto.runtime_pb2 import CompressionType

from wire.errors import ErrorCode, WireError

PROTOCOL_VERSION = 1
RPC_INFO = "swarmllm.v1.info"
RPC_FORWARD = "swarmllm.v1.forward"
RPC_INFERENCE = "swarmllm.v1.inference"
RPC_PUSH = "swarmllm.v1.push"
RPC_FETCH = "swarmllm.v1.fetch"  # a session's kept inputs or outputs that a reply named instead of carrying
RPC_BACKWARD = "swarmllm.v1.backward"  # a stream of chunks of (inputs, output gradient): input gradient back
RPC_PROOF = "swarmllm.v1.proof"  # served by a client that caught a lie: {"digest"} -> the fraud proof (verify.proofs)
MAX_NEXT_HOPS = 64  # peers a step may name to push its output on to ("next")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20  # a peer rejects a message whose tensors exceed this (bytes)
CHUNK_TARGET_BYTES = 2 * 2**20  # clients split long sequences into messages of about this size (bytes)
HIDDEN_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HIDDEN_DTYPES = tuple(HIDDEN_DTYPE_NAMES.values())


def serialize(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        # hivemind 1.1.12 widens bfloat16 to float32 on the wire by default (USE_LEGACY_BFLOAT16); send the
        # 2-byte payload as it is (its deserializer reads either form).
        return runtime_pb2.Tensor(compression=CompressionType.NONE, buffer=tensor.view(torch.int16).numpy().tobytes(),
                                  size=tensor.shape, dtype="bfloat16")
    return serialize_torch_tensor(tensor, CompressionType.NONE)


def to_wire_dtype(hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Hidden states cast for the wire; float16 saturates instead of overflowing to infinity."""
    if dtype == torch.float16 and hidden.dtype != torch.float16:
        limit = torch.finfo(torch.float16).max
        hidden = hidden.clamp(-limit, limit)
    return hidden.to(dtype)


def int_field(meta: dict, name: str, low: int, high: int | None = None) -> int:
    """meta[name] as an int in [low, high]; a typed bad_request otherwise."""
    value = meta.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(ErrorCode.BAD_REQUEST, f"field {name!r} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise WireError(ErrorCode.BAD_REQUEST, f"field {name!r} must be in {bound}, got {value}")
    return value


def deserialize(proto: runtime_pb2.Tensor) -> torch.Tensor:
    return deserialize_torch_tensor(proto)


def request(meta: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(metadata=msgpack.packb(meta), tensors=[serialize(t) for t in tensors])


def response(meta: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=msgpack.packb(meta), tensors=[serialize(t) for t in tensors])


def error_response(error: WireError) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=msgpack.packb(error.to_metadata()))


def tensor_bytes(message: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse) -> int:
    return sum(len(t.buffer) for t in message.tensors)


def unpack(
    message: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse, *, max_bytes: int | None = None
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """(metadata, tensors) of a message. Raises WireError for anything malformed or oversized."""
    if max_bytes is not None and (size := tensor_bytes(message)) > max_bytes:
        raise WireError(
            ErrorCode.TOO_LARGE,
            f"message carries {size} bytes of tensors, over this peer's limit of {max_bytes}: send fewer tokens per step",
        )
    try:
        meta = msgpack.unpackb(message.metadata, raw=False) if message.metadata else {}
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise WireError(ErrorCode.BAD_REQUEST, f"metadata is not valid msgpack: {e}") from None
    if not isinstance(meta, dict):
        raise WireError(ErrorCode.BAD_REQUEST, f"metadata must be a map, got {type(meta).__name__}")
    try:
        tensors = [deserialize(t) for t in message.tensors]
    except Exception as e:  # hivemind raises ValueError/TypeError/RuntimeError for bad buffers
        raise WireError(ErrorCode.BAD_REQUEST, f"a tensor could not be decoded: {e}") from None
    return meta, tensors


def chunk_tokens(batch_size: int, hidden_size: int, element_bytes: int = 4) -> int:
    """How many tokens per message keep one message near CHUNK_TARGET_BYTES."""
    return max(1, CHUNK_TARGET_BYTES // max(1, batch_size * hidden_size * element_bytes))
