"""Pure tests of the record schema and the record validator (no network)."""

from __future__ import annotations

import dataclasses
import os

import msgpack
import pytest
from hivemind.dht.validation import DHTRecord

from dht import identity, records
from dht.records import PeerRecord, PeerState, RecordError
from dht.validator import PeerRecordValidator


def make_record(**overrides) -> PeerRecord:
    fields = dict(peer_id="12D3KooWtest", model_id="llama-6L-abc", start=0, end=4, state=PeerState.ONLINE,
                  throughput=10.0, dtype="float32", cache_tokens_left=100, version="0.1.0")
    return PeerRecord(**{**fields, **overrides})


def test_roundtrip_and_unknown_extras_are_ignored():
    r = make_record(public_name="alice", maddrs=("/ip4/127.0.0.1/tcp/1",), model_type="qwen3_moe",
                    num_parameters=123456, quant="nf4")
    wire = records.encode(r)
    assert records.decode(wire) == r
    assert records.decode({**wire, "future_field": [1, 2]}) == r


@pytest.mark.parametrize("change, message", [
    ({"v": 2}, "version 2"),
    ({"start": "0"}, "'start'"),
    ({"start": 5, "end": 5}, "0 <= start < end"),
    ({"state": "sleeping"}, "unknown peer state"),
    ({"dtype": "int8"}, "dtype"),
    ({"throughput": -1.0}, "throughput"),
    ({"cache_tokens_left": True}, "bool"),
    ({"model_id": "has space"}, "model id"),
    ({"maddrs": [1]}, "maddrs"),
    ({"model_type": "<b>llama</b>"}, "model_type"),
    ({"model_type": 3}, "'model_type'"),
    ({"num_parameters": -1}, "num_parameters"),
    ({"quant": "fp4"}, "quant must be one of"),
    ({"quant": 4}, "'quant'"),
])
def test_malformed_fields_are_rejected(change, message):
    wire = {**records.encode(make_record()), **change}
    with pytest.raises(RecordError, match=message):
        records.decode(wire)


def test_fields_added_later_default_when_an_older_peer_omits_them():
    wire = records.encode(make_record(model_type="bloom", num_parameters=7, quant="int8"))
    del wire["model_type"], wire["num_parameters"], wire["quant"]
    r = records.decode(wire)
    assert (r.model_type, r.num_parameters, r.quant, r.format) == ("", 0, "none", "float32")


def test_missing_field_is_named():
    wire = records.encode(make_record())
    del wire["dtype"]
    with pytest.raises(RecordError, match="'dtype'"):
        records.decode(wire)


def test_model_id_separates_checkpoints_and_ignores_volatile_fields():
    a = {"model_type": "llama", "num_hidden_layers": 6, "hidden_size": 64, "transformers_version": "5.23.0"}
    assert records.derive_model_id(a) == records.derive_model_id({**a, "transformers_version": "9.9"})
    assert records.derive_model_id(a) != records.derive_model_id({**a, "hidden_size": 128})
    assert records.derive_model_id(a).startswith("llama-6L-")


def _dht_record(peer_id: str, value: dict, subkey: str | None = None) -> DHTRecord:
    return DHTRecord(key=b"k" * 20, subkey=msgpack.packb(subkey or records.subkey_for(peer_id)),
                     value=msgpack.packb(value), expiration_time=1e9)


def test_validator_accepts_own_signed_record_and_rejects_forgeries(tmp_path):
    me = identity.load_or_create(str(tmp_path / "me.key"))
    other = identity.load_or_create(str(tmp_path / "other.key"))
    mine, theirs = PeerRecordValidator(me), PeerRecordValidator(other)
    value = records.encode(make_record(peer_id=me.peer_id))
    record = _dht_record(me.peer_id, value)

    signed = dataclasses.replace(record, value=mine.sign_value(record))
    assert theirs.validate(signed)  # anyone can check it
    assert theirs.strip_value(signed) == record.value

    # Someone else cannot sign a record under my peer id.
    assert theirs.sign_value(record) == record.value
    assert not mine.validate(record)
    forged = dataclasses.replace(record, value=record.value + b"\x00swsig1\x00" + other.sign(b"x") * 1)
    assert not mine.validate(forged)
    # A valid signature does not carry over to changed contents or expiration.
    assert not mine.validate(dataclasses.replace(signed, expiration_time=2e9))
    # The record's own peer_id must match the subkey.
    wrong = _dht_record(me.peer_id, records.encode(make_record(peer_id=other.peer_id)))
    assert not theirs.validate(dataclasses.replace(wrong, value=mine.sign_value(wrong)))
    # Other DHT traffic (not our subkeys) is not our business.
    assert mine.validate(DHTRecord(b"k", msgpack.packb("x"), b"v", 1.0))


def test_identity_persists_with_owner_only_permissions(tmp_path):
    path = str(tmp_path / "id.key")
    first = identity.load_or_create(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert identity.load_or_create(path).peer_id == first.peer_id
    assert first.peer_id.startswith("12D3KooW")
    assert identity.public_key_of("not-a-peer-id") is None


def test_verdicts_must_be_signed_by_their_author(tmp_path):
    author = identity.load_or_create(str(tmp_path / "author.key"))
    other = identity.load_or_create(str(tmp_path / "other.key"))
    verdict = records.VerdictRecord(author=author.peer_id, target="12D3KooWtarget", model_id="m-1L-x", start=0,
                                    end=2, verdict="fail", median_error=0.4, max_error=0.9, time=1.0)
    value = records.encode_verdict(verdict)
    assert records.decode_verdict(value) == verdict
    record = DHTRecord(key=b"k" * 20, subkey=msgpack.packb(records.verdict_subkey(author.peer_id, "12D3KooWtarget")),
                       value=msgpack.packb(value), expiration_time=1e9)
    signed = dataclasses.replace(record, value=PeerRecordValidator(author).sign_value(record))
    assert PeerRecordValidator().validate(signed)
    assert not PeerRecordValidator().validate(record)  # unsigned
    assert PeerRecordValidator(other).sign_value(record) == record.value  # others cannot sign it
    # an author cannot file its verdict under another target's subkey
    moved = dataclasses.replace(record, subkey=msgpack.packb(records.verdict_subkey(author.peer_id, "12D3KooWelse")))
    assert not PeerRecordValidator().validate(dataclasses.replace(moved, value=PeerRecordValidator(author).sign_value(moved)))
    with pytest.raises(RecordError, match="verdict must be one of"):
        records.decode_verdict({**value, "verdict": "guilty"})


def test_model_entries_are_signed_by_the_writer_they_name_and_records_are_bounded(tmp_path):
    writer = identity.load_or_create(str(tmp_path / "writer.key"))
    other = identity.load_or_create(str(tmp_path / "other.key"))
    entry = records.model_entry(make_record(peer_id=writer.peer_id, model_type="llama", model_blocks=32))
    value = records.encode_model_entry(entry)
    assert records.decode_model_entry(value) == entry
    assert records.decode_model_entry({"v": 1, "model_id": entry.model_id, "writer": "w"}).model_blocks == 0

    def dht_record(value, model_id=entry.model_id):
        return DHTRecord(key=b"k" * 20, subkey=msgpack.packb(records.model_subkey(model_id)),
                         value=msgpack.packb(value), expiration_time=1e9)

    record = dht_record(value)
    signed = dataclasses.replace(record, value=PeerRecordValidator(writer).sign_value(record))
    assert PeerRecordValidator().validate(signed)
    assert not PeerRecordValidator().validate(record)  # unsigned
    assert PeerRecordValidator(other).sign_value(record) == record.value  # only the named writer signs it
    # filed under another model's subkey: refused even when properly signed
    misfiled = dht_record(value, model_id="other-1L-x")
    assert not PeerRecordValidator().validate(
        dataclasses.replace(misfiled, value=PeerRecordValidator(writer).sign_value(misfiled)))
    # a node that plays many peers (bench.directory) signs for each of them
    many = PeerRecordValidator(None, [other, writer])
    assert PeerRecordValidator().validate(dataclasses.replace(record, value=many.sign_value(record)))
    with pytest.raises(records.RecordError, match="model_blocks"):
        records.decode_model_entry({**value, "model_blocks": -1})

    # every field of a peer record is bounded, and so is what a DHT node accepts under our subkeys
    with pytest.raises(records.RecordError, match="multiaddr is longer"):
        make_record(maddrs=("/ip4/1.2.3.4/tcp/1/" + "x" * 300,))
    with pytest.raises(records.RecordError, match="version is longer"):
        make_record(version="v" * 65)
    biggest = make_record(peer_id=writer.peer_id, maddrs=("/" + "m" * 255,) * records.MAX_MADDRS,
                          public_name="n" * 64, version="v" * 64, model_type="t" * 64)
    assert len(msgpack.packb(records.encode(biggest))) <= records.MAX_RECORD_BYTES
    huge = _dht_record(writer.peer_id, {**records.encode(biggest), "extra": "x" * 9000})
    assert not PeerRecordValidator().validate(
        dataclasses.replace(huge, value=PeerRecordValidator(writer).sign_value(huge)))


def test_shards_spread_peers_and_readers_know_every_key():
    ids = [f"12D3KooW{i:04d}" for i in range(1600)]
    counts = [0] * records.MODEL_SHARDS
    for peer_id in ids:
        shard = records.shard_of(peer_id)
        assert shard == records.shard_of(peer_id)  # stable
        counts[shard] += 1
    assert min(counts) > 1600 / records.MODEL_SHARDS / 2  # roughly even: no shard holds most of a model
    keys = records.peer_keys("m-1L-x")
    assert len(set(keys)) == records.MODEL_SHARDS + 1 and keys[-1] == records.model_key("m-1L-x")
    assert records.shard_key("m-1L-x", 3) in keys and records.MODELS_KEY != records.INDEX_KEY
    with pytest.raises(ValueError):
        records.shard_key("m-1L-x", records.MODEL_SHARDS)
