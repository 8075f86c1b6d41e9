"""A peer's readiness line and maddr file, its announcement, and a clean SIGTERM exit."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from dht import directory
from dht.records import PeerState, derive_model_id
from peer.blocks import load_config
from swarmllm import launch


def test_ready_line_maddr_file_announcement_and_sigterm(tiny_checkpoint, make_swarm, tmp_path):
    path = tiny_checkpoint("qwen2")
    swarm = make_swarm()
    maddr_file = tmp_path / "peer.maddrs"
    peer, = swarm.add_peers(path, [(0, 6)], extra=["--maddr-file", str(maddr_file), "--model-id", "qwen-test"])
    assert peer.ready["role"] == "peer" and peer.ready["model_id"] == "qwen-test"
    assert maddr_file.read_text().split() == peer.ready["maddrs"]
    assert all(m.startswith("/ip4/127.0.0.1/") for m in peer.ready["maddrs"])
    assert derive_model_id(load_config(path).to_dict()) != "qwen-test"

    node = directory.start_node(None, swarm.initial_peers, client_mode=True)
    try:
        def states():
            return {r.peer_id: r.state for r in asyncio.run(directory.fetch_peers(node, "qwen-test"))}

        assert states() == {peer.ready["peer_id"]: PeerState.ONLINE}
        os.kill(peer.pid, signal.SIGTERM)
        peer.popen.wait(timeout=30)
        assert peer.popen.returncode == 0, peer.stderr_tail()
        deadline = time.monotonic() + 10
        while states().get(peer.ready["peer_id"]) != PeerState.OFFLINE:
            assert time.monotonic() < deadline, "the peer did not announce that it went offline"
            time.sleep(0.2)
    finally:
        node.shutdown()
