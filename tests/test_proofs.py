"""Fraud proofs, pure: what a peer signs for each step (peer.steps.receipt), building a proof from a served
span, checking it without a network (chain, digests, the accused's signature), judging it by re-running
(an injected checker), and its DHT record. The real-swarm cases are in tests/test_verify_swarm.py."""

from __future__ import annotations

import asyncio
import dataclasses

import msgpack
import pytest
import torch
from hivemind.dht.validation import DHTRecord

from dht import identity, records
from dht.validator import PeerRecordValidator
from peer import steps
from peer.sessions import Session
from verify import proofs
from verify.auditor import Auditor, ServedSpan
from verify.policy import AuditRates, SamplingPolicy
from verify.proofs import Ruling
from verify.reputation import ReputationBook, Status, Verdict
from wire.receipts import Receipt

HIDDEN = 8
MODEL = "m-1L-x"


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """The 'true' span: each token's output depends on every input so far (like attention)."""  # (1, T, hidden)
    return torch.tanh(x.cumsum(dim=1)) + x


def _serve(peer: identity.Identity, steps_tokens: list[int], lie_at: int | None = None, seed: int = 0) -> ServedSpan:
    """A peer session answering steps of these sizes, signing each (a liar's ``lie_at`` step is wrong)."""
    gen = torch.Generator().manual_seed(seed)
    session = Session("sess-1", 1, 64, runner=None, cache=None, span=(3, 6))
    hidden, positions, outputs, receipts, offset = [], [], [], [], 0
    for n, tokens in enumerate(steps_tokens):
        x = torch.randn(1, tokens, HIDDEN, generator=gen)
        pos = torch.arange(offset, offset + tokens).unsqueeze(0)
        out = _blocks(torch.cat(hidden + [x], dim=1))[:, offset:]
        if n == lie_at:
            out = out + 1.0
        receipts.append(Receipt.from_wire(steps.receipt(session, MODEL, peer.sign, x, pos, None, offset, out)))
        hidden.append(x)
        positions.append(pos)
        outputs.append(out)
        offset += tokens
    return ServedSpan(peer.peer_id, 3, 6, "float32", hidden, positions, None, outputs, session_id="sess-1",
                      receipts=tuple(receipts))


def _auditor(book: ReputationBook) -> Auditor:
    """Two honest checkers that compute ``_blocks`` (the injected network)."""
    async def replay(checker, hidden, position_ids, mask):
        return _blocks(hidden)
    def candidates(start, end, dtype, quant, exclude):
        return [((p, start, end),) for p in ("c1", "c2") if p not in exclude]
    return Auditor(book, SamplingPolicy(AuditRates.always()), candidates, replay)


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    return identity.load_or_create(str(tmp_path_factory.mktemp("keys") / "peer.key"))


def test_a_signed_lie_is_proven_and_an_honest_span_refutes_its_accuser(peer):
    liar = proofs.build(_serve(peer, [5, 1, 1, 1], lie_at=2), MODEL, "accuser")
    assert [(c.offset, c.tokens) for c in liar.claims] == [(0, 5), (5, 1), (6, 1), (7, 1)]
    assert proofs.check(liar) is None  # every receipt matches the inputs and outputs, signed by the accused
    book = ReputationBook()
    result = asyncio.run(_auditor(book).judge(proofs.span(liar), proofs.compared(liar)))
    assert proofs.ruling(result) == Ruling.PROVEN and result.verdict == Verdict.GROSS_FAIL
    assert not book.entries  # judging leaves the book alone: the sentence decides
    assert proofs.sentence(book, liar, Ruling.PROVEN) == peer.peer_id
    assert book.status(peer.peer_id) == Status.BANNED and book.status("accuser") != Status.BANNED

    honest = proofs.build(_serve(peer, [5, 1, 1, 1], seed=1), MODEL, "slanderer")
    assert proofs.check(honest) is None
    book = ReputationBook()
    ruling = proofs.ruling(asyncio.run(_auditor(book).judge(proofs.span(honest), proofs.compared(honest))))
    assert ruling == Ruling.REFUTED
    assert proofs.sentence(book, honest, ruling) == "slanderer"
    assert book.status("slanderer") == Status.BANNED and book.status(peer.peer_id) != Status.BANNED


def test_only_signed_tokens_are_judged(peer):
    """A step whose receipt the client no longer holds (a truncated draft) is left out of the proof, and its
    outputs cannot make an honest peer look guilty."""
    span = _serve(peer, [4, 1, 1], lie_at=1)
    span = dataclasses.replace(span, receipts=(span.receipts[0], None, span.receipts[2]))
    proof = proofs.build(span, MODEL, "accuser")
    assert [(c.offset, c.tokens) for c in proof.claims] == [(0, 4), (5, 1)]
    assert proofs.compared(proof).tolist() == [True] * 4 + [False, True]
    ruling = proofs.ruling(asyncio.run(_auditor(ReputationBook()).judge(proofs.span(proof), proofs.compared(proof))))
    assert ruling == Ruling.REFUTED  # the lie was in the unsigned step: this proof shows none


def test_a_forged_proof_fails_its_check(peer, tmp_path):
    proof = proofs.build(_serve(peer, [3, 1, 1], lie_at=1), MODEL, "accuser")
    claim = proof.claims[1]
    other = identity.load_or_create(str(tmp_path / "other.key"))

    def with_claim(**change):
        return dataclasses.replace(proof, claims=(proof.claims[0], dataclasses.replace(claim, **change), proof.claims[2]))

    bad_sig = Receipt(claim.receipt.chain, claim.receipt.output_digest, bytes(64))
    assert "signature" in proofs.check(with_claim(receipt=bad_sig))
    # signed by someone else: only the accused's key counts
    statement = proof.statement(claim)
    resigned = Receipt(claim.receipt.chain, claim.receipt.output_digest, other.sign(statement.message()))
    assert "signature" in proofs.check(with_claim(receipt=resigned))
    assert "outputs" in proofs.check(with_claim(outputs=claim.outputs + 1e-3))  # not what it signed
    changed = proof.hidden.clone()
    changed[0, 1, 0] += 1.0  # another history than the one it computed on
    assert "history" in proofs.check(dataclasses.replace(proof, hidden=changed))
    assert "signature" in proofs.check(dataclasses.replace(proof, session_id="sess-2"))  # it signed another session
    assert "signature" in proofs.check(dataclasses.replace(proof, start=0))  # or another span


def test_a_rolled_back_history_cannot_pass_for_another(peer):
    """Speculative decoding rolls a session back: the peer's chain after the rewrite names the new history,
    so a proof cannot splice a receipt of the old history onto the new inputs."""
    session = Session("sess-1", 1, 64, runner=None, cache=_Cropped(), span=(3, 6))
    x1, x2, x3 = (torch.randn(1, n, HIDDEN, generator=torch.Generator().manual_seed(n)) for n in (3, 2, 1))
    pos = lambda a, b: torch.arange(a, b).unsqueeze(0)
    steps.receipt(session, MODEL, peer.sign, x1, pos(0, 3), None, 0, _blocks(x1))
    old = Receipt.from_wire(steps.receipt(session, MODEL, peer.sign, x2, pos(3, 5), None, 3, _blocks(torch.cat([x1, x2], 1))[:, 3:]))
    session.length = 5
    steps.rewind(session, 4, _NoReuse())  # one draft token rejected: the chain is cut back to 4 tokens
    assert len(session.chain) == 4
    new = Receipt.from_wire(steps.receipt(session, MODEL, peer.sign, x3, pos(4, 5), None, 4, x3))
    assert new.chain != old.chain


class _NoReuse:  # the prefix store and the KV cache take no part in what the receipts sign
    def truncate(self, session, offset):
        pass


class _Cropped:
    def crop(self, length):
        pass


def test_a_proof_goes_over_the_wire_and_back(peer):
    proof = proofs.build(_serve(peer, [3, 1], lie_at=1), MODEL, "accuser")
    meta, tensors = proofs.encode(proof)
    again = proofs.decode(msgpack.unpackb(msgpack.packb(meta), raw=False), tensors)
    assert again.digest() == proof.digest() and proofs.check(again) is None
    with pytest.raises(proofs.ProofError):
        proofs.decode(meta, tensors[:-1])
    with pytest.raises(proofs.ProofError):
        proofs.decode({**meta, "claims": [[0, 3, {"chain": b"x"}]] * 2}, tensors)
    with pytest.raises(proofs.ProofError):
        proofs.decode({k: v for k, v in meta.items() if k != "accused"}, tensors)


def test_proof_records_are_signed_by_their_author(tmp_path):
    author = identity.load_or_create(str(tmp_path / "author.key"))
    other = identity.load_or_create(str(tmp_path / "other.key"))
    proof = records.ProofRecord(author.peer_id, "12D3KooWaccused", MODEL, 3, 6, "ab" * 32,
                                ("/ip4/127.0.0.1/tcp/1/p2p/x",), 1.0)
    value = records.encode_proof(proof)
    assert records.decode_proof(value) == proof
    record = DHTRecord(key=b"k" * 20, subkey=msgpack.packb(records.proof_subkey(author.peer_id, "12D3KooWaccused")),
                       value=msgpack.packb(value), expiration_time=1e9)
    signed = dataclasses.replace(record, value=PeerRecordValidator(author).sign_value(record))
    assert PeerRecordValidator().validate(signed)
    assert not PeerRecordValidator().validate(record)  # unsigned: nobody can accuse in another's name
    assert PeerRecordValidator(other).sign_value(record) == record.value
    with pytest.raises(records.RecordError, match="64 hex"):
        records.decode_proof({**value, "digest": "zz"})
