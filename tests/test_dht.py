"""Real DHT nodes: signed announcements are stored and read back; forged ones are refused everywhere."""

from __future__ import annotations

import asyncio

import hivemind
import pytest
from hivemind.utils import get_dht_time

from dht import directory, identity, records
from dht.records import PeerRecord, PeerState


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    started = []
    try:
        boot = directory.start_node(identity.load_or_create(str(tmp_path_factory.mktemp("id") / "boot.key")))
        started.append(boot)
        peers = [directory.start_node(identity.load_or_create(), directory.visible_maddrs(boot)) for _ in range(2)]
        started += peers
        plain = hivemind.DHT(initial_peers=directory.visible_maddrs(boot), start=True,
                             host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_ipfs=False)  # validates nothing
        started.append(plain)
        yield boot, peers, plain
    finally:
        for node in started:
            node.shutdown()


def _record(peer_id: str, **kw) -> PeerRecord:
    fields = dict(peer_id=peer_id, model_id="tiny-2L-abc", start=0, end=2, state=PeerState.ONLINE,
                  throughput=5.0, dtype="float32", cache_tokens_left=10, version="t")
    return PeerRecord(**{**fields, **kw})


def test_announce_fetch_and_forgery(nodes):
    boot, (a, b), plain = nodes

    async def scenario():
        a_id, b_id = str(a.peer_id), str(b.peer_id)
        assert await directory.announce(a, _record(a_id), ttl=30)
        assert await directory.announce(b, _record(b_id, start=1), ttl=30)
        # b claims a's id (its node cannot sign for it), with a later expiration to win "latest" reads;
        # a node that runs no validator writes garbage under a peer subkey. Only that node may keep them.
        await directory.announce(b, _record(a_id, start=1, end=2), ttl=60)
        await plain.store(records.model_key("tiny-2L-abc"), subkey=records.subkey_for("12D3KooWfake"),
                          value={"v": 1, "junk": True}, expiration_time=get_dht_time() + 60, return_future=True)
        return ([{(r.peer_id, r.start) for r in await directory.fetch_peers(node, "tiny-2L-abc")} for node in (boot, a, b)],
                a_id, b_id)

    seen, a_id, b_id = asyncio.run(scenario())
    assert seen == [{(a_id, 0), (b_id, 1)}] * 3


# The fields a layout-1 peer (before the directory moved to shards and a models index) did not send.
_ADDED_LATER = ("relayed", "num_sessions", "model_blocks", "model_type", "num_parameters", "quant", "backward")


def test_layout_shards_and_models_index_with_older_peers(nodes, tmp_path):
    """Layout 2 writes a peer under one shard of its model and its model in the models index (two
    writes); readers still find older peers, which wrote every record under the model's single key
    and again under the global index, without the fields added since."""
    boot, (a, _), _ = nodes
    old_ids = [identity.load_or_create(str(tmp_path / f"old{i}.key")) for i in range(3)]
    old = directory.start_node(None, directory.visible_maddrs(boot), signers=old_ids)

    async def old_announce(record: PeerRecord):
        value = {k: v for k, v in records.encode(record).items() if k not in _ADDED_LATER}
        expiration = get_dht_time() + 30
        for key in (records.model_key(record.model_id), records.INDEX_KEY):
            assert await old.store(key, subkey=records.subkey_for(record.peer_id), value=value,
                                   expiration_time=expiration, return_future=True)

    async def scenario():
        a_id = str(a.peer_id)
        new = _record(a_id, model_id="mixed-4L-abc", end=2, model_blocks=4, model_type="llama", backward=True)
        assert await directory.announce(a, new, ttl=30)
        # the record sits under its shard only; the models index names the model, not the peer
        shard = records.shard_key("mixed-4L-abc", records.shard_of(a_id))
        stored = await boot.get(shard, latest=True, return_future=True)
        assert list(stored.value) == [records.subkey_for(a_id)]
        for key in (records.model_key("mixed-4L-abc"), records.INDEX_KEY):
            found = await boot.get(key, latest=True, return_future=True)
            assert found is None or records.subkey_for(a_id) not in found.value
        models = await boot.get(records.MODELS_KEY, latest=True, return_future=True)
        assert records.model_subkey("mixed-4L-abc") in models.value

        # an older peer of the same model, and one serving a model that only older peers serve
        await old_announce(_record(old_ids[0].peer_id, model_id="mixed-4L-abc", start=2, end=4))
        await old_announce(_record(old_ids[1].peer_id, model_id="legacy-2L-abc"))
        mixed = await directory.fetch_peers(boot, "mixed-4L-abc")
        models = await directory.fetch_models(boot)
        index = await directory.fetch_index(boot)
        # a peer updated from layout 1 to 2 has a record under each until the old one expires: the new wins
        moved = old_ids[2].peer_id
        await old_announce(_record(moved, model_id="mixed-4L-abc", start=3, end=4))
        assert await directory.announce(old, _record(moved, model_id="mixed-4L-abc", start=0, end=2), ttl=30)
        updated = await directory.fetch_peers(a, "mixed-4L-abc")
        return a_id, mixed, models, index, updated

    try:
        a_id, mixed, models, index, updated = asyncio.run(scenario())
    finally:
        old.shutdown()
    by_id = {r.peer_id: r for r in mixed}
    assert set(by_id) == {a_id, old_ids[0].peer_id}
    assert by_id[a_id].backward and by_id[a_id].model_blocks == 4
    assert not by_id[old_ids[0].peer_id].backward and by_id[old_ids[0].peer_id].quant == "none"  # defaults
    named = {m.model_id: m for m in models}
    assert {"mixed-4L-abc", "legacy-2L-abc"} <= set(named)
    assert named["mixed-4L-abc"].model_blocks == 4 and named["mixed-4L-abc"].writer == a_id
    assert {(r.peer_id, r.model_id) for r in index} >= {
        (a_id, "mixed-4L-abc"), (old_ids[0].peer_id, "mixed-4L-abc"), (old_ids[1].peer_id, "legacy-2L-abc")}
    assert [(r.start, r.end) for r in updated if r.peer_id == old_ids[2].peer_id] == [(0, 2)]
