"""Real peers choose their blocks (--num-blocks), move when the swarm needs it, keep their identity,
and can be reached through a relay."""

from __future__ import annotations

import asyncio
import threading
import time

import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM, ClientConfig, RemoteSwarm
from dht import directory
from dht.records import PeerState, derive_model_id
from peer import placement
from peer.blocks import load_config


def _records(swarm, path):
    node = directory.start_node(None, swarm.initial_peers, client_mode=True)
    try:
        found = asyncio.run(directory.fetch_peers(node, derive_model_id(load_config(path).to_dict())))
        return [r for r in found if r.state == PeerState.ONLINE]
    finally:
        node.shutdown()


def _covered(records, num_blocks):
    return all(any(r.start <= b < r.end for r in records) for b in range(num_blocks))


def _until_covered(swarm, path, timeout: float) -> list:
    """The online records once they cover every block (fetched until then, at most ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not _covered(records := _records(swarm, path), 6):
        assert time.monotonic() < deadline, f"blocks still uncovered: {[(r.start, r.end) for r in records]}"
        time.sleep(1)
    return records


def _moves(swarm, path, records) -> dict[str, int]:
    """Each peer's own count of the moves it made (its info RPC)."""
    config = load_config(path)
    client = RemoteSwarm(ClientConfig(tuple(swarm.initial_peers), derive_model_id(config.to_dict()), 6, config.hidden_size))
    try:
        async def ask(record):
            await client.core.transport.connect(record.peer_id, record.maddrs)
            return (await client.core.transport.info(record.peer_id, timeout=30))[0]["moves"]
        return {r.peer_id: client.loop.run(ask(r), timeout=60) for r in records}
    finally:
        client.shutdown()


def test_peers_started_one_after_another_cover_every_block(tiny_checkpoint, make_swarm):
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    for _ in range(4):
        swarm.add_auto_peers(path, 2, 1, extra=["--placement-jitter", "0"])
    spans = sorted((r.start, r.end) for r in _records(swarm, path))
    assert len(spans) == 4 and _covered(_records(swarm, path), 6), spans


def test_peers_started_together_spread_out_and_rebalance(tiny_checkpoint, make_swarm):
    """Three peers of 2 blocks started at the same moment end up one on each third of the 6 blocks. Where
    two chose the same blocks (the jitter did not keep them apart), rebalancing moved one of them; where
    they chose apart, nobody moved."""
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    procs = swarm.add_auto_peers(path, 2, 3, extra=["--balance-period", "2", "--placement-jitter", "2"])
    chosen = {p.ready["peer_id"]: p.ready["blocks"][0] for p in procs}  # where each one started serving
    records = [r for r in _until_covered(swarm, path, 60) if r.peer_id in chosen]
    final = {r.peer_id: r.start for r in records}
    assert sorted(final.values()) == [0, 2, 4], final  # spread out: three different starts, one per third
    moves = _moves(swarm, path, records)
    collisions = len(chosen) - len(set(chosen.values()))
    assert all(moves[p] >= 1 for p in chosen if final[p] != chosen[p]), (chosen, final, moves)
    assert sum(moves.values()) >= collisions, (chosen, final, moves)
    if collisions == 0:  # a tiled swarm does not churn: each peer alone serves its blocks
        assert sum(moves.values()) == 0, (chosen, final, moves)


def test_peers_piled_on_the_weakest_span_rebalance_when_the_swarm_needs_them(tiny_checkpoint, make_swarm):
    """Three peers of 2 blocks all choose [0, 2), the weakest window while a strong peer serves [2, 6). When
    it leaves, they rebalance: one peer on each third, each move counted by the peer that made it, and the
    weakest block's throughput rises from nothing to one peer's."""
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    strong, = swarm.add_peers(path, [(2, 6)], extra=["--throughput", "1000"])
    auto = []
    for _ in range(3):  # one after another: each sees the ones before it, and [0, 2) is still the weakest
        auto += swarm.add_auto_peers(path, 2, 1, extra=["--balance-period", "2", "--placement-jitter", "0",
                                                        "--throughput", "100"])
    ids = [p.ready["peer_id"] for p in auto]
    assert [p.ready["blocks"] for p in auto] == [[0, 2]] * 3  # piled up
    swarm.stop([strong])
    deadline = time.monotonic() + 120  # it says it is leaving; else its record expires (2.5 announce periods)
    while min(placement.block_throughputs(_records(swarm, path), 6)) > 0:  # until blocks 2-5 count as unserved
        assert time.monotonic() < deadline, "the stopped peer still counts"
        time.sleep(1)
    records = [r for r in _until_covered(swarm, path, 120) if r.peer_id in ids]
    assert sorted(r.start for r in records) == [0, 2, 4], [(r.start, r.end) for r in records]
    assert min(placement.block_throughputs(records, 6)) == 100.0  # each block: one peer's claimed throughput
    moves = _moves(swarm, path, records)
    assert all(moves[r.peer_id] >= 1 for r in records if r.start != 0), moves
    assert sum(moves.values()) >= 2, moves


def test_a_rebalancing_move_fails_no_generation(tiny_checkpoint, make_swarm):
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    same_speed = ["--throughput", "100"]  # measured speeds are noisy on a shared machine
    swarm.add_peers(path, [(3, 6)], extra=same_speed)
    mover, = swarm.add_auto_peers(path, 3, 1, extra=["--balance-period", "2", "--placement-jitter", "0", *same_speed])
    assert mover.ready["blocks"] == [0, 3]  # the uncovered half
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, step_timeout=5.0,
                                                             refresh_period=1.0)
    results, errors, stop = [], [], threading.Event()

    def keep_generating():
        seed = 0
        while not stop.is_set():
            ids = torch.randint(3, 250, (1, 5), generator=torch.Generator().manual_seed(seed))
            try:
                out = remote.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
                ref = local.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
                results.append(out.tolist() == ref.tolist())
            except BaseException as e:  # reported by the assert below
                errors.append(e)
            seed += 1

    thread = threading.Thread(target=keep_generating)
    thread.start()
    try:
        swarm.add_peers(path, [(0, 3), (0, 3)], extra=same_speed)  # now [0, 3) is crowded and [3, 6) has one peer
        deadline = time.monotonic() + 60
        mover_id = mover.ready["peer_id"]
        while (next((r.start, r.end) for r in _records(swarm, path) if r.peer_id == mover_id) != (3, 6)):
            assert time.monotonic() < deadline, "the automatic peer did not move to the weak half"
            time.sleep(1)
        count = len(results)
        while len(results) < count + 2 and not errors:  # generations after the move too
            assert time.monotonic() < deadline + 60
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(timeout=120)
        remote.swarm.shutdown()
    assert not errors, errors
    assert results and all(results), results


def test_identity_survives_a_restart(tiny_checkpoint, make_swarm, tmp_path):
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    key = str(tmp_path / "peer.key")
    first, = swarm.add_peers(path, [(0, 6)], extra=["--identity", key])
    first.stop()
    second, = swarm.add_peers(path, [(0, 6)], extra=["--identity", key])
    assert second.ready["peer_id"] == first.ready["peer_id"]
    assert (tmp_path / "peer.key").stat().st_mode & 0o777 == 0o600


def test_a_peer_reached_only_through_a_relay(tiny_checkpoint, make_swarm):
    path = tiny_checkpoint("llama")
    swarm = make_swarm(dht_args=["--relay"])
    swarm.add_peers(path, [(0, 3)])
    hidden, = swarm.add_peers(path, [(3, 6)], extra=["--no-listen"])
    assert hidden.ready["relayed"] is True
    assert all("/p2p-circuit" in m for m in hidden.ready["maddrs"])
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, route_timeout=60.0,
                                                             refresh_period=1.0)
    try:
        ids = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(3))
        out = remote.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert out.tolist() == local.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0).tolist()
        assert hidden.ready["peer_id"] in [h.peer_id for h in remote.swarm.route()]
    finally:
        remote.swarm.shutdown()
