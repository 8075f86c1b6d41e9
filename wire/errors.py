"""The wire's error codes and the exception that carries one across it (a peer answers every bad
message with one; a client reads it back with ``WireError.from_metadata``)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


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
    UNKNOWN_PROOF = "unknown_proof"  # asked a client for a fraud proof it does not hold (any more)
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
