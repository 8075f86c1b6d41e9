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
