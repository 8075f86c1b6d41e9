"""A hivemind record validator that makes every peer record signed by the peer it names, and every
verdict signed by the client that wrote it.

A peer record lives under subkey 'peer:<peer id>'. Its value must (1) carry an Ed25519 signature by
the key inlined in that peer id, over key, subkey, value and expiration, and (2) decode as a valid
PeerRecord whose peer_id equals the subkey's. Every DHT node runs this validator, so a forged record
(another peer's id, another key, a malformed schema) is rejected wherever it is sent.
A verdict lives under subkey 'verdict:<author id>:<target id>' and must be signed by the author's key
and decode as a valid VerdictRecord with that author and target; a fraud proof's record, under
'proof:<author id>:<accused id>', likewise (a ProofRecord). A models-index entry lives under
subkey 'model:<model id>' and must decode as a valid ModelEntry for that model, signed by the peer it
names as its writer. Any of ours larger than ``records.MAX_RECORD_BYTES`` is refused. Records whose
subkey is not ours pass through untouched.
"""

from __future__ import annotations

from typing import Sequence

import msgpack
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from dht import identity as identity_mod
from dht import records

_MARKER = b"\x00swsig1\x00"
_SIG_BYTES = 64


def _subkey(record: DHTRecord) -> object:
    try:
        return msgpack.unpackb(record.subkey, raw=False)
    except Exception:  # not our subkey format: not ours to judge
        return None


def _kind(record: DHTRecord) -> str | None:
    """'peer', 'verdict', 'model' or 'proof' for our subkeys, None for records that are not ours."""
    subkey = _subkey(record)
    if records.peer_id_from_subkey(subkey) is not None:
        return "peer"
    if records.author_from_subkey(subkey) is not None:
        return "verdict"
    if records.model_from_subkey(subkey) is not None:
        return "model"
    if records.proof_author_from_subkey(subkey) is not None:
        return "proof"
    return None


def _owner(record: DHTRecord, kind: str, value: bytes) -> str | None:
    """The peer id that must have signed this record's (unsigned) ``value``."""
    subkey = _subkey(record)
    if kind == "peer":
        return records.peer_id_from_subkey(subkey)
    if kind == "verdict":
        return records.author_from_subkey(subkey)
    if kind == "proof":
        return records.proof_author_from_subkey(subkey)
    try:  # a model entry names its writer inside
        writer = msgpack.unpackb(value, raw=False).get("writer")
    except Exception:
        return None
    return writer if isinstance(writer, str) else None


def _signed_message(record: DHTRecord, value: bytes) -> bytes:
    return msgpack.packb([record.key, record.subkey, value, float(record.expiration_time)])


class PeerRecordValidator(RecordValidatorBase):
    def __init__(self, local_identity: identity_mod.Identity | None = None,
                 signers: Sequence[identity_mod.Identity] = ()):
        """``local_identity`` signs this node's records; ``signers``: more identities this node writes
        records for (a benchmark that plays thousands of peers from a few nodes)."""
        self._signers = {i.peer_id: i for i in [*signers, *([local_identity] if local_identity else [])]}

    def sign_value(self, record: DHTRecord) -> bytes:
        kind = _kind(record)
        signer = self._signers.get(_owner(record, kind, record.value)) if kind is not None else None
        if signer is None:
            return record.value  # unsigned: other nodes will reject it if it claims one of our subkeys
        return record.value + _MARKER + signer.sign(_signed_message(record, record.value))

    def validate(self, record: DHTRecord) -> bool:
        kind = _kind(record)
        if kind is None:
            return True
        if len(record.value) > records.MAX_RECORD_BYTES + len(_MARKER) + _SIG_BYTES:
            return False
        value, signature = self._split(record.value)
        owner = _owner(record, kind, value)
        if signature is None or owner is None or not identity_mod.verify(owner, _signed_message(record, value),
                                                                         signature):
            return False
        try:
            obj = msgpack.unpackb(value, raw=False)
            subkey = _subkey(record)
            if kind == "peer":
                return records.decode(obj).peer_id == owner
            if kind == "model":
                entry = records.decode_model_entry(obj)
                return entry.writer == owner and subkey == records.model_subkey(entry.model_id)
            if kind == "proof":
                proof = records.decode_proof(obj)
                return proof.author == owner and subkey == records.proof_subkey(proof.author, proof.accused)
            verdict = records.decode_verdict(obj)
            return verdict.author == owner and subkey == records.verdict_subkey(verdict.author, verdict.target)
        except (records.RecordError, ValueError, TypeError, msgpack.ExtraData):
            return False

    def strip_value(self, record: DHTRecord) -> bytes:
        if _kind(record) is None:
            return record.value
        value, _ = self._split(record.value)
        return value

    @staticmethod
    def _split(value: bytes) -> tuple[bytes, bytes | None]:
        cut = len(value) - _SIG_BYTES - len(_MARKER)
        if cut < 0 or value[cut:cut + len(_MARKER)] != _MARKER:
            return value, None
        return value[:cut], value[cut + len(_MARKER):]

    @property
    def priority(self) -> int:
        return 10  # sign last, verify and strip first (before any schema validator)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False
