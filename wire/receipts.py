"""Receipts: a peer's signature on each step it answers, so that a lie can be proven to anyone.

A peer signs, for every step of an inference session, the statement "in session S, serving blocks
[start, end) of model M, after the history whose digest chain is C (every input token so far, as
``wire.history_chain`` names it: hidden states as received, positions, mask columns), my outputs for
tokens [offset, offset + tokens) have digest D". The reply's ``receipt`` field carries C, D and the
signature (Ed25519, by the key inlined in the peer's id). The chain pins the *whole* history the
outputs were computed on, so a rolled-back draft or a reordered beam cannot be passed off as another
history: whoever holds the inputs can recompute C, the outputs' D, check the signature, and re-run the
inputs on another peer. That is a fraud proof (``verify.proofs``); without the signature there is none.

A session whose cache rows were reordered (beam search) stops signing: its rows no longer follow one
history each, and the chain over its inputs names none of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

RECEIPT_DOMAIN = b"swarmllm-receipt-v1"
SIGNATURE_BYTES = 64
CHAIN_BYTES = 32
DIGEST_CHARS = 32  # wire.digest: blake2b-128, hex


@dataclasses.dataclass(frozen=True)
class Statement:
    """What a peer signs for one step (``message`` is the signed bytes)."""

    model_id: str
    start: int  # the span's blocks
    end: int
    session_id: str
    offset: int  # the step's first token
    tokens: int  # the step's tokens
    chain: bytes  # the history digest chain after its last token (CHAIN_BYTES)
    output_digest: str  # wire.digest of its outputs (batch, tokens, hidden), as sent

    def message(self) -> bytes:
        return msgpack.packb([RECEIPT_DOMAIN, self.model_id, self.start, self.end, self.session_id, self.offset,
                              self.tokens, self.chain, self.output_digest])


@dataclasses.dataclass(frozen=True)
class Receipt:
    """A signed statement as the reply carries it (the rest of the statement is the step's own context)."""

    chain: bytes
    output_digest: str
    signature: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"chain": self.chain, "out": self.output_digest, "sig": self.signature}

    @classmethod
    def from_wire(cls, obj: Any) -> "Receipt | None":
        """The receipt in a reply's ``receipt`` field, or None if it is absent or malformed."""
        if not isinstance(obj, dict):
            return None
        chain, out, sig = obj.get("chain"), obj.get("out"), obj.get("sig")
        if not (isinstance(chain, bytes) and len(chain) == CHAIN_BYTES and isinstance(out, str)
                and len(out) == DIGEST_CHARS and isinstance(sig, bytes) and len(sig) == SIGNATURE_BYTES):
            return None
        return cls(chain, out, sig)
