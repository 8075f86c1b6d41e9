"""hivemind's DHT process dies (SIGKILL); peers, clients and the health monitor restart it (dht.node.Node)
and carry on: same peer id, records re-announced at once, open sessions untouched, same tokens."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from client import AutoDistributedModelForCausalLM
from dht import directory, records
from dht.node import Node
from dht.records import PeerState
from health.monitor import Monitor

# A long announce period (records live 2.5 periods): the only re-announcement a test can see is the one
# a restart makes at once.
PEER_OPTIONS = ["--announce-period", "300"]
CLIENT_OPTIONS = dict(step_timeout=5.0, refresh_period=1.0, route_timeout=20.0)


class KillAt(LogitsProcessor):
    """SIGKILLs ``pid()`` before token ``step`` is chosen (mid-generation: the session is open)."""

    def __init__(self, step: int, pid):
        self.step, self.pid, self.seen, self.killed = step, pid, 0, None

    def __call__(self, input_ids, scores):
        if self.seen == self.step:
            self.killed = self.pid()
            os.kill(self.killed, signal.SIGKILL)
        self.seen += 1
        return scores


def _until(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.1)
    return value


@pytest.fixture(scope="module")
def peer(swarm, path):
    proc, = swarm.add_peers(path, [(0, 6)], extra=PEER_OPTIONS)
    return proc


@pytest.fixture(scope="module")
def models(swarm, path, peer):
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, **CLIENT_OPTIONS)
    yield local, remote
    remote.swarm.shutdown()


def _prompt(seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, **kwargs) -> list:
    return model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, **kwargs).tolist()


def _info(remote, peer_id: str) -> dict:
    return remote.swarm.loop.run(remote.swarm.core.transport.info(peer_id), timeout=10)[0]


def _expiration(remote, peer_id: str) -> float:
    """When the peer's record expires, as the DHT holds it (a re-announcement pushes it later)."""
    model_id = remote.swarm.cfg.model_id
    found = remote.swarm.node.dht.get(records.shard_key(model_id, records.shard_of(peer_id)), latest=True)
    return found.value[records.subkey_for(peer_id)].expiration_time


def test_peer_restarts_its_dht_keeps_its_session_and_reannounces(models, peer):
    local, remote = models
    peer_id = peer.ready["peer_id"]
    before = _info(remote, peer_id)
    assert before["dht_restarts"] == 0 and psutil.Process(before["dht_pid"]).ppid() == peer.pid
    p2pd = [c.pid for c in psutil.Process(peer.pid).children() if c.name() == "p2pd"]
    expires = _expiration(remote, peer_id)
    retries = remote.swarm.core.retries

    ids = _prompt(0)
    kill = KillAt(3, lambda: before["dht_pid"])
    assert _generate(remote, ids, logits_processor=LogitsProcessorList([kill])) == _generate(local, ids)
    assert kill.killed == before["dht_pid"]
    assert remote.swarm.core.retries == retries  # the open session went on: no failover was needed

    after = _until(lambda: (i := _info(remote, peer_id))["dht_restarts"] == 1 and i, "the peer restarted its DHT")
    assert after["dht_pid"] != before["dht_pid"] and after["dht_alive"]
    assert psutil.Process(after["dht_pid"]).ppid() == peer.pid
    assert [c.pid for c in psutil.Process(peer.pid).children() if c.name() == "p2pd"] == p2pd  # the same daemon
    _until(lambda: _expiration(remote, peer_id) > expires, "the peer re-announced on its new DHT")
    found = remote.swarm.loop.run(directory.fetch_peers(remote.swarm.node.dht, remote.swarm.cfg.model_id), timeout=30)
    assert [(r.peer_id, r.state, list(r.maddrs)) for r in found] == [(peer_id, PeerState.ONLINE, peer.ready["maddrs"])]
    ids = _prompt(1)
    assert _generate(remote, ids) == _generate(local, ids)


def test_client_restarts_its_dht_and_keeps_generating(models, peer):
    local, remote = models
    node = remote.swarm.node
    first, restarts = node.dht.pid, node.restarts
    ids = _prompt(2)
    kill = KillAt(2, lambda: node.dht.pid)
    assert _generate(remote, ids, logits_processor=LogitsProcessorList([kill])) == _generate(local, ids)
    assert kill.killed == first
    _until(lambda: node.restarts == restarts + 1 and node.alive(), "the client restarted its DHT")
    assert node.dht.pid != first and psutil.Process(node.dht.pid).ppid() == os.getpid()
    found = remote.swarm.loop.run(directory.fetch_peers(node.dht, remote.swarm.cfg.model_id), timeout=30)
    assert [r.peer_id for r in found] == [peer.ready["peer_id"]]
    ids = _prompt(3)
    assert _generate(remote, ids) == _generate(local, ids)


def test_health_monitor_fails_fast_on_a_dead_dht_then_restarts_it(swarm, peer):
    async def run() -> None:
        node = await Node.start(None, swarm.initial_peers, client_mode=True)
        try:
            monitor = Monitor(node, ping_timeout=5.0)
            await monitor.start()
            assert [p.peer_id for m in monitor.latest.models for p in m.peers] == [peer.ready["peer_id"]]
            os.kill(node.dht.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while node.alive():
                assert time.monotonic() < deadline, "the killed DHT process did not exit within 10 s"
                await asyncio.sleep(0.05)
            began = time.monotonic()
            with pytest.raises(directory.DHTDied):  # an error, not a wait forever
                await monitor.refresh()
            assert time.monotonic() - began < 5
            restarted = asyncio.Event()

            async def on_restart(daemon_replaced: bool) -> None:
                restarted.set()

            async with asyncio.TaskGroup() as tasks:
                watcher = tasks.create_task(node.watch(on_restart, period=0.2))
                await asyncio.wait_for(restarted.wait(), 30)
                deadline = time.monotonic() + 30  # a busy machine may need a moment to fill the new routing table
                while [(p.peer_id, p.reachable) for m in (await monitor.refresh()).models for p in m.peers] != [
                        (peer.ready["peer_id"], True)]:
                    assert time.monotonic() < deadline, f"the restarted monitor never showed the peer: {monitor.latest}"
                    await asyncio.sleep(0.2)
                watcher.cancel()
            assert node.restarts == 1
        finally:
            await node.shutdown()

    asyncio.run(run())


def _record(remote, peer_id: str):
    found = remote.swarm.loop.run(directory.fetch_peers(remote.swarm.node.dht, remote.swarm.cfg.model_id), timeout=30)
    return next((r for r in found if r.peer_id == peer_id), None)


def test_peer_replaces_a_dead_daemon_and_its_clients_fail_over(models, peer):
    """The daemon itself dies: a new one (same peer id, new port) serves the RPCs; the session open on the
    old one is lost, and the client rebuilds it by replay (same tokens)."""
    local, remote = models
    peer_id = peer.ready["peer_id"]
    before = _info(remote, peer_id)
    old_maddrs = list(_record(remote, peer_id).maddrs)
    retries = remote.swarm.core.retries
    ids = _prompt(4)
    kill = KillAt(3, lambda: before["p2pd_pid"])
    assert _generate(remote, ids, logits_processor=LogitsProcessorList([kill])) == _generate(local, ids)
    assert kill.killed == before["p2pd_pid"] and remote.swarm.core.retries > retries  # a failover, as for a dead peer
    after = _info(remote, peer_id)
    assert after["p2pd_restarts"] == before["p2pd_restarts"] + 1 and after["p2pd_pid"] != before["p2pd_pid"]
    assert psutil.Process(after["p2pd_pid"]).ppid() == peer.pid
    record = _until(lambda: (r := _record(remote, peer_id)) and list(r.maddrs) != old_maddrs and r,
                    "the peer announced its new daemon's addresses")
    assert record.state == PeerState.ONLINE
    _until(lambda: _info(remote, peer_id)["sessions"] == 0, "the session on the dead daemon was closed", 10)
    ids = _prompt(5)
    assert _generate(remote, ids) == _generate(local, ids)


def test_client_replaces_a_dead_daemon_and_keeps_generating(models, peer):
    local, remote = models
    node = remote.swarm.node
    first, replaced = node.daemon_pid, node.daemon_restarts
    ids = _prompt(6)
    kill = KillAt(2, lambda: node.daemon_pid)
    assert _generate(remote, ids, logits_processor=LogitsProcessorList([kill])) == _generate(local, ids)
    assert kill.killed == first
    _until(lambda: node.daemon_restarts == replaced + 1 and node.alive(), "the client replaced its daemon")
    assert remote.swarm.core.transport.p2p is node.p2p and node.daemon_pid != first
    _until(lambda: _info(remote, peer.ready["peer_id"])["sessions"] == 0, "the peer closed the broken session", 10)
    ids = _prompt(7)
    assert _generate(remote, ids) == _generate(local, ids)


def test_peer_leaves_cleanly_after_its_restarts(models, peer):
    """SIGTERM after the restarts above: the peer drains and exits 0 (a DHT process forked after the peer
    set its signal handlers once ignored SIGTERM and hung this exit)."""
    assert _info(models[1], peer.ready["peer_id"])["dht_restarts"] >= 2
    os.kill(peer.pid, signal.SIGTERM)
    assert peer.popen.wait(timeout=30) == 0, peer.stderr_tail()


def test_a_restarted_bootstrap_node_learns_the_swarm_again(make_swarm, path, tmp_path):
    """The bootstrap node dies and comes back empty (same key and port): the peers' periodic pings remind it
    of them, and a newcomer joining through it finds their records again (before, it never did). A peer
    started during the outage waits for the bootstrap node (--bootstrap-wait) instead of exiting, and joins."""
    from bench.harness import _free_port
    from swarmllm import launch

    dht_args = ["--port", str(_free_port()), "--identity", str(tmp_path / "boot.key")]
    swarm = make_swarm(dht_args)
    peers = swarm.add_peers(path, [(0, 3), (3, 6)], extra=["--announce-period", "2"])
    model_id = peers[0].ready["model_id"]

    def seen_through_bootstrap() -> int:
        async def read() -> int:
            node = await Node.start(None, swarm.initial_peers, client_mode=True)
            try:
                return len(await directory.fetch_peers(node.dht, model_id))
            finally:
                await node.shutdown()
        return asyncio.run(read())

    assert seen_through_bootstrap() == 2
    swarm.dht.signal(signal.SIGKILL)
    swarm.stop([swarm.dht])
    late = swarm._track(launch.start_peer(path, swarm.initial_peers, 0, 3, name="late", wait=False,
                                          extra=["--device", "cpu", "--announce-period", "2"], forked=swarm.forked))
    time.sleep(8)  # the outage itself (not a wait for anything): 4 announce periods, so the peers drop the node
    _until(lambda: "none of the initial peers answered" in late.stderr_tail(10**6) or not late.alive(),
           "the late peer tried the bootstrap node", 60)
    assert late.alive(), f"a peer started while the bootstrap node was down gave up: {late.stderr_tail()}"
    swarm.dht = swarm._track(launch.start_dht(extra=dht_args, forked=swarm.forked))  # empty, same address
    late.wait_ready(timeout=90)
    _until(lambda: seen_through_bootstrap() == 3, "a newcomer found all three peers through the restarted bootstrap", 60)
