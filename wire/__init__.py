"""The wire contract between clients and peers: the ground floor both stand on (neither imports the other).

Files:
- messages.py  RPC names, message layout (its docstring is the protocol), limits, packing metadata and tensors
- errors.py    ErrorCode and WireError: how a peer says what was wrong, and how a client reads it back
- history.py   digests: ``digest`` of one tensor, and the history digest chain that names kept histories
- receipts.py  what a peer signs for each step it answers (the statement a fraud proof shows wrong)
- phases.py    the phases of a step each side times (``Phases``: histograms and recent samples; ``Timeline``)

``import wire`` gives all of it (``wire.RPC_INFERENCE``, ``wire.WireError``, ``wire.history_chain``).
"""

from wire.errors import ErrorCode, WireError
from wire.history import PREFIX_DOMAIN, digest, history_chain, history_root
from wire.messages import (
    CHUNK_TARGET_BYTES, DEFAULT_MAX_MESSAGE_BYTES, HIDDEN_DTYPE_NAMES, HIDDEN_DTYPES, MAX_NEXT_HOPS, PROTOCOL_VERSION,
    RPC_BACKWARD, RPC_FETCH, RPC_PROOF, RPC_FORWARD, RPC_INFERENCE, RPC_INFO, RPC_PUSH, chunk_tokens, deserialize,
    error_response, int_field, request, response, serialize, tensor_bytes, to_wire_dtype, unpack,
)

__all__ = [
    "ErrorCode", "WireError", "PREFIX_DOMAIN", "digest", "history_chain", "history_root",
    "CHUNK_TARGET_BYTES", "DEFAULT_MAX_MESSAGE_BYTES", "HIDDEN_DTYPE_NAMES", "HIDDEN_DTYPES", "MAX_NEXT_HOPS",
    "PROTOCOL_VERSION", "RPC_BACKWARD", "RPC_FETCH", "RPC_PROOF", "RPC_FORWARD", "RPC_INFERENCE", "RPC_INFO", "RPC_PUSH",
    "chunk_tokens", "deserialize", "error_response", "int_field", "request", "response", "serialize",
    "tensor_bytes", "to_wire_dtype", "unpack",
]
