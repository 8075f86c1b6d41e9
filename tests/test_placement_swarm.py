"""Real peers choose their blocks (--num-blocks), move when the swarm needs it, keep their identity,
and can be reached through a relay."""

from __future__ import annotations

import asyncio
import threading
import time

import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from dht import directory
from dht.records import PeerState, derive_model_id
from peer.blocks import load_config
from swarmllm import launch


def _records(swarm, path):
    node = directory.start_node(None, swarm.initial_peers, client_mode=True)
    try:
        found = asyncio.run(directory.fetch_peers(node, derive_model_id(load_config(path).to_dict())))
        return [r for r in found if r.state == PeerState.ONLINE]
    finally:
        node.shutdown()


def _covered(records, num_blocks):
    return all(any(r.start <= b < r.end for r in records) for b in range(num_blocks))


def test_peers_started_one_after_another_cover_every_block(tiny_checkpoint, make_swarm):
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    for _ in range(4):
        swarm.add_auto_peers(path, 2, 1, extra=["--placement-jitter", "0"])
    spans = sorted((r.start, r.end) for r in _records(swarm, path))
    assert len(spans) == 4 and _covered(_records(swarm, path), 6), spans


def test_peers_started_together_spread_out_and_rebalance(tiny_checkpoint, make_swarm):
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    swarm.add_auto_peers(path, 2, 3, extra=["--balance-period", "2", "--placement-jitter", "2"])
    deadline = time.monotonic() + 60
    while not _covered(_records(swarm, path), 6):
        assert time.monotonic() < deadline, f"blocks still uncovered: {[(r.start, r.end) for r in _records(swarm, path)]}"
        time.sleep(1)


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
