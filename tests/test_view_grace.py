"""Pure tests of the client's view of the swarm across a DHT read that misses records (no network: the DHT
read and the pings are the view's two inputs, given here directly)."""

from __future__ import annotations

import asyncio
import types

import pytest

from client import view as view_module
from client.config import ClientConfig
from client.errors import PeerError
from client.view import SwarmView
from dht.records import PeerRecord, PeerState


def _record(peer_id: str, start: int, end: int) -> PeerRecord:
    return PeerRecord(peer_id=peer_id, model_id="llama-6L-abc", start=start, end=end, state=PeerState.ONLINE,
                      throughput=10.0, dtype="float32", cache_tokens_left=100, version="0.1.0")


class Pings:
    """Answers ``info`` for the peers in ``alive`` (what the view's pings see), fails for the others."""

    def __init__(self, alive: set[str]):
        self.alive = alive

    async def connect(self, peer_id, maddrs):
        pass

    async def info(self, peer_id, timeout):
        if peer_id not in self.alive:
            raise PeerError(peer_id, "no answer")
        return {}, 0.001

    def forget(self, peer_id):
        pass


@pytest.fixture
def swarm(monkeypatch):
    """A view whose DHT read returns ``dht`` (a list the test changes) and whose pings reach ``alive``."""
    dht: list[PeerRecord] = []
    alive: set[str] = set()
    clock = [1000.0]

    async def fetch_peers(_dht, model_id):
        return list(dht)

    monkeypatch.setattr(view_module.directory, "fetch_peers", fetch_peers)
    monkeypatch.setattr(view_module.time, "monotonic", lambda: clock[0])
    cfg = ClientConfig(initial_peers=[], model_id="llama-6L-abc", num_blocks=6, hidden_size=8, reputation_path=None, record_grace=60.0)
    view = SwarmView(cfg, Pings(alive), node=types.SimpleNamespace(dht=None), peer_id="me")
    return view, dht, alive, clock


def _ids(view) -> set[str]:
    return {r.peer_id for r in view.records}


def test_a_live_peer_whose_record_vanished_stays_routable_for_the_grace_period(swarm):
    view, dht, alive, clock = swarm
    dht += [_record("a", 0, 6), _record("b", 0, 6)]
    alive |= {"a", "b"}
    asyncio.run(view.refresh(ping_all=True))
    assert _ids(view) == {"a", "b"}

    dht[:] = [_record("a", 0, 6)]  # a partial read: b's record is gone, b still answers
    clock[0] += 30
    asyncio.run(view.refresh(ping_all=True))
    assert _ids(view) == {"a", "b"}
    assert asyncio.run(view.plan(exclude=frozenset({"a"}), wait=False))[0].peer_id == "b"

    clock[0] += 31  # 61 s since b's record was last read
    asyncio.run(view.refresh(ping_all=True))
    assert _ids(view) == {"a"}


def test_a_vanished_record_whose_peer_stopped_answering_is_dropped_at_once(swarm):
    view, dht, alive, clock = swarm
    dht += [_record("a", 0, 6), _record("b", 0, 6)]
    alive |= {"a", "b"}
    asyncio.run(view.refresh(ping_all=True))

    dht[:] = [_record("a", 0, 6)]
    alive.discard("b")
    clock[0] += 5
    asyncio.run(view.refresh(ping_all=True))  # b is kept for this read, but its ping fails: not routable
    assert "b" in view.unreachable
    clock[0] += 5
    asyncio.run(view.refresh(ping_all=True))
    assert _ids(view) == {"a"}


def test_a_record_read_again_replaces_the_kept_one(swarm):
    view, dht, alive, clock = swarm
    dht += [_record("b", 0, 3)]
    alive.add("b")
    asyncio.run(view.refresh(ping_all=True))
    dht[:] = []
    clock[0] += 10
    asyncio.run(view.refresh(ping_all=True))
    dht[:] = [_record("b", 3, 6)]  # the peer moved its blocks
    clock[0] += 10
    asyncio.run(view.refresh(ping_all=True))
    assert [(r.start, r.end) for r in view.records] == [(3, 6)]
