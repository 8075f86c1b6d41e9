"""The wire contract between clients and peers: RPC names, message layout and error codes
(the checkpoint's layout, which modules are blocks, is ``peer.layout``'s).

This is the only module of ``peer`` that other packages import. Every message is a hivemind
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
         ["duplicate": true]}  tensors: hidden (batch, t, hidden), none for a duplicate (a step this
         session already computed, e.g. pushed and then re-sent by a client after a failover)
error:  {"error": {"code": ErrorCode, "message": str, "retry_after": float | None}}
A peer answers a bad message with an error and keeps the session as it was. A session queues at most
a few messages (the client's stream waits; a push beyond that is answered 'busy'); a pushed step
that arrives ahead of its predecessor (relayed by the client after a failed push) waits for it.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from typing import Any, Sequence

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.proto.runtime_pb2 import CompressionType

PROTOCOL_VERSION = 1
RPC_INFO = "swarmllm.v1.info"
RPC_FORWARD = "swarmllm.v1.forward"
RPC_INFERENCE = "swarmllm.v1.inference"
RPC_PUSH = "swarmllm.v1.push"
RPC_FETCH = "swarmllm.v1.fetch"
RPC_BACKWARD = "swarmllm.v1.backward"  # a stream of chunks of (inputs, output gradient): input gradient back  # a session's kept inputs or outputs that a reply named instead of carrying
MAX_NEXT_HOPS = 64  # length of a step's push chain

DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20  # a peer rejects a message whose tensors exceed this (bytes)
CHUNK_TARGET_BYTES = 2 * 2**20  # clients split long sequences into messages of about this size (bytes)
HIDDEN_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HIDDEN_DTYPES = tuple(HIDDEN_DTYPE_NAMES.values())


class ErrorCode(str, enum.Enum):
    BAD_REQUEST = "bad_request"  # malformed message or metadata
    WRONG_BLOCKS = "wrong_blocks"  # asked for blocks the peer does not serve
    BAD_SHAPE = "bad_shape"
    BAD_DTYPE = "bad_dtype"
    TOO_LARGE = "too_large"  # message or session larger than the peer accepts at all
    BUSY = "busy"  # cache budget full right now: retry later or elsewhere
    UNKNOWN_SESSION = "unknown_session"
    NO_BACKWARD = "no_backward"  # this peer serves no backward passes (--no-backward): route elsewhere
    UNKNOWN_PREFIX = "unknown_prefix"  # a pushed step named inputs by a prefix this peer does not keep
    OUT_OF_ORDER = "out_of_order"  # step offset does not match the tokens the session holds
    EXPIRED = "expired"  # session idle for too long
    DRAINING = "draining"  # peer is leaving and accepts no new sessions
    INTERNAL = "internal"  # the peer failed computing: not the client's fault


@dataclasses.dataclass
class WireError(Exception):
    code: ErrorCode
    message: str
    retry_after: float | None = None  # seconds, for BUSY

    def __str__(self) -> str:
        return f"[{self.code.value}] {self.message}"

    def to_metadata(self) -> dict[str, Any]:
        return {"error": {"code": self.code.value, "message": self.message, "retry_after": self.retry_after}}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "WireError | None":
        err = meta.get("error") if isinstance(meta, dict) else None
        if err is None:
            return None
        try:
            code = ErrorCode(err.get("code"))
        except (ValueError, AttributeError):
            code = ErrorCode.INTERNAL
        return cls(code, str(err.get("message", "")), err.get("retry_after"))


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


def digest(tensor: torch.Tensor) -> str:
    """A short fingerprint of a tensor's bytes: a peer reports the one of the input it computed on, so a
    client can tell that a pushed input is what the previous peer told the client it sent."""
    data = tensor.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()


PREFIX_DOMAIN = b"swarmllm-prefix-v1"  # the digest chains that name histories (peer.prefixes)


def history_root(batch_size: int) -> bytes:
    """The digest of an empty history of ``batch_size`` rows (peer.prefixes: how kept histories are named)."""
    return hashlib.sha256(b"|".join([PREFIX_DOMAIN, f"batch={batch_size}".encode()])).digest()


def history_chain(previous: bytes, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                  offset: int) -> list[bytes]:
    """The digests after each new token of a step: hidden (batch, t, hidden) as received, position_ids
    (batch, t), mask (batch, offset + t) or None. Returns t digests. A peer names the histories it keeps
    by them, and a client names the part of a step the first peer keeps (a probe) the same way."""
    tokens = hidden.shape[1]
    rows = hidden.detach().cpu().transpose(0, 1).contiguous()  # (t, batch, hidden)
    raw = rows.view(torch.uint8).reshape(tokens, -1).numpy()  # (t, bytes): the bits as sent, any dtype
    dtype = str(hidden.dtype).encode()
    positions = position_ids.detach().cpu().long().t().contiguous().numpy()  # (t, batch)
    columns = None if mask is None else mask[:, offset:offset + tokens].detach().cpu().long().t().contiguous().numpy()
    out = []
    for t in range(tokens):
        h = hashlib.sha256(previous)
        h.update(dtype)
        h.update(raw[t].tobytes())
        h.update(positions[t].tobytes())
        h.update(b"-" if columns is None else columns[t].tobytes())
        previous = h.digest()
        out.append(previous)
    return out


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


# ---- checkpoint errors (peer.layout reads checkpoints) --------------------------------------------

class CheckpointError(ValueError):
    """The checkpoint directory is missing, incomplete or not a checkpoint this model class can load."""
