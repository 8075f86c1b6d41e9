"""Fraud proofs: a lie a peer signed, in a form any client or peer can check by re-running it (pure).

A proof holds every input a peer's session received up to the last step it names (hidden states,
positions, mask), and for each named step the peer's receipt (``wire.receipts``) with the outputs it
answered. ``check`` needs no network: the history chain recomputed over the inputs must equal each
receipt's, each step's outputs must have the signed digest, and each signature must be the accused
peer's (its key is inlined in its peer id). A proof that fails ``check`` is forged: its author made it
up. One that passes is then judged by re-running the inputs on other peers of the same format
(``span``/``compared`` give the auditor what to compare, the signed tokens only): if they disagree
with the signed outputs the lie is proven; if they agree, the proof was a slander and its author
lied. Either way someone is banned, and it is never the one who told the truth.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib

import msgpack
import torch

import wire
from dht import identity
from verify.auditor import AuditResult, ServedSpan
from verify.reputation import ReputationBook, Verdict
from wire.receipts import Receipt, Statement

MAX_PROOF_CLAIMS = 4096  # steps a proof may name


class ProofError(ValueError):
    """A proof is malformed (it cannot even be checked)."""


@dataclasses.dataclass(frozen=True)
class Claim:
    offset: int  # the step's first token
    tokens: int
    receipt: Receipt
    outputs: torch.Tensor  # (batch, tokens, hidden): what the accused answered, as sent


@dataclasses.dataclass(frozen=True)
class FraudProof:
    author: str  # the accuser's peer id (it publishes the proof's record, signed)
    accused: str
    model_id: str
    start: int  # the accused's span
    end: int
    dtype: str  # its declared format: whom it may be compared with
    quant: str
    session_id: str
    hidden: torch.Tensor  # (batch, T, hidden): every input of the session up to the last claimed token
    position_ids: torch.Tensor  # (batch, T)
    mask: torch.Tensor | None  # (batch, T) or None
    claims: tuple[Claim, ...]

    def statement(self, claim: Claim) -> Statement:
        return Statement(self.model_id, self.start, self.end, self.session_id, claim.offset, claim.tokens,
                         claim.receipt.chain, claim.receipt.output_digest)

    def digest(self) -> str:
        """What names this proof (its DHT record carries it; a fetched proof must match it)."""
        meta, tensors = encode(self)
        h = hashlib.sha256(msgpack.packb(meta))
        for t in tensors:
            h.update(wire.digest(t).encode())
        return h.hexdigest()


def build(span: ServedSpan, model_id: str, author: str) -> FraudProof | None:
    """The proof of what ``span``'s peer signed (every step it signed whose inputs the client still
    holds), or None when it signed nothing provable."""
    claims, offset = [], 0
    for x, out, receipt in zip(span.hidden, span.outputs, span.receipts):
        tokens = x.shape[1]
        if receipt is not None and torch.isfinite(out).all():
            claims.append(Claim(offset, tokens, receipt, out))
        offset += tokens
    if not claims:
        return None
    last = claims[-1].offset + claims[-1].tokens
    hidden = torch.cat(span.hidden, dim=1)[:, :last]
    positions = torch.cat(span.position_ids, dim=1)[:, :last]
    mask = None if span.mask is None else span.mask[:, :last]
    return FraudProof(author, span.peer_id, model_id, span.start, span.end, span.dtype, span.quant, span.session_id,
                      hidden, positions, mask, tuple(claims))


def check(proof: FraudProof) -> str | None:
    """Why this proof is forged (a receipt the inputs or outputs do not match, a signature that is not
    the accused's), or None if every claim is what the accused signed."""
    batch, total = proof.hidden.shape[:2]
    chain = wire.history_chain(wire.history_root(batch), proof.hidden, proof.position_ids, proof.mask, 0)
    for n, claim in enumerate(proof.claims):
        end = claim.offset + claim.tokens
        if claim.offset < 0 or claim.tokens < 1 or end > total:
            return f"claim {n} names tokens [{claim.offset}, {end}) of a history of {total}"
        if chain[end - 1] != claim.receipt.chain:
            return f"claim {n}: the inputs are not the history the accused signed"
        if wire.digest(claim.outputs) != claim.receipt.output_digest:
            return f"claim {n}: the outputs are not the ones the accused signed"
        if not identity.verify(proof.accused, proof.statement(claim).message(), claim.receipt.signature):
            return f"claim {n}: the signature is not the accused's"
    return None


def span(proof: FraudProof) -> ServedSpan:
    """The proof as a span the auditor can re-run: the inputs in one step, the claimed outputs in place
    (zeros where no claim speaks: see ``compared``)."""
    outputs = torch.zeros_like(proof.hidden, dtype=proof.claims[0].outputs.dtype)
    for claim in proof.claims:
        outputs[:, claim.offset:claim.offset + claim.tokens] = claim.outputs
    return ServedSpan(proof.accused, proof.start, proof.end, proof.dtype, [proof.hidden], [proof.position_ids],
                      proof.mask, [outputs], quant=proof.quant, session_id=proof.session_id)


def compared(proof: FraudProof) -> torch.Tensor:
    """(T,) bool: the tokens some claim signed (the only ones a judgment may look at)."""
    signed = torch.zeros(proof.hidden.shape[1], dtype=torch.bool)
    for claim in proof.claims:
        signed[claim.offset:claim.offset + claim.tokens] = True
    return signed


class Ruling(str, enum.Enum):
    PROVEN = "proven"  # the re-run disagrees with what the accused signed: it lied
    REFUTED = "refuted"  # the re-run agrees with the signed outputs: the accuser lied
    UNDECIDED = "undecided"  # no checker, or no majority: nobody is judged (yet)


def ruling(result: AuditResult) -> Ruling:
    """What a re-run of a proof's span (an audit of it) decides."""
    if result.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL):
        return Ruling.PROVEN
    if result.verdict == Verdict.PASS:
        return Ruling.REFUTED
    return Ruling.UNDECIDED


def sentence(book: ReputationBook, proof: FraudProof, decided: Ruling) -> str | None:
    """Ban whoever lied: the accused for a proven lie, the author for a refuted proof (a forged one,
    which ``check`` rejects, bans its author too: see the client). Returns who was banned."""
    if decided == Ruling.UNDECIDED:
        return None
    liar = proof.accused if decided == Ruling.PROVEN else proof.author
    book.record(liar, Verdict.GROSS_FAIL)
    return liar


# ---- on the wire (the accuser serves its proofs: wire.RPC_PROOF) -----------------------------------

def encode(proof: FraudProof) -> tuple[dict, list[torch.Tensor]]:
    meta = {"author": proof.author, "accused": proof.accused, "model_id": proof.model_id, "start": proof.start,
            "end": proof.end, "dtype": proof.dtype, "quant": proof.quant, "session_id": proof.session_id,
            "mask": proof.mask is not None,
            "claims": [[c.offset, c.tokens, c.receipt.to_wire()] for c in proof.claims]}
    tensors = [proof.hidden, proof.position_ids] + ([proof.mask] if proof.mask is not None else [])
    return meta, tensors + [c.outputs for c in proof.claims]


def decode(meta: dict, tensors: list[torch.Tensor]) -> FraudProof:
    """A proof from a message; ProofError for anything malformed."""
    try:
        claims = meta["claims"]
        fixed = 3 if meta["mask"] else 2
        if not isinstance(claims, list) or not 0 < len(claims) <= MAX_PROOF_CLAIMS or len(tensors) != fixed + len(claims):
            raise ProofError(f"a proof names 1 to {MAX_PROOF_CLAIMS} steps, each with its outputs")
        hidden, positions = tensors[0], tensors[1]
        mask = tensors[2] if meta["mask"] else None
        if hidden.ndim != 3 or tuple(positions.shape) != tuple(hidden.shape[:2]) or (
                mask is not None and tuple(mask.shape) != tuple(hidden.shape[:2])):
            raise ProofError(f"inputs of shapes {[tuple(t.shape) for t in tensors[:fixed]]} do not fit together")
        parsed = []
        for (offset, tokens, raw), out in zip(claims, tensors[fixed:]):
            receipt = Receipt.from_wire(raw)
            if receipt is None or not isinstance(offset, int) or not isinstance(tokens, int):
                raise ProofError("a claim is not (offset, tokens, receipt)")
            if tuple(out.shape) != (hidden.shape[0], tokens, hidden.shape[2]):
                raise ProofError(f"a claim's outputs have shape {tuple(out.shape)}, not (batch, {tokens}, hidden)")
            parsed.append(Claim(offset, tokens, receipt, out))
        fields = [meta[k] for k in ("author", "accused", "model_id", "start", "end", "dtype", "quant", "session_id")]
        if not all(isinstance(f, str) for f in fields[:3] + fields[5:]) or not all(isinstance(f, int) for f in fields[3:5]):
            raise ProofError("a proof's fields have the wrong types")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ProofError):
            raise
        raise ProofError(f"a malformed proof: {type(e).__name__}: {e}") from None
    return FraudProof(*fields, hidden, positions, mask, tuple(parsed))
