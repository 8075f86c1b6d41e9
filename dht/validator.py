"""A hivemind record validator that makes every peer record signed by the peer it names, and every
verdict signed by the client that wrote it.

A peer record lives under subkey 'peer:<peer id>'. Its value must (1) carry an Ed25519 signature by
the key inlined in that peer id, over key, subkey, value and expiration, and (2) decode as a valid
PeerRecord whose peer_id equals the subkey's. Every DHT node runs this validator, so a forged record
(another peer's id, another key, a malformed schema) is rejected wherever it is sent.
A verdict lives under subkey 'verdict:<author id>:<target id>' and must be signed by the author's key
and decode as a valid VerdictRecord with that author and target. Records whose subkey is not ours
pass through untouched.
"""

from __future__ import annotations

import msgpack
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from dht import identity as identity_mod
from dht import records

_MARKER = b"\x00swsig1\x00"
_SIG_BYTES = 64


def _subkey_owner(record: DHTRecord) -> tuple[str | None, str | None]:
    """(the peer id that must have signed this record, its kind 'peer'/'verdict'), or (None, None)
    for records that are not ours."""
    try:
        subkey = msgpack.unpackb(record.subkey, raw=False)
    except Exception:  # not our subkey format: not ours to judge
        return None, None
    if (peer := records.peer_id_from_subkey(subkey)) is not None:
        return peer, "peer"
    if (author := records.author_from_subkey(subkey)) is not None:
        return author, "verdict"
    return None, None


def _subkey_peer(record: DHTRecord) -> str | None:
    return _subkey_owner(record)[0]


def _signed_message(record: DHTRecord, value: bytes) -> bytes:
    return msgpack.packb([record.key, record.subkey, value, float(record.expiration_time)])


class PeerRecordValidator(RecordValidatorBase):
    def __init__(self, local_identity: identity_mod.Identity | None = None):
        self._identity = local_identity

    def sign_value(self, record: DHTRecord) -> bytes:
        peer_id = _subkey_peer(record)
        if peer_id is None or self._identity is None or peer_id != self._identity.peer_id:
            return record.value  # unsigned: other nodes will reject it if it claims a peer subkey
        return record.value + _MARKER + self._identity.sign(_signed_message(record, record.value))

    def validate(self, record: DHTRecord) -> bool:
        peer_id = _subkey_peer(record)
        if peer_id is None:
            return True
        value, signature = self._split(record.value)
        if signature is None or not identity_mod.verify(peer_id, _signed_message(record, value), signature):
            return False
        kind = _subkey_owner(record)[1]
        try:
            obj = msgpack.unpackb(value, raw=False)
            if kind == "peer":
                return records.decode(obj).peer_id == peer_id
            verdict = records.decode_verdict(obj)
            subkey = msgpack.unpackb(record.subkey, raw=False)
            return verdict.author == peer_id and subkey == records.verdict_subkey(verdict.author, verdict.target)
        except (records.RecordError, ValueError, TypeError, msgpack.ExtraData):
            return False

    def strip_value(self, record: DHTRecord) -> bytes:
        if _subkey_peer(record) is None:
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
